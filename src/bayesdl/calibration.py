"""Post-hoc recalibration of any fitted posterior with one scalar fitted on validation data.

* **Temperature scaling** (classification; Guo et al., 2017): every draw's logits are divided by
  one temperature ``T``, so each draw's probabilities are ``softmax(logits_s / T)``.
* **Variance scaling** (regression; Levi et al., 2022): every draw's noise variance
  ``exp(log_var_s)`` is multiplied by one factor ``s`` (the likelihood's ``min_variance`` floor
  is added after, as always).

The scalar is applied to each draw's outputs *before* the likelihood builds the mixture, so the
calibrated prediction is an ordinary :class:`~bayesdl.predictions.ClassificationPrediction` or
:class:`~bayesdl.predictions.RegressionPrediction` whose mixture and decomposition
(``total = aleatoric + epistemic``) stay consistent. The scalar is fitted by minimising the
negative log-likelihood of the *mixture* predictive on validation data with L-BFGS, over its
logarithm (so it stays positive), on validation outputs sampled once.

>>> calibrated = temperature_scale(posterior, x_val, y_val)       # doctest: +SKIP
>>> calibrated.scale, calibrated.predict(x_test).probs            # doctest: +SKIP
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import Posterior
from bayesdl.posteriors.wrapper import PosteriorWrapper, check_posterior

__all__ = [
    "CalibratedPosterior",
    "ScaleKind",
    "calibrate",
    "fit_scale",
    "mixture_nll",
    "scale_outputs",
    "temperature_scale",
    "variance_scale",
]

_SCALE_KEY = "calibration.scale"


class ScaleKind(str, Enum):
    """What the fitted scalar multiplies; resolved from the likelihood's task."""

    #: Classification: each draw's logits are divided by the temperature ``T``.
    TEMPERATURE = "temperature"
    #: Regression: each draw's noise variance ``exp(log_var)`` is multiplied by ``s``.
    VARIANCE = "variance"


def _kind(likelihood: Likelihood) -> ScaleKind:
    if likelihood.task == "classification":
        return ScaleKind.TEMPERATURE
    if likelihood.task == "regression" and hasattr(likelihood, "n_targets"):
        return ScaleKind.VARIANCE
    raise TypeError(
        f"cannot recalibrate a {type(likelihood).__name__} likelihood: temperature scaling "
        "needs logits (Categorical) and variance scaling a Gaussian likelihood."
    )


def scale_outputs(outputs: Tensor, log_scale: Tensor, likelihood: Likelihood) -> Tensor:
    """Apply ``exp(log_scale)`` to every draw's natural parameters (differentiable).

    Parameters
    ----------
    outputs:
        Natural parameters under ``S`` draws, ``(S, B, K)``: logits, or means and
        log-variances ``[mu, log_var]`` (``K = 2D``).
    log_scale:
        Log of the temperature or variance factor, a tensor with one element.
    likelihood:
        The posterior's likelihood (decides :class:`ScaleKind`).

    Returns
    -------
    Tensor
        ``(S, B, K)``: ``logits / T``, or ``[mu, log_var + log s]``.
    """
    log_scale = log_scale.reshape(())
    if _kind(likelihood) is ScaleKind.TEMPERATURE:
        return outputs * torch.exp(-log_scale)
    n_targets = likelihood.n_targets
    return torch.cat([outputs[..., :n_targets], outputs[..., n_targets:] + log_scale], dim=-1)


def mixture_nll(outputs: Tensor, y: Tensor, likelihood: Likelihood) -> Tensor:
    """Mean NLL of ``y`` under the equal-weight mixture of the ``S`` draws, a 0-d tensor.

    ``-1/B sum_b log(1/S sum_s p(y_b | outputs_sb))`` by a log-sum-exp over draws; the same
    quantity as ``-likelihood.predictive(outputs).log_prob(y).mean()``.
    """
    log_p = -likelihood.nll(outputs, y)  # (S, B)
    return -(torch.logsumexp(log_p, dim=0) - math.log(outputs.shape[0])).mean()


def fit_scale(outputs: Tensor, y: Tensor, likelihood: Likelihood, *, max_iter: int = 100) -> float:
    """The scalar (temperature or variance factor) minimising :func:`mixture_nll`.

    L-BFGS with a strong-Wolfe line search over ``log(scale)``, started at ``scale = 1``, in
    float64 whatever the outputs' dtype.

    Parameters
    ----------
    outputs:
        Validation outputs under ``S`` draws, ``(S, B, K)``, sampled once.
    y:
        Validation targets, ``(B,)`` (or ``(B, D)``), already checked by the likelihood.
    likelihood:
        The posterior's likelihood.
    max_iter:
        Most L-BFGS iterations.

    Returns
    -------
    float
        The fitted scale, positive.
    """
    outputs = outputs.detach().to(torch.float64)
    y = y.to(outputs.device, torch.float64 if y.is_floating_point() else y.dtype)
    log_scale = torch.zeros(1, dtype=torch.float64, device=outputs.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_scale],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = mixture_nll(scale_outputs(outputs, log_scale, likelihood), y, likelihood)
        loss.backward()
        return loss

    start = float(closure().detach())
    if not math.isfinite(start):
        raise ValueError(
            "the validation NLL of the uncalibrated posterior is not finite; check the "
            "validation data (labels, scale of y) before calibrating."
        )
    optimizer.step(closure)
    scale = math.exp(float(log_scale.detach()))
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(
            f"the fitted scale is {scale!r}; the validation data may be separated perfectly. "
            "Use more (or harder) validation data."
        )
    return scale


