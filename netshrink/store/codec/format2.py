"""Reading tensors of format-1 and format-2 files (netshrink 0.1-0.3); new files use
``codec.weights``. Each tensor was stored as the smallest exact encoding among

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

import math

import numpy as np

from ...errors import NetshrinkError
from . import streams
from .streams import Reader

RAW, DENSE, SPARSE = 0, 1, 2
NAMES = {RAW: "raw", DENSE: "dense", SPARSE: "sparse"}
VALUES_RAW, VALUES_CODEBOOK, VALUES_GRID = 0, 1, 2


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


def encoding_name(data: bytes) -> str:
    return NAMES.get(data[0], "?") if data else "?"


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
