"""Priors over network weights, as objects any method can use (not flags).

A prior gives the KL divergence from a factorised Gaussian ``q = N(mu, sigma^2)`` to itself,
summed over all elements: in closed form where one exists (:class:`GaussianPrior`), else as a
one-sample Monte Carlo estimate at the weights drawn for the forward pass
(:class:`ScaleMixturePrior`, Blundell et al. 2015), which is unbiased.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["GaussianPrior", "Prior", "ScaleMixturePrior", "gaussian_kl", "prior_from_options"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return float(value)


def gaussian_kl(mu: Tensor, sigma: Tensor, scale: float) -> Tensor:
    """``sum KL(N(mu, sigma^2) || N(0, scale^2))`` over all elements (0-d tensor)."""
    var_ratio = (sigma / scale) ** 2
    return 0.5 * (var_ratio + (mu / scale) ** 2 - 1.0 - var_ratio.log()).sum()


class Prior(ABC):
    """A factorised prior ``p(w) = prod_i p(w_i)`` over the Bayesian parameters."""

    #: True when :meth:`kl` does not need the sampled weights.
    closed_form: bool
    #: Name in model files (see :func:`prior_from_options`).
    name: str

    @abstractmethod
    def options(self) -> dict:
        """Constructor options as plain JSON values: ``type(self)(**options())`` rebuilds it."""

    @abstractmethod
    def log_prob(self, w: Tensor) -> Tensor:
        """``sum_i log p(w_i)`` (0-d tensor)."""

    @abstractmethod
    def kl(self, mu: Tensor, sigma: Tensor, w: Tensor | None = None) -> Tensor:
        """``KL(q || p)`` summed over elements, for ``q = N(mu, sigma^2)``.

        ``w`` (a draw from ``q``, same shape as ``mu``) is used by Monte Carlo estimates.
        """


class GaussianPrior(Prior):
    """Isotropic Gaussian ``N(0, scale^2)``; closed-form KL."""

    closed_form = True
    name = "gaussian"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = _positive("scale", scale)

    def options(self) -> dict:
        return {"scale": self.scale}

    def __repr__(self) -> str:
        return f"GaussianPrior(scale={self.scale})"

    def log_prob(self, w: Tensor) -> Tensor:
        return (-0.5 * (w / self.scale) ** 2 - math.log(self.scale) - _LOG_SQRT_2PI).sum()

    def kl(self, mu: Tensor, sigma: Tensor, w: Tensor | None = None) -> Tensor:
        return gaussian_kl(mu, sigma, self.scale)


class ScaleMixturePrior(Prior):
    """Scale mixture ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)`` (Blundell et al., 2015).

    No closed-form KL: :meth:`kl` is the one-sample estimate ``log q(w) - log p(w)`` at the
    weights ``w`` drawn for the forward pass.
    """

    closed_form = False
    name = "scale_mixture"

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> None:
        if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not 0.0 < pi < 1.0:
            raise ValueError(f"pi must lie strictly between 0 and 1, got {pi!r}.")
        self.pi = float(pi)
        self.sigma1 = _positive("sigma1", sigma1)
        self.sigma2 = _positive("sigma2", sigma2)

    def options(self) -> dict:
        return {"pi": self.pi, "sigma1": self.sigma1, "sigma2": self.sigma2}

    def __repr__(self) -> str:
        return f"ScaleMixturePrior(pi={self.pi}, sigma1={self.sigma1}, sigma2={self.sigma2})"

    def log_prob(self, w: Tensor) -> Tensor:
        def log_normal(s: float) -> Tensor:
            return -0.5 * (w / s) ** 2 - math.log(s) - _LOG_SQRT_2PI

        both = torch.stack([log_normal(self.sigma1), log_normal(self.sigma2)])
        weights = torch.tensor([math.log(self.pi), math.log1p(-self.pi)], dtype=w.dtype)
        weights = weights.to(w.device).reshape(2, *([1] * w.ndim))
        return torch.logsumexp(both + weights, dim=0).sum()

    def kl(self, mu: Tensor, sigma: Tensor, w: Tensor | None = None) -> Tensor:
        if w is None:
            raise ValueError("ScaleMixturePrior has no closed-form KL: pass the sampled weights w.")
        log_q = (-0.5 * ((w - mu) / sigma) ** 2 - sigma.log() - _LOG_SQRT_2PI).sum()
        return log_q - self.log_prob(w)


_PRIORS: dict[str, type[Prior]] = {c.name: c for c in (GaussianPrior, ScaleMixturePrior)}


def prior_from_options(name: str, options: dict) -> Prior:
    """The prior ``name`` (``"gaussian"``, ``"scale_mixture"``) built with ``options``."""
    if name not in _PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(map(repr, _PRIORS))}.")
    return _PRIORS[name](**options)
