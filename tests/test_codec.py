import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from netshrink.codec import streams, tensors
from netshrink.codec.streams import Reader
from netshrink.errors import NetshrinkError
from netshrink.methods.quantize import fake_quantize


def roundtrip(array):
    encoded = tensors.encode(array)
    decoded = tensors.decode(encoded, array.shape)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    assert decoded.tobytes() == np.asarray(array, np.float32).tobytes()  # bit-identical, incl. -0.0 and NaN
    return encoded


@pytest.mark.parametrize("array", [np.zeros(0, np.float32), np.zeros((3, 0), np.float32), np.zeros(1000, np.float32),
                                   np.full((7, 5), -2.5, np.float32), np.array([np.nan, -0.0, 0.0, np.inf], np.float32),
                                   np.array([1e-45, -3.4e38], np.float32)])
def test_edge_cases(array):
    roundtrip(array)


@settings(max_examples=150, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)),
              elements=st.sampled_from([0.0, 0.0, 0.0, 1.5, -0.25, 3.0, 7.0, -1e-3])))
def test_roundtrip_low_cardinality(array):
    roundtrip(array)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(0, 300), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_roundtrip_any_floats(array):
    roundtrip(array)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.floats(0.0, 0.99), st.sampled_from([1, 2, 4, 8]))
def test_roundtrip_pruned_quantized(seed, sparsity, bits):
    import torch

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((17, 33)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    roundtrip(fake_quantize(torch.from_numpy(w), bits, "symmetric", True).numpy())


def test_sparse_and_grid_encodings_are_chosen_and_small():
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 784)).astype(np.float32)
    w[rng.random(w.shape) > 0.08] = 0
    codebook = np.linspace(-1, 1, 32, dtype=np.float32)
    shared = np.where(w != 0, codebook[rng.integers(0, 32, w.shape)], 0).astype(np.float32)
    encoded = roundtrip(shared)
    assert tensors.encoding_name(encoded) == "sparse"
    # 8% density, 32 uniform values: ~5 bits value + ~5 bits position per non-zero
    assert len(encoded) * 8 / (shared != 0).sum() < 11
    q = fake_quantize(torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32)), 4).numpy()
    encoded = roundtrip(q)
    assert len(encoded) * 8 / q.size < 4.0  # grid codes: at most 4 bits, less after Huffman


def test_gap_escape_symbols():
    skips = np.array([0, 5, 17, 3])
    symbols = tensors.gap_symbols(skips, 2)  # span 4: 5 = 4 + 1, 17 = 4*4 + 1
    assert symbols.tolist() == [0, 4, 1, 4, 4, 4, 4, 1, 3]


def test_huffman_stream_matches_entropy_bound():
    rng = np.random.default_rng(0)
    probabilities = np.array([0.5, 0.25, 0.125, 0.125])
    symbols = rng.choice(4, size=100_000, p=probabilities)
    encoded = streams.encode(symbols)
    entropy = -(probabilities * np.log2(probabilities)).sum()  # 1.75 bits: dyadic, Huffman is optimal
    assert len(encoded) * 8 / symbols.size == pytest.approx(entropy, rel=0.01)
    assert np.array_equal(streams.decode(Reader(encoded), len(symbols)), symbols)


@pytest.mark.parametrize("cut", [0, 1, 3, 10, -1])
def test_truncated_stream_is_an_error(cut):
    rng = np.random.default_rng(0)
    w = np.where(rng.random(5000) < 0.1, rng.choice([-1.0, 0.5, 2.0], 5000), 0).astype(np.float32)
    encoded = tensors.encode(w)
    with pytest.raises(NetshrinkError):
        tensors.decode(encoded[:cut] if cut >= 0 else encoded[:-1], w.shape)


def _reference_huffman_cost(counts):
    """Total coded bits by the textbook heap construction: each merge adds its weight."""
    import heapq

    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=300))
def test_huffman_lengths_are_optimal_and_a_valid_prefix_code(counts):
    counts = np.array(counts, dtype=np.int64)
    if not counts.any():
        return
    lengths = streams.huffman_lengths(counts)
    assert ((lengths > 0) == (counts > 0)).all()
    assert int((lengths * counts).sum()) == _reference_huffman_cost(counts)
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1  # Kraft: a prefix code exists
