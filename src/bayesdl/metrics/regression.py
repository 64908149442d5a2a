"""Accuracy, likelihood and prediction-interval metrics for regression.

Targets ``y`` have shape ``(B,)`` for one output or ``(B, D)`` for ``D`` outputs; numpy arrays are
accepted too. Scalar results are 0-d tensors on the inputs' device, in their promoted floating
dtype (the default dtype if none is floating).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesdl.metrics._validation import (
    as_tensor,
    check_finite,
    check_ndim,
    check_nonempty,
    check_real,
    check_same_device,
    check_same_shape,
    result_dtype,
)

__all__ = ["gaussian_mixture_nll", "mpiw", "picp", "rmse"]

_TARGET_LAYOUT = "(B,) or (B, D)"


def _check_targets(**tensors: object) -> tuple[list[Tensor], torch.dtype]:
    """Validate same-shape ``(B,)`` or ``(B, D)`` real, finite tensors; cast to one float dtype."""
    checked = {}
    for name, x in tensors.items():
        x = check_real(as_tensor(x, name), name)
        check_ndim(x, name, (1, 2), _TARGET_LAYOUT)
        check_nonempty(x, name)
        check_finite(x, name)
        checked[name] = x
    check_same_device(**checked)
    check_same_shape(**checked)
    dtype = result_dtype(*checked.values())
    return [x.to(dtype) for x in checked.values()], dtype


def rmse(mean: Tensor, y: Tensor) -> Tensor:
    """Root mean squared error over all entries: ``sqrt(mean((mean - y)^2))``.

    For ``(B, D)`` inputs the mean runs over all ``B * D`` entries, i.e. this is the square root
    of the output-averaged MSE (``sklearn.metrics.mean_squared_error`` with its default
    ``multioutput="uniform_average"``), not the average of per-output RMSEs.

    Parameters
    ----------
    mean:
        Point predictions (e.g. the predictive mean), shape ``(B,)`` or ``(B, D)``.
    y:
        Targets, same shape as ``mean``.

    Returns
    -------
    Tensor
        0-d tensor, non-negative.
    """
    (mean, y), _ = _check_targets(mean=mean, y=y)
    return (mean - y).square().mean().sqrt()


def gaussian_mixture_nll(means: Tensor, variances: Tensor, y: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``y`` under an equal-weight mixture of ``S`` Gaussians.

    ``-1/B sum_b log( 1/S sum_s N(y_b; mu_sb, var_sb) )``, computed with a log-sum-exp over the
    draws. For ``D`` outputs each component is a diagonal Gaussian: the ``D`` log densities are
    summed inside each component before mixing.

    Parameters
    ----------
    means:
        Component means, shape ``(S, B)`` or ``(S, B, D)`` (e.g.
        :attr:`~bayesdl.predictions.RegressionPrediction.means`).
    variances:
        Component variances (not standard deviations), same shape as ``means``; positive.
    y:
        Targets, shape ``(B,)`` or ``(B, D)``, matching ``means.shape[1:]``.

    Returns
    -------
    Tensor
        0-d tensor (nats per example; can be negative for a sharp density).
    """
    means = check_real(as_tensor(means, "means"), "means")
    variances = check_real(as_tensor(variances, "variances"), "variances")
    y = check_real(as_tensor(y, "y"), "y")
    for x, name in ((means, "means"), (variances, "variances")):
        check_ndim(x, name, (2, 3), "(S, B) or (S, B, D) (S mixture components / posterior draws)")
        check_nonempty(x, name)
        check_finite(x, name)
    check_ndim(y, "y", (1, 2), _TARGET_LAYOUT)
    check_nonempty(y, "y")
    check_finite(y, "y")
    check_same_device(means=means, variances=variances, y=y)
    check_same_shape(means=means, variances=variances)
    if tuple(y.shape) != tuple(means.shape[1:]):
        raise ValueError(
            f"y must have shape means.shape[1:] = {tuple(means.shape[1:])}, got "
            f"{tuple(y.shape)}. means holds one prediction per draw along its first axis, "
            "(S, B) or (S, B, D); y holds one target per example."
        )
    smallest = float(variances.min())
    if smallest <= 0.0:
        raise ValueError(
            f"variances must be positive, got a minimum of {smallest:.4g}. If you hold standard "
            "deviations pass their square; if log-variances, pass their exp(); add a small "
            "floor (e.g. clamp_min(1e-6)) if some are exactly zero."
        )
    dtype = result_dtype(means, variances, y)
    means, variances, y = means.to(dtype), variances.to(dtype), y.to(dtype)
    squared_z = (y - means).square() / variances
    log_density = -0.5 * (math.log(2 * math.pi) + variances.log() + squared_z)
    if log_density.ndim == 3:
        log_density = log_density.sum(-1)
    n_draws = means.shape[0]
    return -(torch.logsumexp(log_density, dim=0) - math.log(n_draws)).mean()


def _check_interval(lower: Tensor, upper: Tensor) -> None:
    bad = lower > upper
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"lower must be <= upper everywhere, but {int(bad.sum())} of {bad.numel()} intervals "
            f"are inverted (the first at index {first}: lower={lower[first].item():.6g} > "
            f"upper={upper[first].item():.6g}). Check the argument order (lower, upper, ...)."
        )


def picp(lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """Prediction-interval coverage probability: fraction of ``y`` inside ``[lower, upper]``.

    Bounds are inclusive. For a well-calibrated ``q`` prediction interval PICP is close to ``q``.

    Parameters
    ----------
    lower:
        Lower interval bounds, shape ``(B,)`` or ``(B, D)``.
    upper:
        Upper interval bounds, same shape; ``lower <= upper``.
    y:
        Targets, same shape.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]`` (over all ``B * D`` entries).
    """
    (lower, upper, y), dtype = _check_targets(lower=lower, upper=upper, y=y)
    _check_interval(lower, upper)
    return ((lower <= y) & (y <= upper)).to(dtype).mean()


def mpiw(lower: Tensor, upper: Tensor) -> Tensor:
    """Mean prediction-interval width ``mean(upper - lower)``.

    Parameters
    ----------
    lower:
        Lower interval bounds, shape ``(B,)`` or ``(B, D)``.
    upper:
        Upper interval bounds, same shape; ``lower <= upper``.

    Returns
    -------
    Tensor
        0-d tensor, non-negative (in the units of ``y``; over all ``B * D`` entries).
    """
    (lower, upper), _ = _check_targets(lower=lower, upper=upper)
    _check_interval(lower, upper)
    return (upper - lower).mean()
