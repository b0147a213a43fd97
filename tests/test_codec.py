"""The tensor coder of format-3 to format-6 files (``codec.weights``) against the arrays it codes: every
decode is bit-identical, whatever the values (NaN, -0.0, subnormals), shape or density."""
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from netshrink.store.codec import weights
from netshrink.errors import NetshrinkError
from netshrink.compress.methods.quantize import fake_quantize


# "packed" forces the packed coding (``codec.packed``, by default only for large tensors) on any
# tensor, "bands" cuts any tensor of more than 37 values into bands of rows (by default only above a
# million values), so every path meets the same property tests.
MODES = {"auto": {}, "packed": dict(SAMPLE=-1, MARGIN_ABOVE=-1, PACKED_MARGIN=float("inf")), "bands": dict(BAND=37)}


def roundtrip(array, mode="auto"):
    """Encode and decode in one of ``MODES``; the decoded array must be the same bits."""
    with mock.patch.multiple(weights, **MODES[mode]) if MODES[mode] else nullcontext():
        encoded = weights.encode(array)
    decoded = weights.decode(encoded, array.shape)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    assert decoded.tobytes() == np.asarray(array, np.float32).tobytes()  # bit-identical, incl. -0.0 and NaN
    if mode == "packed" and encoded[0] not in (weights.CONSTANT, weights.RAW):
        assert encoded[1] & weights.PACKED
    if mode == "bands":
        assert (encoded[0] == weights.BANDS) == (array.size > 37 and weights.matrix_shape(array.shape)[0] > 1)
    return encoded


def bands(encoded):
    """The bands of a tensor coded in bands, each as bytes."""
    reader = weights.Reader(encoded)
    assert reader.u8() == weights.BANDS and reader.varint() >= 1
    parts = []
    while reader.pos < len(encoded):
        parts.append(bytes(reader.take(reader.varint())))
    return parts


def quantized(rng, shape, bits, keep=1.0):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= keep] = 0
    return fake_quantize(torch.from_numpy(w), bits, "symmetric", True).numpy()


@pytest.mark.parametrize("array", [np.zeros(0, np.float32), np.zeros((3, 0), np.float32), np.zeros(1000, np.float32),
                                   np.full((7, 5), -2.5, np.float32), np.array([np.nan, -0.0, 0.0, np.inf], np.float32),
                                   np.array([1e-45, -3.4e38], np.float32), np.float32(3.0).reshape(()),
                                   np.full((4, 4), -0.0, np.float32)])
def test_edge_cases(array):
    roundtrip(array)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=120, deadline=None)
@given(array=arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)),
                    elements=st.sampled_from([0.0, 0.0, 0.0, 1.5, -0.25, 3.0, 7.0, -1e-3, -0.0])))
def test_roundtrip_low_cardinality(array, mode):
    roundtrip(array, mode)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=80, deadline=None)
@given(array=arrays(np.float32, st.one_of(st.integers(0, 300), st.tuples(st.integers(1, 20), st.integers(1, 20))),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)))
def test_roundtrip_any_floats(array, mode):
    roundtrip(array, mode)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), keep=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 0.51, 0.9, 1.0]),
       bits=st.sampled_from([1, 2, 3, 4, 8, 10, 12]), shape=st.sampled_from([(17, 33), (1, 700), (300, 3), (4, 3, 3, 3)]))
def test_roundtrip_pruned_quantized_any_density(seed, keep, bits, shape, mode):
    roundtrip(quantized(np.random.default_rng(seed), shape, bits, keep), mode)


def test_sizes_against_what_the_values_hold():
    rng = np.random.default_rng(0)
    # 4-bit grid, dense: at most the 4 bits, less after entropy coding (scales included)
    q = quantized(rng, (64, 256), 4)
    assert weights.encoding_name(roundtrip(q)) == "grid" and len(weights.encode(q)) * 8 / q.size < 4.0
    # exactly 50% pruned fp32: a map (~1 bit per weight) + the kept floats (< 32 bits each)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    half = np.where(rng.random(w.shape) < 0.5, w, 0).astype(np.float32)
    assert weights.encoding_name(roundtrip(half)) == "float+map" and len(weights.encode(half)) < 0.55 * half.nbytes
    # more than 65,536 distinct values on per-row grids (8-bit weights of a 1024 x 1024 layer)
    big = quantized(rng, (1024, 1024), 8)
    assert len(np.unique(big)) > 65536
    assert weights.encoding_name(roundtrip(big)) == "grid" and len(weights.encode(big)) < 0.26 * big.nbytes
    # dense floats: sign and exponent coded, mantissas stored: smaller than fp32, never larger
    assert len(roundtrip(w)) < 0.9 * w.nbytes
    tiny = rng.standard_normal(3).astype(np.float32)
    assert len(roundtrip(tiny)) <= 4 * tiny.size + 1


