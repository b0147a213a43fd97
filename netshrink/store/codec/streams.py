"""Byte-level helpers (varints, a bounds-checked reader) and the symbol streams of format-1 and
format-2 files (read only): small non-negative integers stored as fixed-width packed bits or as
canonical Huffman code. Each stream is self-describing bytes.

Layout (little-endian)::

    u8 kind (0 = empty/constant, 1 = packed, 2 = huffman) | varint count | body
    constant: varint symbol
    packed:   u8 bits | ceil(count * bits / 8) bytes, most significant bit first
    huffman:  varint table size L | L bytes: code length of symbol 0..L-1 (0 = unused)
              | varint bit count | the canonical Huffman bit stream

The Huffman bit loop runs in C inside ``bitarray`` (canonical decode); what is ours is only the
table layout, so that any canonical Huffman decoder reads the stream.
"""
from __future__ import annotations

import io

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

from ...errors import NetshrinkError

EMPTY, PACKED, HUFFMAN = 0, 1, 2
_CHUNK = 1 << 22  # symbols per unpacking step: bounds the temporaries
MAX_CODE_LENGTH = 31


def write_varint(out: io.BytesIO, value: int) -> None:
    value = int(value)
    while True:
        byte, value = value & 0x7F, value >> 7
        out.write(bytes([byte | (0x80 if value else 0)]))
        if not value:
            return


class Reader:
    """Bounds-checked reads from a bytes payload: truncation becomes a NetshrinkError."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise NetshrinkError("encoded tensor is truncated or corrupt")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise NetshrinkError("encoded tensor is corrupt (bad integer)")


def _canonical(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """(count per length, symbols in canonical order): the tables canonical decoders take."""
    symbols = [int(s) for s in np.lexsort((np.arange(len(lengths)), lengths)) if lengths[s] > 0]
    count = [0] * (int(lengths.max()) + 1)
    for s in symbols:
        count[lengths[s]] += 1
    return count, symbols


def decode(reader: Reader, limit: int) -> np.ndarray:
    """Decode one stream written by :func:`encode`; returns int64 symbols. ``limit`` is the most
    symbols the caller can use: a larger count is refused before anything is allocated."""
    kind = reader.u8()
    count = reader.varint()
    if count > limit:
        raise NetshrinkError(f"encoded tensor is corrupt (a stream claims {count} symbols where at most {limit} fit)")
    if kind == EMPTY:
        return np.full(count, reader.varint(), dtype=np.int64)
    if kind == PACKED:
        width = reader.u8()
        if not 1 <= width <= 32:
            raise NetshrinkError("encoded tensor is corrupt (bad bit width)")
        return _unpack(reader.take((count * width + 7) // 8), count, width)
    if kind != HUFFMAN:
        raise NetshrinkError(f"encoded tensor is corrupt (unknown stream kind {kind})")
    lengths = np.frombuffer(reader.take(reader.varint()), dtype=np.uint8).astype(np.int64)
    nbits = reader.varint()
    if count > nbits:  # every symbol takes at least one bit
        raise NetshrinkError("encoded tensor is corrupt (Huffman stream shorter than its count)")
    if not lengths.any() or lengths.max() > MAX_CODE_LENGTH or np.sum(2.0 ** -lengths[lengths > 0]) > 1:
        raise NetshrinkError("encoded tensor is corrupt (bad Huffman table)")
    stream = bitarray(endian="big")
    stream.frombytes(bytes(reader.take((nbits + 7) // 8)))
    del stream[nbits:]
    table, symbols = _canonical(lengths)
    try:
        decoded = np.fromiter(canonical_decode(stream, table, symbols), dtype=np.int64, count=count)
    except (ValueError, StopIteration) as exc:
        raise NetshrinkError(f"encoded tensor is corrupt (Huffman stream: {exc})") from None
    return decoded


def _unpack(data: memoryview, count: int, width: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * width // 8  # bytes per chunk of _CHUNK symbols
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        bits = np.unpackbits(raw[i * step:i * step + (n * width + 7) // 8], count=n * width)
        out[start:start + n] = bits.reshape(n, width).astype(np.int64) @ weights
    return out
