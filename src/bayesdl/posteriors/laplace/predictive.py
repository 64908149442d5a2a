"""Closed forms of the linearised (GLM) predictive from the function-space Gaussian.

Given the network's raw outputs ``f`` ``(B, K)`` and their linearised covariance
``J Sigma J^T`` ``(B, K, K)``:

* classification: the probit approximation ``softmax(f_k / sqrt(1 + pi / 8 Var[f_k]))``;
* homoscedastic Gaussian: ``N(f, J Sigma J^T + sigma^2)`` exactly (per target);
* heteroscedastic Gaussian (outputs mean ``m`` and log-variance ``s``): the epistemic part is
  ``Var[m]`` and the aleatoric part ``E[exp(s)] = exp(s* + Var[s] / 2)`` (the log-normal mean)
  plus the variance floor; ``total`` is their sum, the exact predictive variance of the
  linearised model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayesdl.likelihoods import Categorical, HomoscedasticGaussian, Likelihood

__all__ = [
    "RegressionMoments",
    "closed_form_nll",
    "log_probit",
    "probit",
    "regression_moments",
]


def log_probit(f: Tensor, cov: Tensor) -> Tensor:
    """Log of :func:`probit`, computed stably, ``(B, C)``."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return torch.log_softmax(f / (1.0 + math.pi / 8.0 * var).sqrt(), dim=-1)


def probit(f: Tensor, cov: Tensor) -> Tensor:
    """Probit-approximated predictive probabilities ``(B, C)`` from logits ``(B, C)`` and their
    covariance ``(B, C, C)``: ``softmax(f_k / sqrt(1 + pi / 8 Var[f_k]))``."""
    return log_probit(f, cov).exp()


@dataclass(frozen=True, eq=False)
class RegressionMoments:
    """Closed-form moments of the linearised regression predictive.

    Attributes
    ----------
    mean:
        Predictive mean, ``(B,)`` for one target or ``(B, D)``.
    aleatoric:
        Expected noise variance ``E[sigma^2]``, same shape.
    epistemic:
        Variance of the mean from the weight uncertainty, ``diag(J Sigma J^T)``, same shape.
    """

    mean: Tensor
    aleatoric: Tensor
    epistemic: Tensor

    @property
    def total(self) -> Tensor:
        """``aleatoric + epistemic``: the predictive variance."""
        return self.aleatoric + self.epistemic

    @property
    def std(self) -> Tensor:
        return self.total.sqrt()

    def log_prob(self, y: Tensor) -> Tensor:
        """Log density of ``y`` under ``N(mean, total)`` (exact for the homoscedastic GLM; a
        moment-matched Gaussian for the heteroscedastic one), summed over targets: ``(B,)``."""
        y = torch.as_tensor(y, dtype=self.mean.dtype, device=self.mean.device)
        if y.shape != self.mean.shape:
            raise ValueError(
                f"y must have shape {tuple(self.mean.shape)} to match the predictions, got "
                f"{tuple(y.shape)}."
            )
        var = self.total
        out = -0.5 * ((y - self.mean) ** 2 / var + var.log() + math.log(2 * math.pi))
        return out if out.ndim == 1 else out.sum(-1)


def regression_moments(likelihood: Likelihood, f: Tensor, cov: Tensor) -> RegressionMoments:
    """Moments of the linearised predictive of a Gaussian likelihood (see the module docstring)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    d = likelihood.n_targets
    if isinstance(likelihood, HomoscedasticGaussian):
        noise = likelihood.log_variance.detach().to(f.dtype).exp() + likelihood.min_variance
        mean, epistemic, aleatoric = f, var, noise.expand(f.shape)
    else:
        mean, epistemic = f[:, :d], var[:, :d]
        aleatoric = (f[:, d:] + 0.5 * var[:, d:]).exp() + likelihood.min_variance
    if d == 1:
        mean, aleatoric, epistemic = mean[:, 0], aleatoric[:, 0], epistemic[:, 0]
    return RegressionMoments(mean, aleatoric, epistemic)


def closed_form_nll(likelihood: Likelihood, f: Tensor, cov: Tensor, y: Tensor) -> Tensor:
    """Negative log predictive density of ``y`` per example ``(B,)`` under the closed forms."""
    if isinstance(likelihood, Categorical):
        return -log_probit(f, cov).gather(1, y.long().unsqueeze(1)).squeeze(1)
    return -regression_moments(likelihood, f, cov).log_prob(y)
