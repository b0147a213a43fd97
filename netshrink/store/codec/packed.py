"""Fast coding of symbol streams and significance maps: symbols packed into bytes, the bytes
compressed by zstd. Used for large tensors whose symbols have little context structure (most
weights of large layers), where it is within a few percent of the context-adaptive coder
(``codec.lines``) and decodes an order of magnitude faster.

Why it is close: zstd's literal coder is Huffman coding over bytes, with tables fitted to every
block of up to 128 KiB. Packing as many symbols per byte as fit (a byte holds 2 symbols of a 4-bit
grid, 5 of a ternary one, 8 map bits) makes each byte a joint symbol, which removes most of
Huffman's rounding loss on small alphabets. zstd (C, maintained, a netshrink dependency) does
all per-symbol work; what is ours is the packing, a few vectorised numpy operations.

Stream layout: ``varint byte count | zstd frame`` (the frame stores its content size; decoding
refuses any other size, so a corrupt count cannot allocate more than the tensor needs).
A map is ``u8 form`` then one stream: 0 a bitmap (``np.packbits``), 1 gaps: the zeros before each
non-zero as bytes, 255 meaning "255 zeros and continue" (better when non-zeros are rare).
"""
from __future__ import annotations

import io

import numpy as np

from ...errors import NetshrinkError
from .streams import Reader, write_varint

LEVEL = 1  # zstd's entropy stage does the work; higher levels spend time on matches weights lack
BITMAP, GAPS = 0, 1
_RUN = 255  # a gap byte meaning "255 zeros, the gap continues"
GAPS_BELOW = 0.2  # gaps are tried below this density (a byte per kept value: denser maps lose)
RAW_SHARE = 0.98  # a frame at least this share of its input was (nearly) stored raw: try one symbol per byte


def _zstd():
    try:
        import zstandard
    except ImportError:  # a dependency: only a broken install lacks it
        raise NetshrinkError("netshrink files need the 'zstandard' package: pip install zstandard") from None
    return zstandard


def _frame(data: bytes) -> bytes:
    return _zstd().ZstdCompressor(level=LEVEL).compress(data)


def _put_frame(out: io.BytesIO, frame: bytes) -> None:
    write_varint(out, len(frame))
    out.write(frame)


def _write_frame(out: io.BytesIO, data: bytes) -> None:
    _put_frame(out, _frame(data))


def _read_frame(reader: Reader, size: int) -> np.ndarray:
    frame = reader.take(reader.varint())
    try:
        data = _zstd().ZstdDecompressor().decompress(frame, max_output_size=size)
    except Exception as error:  # zstd's own error type for a corrupt frame
        raise NetshrinkError(f"encoded tensor is corrupt ({error})") from None
    if len(data) != size:
        raise NetshrinkError("encoded tensor is corrupt (packed stream size)")
    return np.frombuffer(data, dtype=np.uint8)


def per_byte(alphabet: int) -> int:
    """How many symbols of ``alphabet`` (<= 256) one byte holds."""
    count, alphabet = 1, max(alphabet, 2)
    while alphabet ** (count + 1) <= 256:
        count += 1
    return count


