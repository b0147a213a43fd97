"""How one float tensor is stored: the smallest exact encoding among

* ``raw``: float32 bytes.
* ``dense``: a codebook of the distinct values + one symbol stream of codebook indices.
* ``sparse``: positions of the non-zeros as relative gaps + their values.

Values (all of them, or the non-zeros) are stored as raw floats, as indices into a codebook of
distinct values (shared weights), or as a ``grid``: one float scale per row (output channel) and
small integer codes with value = code * scale, bit-exact, which is what per-channel quantization
produces (a tensor-wide codebook would need one entry per channel and level).

Sparse positions improve on Deep Compression's scheme: there, a gap longer than 2^g inserts a
"filler zero" that costs an index in the value stream too. Here the gap alphabet has one extra
symbol, ``M = 2^g``, meaning "skip M zeros, no value", so fillers cost only their gap symbol, and
``g`` is chosen per tensor to minimise the coded size. Gaps and indices are each entropy coded.

Every encoding is exact: decode(encode(x)) is bit-identical to x (float32).
"""
from __future__ import annotations

import io
import math

import numpy as np

from ..errors import NetshrinkError
from . import streams
from .streams import Reader, write_varint

RAW, DENSE, SPARSE = 0, 1, 2
NAMES = {RAW: "raw", DENSE: "dense", SPARSE: "sparse"}
MAX_CODEBOOK = 1 << 16  # beyond this a codebook rarely beats raw floats
VALUES_RAW, VALUES_CODEBOOK, VALUES_GRID = 0, 1, 2
MAX_GRID_CODE = 1 << 15


def encode(array: np.ndarray) -> bytes:
    """Encode a float32 array (any shape; the shape is stored by the caller). Rows for the grid
    encoding are the first dimension (output channels of Linear/Conv weights)."""
    array = np.asarray(array, dtype=np.float32)
    row_length = int(np.prod(array.shape[1:])) if array.ndim > 1 else max(1, array.size)
    flat = np.ascontiguousarray(array).ravel()
    # Compare bit patterns, not float values: -0.0 and NaN payloads must survive exactly.
    bits = flat.view(np.uint32)
    candidates = [bytes([RAW]) + flat.tobytes()]
    if flat.size:  # every value stored: as a codebook (few distinct values) or a per-row grid
        distinct = distinct_within(bits, MAX_CODEBOOK)
        candidates.append(bytes([DENSE]) + _encode_values(bits, row_length, distinct))
    nonzero = np.flatnonzero(bits)  # +0.0 is the all-zero bit pattern
    if flat.size and len(nonzero) < 0.5 * flat.size:
        candidates.append(bytes([SPARSE]) + _encode_sparse(bits, nonzero, row_length))
    return min(candidates, key=len)


