"""Context-adaptive arithmetic coding of integer symbols, one line at a time.

A tensor's symbols (significance bits, grid codes, codebook indices, float exponents) are cut
into lines of equal length (rows or columns of the weight matrix, or several of them). Each
symbol gets a context from the two lines before it at the same offset (whether those weights
were zero, negative or positive); each context has its own adaptive model (symbol counts so far,
updated after every line). Every context is therefore known before its line is decoded, so a
line is coded with one call per context into a vectorised range coder instead of one call per
symbol, and no probability table is stored: the decoder learns the same counts as it goes.

Neighbouring inputs of a layer (adjacent pixels, adjacent channels) keep and drop weights
together and carry similar values; with lines along the input dimension the previous line *is*
the neighbouring input, which is what context modelling in NNR/DeepCABAC exploits in its scan
order. Measured in ``benchmarks/codec.py``.

The range coder is ``constriction``'s (Rust, exactly invertible fixed-point models). Model
probabilities are the counts as float64, normalised inside ``constriction``: the same numbers on
every machine, so a file decodes anywhere. Written here: only the context and count bookkeeping,
which no library offers for vectorised coding.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import NetshrinkError

MAX_ALPHABET = 1 << 12
# Pseudo-counts: every symbol gets _PRIOR (a new symbol costs a few bits, not the ~24 bits of
# constriction's floor probability), and the distribution of all contexts pooled is added with a
# total weight of _POOLED per symbol of the alphabet: it guides young contexts and fades as a
# context's own counts grow.
_PRIOR, _POOLED = 0.4, 1.0


def _constriction():
    try:
        import constriction
    except ImportError:  # a dependency: only a broken install lacks it
        raise NetshrinkError("netshrink files need the 'constriction' package: pip install constriction") from None
    return constriction


def range_encoder():
    """An empty range encoder; code lines into it, then take its ``get_compressed()`` words."""
    return _constriction().stream.queue.RangeEncoder()


def range_decoder(words: np.ndarray):
    """A range decoder over the words a :func:`range_encoder` produced."""
    return _constriction().stream.queue.RangeDecoder(words)


class Models:
    """Adaptive symbol counts per context, shared by the encoder and the decoder."""

    def __init__(self, alphabet: int, contexts: int) -> None:
        if not 1 <= alphabet <= MAX_ALPHABET:
            raise NetshrinkError(f"encoded tensor is corrupt (alphabet of {alphabet} symbols)")
        self.alphabet, self.contexts = max(alphabet, 2), contexts  # constriction needs two symbols
        self.counts = np.zeros((contexts, self.alphabet), dtype=np.float64)
        self.pooled = np.zeros(self.alphabet, dtype=np.float64)  # the counts of all contexts, kept with them
        self.categorical = _constriction().stream.model.Categorical

    def model(self, context: int):
        """This context's model now: its counts, a little of every context's, and a prior."""
        weight = _POOLED * self.alphabet / max(self.pooled.sum(), 1.0)
        return self.categorical(self.counts[context] + weight * self.pooled + _PRIOR, perfect=False)

    def learn(self, symbols: np.ndarray, contexts: np.ndarray | None) -> None:
        if contexts is None or self.contexts == 1:
            self.counts[0] += np.bincount(symbols, minlength=self.alphabet)
        else:
            self.counts += np.bincount(contexts.astype(np.int64) * self.alphabet + symbols,
                                       minlength=self.contexts * self.alphabet).reshape(self.contexts, self.alphabet)
        self.pooled += np.bincount(symbols, minlength=self.alphabet)


def _groups(contexts: np.ndarray | None, count: int):
    """(context, positions) for each context present, in context order."""
    if contexts is None or count == 1:
        yield 0, slice(None)
        return
    for context in range(count):
        where = np.flatnonzero(contexts == context)
        if where.size:
            yield context, where


def encode_lines(encoder, symbols: np.ndarray, bounds: np.ndarray, models: Models,
                 contexts: np.ndarray | None = None) -> None:
    """Code ``symbols`` (1-D, values < ``models.alphabet``) line by line, line i being
    ``symbols[bounds[i]:bounds[i + 1]]``, each with its context (< ``models.contexts``; computed
    by the caller from earlier lines only, as the decoder will)."""
    symbols = symbols.astype(np.int32)
    for i in range(len(bounds) - 1):
        line = symbols[bounds[i]:bounds[i + 1]]
        if not line.size:
            continue
        line_contexts = None if contexts is None else contexts[bounds[i]:bounds[i + 1]]
        for context, where in _groups(line_contexts, models.contexts):
            encoder.encode(line[where], models.model(context))
        models.learn(line, line_contexts)


def decode_lines(decoder, bounds: np.ndarray, models: Models,
                 context_of: Callable[[int], np.ndarray] | None = None,
                 on_line: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Inverse of :func:`encode_lines`; ``on_line(i, symbols)`` lets the caller record line i
    where ``context_of`` reads it before the next line."""
    out = np.empty(int(bounds[-1]), dtype=np.int32)
    for i in range(len(bounds) - 1):
        line = out[bounds[i]:bounds[i + 1]]
        if line.size:
            contexts = context_of(i) if context_of else None
            for context, where in _groups(contexts, models.contexts):
                line[where] = decoder.decode(models.model(context), line.size if isinstance(where, slice) else where.size)
            if line.min() < 0 or line.max() >= models.alphabet:
                raise NetshrinkError("encoded tensor is corrupt (symbol outside its alphabet)")
            models.learn(line, contexts)
        if on_line:
            on_line(i, line)
    return out
