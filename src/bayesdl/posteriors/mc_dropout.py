"""Monte Carlo dropout (Gal & Ghahramani, 2016): the dropout layers of the user's module stay
stochastic at prediction time, and each draw of their masks is a draw from the posterior.

Only the dropout layers are stochastic: the module is put in eval mode (BatchNorm uses its running
statistics) and the masks are applied by forward hooks on the module's own ``nn.Dropout`` /
``nn.Dropout1d/2d/3d`` layers, so no layer is re-implemented.

All ``S`` draws run in one forward pass. By default the draws are expanded lazily: the network
runs once on the batch ``(B, ...)`` up to the first dropout layer, where its input is repeated to
``(S * B, ...)`` and masked, so the work before the first dropout layer, identical in every draw,
is done once. Models where that is not possible (a skip connection around a dropout layer that
mixes the two shapes, code that keeps the batch size) fail loudly and are then run with the input
itself repeated ``S`` times (``expand="input"`` forces this).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor, nn

from bayesdl._options import resolve
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import (
    NetworkObjective,
    Posterior,
    prediction_rows,
    register,
    shared_rows,
)

__all__ = ["Expand", "MCDropout"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED = (nn.AlphaDropout, nn.FeatureAlphaDropout)
# Rows (S * B) per chunk when the caller does not say: bounds the activations kept at once.
_DEFAULT_CHUNK_ROWS = 2**14


class Expand(str, Enum):
    """Where the ``S`` draws are expanded out of the batch."""

    #: At the first dropout layer, falling back to ``INPUT`` if the model cannot take it.
    AUTO = "auto"
    #: Repeat the input ``S`` times before the first layer (always works, more work).
    INPUT = "input"


def keep_mask(shape: tuple[int, ...], p: float, generator, device: torch.device) -> Tensor:
    """Boolean mask of independent Bernoulli(1 - p) draws (True = keep), of ``shape``.

    On the CPU the bits come from 64-bit random integers cut into four 16-bit lanes (a quarter of
    the generator calls of ``torch.rand``), so ``p`` is applied at a resolution of 2^-16; the
    caller rescales by the matching keep probability (:func:`keep_probability`), so the masked
    activations stay unbiased. On other devices ``torch.rand`` is used.
    """
    if device.type != "cpu":
        return torch.rand(shape, generator=generator, device=device) >= p
    return random_lanes(shape, generator) >= lane_threshold(p)


def random_lanes(shape: tuple[int, ...], generator) -> Tensor:
    """Uniform random ``int16`` values of ``shape`` on the CPU: 64-bit random integers cut into
    four 16-bit lanes. A lane is ``>= lane_threshold(p)`` with probability ``keep_probability(p)``.
    """
    numel = math.prod(shape)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=generator
    )
    return words.view(torch.int16)[:numel].view(shape)


def lane_threshold(p: float) -> int:
    """The lane value from which :func:`random_lanes` keeps, for drop probability ``p``
    (``32768``, beyond every lane, for ``p = 1``)."""
    return round(p * 65536) - 32768


def keep_probability(p: float, device: torch.device) -> float:
    """The exact keep probability that :func:`keep_mask` realises for drop probability ``p``."""
    if device.type != "cpu":
        return 1.0 - p
    return (32768 - lane_threshold(p)) / 65536


class _Sampler:
    """Forward hooks on the dropout layers that draw ``S`` masks per call."""

    def __init__(self, n_samples: int, batch: int, lazy: bool, generator) -> None:
        self.n_samples, self.batch, self.lazy, self.generator = n_samples, batch, lazy, generator
        self.expanded = not lazy

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        h = inputs[0]
        s, b = self.n_samples, self.batch
        p = float(module.p)
        expand = self.lazy and h.shape[0] == b and not (self.expanded and s == 1)
        if not expand and h.shape[0] != s * b:
            raise _ExpandError(
                f"a dropout layer saw a tensor with leading size {h.shape[0]}, expected the batch "
                f"{b} or the expanded batch {s * b}"
            )
        rows = s * b if expand else h.shape[0]
        if isinstance(module, nn.Dropout):
            shape = (rows, *h.shape[1:])
        else:  # channel dropout: one mask entry per (row, channel)
            shape = (rows, h.shape[1], *([1] * (h.ndim - 2)))

        def draw(n_rows: int) -> Tensor:  # masks of S draws x n_rows rows
            mask = keep_mask((s * n_rows, *shape[1:]), p, self.generator, h.device)
            return mask.view(s, n_rows, *shape[1:])

        keep = shared_rows(draw, b, axis=1).reshape(shape)
        scale = 1.0 / keep_probability(p, h.device)
        if expand:
            # Scale the B rows once, then let `where` broadcast them over the S draws: the
            # (S * B, ...) result is written once, with no expanded copy of the input.
            self.expanded = True
            keep = keep.view(s, b, *keep.shape[1:])
            return torch.where(keep, (h * scale).unsqueeze(0), 0.0).view(rows, *h.shape[1:])
        return torch.where(keep, h, 0.0).mul_(scale)


class _ExpandError(RuntimeError):
    pass


@register
class MCDropout(Posterior):
    """MC dropout over the dropout layers of ``model``.

    Parameters
    ----------
    model:
        The user's module; it must contain at least one ``nn.Dropout`` (or ``Dropout1d/2d/3d``)
        layer with ``p > 0``. Their ``p`` is the dropout rate at training and at prediction.
    likelihood:
        See :class:`~bayesdl.posteriors.base.Posterior`.
    expand:
        ``"auto"`` (default) or ``"input"``: see :class:`Expand`.
    chunk_size:
        Draws per forward pass; ``None`` picks chunks of about 2^14 rows (``S_chunk * B``),
        which keeps the activations of a chunk near cache size (much faster on CPUs than one
        huge pass).

    Notes
    -----
    ``sample_outputs(x, n_samples)`` returns ``(S, B, K)``; draws are reproducible with a
    ``generator``. ``fit`` trains the module with dropout on, like any dropout network.
    """

    name = "mc_dropout"
    default_n_samples = 100

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        expand: Expand | str = Expand.AUTO,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(model, likelihood)
        unsupported = [n for n, m in model.named_modules() if isinstance(m, _UNSUPPORTED)]
        if unsupported:
            raise ValueError(
                f"MCDropout does not support alpha dropout (layers {unsupported}); use "
                "nn.Dropout or nn.Dropout1d/2d/3d."
            )
        self.dropout_layers = {
            n: m for n, m in model.named_modules() if isinstance(m, _DROPOUT) and m.p > 0
        }
        if not self.dropout_layers:
            raise ValueError(
                f"MCDropout needs a model with dropout layers (nn.Dropout, nn.Dropout1d/2d/3d "
                f"with p > 0), but {type(model).__name__} has none. Add e.g. nn.Dropout(0.1) "
                "after the hidden activations, or use DeepEnsemble or another posterior."
            )
        self.expand = resolve(Expand, expand, "expand")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def options(self) -> dict:
        return {"expand": self.expand.value, "chunk_size": self.chunk_size}

    def _probe_n_samples(self) -> int:
        return 1

    def _objective(self) -> NetworkObjective:
        return NetworkObjective(self.network)

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        chunk = self.chunk_size or max(1, _DEFAULT_CHUNK_ROWS // prediction_rows(len(x)))
        was_training = self.network.training
        self.network.eval()
        try:
            parts = [
                self._draw(x, min(chunk, n_samples - start), generator)
                for start in range(0, n_samples, chunk)
            ]
        finally:
            self.network.train(was_training)
        return torch.cat(parts, dim=0)

    def _draw(self, x: Tensor, s: int, generator) -> Tensor:
        b = x.shape[0]
        if self.expand is Expand.AUTO:
            try:
                return self._run(x, s, b, lazy=True, generator=generator)
            except RuntimeError:  # includes _ExpandError
                pass
        xs = x.unsqueeze(0).expand(s, *x.shape).reshape(s * b, *x.shape[1:])
        out = self._run(xs, s, b, lazy=False, generator=generator)
        self.expand = Expand.INPUT  # it worked where AUTO did not: remember for this model
        return out

    def _run(self, x: Tensor, s: int, b: int, *, lazy: bool, generator) -> Tensor:
        sampler = _Sampler(s, b, lazy, generator)
        handles = [m.register_forward_hook(sampler) for m in self.dropout_layers.values()]
        try:
            out = self.network(x)
        finally:
            for h in handles:
                h.remove()
        if out.shape[0] == b and not sampler.expanded:  # no dropout layer was reached
            out = out.unsqueeze(0).expand(s, *out.shape).reshape(s * b, *out.shape[1:])
        if out.shape[0] != s * b:
            raise _ExpandError(f"output has leading size {out.shape[0]}, expected {s * b}")
        return out.reshape(s, b, *out.shape[1:])
