"""Predictive distributions built from a stack of posterior draws.

Every posterior produces network outputs under ``S`` draws of its parameters, a tensor of shape
``(S, B, ...)``; a likelihood turns that stack into one of the result objects here. The
predictive distribution is the equal-weight mixture over the ``S`` draws, and every quantity is
computed from that mixture exactly (no moment matching), so that

* classification: ``total = aleatoric + epistemic`` with ``total`` the entropy of the mean
  probabilities, ``aleatoric`` the mean entropy of the draws and ``epistemic`` the mutual
  information between the label and the parameters;
* regression: ``total = aleatoric + epistemic`` with ``aleatoric = E_s[sigma_s^2]`` and
  ``epistemic = Var_s[mu_s]`` (the population variance over draws), which is the exact variance of
  the mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["ClassificationPrediction", "Prediction", "RegressionPrediction"]


def _check_level(level: float) -> float:
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(
            f"level must be a number strictly between 0 and 1 (e.g. 0.9 for a 90% interval), "
            f"got {level!r}."
        )
    return float(level)


def _entropy(log_p: Tensor) -> Tensor:
    """Entropy (nats) over the last axis of log-probabilities, with 0 log 0 = 0."""
    p = log_p.exp()
    return -(p * log_p).nan_to_num(nan=0.0).sum(-1)


@dataclass(frozen=True, eq=False)
class ClassificationPrediction:
    """Mixture-of-categoricals predictive from ``S`` draws.

    Parameters
    ----------
    log_probs:
        Log-probabilities of every draw, shape ``(S, B, C)``.

    Attributes
    ----------
    probs:
        Predictive (mixture) probabilities, ``(B, C)``.
    label:
        Most probable class, ``(B,)``, long.
    confidence:
        Largest predictive probability, ``(B,)``.
    total:
        Predictive entropy ``H[E_s p_s]`` in nats, ``(B,)``.
    aleatoric:
        Expected entropy ``E_s H[p_s]``, ``(B,)``.
    epistemic:
        Mutual information ``total - aleatoric`` (clamped at 0 against round-off), ``(B,)``.
    """

    log_probs: Tensor

    def __post_init__(self) -> None:
        if self.log_probs.ndim != 3:
            raise ValueError(
                f"log_probs must have shape (S, B, C), got {tuple(self.log_probs.shape)}."
            )

    task = "classification"

    @property
    def n_samples(self) -> int:
        return self.log_probs.shape[0]

    @cached_property
    def log_predictive(self) -> Tensor:
        """``log E_s p_s``, shape ``(B, C)``, computed stably by logsumexp over draws."""
        return torch.logsumexp(self.log_probs, dim=0) - math.log(self.n_samples)

    @cached_property
    def probs(self) -> Tensor:
        return self.log_predictive.exp()

    @property
    def label(self) -> Tensor:
        return self.probs.argmax(-1)

    @property
    def confidence(self) -> Tensor:
        return self.probs.max(-1).values

    @cached_property
    def total(self) -> Tensor:
        return _entropy(self.log_predictive)

    @cached_property
    def aleatoric(self) -> Tensor:
        return _entropy(self.log_probs).mean(0)

    @cached_property
    def epistemic(self) -> Tensor:
        return (self.total - self.aleatoric).clamp_min(0.0)

    def log_prob(self, y: Tensor) -> Tensor:
        """Log predictive probability of the labels ``y`` (``(B,)`` integers), shape ``(B,)``."""
        y = torch.as_tensor(y, device=self.log_probs.device)
        n_classes = self.log_probs.shape[-1]
        if y.shape != self.log_probs.shape[1:2]:
            raise ValueError(
                f"y must have shape ({self.log_probs.shape[1]},), got {tuple(y.shape)}."
            )
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}.")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(
                f"class labels must lie in [0, {n_classes}), got values in "
                f"[{int(y.min())}, {int(y.max())}]."
            )
        return self.log_predictive.gather(-1, y.long()[:, None]).squeeze(-1)


@dataclass(frozen=True, eq=False)
class RegressionPrediction:
    """Equal-weight Gaussian mixture predictive from ``S`` draws.

    Parameters
    ----------
    means:
        Mean of every draw, shape ``(S, B)`` for one target or ``(S, B, D)`` for ``D`` targets.
    variances:
        Observation-noise variance of every draw, same shape as ``means``.

    Attributes
    ----------
    mean:
        Mixture mean, ``(B,)`` or ``(B, D)``.
    aleatoric:
        ``E_s[sigma_s^2]``.
    epistemic:
        ``Var_s[mu_s]`` (population variance over draws; 0 for a single draw).
    total:
        ``aleatoric + epistemic``, the variance of the mixture.
    std:
        ``sqrt(total)``.
    """

    means: Tensor
    variances: Tensor

    task = "regression"

    def __post_init__(self) -> None:
        if self.means.shape != self.variances.shape or self.means.ndim < 2:
            raise ValueError(
                "means and variances must share a shape (S, B) or (S, B, D), got "
                f"{tuple(self.means.shape)} and {tuple(self.variances.shape)}."
            )

    @property
    def n_samples(self) -> int:
        return self.means.shape[0]

    @cached_property
    def mean(self) -> Tensor:
        return self.means.mean(0)

    @cached_property
    def aleatoric(self) -> Tensor:
        return self.variances.mean(0)

    @cached_property
    def epistemic(self) -> Tensor:
        return self.means.var(0, correction=0)

    @cached_property
    def total(self) -> Tensor:
        return self.aleatoric + self.epistemic

    @property
    def std(self) -> Tensor:
        return self.total.sqrt()

    def _check_y(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y, dtype=self.means.dtype, device=self.means.device)
        if y.shape != self.means.shape[1:]:
            raise ValueError(
                f"y must have shape {tuple(self.means.shape[1:])} to match the predictions, "
                f"got {tuple(y.shape)}."
            )
        return y

    def cdf(self, y: Tensor) -> Tensor:
        """Mixture CDF ``P(Y <= y)``, same shape as :attr:`mean`."""
        y = self._check_y(y)
        z = (y - self.means) / self.variances.sqrt()
        return torch.special.ndtr(z).mean(0)

    def log_prob(self, y: Tensor) -> Tensor:
        """Mixture log-density ``log (1/S) sum_s N(y; mu_s, sigma_s^2)``, same shape as ``mean``.

        For several targets the log-densities of the coordinates are summed (the noise is
        diagonal given a draw), so the result has shape ``(B,)``.
        """
        y = self._check_y(y)
        log_n = -0.5 * (
            (y - self.means) ** 2 / self.variances + self.variances.log() + math.log(2 * math.pi)
        )
        if self.means.ndim == 3:
            log_n = log_n.sum(-1)
        return torch.logsumexp(log_n, dim=0) - math.log(self.n_samples)

    def crps(self, y: Tensor) -> Tensor:
        """Continuous ranked probability score of the mixture at ``y``, in closed form.

        One score per entry, shaped like ``y`` (lower is better, in the units of ``y``); see
        :func:`bayesdl.metrics.crps_gaussian_mixture` for the formula and its mean.
        """
        from bayesdl.metrics.regression import crps_gaussian_mixture_per_point

        return crps_gaussian_mixture_per_point(self.means, self.variances, self._check_y(y))

    def quantile(self, q: float, *, tol: float = 1e-10, max_iter: int = 200) -> Tensor:
        """The ``q``-quantile of the mixture, found by bisection on its CDF, shape of ``mean``."""
        q = _check_level(q)
        sd = self.variances.sqrt()
        # Every component's q-quantile lies in [min(mu - k sd), max(mu + k sd)], and so does
        # the mixture's (the mixture CDF is an average of the component CDFs).
        k = abs(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()) + 1.0
        lo = (self.means - k * sd).min(0).values
        hi = (self.means + k * sd).max(0).values
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            below = torch.special.ndtr((mid - self.means) / sd).mean(0) < q
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
            if float((hi - lo).max()) <= tol * (1.0 + float(hi.abs().max())):
                break
        return 0.5 * (lo + hi)

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        """Central prediction interval of the mixture at ``level``.

        Returns ``(lower, upper)``, each shaped like :attr:`mean`, with mixture CDF
        ``(1 - level) / 2`` at ``lower`` and ``(1 + level) / 2`` at ``upper``.
        """
        level = _check_level(level)
        tail = (1.0 - level) / 2.0
        return self.quantile(tail), self.quantile(1.0 - tail)


#: Either kind of prediction: what :meth:`~bayesdl.posteriors.base.Posterior.predict` returns.
Prediction = ClassificationPrediction | RegressionPrediction