def decode(data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a float32 array of ``shape`` from bytes written by :func:`encode`."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    row_length = int(np.prod(shape[1:])) if len(shape) > 1 else max(1, size)
    reader = Reader(data)
    kind = reader.u8()
    if kind == RAW:
        out = np.frombuffer(reader.take(4 * size), dtype=np.float32).copy()
    elif kind == DENSE:
        out = _decode_values(reader, np.arange(size) // row_length)
    elif kind == SPARSE:
        out = _decode_sparse(reader, size, row_length)
    else:
        raise NetshrinkError(f"encoded tensor is corrupt (unknown encoding {kind})")
    if reader.pos != len(reader.data):
        raise NetshrinkError("encoded tensor is corrupt (trailing bytes)")
    return out.reshape(shape)


def distinct_within(bits: np.ndarray, limit: int) -> np.ndarray | None:
    """The sorted distinct values, or None when there are more than ``limit``. A strided sample is
    counted first: when it alone exceeds the limit, so does the whole (dense float weights are
    rejected without sorting millions of values)."""
    if bits.size > 8 * limit:
        sample = bits[:: bits.size // (4 * limit)]
        if len(np.unique(sample)) > limit:
            return None
    distinct = np.unique(bits)
    return distinct if len(distinct) <= limit else None


def encoding_name(data: bytes) -> str:
    return NAMES.get(data[0], "?") if data else "?"


def _encode_values(bits: np.ndarray, rows: np.ndarray | int, distinct: np.ndarray | None) -> bytes:
    """Values (float32 bit patterns; ``rows`` their row numbers, ascending, or the length of every
    row of a dense tensor: see :func:`grid`) as the smallest of raw
    floats, a codebook plus index stream (``distinct``: the sorted distinct values, None when
    there are too many for a codebook), and a per-row grid."""
    candidates = [bytes([VALUES_RAW]) + bits.astype("<u4").tobytes()]
    if distinct is not None and len(distinct) > 0:
        out = io.BytesIO()
        out.write(bytes([VALUES_CODEBOOK]))
        write_varint(out, len(distinct))
        out.write(distinct.astype("<u4").tobytes())
        out.write(streams.encode(np.searchsorted(distinct, bits)))
        candidates.append(out.getvalue())
    found = grid(bits, rows)
    if found is not None:
        scales, codes = found
        out = io.BytesIO()
        out.write(bytes([VALUES_GRID]))
        write_varint(out, len(scales))
        out.write(scales.astype("<f4").tobytes())
        out.write(streams.encode(np.where(codes >= 0, 2 * codes, -2 * codes - 1)))  # zigzag
        candidates.append(out.getvalue())
    return min(candidates, key=len)


# Candidate scales per row: the row's largest |value| over each symmetric qmax (2^(b-1) - 1, where
# per-channel quantization puts the largest weight exactly), then its smallest |value| over small
# integers (affine grids, shared grids). Every candidate is verified bit for bit.
_FROM_MAX = (1, 3, 7, 15, 31, 63, 127)
_FROM_MIN = (1, 2, 3, 4)
_SAMPLE_ROWS = 32


def grid(bits: np.ndarray, rows: np.ndarray | int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-row scale s and integer codes k with float32(k * s) == value bit for bit, for values
    given as float32 bit patterns with their (ascending) row numbers, or with ``rows`` an int:
    every row holds that many values (a dense tensor); None when no candidate scale fits every row."""
    if bits.size == 0:
        return None
    if isinstance(rows, (int, np.integer)):
        return _dense_grid(bits.reshape(-1, int(rows)))
    values = bits.view(np.float32)
    if not np.isfinite(values).all():
        return None
    sample_end = np.searchsorted(rows, rows[0] + _SAMPLE_ROWS)
    if sample_end < len(rows) and grid(bits[:sample_end], rows[:sample_end]) is None:
        return None  # a grid holds on every row: a few rows reject most tensors cheaply
    row_count = int(rows[-1]) + 1
    magnitude = np.abs(values)
    largest = np.zeros(row_count, dtype=np.float32)
    smallest = np.full(row_count, np.inf, dtype=np.float32)
    _row_reduce(np.maximum, largest, rows, magnitude)
    _row_reduce(np.minimum, smallest, rows, np.where(values != 0, magnitude, np.inf))
    scales = np.ones(row_count, dtype=np.float32)
    # Rows arrive in ascending order, so per-row answers come from reductions over row starts
    # (no np.unique / np.isin over the whole tensor: those dominated encoding time).
    unresolved = np.zeros(row_count, dtype=bool)
    unresolved[rows] = True
    candidates = [(largest, k) for k in _FROM_MAX] + [(smallest, k) for k in _FROM_MIN]
    for reference, k in candidates:
        trial = (reference.astype(np.float64) / k).astype(np.float32)
        trial[~(trial > 0) | ~np.isfinite(trial)] = 1.0
        selected = unresolved[rows]
        v, r, b = (values, rows, bits) if selected.all() else (values[selected], rows[selected], bits[selected])
        with np.errstate(over="ignore", invalid="ignore"):  # huge ratios simply fail the check
            codes = np.rint(v / trial[r])
            product = codes.astype(np.float32) * trial[r]
        # Bit patterns, not float equality: -0.0 == 0.0 but would not survive the round trip.
        # Integer codes have no -0, so a -0.0 value is off every grid.
        exact = (np.abs(codes) <= MAX_GRID_CODE) & (product.view(np.uint32) == b) & ((codes != 0) | (b == 0))
        starts = np.flatnonzero(np.diff(r, prepend=-1))
        good = r[starts][np.logical_and.reduceat(exact, starts)]
        scales[good] = trial[good]
        unresolved[good] = False
        if not unresolved.any():
            codes = np.rint(values / scales[rows]).astype(np.int64)
            return scales, codes
    return None


def _dense_grid(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`grid` for a dense [rows, length] matrix of bit patterns: the same candidates and the
    same bit-exact test, with reductions along an axis instead of over row-number arrays."""
    values = bits.view(np.float32)
    if not np.isfinite(values).all():
        return None
    if len(bits) > _SAMPLE_ROWS and _dense_grid(bits[:_SAMPLE_ROWS]) is None:
        return None  # a grid holds on every row: a few rows reject most tensors cheaply
    magnitude = np.abs(values)
    largest = magnitude.max(axis=1)
    smallest = np.where(values != 0, magnitude, np.inf).min(axis=1)
    scales = np.ones(len(bits), dtype=np.float32)
    unresolved = np.arange(len(bits))
    for reference, k in [(largest, k) for k in _FROM_MAX] + [(smallest, k) for k in _FROM_MIN]:
        trial = (reference.astype(np.float64) / k).astype(np.float32)
        trial[~(trial > 0) | ~np.isfinite(trial)] = 1.0
        whole = len(unresolved) == len(bits)
        v, b, t = (values, bits, trial) if whole else (values[unresolved], bits[unresolved], trial[unresolved])
        with np.errstate(over="ignore", invalid="ignore"):
            codes = np.rint(v / t[:, None])
            product = codes.astype(np.float32) * t[:, None]
        exact = ((np.abs(codes) <= MAX_GRID_CODE) & (product.view(np.uint32) == b) & ((codes != 0) | (b == 0))).all(axis=1)
        scales[unresolved[exact]] = t[exact]
        unresolved = unresolved[~exact]
        if unresolved.size == 0:
            return scales, np.rint(values / scales[:, None]).astype(np.int64).ravel()
    return None


def _row_reduce(ufunc, out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """Row-wise reduction for rows given in ascending order (reduceat: much faster than ufunc.at)."""
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    out[rows[starts]] = ufunc.reduceat(values, starts)


def _decode_values(reader: Reader, rows: np.ndarray) -> np.ndarray:
    size = len(rows)
    kind = reader.u8()
    if kind == VALUES_RAW:
        return np.frombuffer(reader.take(4 * size), dtype="<u4").view(np.float32).copy()
    if kind == VALUES_CODEBOOK:
        k = reader.varint()
        codebook = np.frombuffer(reader.take(4 * k), dtype="<u4")
        indices = streams.decode(reader, size)
        if len(indices) != size or (size and (indices.min() < 0 or indices.max() >= k)):
            raise NetshrinkError("encoded tensor is corrupt (bad codebook indices)")
        return codebook[indices].view(np.float32)
    if kind == VALUES_GRID:
        scales = np.frombuffer(reader.take(4 * reader.varint()), dtype="<f4")
        zigzag = streams.decode(reader, size)
        if len(zigzag) != size or (size and rows[-1] >= len(scales)):
            raise NetshrinkError("encoded tensor is corrupt (bad grid)")
        codes = np.where(zigzag % 2 == 0, zigzag // 2, -(zigzag + 1) // 2)
        return codes.astype(np.float32) * scales[rows]
    raise NetshrinkError("encoded tensor is corrupt (unknown value kind)")


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


def _encode_sparse(bits: np.ndarray, nonzero: np.ndarray, row_length: int) -> bytes:
    out = io.BytesIO()
    skips = np.diff(nonzero, prepend=-1) - 1
    log_span = _best_log_span(skips) if len(skips) else 0
    out.write(bytes([log_span]))
    out.write(streams.encode(gap_symbols(skips, log_span)))
    values = bits[nonzero]
    out.write(_encode_values(values, nonzero // row_length, distinct_within(values, MAX_CODEBOOK)))
    return out.getvalue()


def _decode_sparse(reader: Reader, size: int, row_length: int) -> np.ndarray:
    log_span = reader.u8()
    if log_span > 40:
        raise NetshrinkError("encoded tensor is corrupt (bad gap width)")
    span = 1 << log_span
    symbols = streams.decode(reader, size)  # each gap symbol covers at least one position
    if len(symbols) and (symbols.min() < 0 or symbols.max() > span):
        raise NetshrinkError("encoded tensor is corrupt (bad gap symbol)")
    is_value = symbols != span
    positions = (np.cumsum(np.where(is_value, symbols + 1, span)) - 1)[is_value]
    if len(positions) and positions[-1] >= size:
        raise NetshrinkError("encoded tensor is corrupt (positions out of range)")
    values = _decode_values(reader, positions // row_length)
    if len(values) != len(positions):
        raise NetshrinkError("encoded tensor is corrupt (positions out of range)")
    out = np.zeros(size, dtype=np.float32)
    out[positions] = values
    return out