def write_symbols(out: io.BytesIO, symbols: np.ndarray, alphabet: int, spread: bool | None = None) -> bool:
    """Symbols (each < ``alphabet``): below 257 symbols, packed as many per byte as fit (mixed
    radix, the first symbol in the lowest place), or one per byte when ``spread``; larger
    alphabets as a low-byte plane and a plane of the rest, each so. Returns ``spread``, decided
    here when None: zstd stores a block raw when Huffman coding it saves too little, and packed
    near-uniform symbols (a 4-bit grid over uniform weights: 3.88 bits of entropy in 4) fall under
    that bar; one per byte, the same symbols save half the bytes and are Huffman-coded (within
    1% of the context coder in that case)."""
    if alphabet > 256:
        write_symbols(out, symbols & 0xFF, 256)
        return write_symbols(out, symbols >> 8, -(-alphabet // 256), spread)
    count = per_byte(alphabet)
    if count == 1 or spread:
        _write_frame(out, symbols.astype(np.uint8).tobytes())
        return bool(spread)
    padded = np.zeros(-(-symbols.size // count) * count, dtype=np.uint16)
    padded[:symbols.size] = symbols
    places = (max(alphabet, 2) ** np.arange(count)).astype(np.uint16)
    packed = (padded.reshape(-1, count) * places).sum(axis=1, dtype=np.uint16).astype(np.uint8).tobytes()
    frame = _frame(packed)
    if spread is None and len(frame) >= RAW_SHARE * len(packed):
        alone = _frame(symbols.astype(np.uint8).tobytes())
        if len(alone) < len(frame):
            _put_frame(out, alone)
            return True
    _put_frame(out, frame)
    return False


def read_symbols(reader: Reader, size: int, alphabet: int, spread: bool = False) -> np.ndarray:
    """Inverse of :func:`write_symbols`: ``size`` symbols (uint8 below 257 symbols, else int32)."""
    if alphabet > 256:
        low = read_symbols(reader, size, 256).astype(np.int32)
        return low | read_symbols(reader, size, -(-alphabet // 256), spread).astype(np.int32) << 8
    count, base = 1 if spread else per_byte(alphabet), max(alphabet, 2)
    packed = _read_frame(reader, -(-size // count))
    if count == 1:
        symbols = packed
    else:
        if packed.size and int(packed.max()) >= base ** count:
            raise NetshrinkError("encoded tensor is corrupt (packed symbol out of range)")
        digits = (np.arange(256)[:, None] // base ** np.arange(count)) % base  # each byte's symbols
        symbols = digits.astype(np.uint8)[packed].ravel()[:size]
    if symbols.size and int(symbols.max()) >= alphabet:
        raise NetshrinkError("encoded tensor is corrupt (symbol outside its alphabet)")
    return symbols


def write_map(out: io.BytesIO, nonzero: np.ndarray, positions: np.ndarray) -> None:
    """Which of the values are non-zero (a bool array, and ``positions``: its non-zero indices) as
    a bitmap or as gaps, whichever is smaller."""
    forms = [(BITMAP, np.packbits(nonzero))]
    if positions.size < GAPS_BELOW * nonzero.size:
        gaps = np.diff(positions, prepend=-1) - 1
        runs = gaps // _RUN
        gap_bytes = np.full(int(runs.sum()) + gaps.size, _RUN, dtype=np.uint8)
        gap_bytes[np.cumsum(runs + 1) - 1] = gaps % _RUN  # each gap ends on its remainder
        forms.append((GAPS, gap_bytes))
    options = []
    for form, data in forms:
        stream = io.BytesIO()
        stream.write(bytes([form]))
        write_varint(stream, data.size)
        _write_frame(stream, data.tobytes())
        options.append(stream.getvalue())
    out.write(min(options, key=len))


def read_map(reader: Reader, size: int) -> np.ndarray:
    """Inverse of :func:`write_map`: the positions of the non-zero values, ascending (int64)."""
    form, count = reader.u8(), reader.varint()
    if form == BITMAP:
        if count != -(-size // 8):
            raise NetshrinkError("encoded tensor is corrupt (map size)")
        return np.flatnonzero(np.unpackbits(_read_frame(reader, count), count=size))
    if form != GAPS or count > size:  # a gap byte is at least one position
        raise NetshrinkError("encoded tensor is corrupt (map form)")
    data = _read_frame(reader, count)
    if data.size and data[-1] == _RUN:
        raise NetshrinkError("encoded tensor is corrupt (unfinished gap)")
    ends = np.flatnonzero(data != _RUN)
    runs = np.diff(ends, prepend=-1) - 1  # 255-bytes before each remainder
    positions = np.cumsum(runs * _RUN + data[ends].astype(np.int64) + 1) - 1
    if positions.size and positions[-1] >= size:
        raise NetshrinkError("encoded tensor is corrupt (map beyond the tensor)")
    return positions
