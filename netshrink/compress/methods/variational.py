"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, 2017): which weights to prune, learned.

Magnitude pruning assumes a small weight matters little. It cannot tell a large weight the network
does not need from one it does, and after heavy pruning (a few percent kept) the difference is
points of accuracy. Variational dropout learns the answer while fine-tuning: every weight ``w``
gets a Gaussian noise of its own variance ``sigma^2``. The loss rewards noise (a KL term towards
a log-uniform prior) and the data punish it where it hurts, so ``alpha = sigma^2 / w^2`` ends
large on weights the network can do without, whatever their size. A prune step with
``ranking="variational"`` ranks weights by ``-log alpha`` instead of ``|w|``::

    - prune: {keep: {fc1: 0.03, fc2: 0.06}, ranking: variational}
      gradual: {epochs: 10, lr: 0.001, distill: true}

The noise goes on each layer's output with the local reparameterization trick: a layer computing
``x @ w.T`` gets ``N(x @ w.T, x^2 @ sigma^2.T)``, one independent draw per example, which keeps
the gradients' variance low (a draw of the weights per batch would not). Layers whose kind has no
such form here (``EmbeddingBag``) get no noise; their ``sigma`` never moves, so they are ranked by
magnitude. The noise and its parameters exist only while the schedule runs.

Written here rather than taken from a library: no maintained PyTorch package implements sparse
variational dropout for arbitrary layers; the method is a forward hook and the KL below.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import NetshrinkError

# Molchanov et al.'s fit of -KL(q || log-uniform prior) as a function of log alpha (their eq. 14).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_RANGE = 10.0  # log alpha is clipped to +-this, as in the paper: beyond, the KL is flat
INITIAL_LOG_SIGMA2 = -10.0  # almost no noise at first: training starts from the trained model
PARAMETER = "variational_log_sigma2"
EPSILON = 1e-8


NOISY = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)  # kinds _output_variance knows


def _output_variance(layer: nn.Module, x: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """The variance of the layer's output when each weight carries independent noise of
    ``variance``: the layer's own operation on (x^2, variance), without bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(x * x, variance)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer._conv_forward(x * x, variance, None)  # honours the layer's padding mode
    if isinstance(layer, nn.Embedding):  # one row per index: its variance, as it is
        return F.embedding(x, variance, layer.padding_idx)
    raise NetshrinkError(f"no output variance for a {type(layer).__name__}")


class VariationalNoise:
    """Noise of a learned variance on ``layers`` (name -> layer) while a schedule fine-tunes them.

    ``penalty()`` is the KL term to add to each step's loss: ``strength`` times the mean KL per
    weight. The evidence lower bound divides the summed KL by the training set's size instead, which
    makes the pull towards noise depend on how much data there is: with a few thousand examples it
    swamps the data term and the network trains under noise it cannot bear. A pruning schedule sets
    the sparsity itself and needs only a ranking, so the pull is per weight, the same on any data
    (on LeNet-300-100 and 54,000 MNIST images, strength 10 is the lower bound's pull times 2).
    ``scores()`` ranks the weights: ``-log alpha``, highest kept first.
    """

    def __init__(self, layers: dict[str, nn.Module], strength: float) -> None:
        count = sum(layer.weight.numel() for layer in layers.values())
        if count == 0:
            raise NetshrinkError("variational ranking needs layers with weights")
        self.layers, self.scale = layers, strength / count
        self.handles = []
        for layer in layers.values():
            initial = torch.full_like(layer.weight.detach(), INITIAL_LOG_SIGMA2)
            layer.register_parameter(PARAMETER, nn.Parameter(initial))
            if isinstance(layer, NOISY):
                self.handles.append(layer.register_forward_hook(self._add_noise))

    @staticmethod
    def _add_noise(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (layer.training and torch.is_grad_enabled()):
            return output
        weight = layer.weight  # as the layer used it: pruned weights are zero and get no noise
        variance = getattr(layer, PARAMETER).exp() * (weight != 0)
        spread = _output_variance(layer, args[0], variance)
        return output + (spread + EPSILON).sqrt() * torch.randn_like(output)

    @staticmethod
    def log_alpha(layer: nn.Module) -> torch.Tensor:
        alpha = getattr(layer, PARAMETER) - torch.log(layer.weight ** 2 + EPSILON)
        return alpha.clamp(-LOG_ALPHA_RANGE, LOG_ALPHA_RANGE)

    def penalty(self) -> torch.Tensor:
        kl = sum((K1 - K1 * torch.sigmoid(K2 + K3 * a) + 0.5 * F.softplus(-a)).sum()
                 for a in map(self.log_alpha, self.layers.values()))
        return self.scale * kl

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return {name: -self.log_alpha(layer) for name, layer in self.layers.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.layers.values():
            if hasattr(layer, PARAMETER):
                delattr(layer, PARAMETER)


@contextlib.contextmanager
def variational_noise(layers: dict[str, nn.Module], strength: float) -> Iterator[VariationalNoise]:
    """:class:`VariationalNoise` on ``layers`` inside the block, gone afterwards (on errors too)."""
    noise = VariationalNoise(layers, strength)
    try:
        yield noise
    finally:
        noise.remove()