def test_context_coding_beats_the_zero_order_entropy_on_structured_masks():
    """Pruned weights of a layer on images: whole input columns kept or dropped together (as
    neighbouring pixels are). Contexts from the previous line must code the map well below its
    zero-order entropy, which is what a context-free coder pays."""
    rng = np.random.default_rng(1)
    columns = np.repeat(rng.random(98) < 0.2, 8)  # runs of 8 neighbouring inputs in use
    rows = rng.random((300, 1)) < 0.5
    mask = columns & rows & (rng.random((300, 784)) < 0.9) | (rng.random((300, 784)) < 0.005)
    w = np.where(mask, np.linspace(-1, 1, 32, dtype=np.float32)[rng.integers(0, 32, mask.shape)], 0).astype(np.float32)
    stats = {}
    weights.encode(w, stats)
    p = mask.mean()
    zero_order = mask.size * -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert stats["position_bits"] < 0.7 * zero_order
    roundtrip(w)


@pytest.mark.parametrize("cut", [1, 5, 20, 100])
def test_truncated_or_padded_tensor_is_an_error(cut):
    data = weights.encode(quantized(np.random.default_rng(0), (40, 50), 4, 0.3))
    with pytest.raises(NetshrinkError):
        weights.decode(data[:-cut], (40, 50))
    with pytest.raises(NetshrinkError):
        weights.decode(data + b"\0", (40, 50))


def test_near_uniform_packed_symbols_go_one_per_byte():
    """A 4-bit grid over uniform weights packs two codes a byte with near-uniform bytes, which zstd
    stores raw (4 bits a code); one code a byte, zstd's Huffman stage codes them within 1% of the
    context coder."""
    rng = np.random.default_rng(5)
    uniform = fake_quantize(torch.rand(300, 1000) * 2 - 1, 4, "symmetric", True).numpy()
    encoded = roundtrip(uniform, "packed")
    assert encoded[1] & weights.SPREAD
    rows, width = uniform.shape
    bits = uniform.ravel().view(np.uint32)
    context = weights._encode_as(bits, rows, width, *weights._symbols(bits, width)[0])[1]
    assert len(encoded) < 1.015 * len(context) and 8 * len(encoded) / uniform.size < 3.97  # packed raw: 4.03
    bell = quantized(rng, (300, 1000), 4)  # bell-shaped codes compress packed: no spreading
    assert not roundtrip(bell, "packed")[1] & weights.SPREAD
    with pytest.raises(NetshrinkError):
        weights.decode(encoded[:1] + bytes([weights.SPREAD]) + encoded[2:], uniform.shape)  # spread, not packed


def test_bands_cost_little_and_bad_bands_are_an_error():
    rng = np.random.default_rng(4)
    w = quantized(rng, (64, 200), 4, 0.3)
    whole = roundtrip(w)
    banded = roundtrip(w, "bands")  # 64 bands of one row each
    assert len(bands(banded)) == 64 and weights.encoding_name(banded) == "grid+map in bands"
    with mock.patch.object(weights, "BAND", 2000):  # 10 rows per band, the last one of 4
        encoded = roundtrip(w)
    parts = bands(encoded)
    assert len(parts) == 7 and weights.decode(parts[-1], (4, 200)).tobytes() == w[60:].tobytes()
    assert len(encoded) < 1.1 * len(whole)  # each band relearns its models: bands of 2,000 values cost < 10%
    for bad in (bytes([weights.BANDS, 0]) + banded[2:],  # no rows per band
                bytes([weights.BANDS, 64]) + banded[2:],  # one band of all the rows
                bytes([weights.BANDS, 32, 3, weights.BANDS, 1, 0]),  # bands within a band
                banded[:-1], banded + b"\0"):
        with pytest.raises(NetshrinkError):
            weights.decode(bad, w.shape)


def test_encoding_is_deterministic():
    w = quantized(np.random.default_rng(3), (30, 70), 3, 0.4)
    assert weights.encode(w) == weights.encode(w.copy())