class CalibratedPosterior(PosteriorWrapper):
    """A fitted posterior whose every draw is rescaled by one fitted scalar.

    It exposes the prediction side of the :class:`~bayesdl.posteriors.base.Posterior`
    contract (``sample_outputs``, ``predict``, ``state_dict``), so it can stand wherever a
    fitted posterior is used for prediction (metrics, conformal prediction, the demo), and it
    can be recalibrated again. It does not train: fit the posterior first.

    Parameters
    ----------
    posterior:
        A fitted posterior (or another wrapped one).
    scale:
        The temperature ``T`` (classification) or variance factor ``s`` (regression), > 0.
        Usually obtained from :func:`temperature_scale` / :func:`variance_scale`.
    """

    wrapper_name = "calibration"

    def __init__(self, posterior: Posterior | PosteriorWrapper, scale: float) -> None:
        super().__init__(posterior)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a positive number, got {type(scale).__name__}.")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
        self.scale = float(scale)
        #: What the scale multiplies (temperature for logits, factor for variances).
        self.kind = _kind(posterior.likelihood)

    def __repr__(self) -> str:
        inner = type(self.posterior).__name__
        return f"CalibratedPosterior({inner}, {self.kind.value}={self.scale:.6g})"

    def wrapper_options(self) -> dict:
        return {"scale": self.scale}

    def transform(self, outputs: Tensor) -> Tensor:
        """Rescale the wrapped posterior's outputs ``(S, B, K)``; see :func:`scale_outputs`."""
        log_scale = torch.tensor(math.log(self.scale), dtype=outputs.dtype, device=outputs.device)
        return scale_outputs(outputs, log_scale, self.likelihood)

    def state_dict(self) -> dict[str, Tensor]:
        """The wrapped posterior's state plus the scale (key ``"calibration.scale"``)."""
        state = dict(self.posterior.state_dict())
        state[_SCALE_KEY] = torch.tensor(self.scale, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what :meth:`state_dict` returned."""
        state = dict(state)
        if _SCALE_KEY not in state:
            raise ValueError(
                f"this state has no {_SCALE_KEY!r} entry; it was not saved from a "
                "CalibratedPosterior. Load it into the posterior itself instead."
            )
        scale = float(state.pop(_SCALE_KEY))
        self.posterior.load_state_dict(state)
        self.scale = scale


def calibrate(
    posterior: Posterior | PosteriorWrapper,
    x_val,
    y_val,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
) -> CalibratedPosterior:
    """Fit one scalar on validation data and return the calibrated posterior.

    Temperature scaling for a classification posterior, variance scaling for a regression one
    (see the module docstring).

    Parameters
    ----------
    posterior:
        A fitted posterior.
    x_val:
        Validation inputs ``(B, ...)``, not used in training.
    y_val:
        Validation targets: labels ``(B,)`` or regression targets ``(B,)`` / ``(B, D)``.
    n_samples:
        Draws used for the validation outputs (sampled once); ``None``: the method's default.
    generator:
        Generator for those draws (reproducibility).
    max_iter:
        Most L-BFGS iterations.

    Returns
    -------
    CalibratedPosterior
    """
    check_posterior(posterior)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    outputs = posterior.sample_outputs(x_val, n_samples, generator=generator)
    y = posterior.likelihood.check_targets(torch.as_tensor(y_val))
    if len(y) != outputs.shape[1]:
        raise ValueError(
            f"x_val has {outputs.shape[1]} examples but y_val has {len(y)}; pass one target per "
            "validation input."
        )
    n_classes = outputs.shape[-1]
    if posterior.task == "classification" and len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"y_val must hold class labels in [0, {n_classes}) for a model with {n_classes} "
            f"logits, got values in [{int(y.min())}, {int(y.max())}]."
        )
    return CalibratedPosterior(
        posterior, fit_scale(outputs, y, posterior.likelihood, max_iter=max_iter)
    )


def require_task(posterior: object, task: str, other: str) -> None:
    """A fitted Posterior or CalibratedPosterior of ``task``, else an error naming ``other``, the
    function for the other task (shared by calibration and conformal prediction)."""
    check_posterior(posterior)
    if posterior.task != task:
        raise ValueError(
            f"this needs a {task} posterior, got a {posterior.task} one; use {other} instead."
        )


def temperature_scale(
    posterior: Posterior | PosteriorWrapper,
    x_val,
    y_val,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
) -> CalibratedPosterior:
    """Temperature scaling of a classification posterior: :func:`calibrate` for logits.

    The fitted temperature is :attr:`CalibratedPosterior.scale`; ``T > 1`` softens
    over-confident predictions. The argmax of every draw is unchanged, so a single network's
    accuracy is too (a mixture's argmax can move slightly when ``T`` reweights its draws).
    """
    require_task(posterior, "classification", "variance_scale")
    return calibrate(
        posterior, x_val, y_val, n_samples=n_samples, generator=generator, max_iter=max_iter
    )


def variance_scale(
    posterior: Posterior | PosteriorWrapper,
    x_val,
    y_val,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
) -> CalibratedPosterior:
    """Variance scaling of a regression posterior: :func:`calibrate` for Gaussian outputs.

    The fitted factor ``s`` (:attr:`CalibratedPosterior.scale`) multiplies every draw's noise
    variance, i.e. the aleatoric part; ``s > 1`` widens over-confident intervals. The means, and
    so the epistemic part ``Var_s[mu_s]``, are unchanged.
    """
    require_task(posterior, "regression", "temperature_scale")
    return calibrate(
        posterior, x_val, y_val, n_samples=n_samples, generator=generator, max_iter=max_iter
    )
