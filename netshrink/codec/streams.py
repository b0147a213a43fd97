"""Symbol streams: a sequence of small non-negative integers stored as fixed-width packed bits or
as canonical Huffman code, whichever is smaller. Each stream is self-describing bytes.

Layout (little-endian)::

    u8 kind (0 = empty/constant, 1 = packed, 2 = huffman) | varint count | body
    constant: varint symbol
    packed:   u8 bits | ceil(count * bits / 8) bytes, most significant bit first
    huffman:  varint table size L | L bytes: code length of symbol 0..L-1 (0 = unused)
              | varint bit count | the canonical Huffman bit stream

The Huffman bit loop runs in C inside ``bitarray`` (encode with a code table, canonical decode);
what is ours is only the table layout, so that any canonical Huffman decoder reads the stream.
"""
from __future__ import annotations

import io

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

from ..errors import NetshrinkError

EMPTY, PACKED, HUFFMAN = 0, 1, 2
_CHUNK = 1 << 22  # symbols per encode call: bounds the temporary Python list
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


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (Huffman) code length per symbol from symbol counts (0 for absent symbols).

    Moffat and Katajainen's in-place algorithm ("In-place calculation of minimum-redundancy codes",
    1995): after one sort it runs in linear time with no heap and no per-node lists, so alphabets
    of tens of thousands of symbols (codebook indices of 8-bit weights) take milliseconds. Written
    here because no maintained Python package exposes code lengths for a given histogram.
    """
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(present) == 1:
        lengths[present] = 1
    if len(present) <= 1:
        return lengths
    order = present[np.argsort(counts[present], kind="stable")]  # ascending weight
    a = [int(c) for c in counts[order]]
    n = len(a)
    # Phase 1: build the tree in place; a[i] becomes the parent pointer of internal node i.
    a[0] += a[1]
    root, leaf = 0, 2
    for nxt in range(1, n - 1):
        if leaf >= n or a[root] < a[leaf]:
            a[nxt] = a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] = a[leaf]
            leaf += 1
        if leaf >= n or (root < nxt and a[root] < a[leaf]):
            a[nxt] += a[root]
            a[root] = nxt
            root += 1
        else:
            a[nxt] += a[leaf]
            leaf += 1
    # Phase 2: depths of the internal nodes.
    a[n - 2] = 0
    for nxt in range(n - 3, -1, -1):
        a[nxt] = a[a[nxt]] + 1
    # Phase 3: leaf depths, deepest for the lightest symbols.
    available, used, depth, root, nxt = 1, 0, 0, n - 2, n - 1
    while available > 0:
        while root >= 0 and a[root] == depth:
            used += 1
            root -= 1
        while available > used:
            a[nxt] = depth
            nxt -= 1
            available -= 1
        available, depth, used = 2 * used, depth + 1, 0
    lengths[order] = a
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """(count per length, symbols in canonical order): the tables canonical decoders take."""
    symbols = [int(s) for s in np.lexsort((np.arange(len(lengths)), lengths)) if lengths[s] > 0]
    count = [0] * (int(lengths.max()) + 1)
    for s in symbols:
        count[lengths[s]] += 1
    return count, symbols


def _codes(lengths: np.ndarray) -> dict[int, bitarray]:
    count, symbols = _canonical(lengths)
    codes, code, length = {}, 0, 0
    for s in symbols:
        while length < lengths[s]:
            code <<= 1
            length += 1
        codes[s] = bitarray(format(code, f"0{length}b"))
        code += 1
    return codes


def huffman_bits(counts: np.ndarray) -> int:
    """Size in bits of the Huffman-coded stream (table excluded)."""
    return int((huffman_lengths(counts) * counts).sum())


def encode(symbols: np.ndarray) -> bytes:
    """Encode non-negative integers as the smaller of packed bits and canonical Huffman."""
    symbols = np.asarray(symbols).ravel()
    out = io.BytesIO()
    if symbols.size and symbols.min() < 0:
        raise NetshrinkError("symbol streams hold non-negative integers only")
    if symbols.size == 0 or symbols.min() == symbols.max():
        out.write(bytes([EMPTY]))
        write_varint(out, symbols.size)
        write_varint(out, int(symbols[0]) if symbols.size else 0)
        return out.getvalue()
    counts = np.bincount(symbols)
    width = int(symbols.max()).bit_length()
    lengths = huffman_lengths(counts)
    huffman_size = (int((lengths * counts).sum()) + 7) // 8 + len(counts) + 8
    if int(lengths.max()) > MAX_CODE_LENGTH or huffman_size >= (symbols.size * width + 7) // 8 + 1:
        out.write(bytes([PACKED]))
        write_varint(out, symbols.size)
        out.write(bytes([width]))
        out.write(_pack(symbols, width))
        return out.getvalue()
    out.write(bytes([HUFFMAN]))
    write_varint(out, symbols.size)
    write_varint(out, len(lengths))
    out.write(lengths.astype(np.uint8).tobytes())
    codes = _codes(lengths)
    stream = bitarray(endian="big")
    for start in range(0, symbols.size, _CHUNK):
        stream.encode(codes, symbols[start:start + _CHUNK].tolist())
    write_varint(out, len(stream))
    out.write(stream.tobytes())
    return out.getvalue()


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


def _pack(symbols: np.ndarray, width: int) -> bytes:
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    out = bytearray()
    for start in range(0, symbols.size, _CHUNK):  # _CHUNK symbols end on a byte boundary
        chunk = symbols[start:start + _CHUNK].astype(np.uint64)
        bits = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        out += np.packbits(bits.ravel()).tobytes()
    return bytes(out)


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
