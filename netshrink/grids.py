"""Finding the structure of a float tensor exactly: its distinct values (a codebook) and per-row
integer grids (value = code * scale, bit for bit), which is what per-channel quantization and
weight sharing produce. Used by the file coder, ``summary`` and the int8 ONNX export."""
from __future__ import annotations

import numpy as np

MAX_GRID_CODE = 1 << 15
_NEGATIVE_ZERO = np.uint32(0x80000000)


def distinct_within(bits: np.ndarray, limit: int) -> np.ndarray | None:
    """The sorted distinct values (bit patterns), or None when there are more than ``limit``.

    Zeros (pruned weights) are set aside first, so a sparse tensor sorts only its kept values.
    Then a strided sample of the rest is counted: n values drawn from at most ``limit`` distinct
    ones show on average at most limit * (1 - e^(-n / limit)) distinct values (equally likely
    values; any other mix shows fewer), so a sample with clearly more (10% and 10 values of
    margin) rejects dense float weights without sorting millions of values. A rejection only
    means the values are coded as floats instead of codebook indices: exact either way."""
    nonzero = bits[bits != 0]
    if nonzero.size > 8 * limit:
        sample = nonzero[:: nonzero.size // (4 * limit)]
        seen = len(np.unique(sample))
        if seen > min(limit, 1.1 * limit * -np.expm1(-sample.size / limit) + 10):
            return None
    distinct = np.unique(nonzero)
    if nonzero.size < bits.size:
        distinct = np.concatenate([np.zeros(1, dtype=bits.dtype), distinct])
    return distinct if len(distinct) <= limit else None


# Candidate scales per row: the row's largest |value| over each symmetric qmax (2^(b-1) - 1 for b up
# to 12, the widest code the coder's alphabet holds; per-channel quantization puts the largest weight
# exactly there), then its smallest |value| over small integers (affine grids, shared grids). Every
# candidate is verified bit for bit.
_FROM_MAX = (1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047)
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
    found = _dense_grid_rows(bits)
    return None if found is None else (found[0], found[1].ravel())


def _dense_grid_rows(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(scales, int32 codes [rows, length], the candidate each row took)."""
    candidates = [(True, k) for k in _FROM_MAX] + [(False, k) for k in _FROM_MIN]
    order = list(range(len(candidates)))
    if len(bits) > _SAMPLE_ROWS:
        # A grid holds on every row: a few rows reject most tensors cheaply, and tell which
        # candidates to try first (one pass over the tensor instead of one per candidate).
        sample = _dense_grid_rows(bits[:_SAMPLE_ROWS])
        if sample is None:
            return None
        counts = np.bincount(sample[2])
        order = [*dict.fromkeys([*(int(i) for i in counts.argsort()[::-1] if counts[i]), *order])]
    # -0.0 passes the bit test below (-0.0 * s is -0.0) but integer code 0 gives +0.0: off every grid.
    if (bits == _NEGATIVE_ZERO).any():
        return None
    values = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        references = {True: np.maximum(values.max(axis=1), -values.min(axis=1))}  # |largest|, no |values| copy
    scales = np.ones(len(bits), dtype=np.float32)
    taken = np.zeros(len(bits), dtype=np.int64)
    codes = None
    unresolved = np.arange(len(bits))
    for index in order:
        use_largest, k = candidates[index]
        if use_largest not in references:
            references[False] = np.where(values != 0, np.abs(values), np.inf).min(axis=1)
        trial = (references[use_largest].astype(np.float64) / k).astype(np.float32)
        trial[~(trial > 0) | ~np.isfinite(trial)] = 1.0
        whole = len(unresolved) == len(bits)
        v, b, t = (values, bits, trial) if whole else (values[unresolved], bits[unresolved], trial[unresolved])
        # Few passes over the tensor (it may be hundreds of MB): codes rounded in place, the
        # bound checked on per-row extremes (NaN and infinities fail it: NaN compares false), the
        # values compared as bit patterns (-0.0 == 0.0 as floats).
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            trial_codes = np.divide(v, t[:, None])
            np.rint(trial_codes, out=trial_codes)
            bounded = (trial_codes.max(axis=1) <= MAX_GRID_CODE) & (trial_codes.min(axis=1) >= -MAX_GRID_CODE)
            product = np.multiply(trial_codes, t[:, None])
        exact = bounded & (product.view(np.uint32) == b).all(axis=1)
        del product
        if whole and exact.all():
            return np.ascontiguousarray(trial), trial_codes.astype(np.int32), np.full(len(bits), index)
        if codes is None:
            codes = np.zeros(bits.shape, dtype=np.int32)
        done = unresolved[exact]
        scales[done], taken[done], codes[done] = t[exact], index, trial_codes[exact]
        unresolved = unresolved[~exact]
        if unresolved.size == 0:
            return scales, codes, taken
    return None


def _row_reduce(ufunc, out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """Row-wise reduction for rows given in ascending order (reduceat: much faster than ufunc.at)."""
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    out[rows[starts]] = ufunc.reduceat(values, starts)




# The widest grid code the coder's alphabet holds (zigzag symbols below codec.lines.MAX_ALPHABET).
NEAR_MAX_CODE = 2047


def round_within(values: np.ndarray, max_error: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``values`` (float32) moved onto one uniform grid, every value at most ``max_error`` from
    where it was (zeros stay zero), and the grid's step; None when a value is not finite or needs
    a code beyond ``NEAR_MAX_CODE`` steps (the values are then stored exactly).

    The step is a hair under ``2 * max_error``: the largest uniform step whose rounding errors stay
    within the bound (a uniform grid is what codes a max-error budget in the fewest bits), checked
    on the float32 products the file will hold."""
    step = np.float32(2 * max_error * (1 - 2.0 ** -16))
    if not step > 0 or not np.isfinite(step) or not np.isfinite(values).all():
        return None
    codes = np.rint(values / step)
    if codes.size and np.abs(codes).max() > NEAR_MAX_CODE:
        return None
    rounded = (codes * step).astype(np.float32) + np.float32(0)  # + 0: code 0 of a negative value is +0.0
    if codes.size and np.abs(rounded.astype(np.float64) - values).max() > max_error:
        return None
    return rounded, np.asarray(step, dtype=np.float32)


def on_step(bits: np.ndarray, rows: int, step: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`grid`'s answer for values known to lie on one ``step`` (:func:`round_within`): the
    same bit-for-bit check, one candidate instead of a search; None when a value is off it."""
    values = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.rint(values / step)
    if not (np.abs(codes) <= NEAR_MAX_CODE).all():
        return None
    codes = codes.astype(np.int64)  # as the decoder has them: -0.0 becomes 0, and fails the check
    if not ((codes.astype(np.float32) * step).view(np.uint32) == bits).all():
        return None
    return np.full(rows, step, dtype=np.float32), codes
