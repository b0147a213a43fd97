"""How one float32 tensor is stored (file formats 3 to 6). Exact: decode(encode(x)) is x bit for bit.

A tensor is seen as a matrix (rows: output channels, the first dimension) and its values as
integer symbols of one of three kinds:

* ``grid``: per-row scale s and integer codes k with float32(k * s) == value (what per-channel
  quantization produces, at any bit width; grouped grids reach the file as their codes);
* ``codebook``: indices into the sorted distinct values (weight sharing, or few values);
* ``float``: any values; the sign and exponent (9 bits) are the coded symbol, the 23 mantissa bits
  are stored as they are (they are close to uniform: coding cannot shrink them).

Where many values are zero (pruning, at any density), a **significance map** says which are
not, and only those carry a value symbol. The map and the symbols are coded line by line with
context-adaptive arithmetic coding (``codec.lines``): a map bit's context is whether the two
previous lines are non-zero at the same offset; a symbol's context (when the encoder estimates
it pays) is the class of the previous line's value there (zero; negative or positive, small or
large) and, with a map, whether the next line is non-zero there (the map is decoded first).
Lines run along rows or along columns, whichever the encoder estimates is smaller (for a
fully-connected layer on images, columns are input pixels: neighbours).

Format 4 and later can **pack** a tensor instead (``codec.packed``: symbols several to a byte, zstd's
Huffman coding over them; the map as a bitmap or as gaps): it decodes about ten times faster, and
large layers rarely have the neighbour structure contexts exploit. Packing is chosen when it is
smaller (on a sample, for large tensors), or for tensors above 4 MiB when it is at most
``PACKED_MARGIN`` larger.

Format 6 stores a grid whose rows share one scale (rate-aware training's codes, per-tensor
quantization) with that scale once, not once per row.

Format 5 codes a tensor of more than ``BAND`` values (a million) as **bands** of whole rows, each
a tensor of its own, so coding and decoding hold one band's work at a time.

Layout::

    u8 kind                                   0 constant, 1 float, 2 grid, 3 codebook, 4 raw, 5 bands
    constant: u32 value                       (also the empty tensor)
    raw: u32 per value                        (when coding would not be smaller)
    bands (format 5; tensors above ``BAND`` values): varint rows per band (the last band may have
                                              fewer), then per band: varint byte count | the band
                                              coded as a tensor of its own (any kind but bands)
    otherwise:
    u8 flags                                  bit 0: lines along columns; bit 1: significance map;
                                              bit 2: value contexts; bit 3: packed; bit 4 (format 5):
                                              packed symbols one per byte (``codec.packed``); bit 5
                                              (format 6): a grid whose rows share one scale, stored once
    varint rows (or columns) per line | varint alphabet
    float: u8 lowest exponent present
    grid: varint row count (1 with one scale), codebook: varint entry count; then u8 lowest exponent, varint alphabet
                                              of those floats (coded first, like ``float``)
    varint words | words: the range coder's output (u32, little-endian); packed: of the scales or
                                              entries only
    mantissas of the scales or codebook entries: 3 bytes each, little-endian
    packed: the map (when flagged), then the value symbols (``codec.packed`` streams)
    float: mantissas of the coded values, 3 bytes each
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np

from ...errors import NetshrinkError
from ...grids import distinct_within, grid, on_step
from .packed import read_map, read_symbols, write_map, write_symbols
from .lines import MAX_ALPHABET, Models, decode_lines, encode_lines, range_decoder, range_encoder
from .streams import Reader, write_varint

CONSTANT, FLOAT, GRID, CODEBOOK, RAW, BANDS = 0, 1, 2, 3, 4, 5
NAMES = {CONSTANT: "constant", FLOAT: "float", GRID: "grid", CODEBOOK: "codebook", RAW: "raw"}
# Tensors above BAND values (4 MiB of float32) are coded as bands of whole rows of about that
# many values, each on its own (own kind, grid, codebook, models): coding and decoding then hold
# one band's work, whatever the tensor's size. Adaptive models restart per band, which costs a few
# hundred bytes in a band's megabytes.
BAND = 1 << 20
COLUMNS, MAP, VALUE_CONTEXT, PACKED, SPREAD, ONE_SCALE = 1, 2, 4, 8, 16, 32
VALUE_CLASSES = 5  # see _sign_table
SMALL = 1 << 16  # tensors this small are coded every way that applies, the smallest kept
# Packed coding (codec.packed) decodes about ten times faster than the context coder. Tensors of up
# to SAMPLE values are coded both ways, the smaller kept; larger ones are packed when, on a sample
# of SAMPLE values, packing is smaller, or (above MARGIN_ABOVE values, 4 MiB of float32, where
# decoding time starts to show) at most PACKED_MARGIN larger.
PACKED_MARGIN, MARGIN_ABOVE, SAMPLE = 0.03, 1 << 20, 1 << 17
EXPONENTS = 512  # float symbols: (8 exponent bits - the lowest present) * 2 + sign
# Lines per tensor: each costs a few calls in Python. With contexts, lines are what neighbours
# are, so small tensors keep every row or column; without contexts lines only pace adaptation.
MAX_LINES, MAX_LINES_LARGE, LARGE, MAX_LINES_PLAIN = 1024, 256, 1 << 20, 16
CONTEXT_GAIN = 0.01  # value contexts are used when they save at least this share of the estimate
# A map pays when zeros are common: below these shares a zero is cheaper as a value symbol.
MAP_SHARE = {GRID: 0.2, CODEBOOK: 0.2, FLOAT: 0.01}


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    size = math.prod(shape)
    rows = shape[0] if len(shape) > 1 and shape[0] else 1
    return rows, size // rows


def encode(array: np.ndarray, stats: dict | None = None, step: np.ndarray | None = None) -> bytes:
    """Encode a float32 array (its shape is stored by the caller). ``stats``, when given, receives
    the kind and the bits spent on positions (the map) and on values. ``step``: one grid step
    the values are known to lie on (``grids.round_within``), tried instead of searching for one."""
    return b"".join(encode_parts(array, stats, step))


def encode_parts(array: np.ndarray, stats: dict | None = None, step: np.ndarray | None = None) -> Iterator[bytes]:
    """:func:`encode`'s bytes in pieces, one band of a large tensor at a time, for a writer that
    streams them: coding holds one band's work, never the whole tensor's."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    rows, width = matrix_shape(array.shape)
    bits = array.reshape(rows, width).view(np.uint32)
    if array.size <= BAND or rows < 2:
        yield _encode_whole(bits.ravel(), rows, width, stats, step=step)
        return
    band_rows = max(1, BAND // width)
    packed = _packing_pays(bits, step=step)  # one decision for the tensor, from its middle rows
    head = io.BytesIO()
    head.write(bytes([BANDS]))
    write_varint(head, band_rows)
    yield head.getvalue()
    totals = {"kind": "bands", "position_bits": 0, "value_bits": 8 * head.tell()}
    for start in range(0, rows, band_rows):
        band = bits[start:start + band_rows]
        found: dict = {}
        part = _encode_whole(band.ravel(), band.shape[0], width, found, packed, step)
        length = io.BytesIO()
        write_varint(length, len(part))
        totals["position_bits"] += found["position_bits"]
        totals["value_bits"] += found["value_bits"] + 8 * length.tell()
        yield length.getvalue() + part
    if stats is not None:
        stats.update(totals)


def _encode_whole(bits: np.ndarray, rows: int, width: int, stats: dict | None, packed: bool | None = None,
                  step: np.ndarray | None = None) -> bytes:
    """One tensor (or band) coded every way that applies, the smallest kept; ``packed`` decided
    by the caller, or here (see ``SAMPLE``)."""
    if bits.size == 0 or (bits == bits[0]).all():
        if stats is not None:
            stats.update(kind="constant", position_bits=0, value_bits=32)
        return bytes([CONSTANT]) + (int(bits[0]) if bits.size else 0).to_bytes(4, "little")
    options = _symbols(bits, width, step)
    if packed is None and bits.size > SAMPLE:
        packed = _packing_pays(bits.reshape(rows, width), options)
    candidates = []
    for found in options:
        if packed is None:
            candidates += [_encode_as(bits, rows, width, *found), _encode_as(bits, rows, width, *found, packed=True)]
        else:
            candidates.append(_encode_as(bits, rows, width, *found, packed=packed))
    position_bits, data = min(candidates, key=lambda candidate: len(candidate[1]))
    if len(data) > 4 * bits.size:  # tiny tensors of distinct floats: learning costs more than it saves
        position_bits, data = 0, bytes([RAW]) + bits.astype("<u4").tobytes()
    if stats is not None:
        stats.update(kind=NAMES[data[0]], position_bits=position_bits, value_bits=8 * len(data) - position_bits)
    return data


def _encode_as(bits: np.ndarray, rows: int, width: int, kind: int, symbols: np.ndarray, side: np.ndarray | None,
               low: int, packed: bool = False) -> tuple[int, bytes]:
    """(bits spent on the map, encoded bytes) with the values as ``symbols`` of ``kind``; coded
    line by line with contexts, or ``packed`` (fast, see ``codec.packed``)."""
    nonzero = bits != 0
    use_map = 1 - nonzero.mean() >= MAP_SHARE[kind]
    alphabet = int(symbols.max()) + 1
    columns = value_context = False
    if not packed:
        signs = _sign_table(kind, alphabet, side, low)[symbols]
        if use_map:
            signs = np.where(nonzero, signs, 0)
        # Both line directions are estimated on the top-left corner (at most 512 x 512): enough to
        # see the structure, and cheap for large tensors.
        corner = (slice(0, 512), slice(0, 512))
        columns, value_context = _choose_lines(
            nonzero.reshape(rows, width)[corner] if use_map else None, signs.reshape(rows, width)[corner])
    flags = (COLUMNS if columns else 0) | (MAP if use_map else 0) | (VALUE_CONTEXT if value_context else 0) \
        | (PACKED if packed else 0)
    if kind == GRID and len(side) == 1 and rows > 1:
        flags |= ONE_SCALE
    out = io.BytesIO()
    out.write(bytes([kind, flags]))
    layout = Layout(rows, width, flags)
    write_varint(out, layout.group)
    write_varint(out, alphabet)
    coder = range_encoder()
    side_mantissas = b""
    if kind == FLOAT:
        out.write(bytes([low]))
    else:  # scales or codebook entries: their exponents coded first, their mantissas stored after
        side_low, side_symbols = float_symbols(side)
        write_varint(out, len(side))
        out.write(bytes([side_low]))
        write_varint(out, int(side_symbols.max()) + 1)
        encode_lines(coder, side_symbols, np.array([0, len(side)]), Models(int(side_symbols.max()) + 1, 1))
        side_mantissas = _mantissa_bytes(side)
    if packed:
        _write_words(out, coder)
        out.write(side_mantissas)
        start = out.tell()
        positions = np.flatnonzero(nonzero) if use_map else None
        if use_map:
            write_map(out, nonzero, positions)
        position_bits = 8 * (out.tell() - start)
        if write_symbols(out, symbols if positions is None else symbols[positions], alphabet):
            out.getbuffer()[1] |= SPREAD  # the flags byte: symbols one per byte
        value_bits = bits if positions is None else bits[positions]
    else:
        position_bits, positions = _code_lines(coder, layout, nonzero if use_map else None, symbols, signs,
                                               value_context, alphabet)
        _write_words(out, coder)
        out.write(side_mantissas)
        value_bits = layout.orient(bits)
        value_bits = value_bits if positions is None else value_bits[positions]
    if kind == FLOAT:
        out.write(_mantissa_bytes(value_bits))
    return position_bits, out.getvalue()


def _packing_pays(bits: np.ndarray, found: list[tuple] | None = None, step: np.ndarray | None = None) -> bool:
    """Whether the packed coding of a large tensor (``bits`` as a matrix) is smaller than the
    context coder's (at most ``PACKED_MARGIN`` larger above ``MARGIN_ABOVE`` values), judged by
    coding both ways, each with its best kind, a band of rows from the middle (at most ``SAMPLE``
    values, 1024 columns): the context coder pays only where neighbours are alike. ``found``: the
    tensor's symbols (see :func:`_symbols`), when the caller has them."""
    rows, width = bits.shape
    columns = min(width, 1024)
    band = min(rows, max(64, SAMPLE // columns))
    start = (rows - band) // 2
    window = (slice(start, start + band), slice(0, columns))
    sample = np.ascontiguousarray(bits[window]).ravel()
    if (sample == sample[0]).all():
        return True
    if found is None:
        found = _symbols(sample, columns, step)
    else:  # the same symbols, cut to the window (a grid's scales to its rows)
        found = [(kind, np.ascontiguousarray(symbols.reshape(rows, width)[window]).ravel(),
                  side[start:start + band] if kind == GRID and len(side) > 1 else side, low)
                 for kind, symbols, side, low in found]
    packed = min(len(_encode_as(sample, band, columns, *f, packed=True)[1]) for f in found)
    lines = min(len(_encode_as(sample, band, columns, *f)[1]) for f in found)
    return packed <= (1 + (PACKED_MARGIN if bits.size > MARGIN_ABOVE else 0.0)) * lines


def _code_lines(coder, layout: Layout, nonzero: np.ndarray | None, symbols: np.ndarray, signs: np.ndarray,
                value_context: bool, alphabet: int) -> tuple[int, np.ndarray | None]:
    """Range-code the map (when given) and the value symbols line by line, with contexts; returns
    (bits spent on the map, positions of the coded values in line order or None: all of them)."""
    side_bits = coder.num_bits()
    bounds, m = layout.bounds(), layout.line_length
    if nonzero is not None:
        oriented_nonzero = layout.orient(nonzero).astype(np.int64)
        encode_lines(coder, oriented_nonzero, bounds, Models(2, 4), _map_context(oriented_nonzero, m))
        positions = np.flatnonzero(oriented_nonzero)
        value_bounds = np.searchsorted(positions, bounds)
    else:
        positions, value_bounds = None, bounds
    position_bits = coder.num_bits() - side_bits
    oriented = layout.orient(symbols)
    coded = oriented if positions is None else oriented[positions]
    contexts = None
    if value_context:
        previous = _back(layout.orient(signs), m)
        contexts = previous if positions is None else previous[positions]
        if positions is not None:  # with a map: is the next line non-zero here (the map is decoded first)
            contexts = contexts * 2 + _back(oriented_nonzero, -m)[positions]
    encode_lines(coder, coded, value_bounds, Models(alphabet, (VALUE_CLASSES * (2 if nonzero is not None else 1))
                                                    if value_context else 1), contexts)
    return position_bits, positions


def _write_words(out: io.BytesIO, coder) -> None:
    words = coder.get_compressed()
    write_varint(out, len(words))
    out.write(words.astype("<u4").tobytes())


def decode(data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a float32 array of ``shape`` from bytes written by :func:`encode`; corrupt bytes
    raise one NetshrinkError (``constriction`` reports invalid data as an AssertionError)."""
    try:
        return _decode(data, shape)
    except NetshrinkError:
        raise
    except (ValueError, IndexError, OverflowError, AssertionError) as exc:
        raise NetshrinkError(f"encoded tensor is corrupt ({type(exc).__name__})") from None


def _decode(data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    reader = Reader(data)
    kind = reader.u8()
    if kind == CONSTANT:
        value = np.frombuffer(reader.take(4), dtype="<u4")[0]
        _finish(reader)
        return np.full(size, value, dtype=np.uint32).view(np.float32).reshape(shape)
    if kind == RAW:
        out = np.frombuffer(reader.take(4 * size), dtype="<u4").view(np.float32).reshape(shape).copy()
        _finish(reader)
        return out
    if kind == BANDS:
        return _decode_bands(reader, shape)
    if kind not in NAMES or size == 0:
        raise NetshrinkError(f"encoded tensor is corrupt (kind {kind} for {size} values)")
    flags = reader.u8()
    rows, width = matrix_shape(shape)
    group, alphabet = reader.varint(), reader.varint()
    layout = Layout(rows, width, flags, group)
    low = side_count = side_low = side_alphabet = 0
    if kind == FLOAT:
        low = reader.u8()
    else:
        side_count, side_low, side_alphabet = reader.varint(), reader.u8(), reader.varint()
    if side_count > (rows if kind == GRID else MAX_ALPHABET) or alphabet > MAX_ALPHABET \
            or (kind == CODEBOOK and alphabet > side_count) or (kind == FLOAT and alphabet > EXPONENTS) \
            or side_alphabet > EXPONENTS or (side_count and not side_alphabet):
        raise NetshrinkError("encoded tensor is corrupt (bad header)")
    words = np.frombuffer(reader.take(4 * reader.varint()), dtype="<u4").astype(np.uint32)
    coder = range_decoder(words)
    side = None
    if kind != FLOAT:
        side = floats(decode_lines(coder, np.array([0, side_count]), Models(side_alphabet, 1)), side_low, reader)
        if kind == GRID and side_count != (1 if flags & ONE_SCALE else rows):
            raise NetshrinkError("encoded tensor is corrupt (grid scales)")
    if flags & ONE_SCALE and kind != GRID:
        raise NetshrinkError("encoded tensor is corrupt (flags)")
    if flags & SPREAD and not flags & PACKED:
        raise NetshrinkError("encoded tensor is corrupt (flags)")
    if flags & PACKED:
        if flags & (COLUMNS | VALUE_CONTEXT):
            raise NetshrinkError("encoded tensor is corrupt (flags)")
        positions = read_map(reader, size) if flags & MAP else None
        coded = read_symbols(reader, size if positions is None else positions.size, alphabet, bool(flags & SPREAD))
    else:
        positions, coded = _decode_lines(coder, layout, flags, _sign_table(kind, alphabet, side, low), alphabet)
    if kind == FLOAT:
        values = floats(coded, low, reader)
    elif kind == CODEBOOK:
        values = side[coded]
    else:  # grid codes as floats, one table look-up (zigzag: 0, -1, 1, -2, 2, ...)
        table = np.arange(alphabet)
        values = np.where(table % 2 == 0, table // 2, -(table + 1) // 2).astype(np.float32)[coded]
    _finish(reader)
    if positions is None:
        oriented = values
    else:
        oriented = np.zeros(size, dtype=values.dtype)
        oriented[positions] = values
    out = layout.restore(oriented).view(np.float32).reshape(rows, width)
    if kind == GRID:
        out *= side.view(np.float32)[:, None]  # a fresh array: scaled in place
    return out.reshape(shape)


def _decode_bands(reader: Reader, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor coded as bands of rows (see ``BAND``), each decoded into its place in turn."""
    rows, width = matrix_shape(shape)
    band_rows = reader.varint()
    if not 1 <= band_rows < rows:
        raise NetshrinkError("encoded tensor is corrupt (bands)")
    out = np.empty((rows, width), dtype=np.float32)
    for start in range(0, rows, band_rows):
        part = reader.take(reader.varint())
        if len(part) and part[0] == BANDS:
            raise NetshrinkError("encoded tensor is corrupt (bands within a band)")
        count = min(band_rows, rows - start)
        out[start:start + count] = _decode(part, (count, width))
    _finish(reader)
    return out.reshape(shape)


def _decode_lines(coder, layout: Layout, flags: int, sign_of: np.ndarray, alphabet: int) \
        -> tuple[np.ndarray | None, np.ndarray]:
    """Inverse of :func:`_code_lines`: (positions of the coded values in line order or None, their symbols)."""
    size, bounds = layout.size, layout.bounds()
    nonzero = None
    if flags & MAP:
        nonzero = np.zeros(size, dtype=bool)

        def record_map(i, line):
            nonzero[bounds[i]:bounds[i + 1]] = line

        decode_lines(coder, bounds, Models(2, 4), _map_contexts(nonzero, bounds), record_map)
        positions = np.flatnonzero(nonzero)
        value_bounds = np.searchsorted(positions, bounds)
    else:
        positions, value_bounds = None, bounds
    if not flags & VALUE_CONTEXT:
        return positions, decode_lines(coder, value_bounds, Models(alphabet, 1))
    signs = np.zeros(size, dtype=np.int8)

    def record_signs(i, line):
        where = slice(bounds[i], bounds[i + 1]) if positions is None else positions[value_bounds[i]:value_bounds[i + 1]]
        signs[where] = sign_of[line]

    return positions, decode_lines(coder, value_bounds, Models(alphabet, VALUE_CLASSES * (2 if nonzero is not None else 1)),
                                   _value_contexts(signs, positions, value_bounds, layout.line_length, nonzero),
                                   record_signs)


def encoding_name(data: bytes) -> str:
    """The value kind, with "+map" when a significance map says which values are non-zero."""
    if not data:
        return "?"
    if data[0] == BANDS:
        reader = Reader(data)
        reader.u8(), reader.varint()
        first = bytes(reader.take(min(reader.varint(), 2)))
        return f"{encoding_name(first)} in bands" if first[:1] != bytes([BANDS]) else "?"
    name = NAMES.get(data[0], "?")
    return f"{name}+map" if data[0] in (FLOAT, GRID, CODEBOOK) and data[1] & MAP else name


class Layout:
    """The order symbols are coded in: the matrix's rows or its columns, ``group`` of them per
    line (at most ``MAX_LINES`` lines)."""

    def __init__(self, rows: int, width: int, flags: int, group: int | None = None) -> None:
        self.rows, self.width, self.columns = rows, width, bool(flags & COLUMNS)
        lines, length = (width, rows) if self.columns else (rows, width)
        if group is None:
            most = MAX_LINES_PLAIN if not flags & (MAP | VALUE_CONTEXT) else MAX_LINES_LARGE if rows * width > LARGE else MAX_LINES
            group = max(1, -(-lines // most))
        self.group = group
        # The encoder never writes more than MAX_LINES lines; a stream that claims more (one
        # decoder call per line) would cost time out of proportion to its bytes.
        if not 1 <= self.group <= max(lines, 1) or -(-lines // self.group) > MAX_LINES:
            raise NetshrinkError("encoded tensor is corrupt (bad line length)")
        self.line_length = self.group * length
        self.size = rows * width

    def orient(self, flat: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(flat.reshape(self.rows, self.width).T).ravel() if self.columns else flat

    def restore(self, flat: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(flat.reshape(self.width, self.rows).T).ravel() if self.columns else flat

    def bounds(self) -> np.ndarray:
        return np.append(np.arange(0, self.size, self.line_length), self.size)


def _symbols(bits: np.ndarray, width: int, step: np.ndarray | None = None) -> list[tuple]:
    """The ways to see the values worth trying, each (kind, one symbol per value, side floats:
    grid scales or codebook entries as bit patterns, lowest exponent): a grid when one fits;
    else a codebook when values repeat, and floats too for small tensors (where a codebook's
    entries may cost more than they save: both are coded, the smaller kept). ``step``: the one
    grid step to check first (see :func:`encode`)."""
    rows = bits.size // width
    found = on_step(bits, rows, step) if step is not None else None
    grids = [found if found is not None else grid(bits, width), _one_step(bits, rows)]
    options = []
    for found in grids:
        if found is not None:
            scales, codes = found
            zigzag = (codes << 1) ^ (codes >> 31)  # 0, -1, 1, -2, 2, ... as 0, 1, 2, 3, 4, ...
            if zigzag.max() < MAX_ALPHABET:
                shared = rows > 1 and (scales == scales[0]).all()
                options.append((GRID, zigzag, scales.view(np.uint32)[:1] if shared else scales.view(np.uint32), 0))
    if options:
        return options
    distinct = distinct_within(bits, min(MAX_ALPHABET, bits.size // 2)) if bits.size >= 4 else None
    if distinct is not None:
        options.append((CODEBOOK, np.searchsorted(distinct, bits).astype(np.int32), distinct, 0))
    if not options or bits.size <= SMALL:
        low, symbols = float_symbols(bits)
        options.append((FLOAT, symbols, None, low))
    return options


def _one_step(bits: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A grid whose rows share one step, when the values lie on one: the smallest magnitude or a
    small fraction of it (what rate-aware training and per-tensor quantization leave). Per-row
    grids (:func:`grid`) fit such values too, but each row then stores a scale of its own."""
    magnitude = np.abs(bits.view(np.float32))
    if not np.isfinite(magnitude).all() or not (magnitude > 0).any():
        return None
    smallest = magnitude[magnitude > 0].min()
    head = bits[: bits.size // rows * min(rows, 32)]  # a few rows reject most steps cheaply
    for divisor in (1, 2, 3, 4):
        step = np.float32(smallest / divisor)
        if step > 0 and on_step(head, min(rows, 32), step) is not None:
            found = on_step(bits, rows, step)
            if found is not None:
                return found
    return None


def _sign_table(kind: int, alphabet: int, side: np.ndarray | None, low: int) -> np.ndarray:
    """Class of each symbol, the context its value gives the next line: 0 zero, then 1-2
    negative (small, large) and 3-4 positive (small, large). "Large" is read off what the decoder
    already has: the upper half of the grid's codes, of the codebook's magnitudes, of the
    exponents present."""
    symbols = np.arange(alphabet)
    if kind == GRID:  # zigzag: 0, -1, 1, -2, 2, ...
        zero, negative, magnitude = symbols == 0, symbols % 2 == 1, (symbols + 1) // 2
        large = 2 * magnitude > magnitude.max()
    elif kind == CODEBOOK:
        entries = side[:alphabet]
        zero, negative = entries == 0, entries >> 31 == 1
        magnitude = np.abs(entries.view(np.float32))
        large = magnitude > np.median(magnitude)
    else:
        zero, negative = (symbols == 0) & (low == 0), symbols % 2 == 1  # +0.0 (and positive subnormals)
        large = symbols // 2 >= symbols.max() // 2 - 1
    return np.where(zero, 0, 1 + 2 * ~negative + large)


def _back(values: np.ndarray, offset: int) -> np.ndarray:
    """``values`` as seen ``offset`` positions later (a line back when ``offset`` is the line
    length, a line ahead when it is minus that): ``out[i] = values[i - offset]``, 0 outside."""
    out = np.zeros_like(values)
    if offset >= 0:
        out[offset:] = values[:max(values.size - offset, 0)]
    else:
        out[:offset] = values[-offset:]
    return out


def _map_context(nonzero: np.ndarray, line_length: int) -> np.ndarray:
    """Every map bit's context at once (the encoder's view of :func:`_map_contexts`)."""
    return _back(nonzero, line_length) + 2 * _back(nonzero, 2 * line_length)


def _map_contexts(nonzero: np.ndarray, bounds: np.ndarray):
    """Context of a map bit: is the same offset non-zero one and two lines back (4 contexts).
    ``nonzero`` is read as decoding fills it, line by line."""
    def context_of(i: int) -> np.ndarray:
        length = bounds[i + 1] - bounds[i]
        context = np.zeros(length, dtype=np.int64)
        for back, weight in ((1, 1), (2, 2)):
            if i >= back:
                start = bounds[i - back]
                context += weight * nonzero[start:start + length]
        return context
    return context_of


def _value_contexts(signs: np.ndarray, positions: np.ndarray | None, value_bounds: np.ndarray, line_length: int,
                    nonzero: np.ndarray | None = None):
    """Context of a value: the class of the value one line back at the same offset (see
    :func:`_sign_table`) and, with a map, whether the next line is non-zero there."""
    def context_of(i: int) -> np.ndarray:
        if positions is None:
            where = np.arange(value_bounds[i], value_bounds[i + 1])
        else:
            where = positions[value_bounds[i]:value_bounds[i + 1]]
        context = signs[where - line_length].astype(np.int64) if i else np.zeros(where.size, dtype=np.int64)
        if nonzero is not None:
            ahead = where + line_length
            following = np.zeros(where.size, dtype=np.int64)
            inside = ahead < nonzero.size
            following[inside] = nonzero[ahead[inside]]
            context = context * 2 + following
        return context
    return context_of


def _choose_lines(nonzero: np.ndarray | None, signs: np.ndarray) -> tuple[bool, bool]:
    """(lines along columns, value contexts on) for a [rows, width] matrix of sign classes (and
    its non-zero map): static per-context entropy estimates of both line directions, with and
    without value contexts (a few histograms)."""
    rows, width = signs.shape
    signs = signs.ravel()
    nonzero = None if nonzero is None else np.ascontiguousarray(nonzero).ravel()
    options = []
    for columns in ((False, True) if rows > 1 and width > 1 else (False,)):
        layout = Layout(rows, width, (COLUMNS if columns else 0) | VALUE_CONTEXT | (MAP if nonzero is not None else 0))
        m = layout.line_length
        s = layout.orient(signs)
        keep = slice(None)
        cost = 0.0
        if nonzero is not None:
            bits = layout.orient(nonzero).astype(np.int64)
            cost = _entropy(_map_context(bits, m) * 2 + bits, 2, 4)
            keep = bits.astype(bool)
        previous = _back(s, m)
        with_context, without = _entropy((previous * VALUE_CLASSES + s)[keep], VALUE_CLASSES, VALUE_CLASSES), _entropy(s[keep], VALUE_CLASSES, 1)
        options.append((cost + min(with_context, without), columns, with_context < (1 - CONTEXT_GAIN) * without))
    _, columns, value_context = min(options)
    return columns, value_context


def _entropy(joint: np.ndarray, alphabet: int, contexts: int) -> float:
    """Bits to code each symbol given its context (static model); ``joint`` is context * alphabet
    + symbol."""
    table = np.bincount(joint, minlength=contexts * alphabet).reshape(contexts, alphabet).astype(np.float64)
    totals = table.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(table > 0, np.log2(table / totals), 0)
    return float(-(table * logs).sum())


def float_symbols(bits: np.ndarray) -> tuple[int, np.ndarray]:
    """(lowest exponent byte, one symbol per float: (exponent - lowest) * 2 + sign)."""
    exponents = ((bits >> 23) & 0xFF).astype(np.int32)
    low = int(exponents.min())
    return low, (exponents - low) * 2 + (bits >> 31).astype(np.int32)


def _mantissa_bytes(bits: np.ndarray) -> bytes:
    return (bits.astype("<u4") & 0x7FFFFF).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()


def floats(symbols: np.ndarray, low: int, reader: Reader) -> np.ndarray:
    """Float bit patterns from their symbols (:func:`float_symbols`) and the next stored mantissas."""
    exponents = symbols.astype(np.uint32) // 2 + low
    if exponents.size and exponents.max() > 0xFF:
        raise NetshrinkError("encoded tensor is corrupt (exponent out of range)")
    raw = np.frombuffer(reader.take(3 * symbols.size), dtype=np.uint8).reshape(-1, 3)
    mantissa = raw[:, 0].astype(np.uint32) | raw[:, 1].astype(np.uint32) << 8 | raw[:, 2].astype(np.uint32) << 16
    return (symbols.astype(np.uint32) % 2) << 31 | exponents << 23 | mantissa


def _finish(reader: Reader) -> None:
    if reader.pos != len(reader.data):
        raise NetshrinkError("encoded tensor is corrupt (trailing bytes)")
