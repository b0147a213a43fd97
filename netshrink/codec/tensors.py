"""How one float tensor is stored: the smallest exact encoding among

* ``raw``: float32 bytes.
* ``dense``: a codebook of the distinct values + one symbol stream of codebook indices.
* ``sparse``: positions of the non-zeros as relative gaps + their values (codebook indices or raw).

Sparse positions improve on Deep Compression's scheme: there, a gap longer than 2^g inserts a
"filler zero" that costs an index in the value stream too. Here the gap alphabet has one extra
symbol, ``M = 2^g``, meaning "skip M zeros, no value", so fillers cost only their gap symbol, and
``g`` is chosen per tensor to minimise the coded size. Gaps and indices are each entropy coded.

Every encoding is exact: decode(encode(x)) is bit-identical to x (float32).
"""
from __future__ import annotations

import io

import numpy as np

from ..errors import NetshrinkError
from . import streams
from .streams import Reader, write_varint

RAW, DENSE, SPARSE = 0, 1, 2
NAMES = {RAW: "raw", DENSE: "dense", SPARSE: "sparse"}
MAX_CODEBOOK = 1 << 16  # beyond this a codebook rarely beats raw floats
VALUES_RAW, VALUES_CODEBOOK = 0, 1


def encode(array: np.ndarray) -> bytes:
    """Encode a float32 array (any shape; the shape is stored by the caller)."""
    flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
    # Compare bit patterns, not float values: -0.0 and NaN payloads must survive exactly.
    bits = flat.view(np.uint32)
    candidates = [bytes([RAW]) + flat.tobytes()]
    distinct = np.unique(bits) if flat.size else bits
    if flat.size and len(distinct) <= MAX_CODEBOOK:
        candidates.append(bytes([DENSE]) + _encode_values(bits, distinct))
    nonzero = np.flatnonzero(bits)  # +0.0 is the all-zero bit pattern
    if flat.size and len(nonzero) < 0.5 * flat.size:
        candidates.append(bytes([SPARSE]) + _encode_sparse(bits, nonzero))
    return min(candidates, key=len)


def decode(data: bytes | memoryview, size: int) -> np.ndarray:
    """Decode ``size`` float32 values from bytes written by :func:`encode`."""
    reader = Reader(data)
    kind = reader.u8()
    if kind == RAW:
        out = np.frombuffer(reader.take(4 * size), dtype=np.float32).copy()
    elif kind == DENSE:
        out = _decode_values(reader, size)
    elif kind == SPARSE:
        out = _decode_sparse(reader, size)
    else:
        raise NetshrinkError(f"encoded tensor is corrupt (unknown encoding {kind})")
    if reader.pos != len(reader.data):
        raise NetshrinkError("encoded tensor is corrupt (trailing bytes)")
    return out


def encoding_name(data: bytes) -> str:
    return NAMES.get(data[0], "?") if data else "?"


def _encode_values(bits: np.ndarray, distinct: np.ndarray | None = None) -> bytes:
    """Values as a codebook plus an index stream, or as raw floats if that is smaller."""
    out = io.BytesIO()
    distinct = np.unique(bits) if distinct is None else distinct
    raw_size = 4 * bits.size
    if len(distinct) <= MAX_CODEBOOK:
        indices = np.searchsorted(distinct, bits)
        coded = streams.encode(indices)
        if 4 * len(distinct) + len(coded) < raw_size:
            out.write(bytes([VALUES_CODEBOOK]))
            write_varint(out, len(distinct))
            out.write(distinct.astype("<u4").tobytes())
            out.write(coded)
            return out.getvalue()
    out.write(bytes([VALUES_RAW]))
    out.write(bits.astype("<u4").tobytes())
    return out.getvalue()


def _decode_values(reader: Reader, size: int) -> np.ndarray:
    kind = reader.u8()
    if kind == VALUES_RAW:
        return np.frombuffer(reader.take(4 * size), dtype="<u4").view(np.float32).copy()
    if kind != VALUES_CODEBOOK:
        raise NetshrinkError("encoded tensor is corrupt (unknown value kind)")
    k = reader.varint()
    codebook = np.frombuffer(reader.take(4 * k), dtype="<u4")
    indices = streams.decode(reader)
    if len(indices) != size or (size and (indices.min() < 0 or indices.max() >= k)):
        raise NetshrinkError("encoded tensor is corrupt (bad codebook indices)")
    return codebook[indices].view(np.float32)


def gap_symbols(skips: np.ndarray, log_span: int) -> np.ndarray:
    """Zeros skipped before each non-zero -> gap symbols: ``s // M`` escapes (symbol M, "skip M
    zeros") then ``s % M``, with M = 2^log_span."""
    span = 1 << log_span
    escapes = skips >> log_span
    per_entry = escapes + 1
    symbols = np.full(int(per_entry.sum()), span, dtype=np.int64)
    symbols[np.cumsum(per_entry) - 1] = skips & (span - 1)
    return symbols


def _best_log_span(skips: np.ndarray) -> int:
    """The gap width whose Huffman-coded stream is smallest (a histogram per candidate: cheap)."""
    histogram = np.bincount(skips)
    values = np.arange(len(histogram))
    best, best_bits = 0, None
    for log_span in range(0, max(1, int(skips.max()).bit_length()) + 1):
        span = 1 << log_span
        counts = np.bincount(values & (span - 1), weights=histogram, minlength=span + 1)
        counts[span] += int(((values >> log_span) * histogram).sum())
        counts = counts.astype(np.int64)
        cost = streams.huffman_bits(counts) + 8 * (span + 1)  # stream + its table
        if best_bits is None or cost < best_bits:
            best, best_bits = log_span, cost
    return best


def _encode_sparse(bits: np.ndarray, nonzero: np.ndarray) -> bytes:
    out = io.BytesIO()
    skips = np.diff(nonzero, prepend=-1) - 1
    log_span = _best_log_span(skips) if len(skips) else 0
    out.write(bytes([log_span]))
    out.write(streams.encode(gap_symbols(skips, log_span)))
    out.write(_encode_values(bits[nonzero]))
    return out.getvalue()


def _decode_sparse(reader: Reader, size: int) -> np.ndarray:
    log_span = reader.u8()
    if log_span > 40:
        raise NetshrinkError("encoded tensor is corrupt (bad gap width)")
    span = 1 << log_span
    symbols = streams.decode(reader)
    if len(symbols) and (symbols.min() < 0 or symbols.max() > span):
        raise NetshrinkError("encoded tensor is corrupt (bad gap symbol)")
    is_value = symbols != span
    positions = (np.cumsum(np.where(is_value, symbols + 1, span)) - 1)[is_value]
    values = _decode_values(reader, len(positions))
    if len(positions) and (positions[-1] >= size or len(values) != len(positions)):
        raise NetshrinkError("encoded tensor is corrupt (positions out of range)")
    out = np.zeros(size, dtype=np.float32)
    out[positions] = values
    return out