@pytest.mark.parametrize("gap", [0, 254, 255, 256, 510, 511, 100_000])
def test_packed_map_gaps_across_run_bytes(gap):
    """Gaps of 255 and more zeros take several bytes in the gap map; every length must survive."""
    w = np.zeros(gap + 1001, np.float32)
    w[[gap, gap + 1000]] = [1.5, -2.0]
    roundtrip(w, "packed")


def test_large_tensors_are_packed_unless_context_coding_saves_more_than_the_margin():
    rng = np.random.default_rng(0)
    big = quantized(rng, (1100, 1000), 8)  # a bell-shaped 8-bit layer, above MARGIN_ABOVE values
    sparse = np.where(rng.random((1100, 1000)) < 0.1, rng.standard_normal((1100, 1000)), 0).astype(np.float32)
    for array in (big, sparse):
        encoded = roundtrip(array)  # above BAND values: two bands, each packed
        parts = bands(encoded)
        assert len(parts) == 2 and all(part[1] & weights.PACKED for part in parts)
        rows, width = weights.matrix_shape(array.shape)
        context = weights._encode_as(array.ravel().view(np.uint32), rows, width,
                                     *weights._symbols(array.ravel().view(np.uint32), width)[0])[1]
        assert len(encoded) <= (1 + weights.PACKED_MARGIN) * len(context) + 64 * len(parts)
    # structured maps (whole input columns kept or dropped): the context coder is far smaller and stays
    columns = rng.random(1000) < 0.1
    structured = np.where(columns & (rng.random((1100, 1000)) < 0.9), 0.5, 0).astype(np.float32)
    assert not any(part[1] & weights.PACKED for part in bands(roundtrip(structured)))


@pytest.mark.parametrize("cut", [1, 5, 20, 100])
def test_truncated_or_padded_packed_tensor_is_an_error(cut):
    w = quantized(np.random.default_rng(0), (40, 50), 4, 0.3)
    data = roundtrip(w, "packed")
    with pytest.raises(NetshrinkError):
        weights.decode(data[:-cut], (40, 50))
    with pytest.raises(NetshrinkError):
        weights.decode(data + b"\0", (40, 50))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_corrupt_packed_bytes_are_an_error_or_the_right_shape(position, value):
    """A changed byte (the file's checksum catches it first; this is what lies behind): either one
    NetshrinkError or an array of the promised shape, never another exception."""
    data = bytearray(roundtrip(quantized(np.random.default_rng(1), (60, 70), 3, 0.05), "packed"))
    data[position % len(data)] = value
    try:
        out = weights.decode(bytes(data), (60, 70))
    except NetshrinkError:
        return
    assert out.shape == (60, 70) and out.dtype == np.float32


@pytest.mark.parametrize("mode", list(MODES))
def test_a_grid_of_one_step_stores_its_scale_once_and_a_forged_one_is_an_error(mode):
    """Integer codes times one step for the whole tensor (what rate-aware training leaves): one
    scale in the file, not one per row, about 3 bytes a row smaller than per-row scales; a flag
    or scale count that does not fit is refused."""
    rng = np.random.default_rng(3)
    step = np.float32(0.0123)
    codes = np.rint(rng.laplace(0, 2, (200, 30))).astype(np.float32)
    codes[rng.random(codes.shape) < 0.9] = 0
    codes += 0.0  # -0.0 as +0.0, as files store it
    codes[0, 0] = 1  # the step itself is a value, as it is when code 1 is used
    array = (codes * step).astype(np.float32)
    encoded = roundtrip(array, mode)
    if mode != "bands":  # (bands of one row each here: a row's one scale needs no flag)
        assert encoded[0] == weights.GRID and encoded[1] & weights.ONE_SCALE
    if mode == "auto":
        with mock.patch.object(weights, "_one_step", lambda bits, rows: None):
            per_row = weights.encode(array)
        assert len(encoded) < len(per_row) - 2 * 200
        forged = bytearray(encoded)
        forged[1] &= ~weights.ONE_SCALE  # the one scale read as per-row scales: too few
        with pytest.raises(NetshrinkError, match="corrupt"):
            weights.decode(bytes(forged), array.shape)
        codebook = weights.encode(np.array([0.5, 0.25, 0.5, 0.75] * 8, np.float32).reshape(4, 8))
        if codebook[0] == weights.CODEBOOK:
            forged = bytearray(codebook)
            forged[1] |= weights.ONE_SCALE
            with pytest.raises(NetshrinkError, match="corrupt"):
                weights.decode(bytes(forged), (4, 8))
