"""Regression metrics: accuracy, likelihood, proper scores, prediction intervals, calibration.

Targets ``y`` have shape ``(B,)`` for one output or ``(B, D)`` for ``D`` outputs; numpy arrays are
accepted too. Scalar results are 0-d tensors on the inputs' device, in their promoted floating
dtype (the default dtype if none is floating).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
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

__all__ = [
    "crps_gaussian_mixture",
    "gaussian_mixture_nll",
    "interval_score",
    "mpiw",
    "picp",
    "pinball_loss",
    "quantile_calibration_curve",
    "quantile_calibration_error",
    "rmse",
]

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


def _check_mixture(means: object, variances: object, y: object) -> tuple[Tensor, Tensor, Tensor]:
    """Validate mixture components ``(S, B[, D])`` and targets ``(B[, D])``; one float dtype."""
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
    return means.to(dtype), variances.to(dtype), y.to(dtype)


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
    means, variances, y = _check_mixture(means, variances, y)
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


# ---------------------------------------------------------------- proper scores and calibration


def _check_open_level(value: object, name: str, example: str) -> float:
    """Require a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a number strictly between 0 and 1, got {value!r} "
            f"({type(value).__name__})."
        )
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} must lie strictly between 0 and 1, got {value!r}. Write a percentage as a "
            f"fraction, e.g. {example}."
        )
    return value


# Elements of the (S, S, b, D) pairwise block of the mixture CRPS held at once.
_CRPS_CHUNK_ELEMENTS = 2**22


def _expected_abs_normal(mean: Tensor, variance: Tensor) -> Tensor:
    """``E|Z|`` for ``Z ~ N(mean, variance)``: ``2 sd phi(mean/sd) + mean (2 Phi(mean/sd) - 1)``."""
    sd = variance.sqrt()
    z = mean / sd
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return 2.0 * sd * pdf + mean * (2.0 * torch.special.ndtr(z) - 1.0)


def crps_gaussian_mixture(means: Tensor, variances: Tensor, y: Tensor) -> Tensor:
    """Mean continuous ranked probability score of an equal-weight Gaussian mixture, in closed form.

    For the mixture ``F = 1/S sum_s N(mu_s, var_s)`` and a target ``y``,
    ``CRPS(F, y) = E|X - y| - 1/2 E|X - X'|`` with ``X, X'`` independent draws from ``F``
    (Gneiting & Raftery, 2007). For normal mixtures both expectations are exact (Grimit et al.,
    2006): with ``A(m, v) = E|Z|`` for ``Z ~ N(m, v)``, that is
    ``A(m, v) = 2 sqrt(v) phi(m / sqrt(v)) + m (2 Phi(m / sqrt(v)) - 1)``,

    ``CRPS = 1/S sum_s A(y - mu_s, var_s) - 1/(2 S^2) sum_{s,t} A(mu_s - mu_t, var_s + var_t)``.

    For a single Gaussian this is ``sd (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))`` with
    ``z = (y - mu) / sd``. The pairwise term costs ``O(S^2 B)``; it is computed in chunks of the
    batch so memory stays bounded. For ``D`` outputs the score of each coordinate's marginal
    mixture is taken and the mean runs over all ``B * D`` entries. Lower is better; the score is
    in the units of ``y``.

    Parameters
    ----------
    means:
        Component means, shape ``(S, B)`` or ``(S, B, D)``.
    variances:
        Component variances, same shape as ``means``; positive.
    y:
        Targets, shape ``(B,)`` or ``(B, D)``, matching ``means.shape[1:]``.

    Returns
    -------
    Tensor
        0-d tensor, non-negative.
    """
    return crps_gaussian_mixture_per_point(means, variances, y).mean()


def crps_gaussian_mixture_per_point(means: Tensor, variances: Tensor, y: Tensor) -> Tensor:
    """The closed-form mixture CRPS of :func:`crps_gaussian_mixture` for every entry.

    Same parameters; returns a tensor shaped like ``y`` (``(B,)`` or ``(B, D)``).
    """
    means, variances, y = _check_mixture(means, variances, y)
    single = means.ndim == 2
    if single:
        means, variances, y = means[..., None], variances[..., None], y[..., None]
    n_draws, _, width = means.shape
    accuracy = _expected_abs_normal(y - means, variances).mean(0)  # (B, D)
    chunk = max(1, _CRPS_CHUNK_ELEMENTS // (n_draws * n_draws * width))
    spread = torch.cat(
        [
            _expected_abs_normal(m[:, None] - m[None, :], v[:, None] + v[None, :]).mean((0, 1))
            for m, v in zip(means.split(chunk, 1), variances.split(chunk, 1), strict=True)
        ]
    )
    out = accuracy - 0.5 * spread
    return out[..., 0] if single else out


def pinball_loss(quantile: Tensor, y: Tensor, q: float) -> Tensor:
    """Mean pinball (quantile) loss of a predicted ``q``-quantile.

    ``1/N sum_i max(q (y_i - f_i), (q - 1) (y_i - f_i))`` over all entries: under-predictions
    cost ``q`` per unit, over-predictions ``1 - q``; its expectation is minimised by the true
    ``q``-quantile. Equals ``sklearn.metrics.mean_pinball_loss(y, quantile, alpha=q)`` (for
    ``(B, D)`` inputs, with its default uniform average over outputs).

    Parameters
    ----------
    quantile:
        Predicted ``q``-quantiles, shape ``(B,)`` or ``(B, D)`` (e.g.
        ``prediction.quantile(q)``).
    y:
        Targets, same shape.
    q:
        Quantile level, strictly between 0 and 1.

    Returns
    -------
    Tensor
        0-d tensor, non-negative.
    """
    q = _check_open_level(q, "q", "q=0.9 for the 90% quantile")
    (quantile, y), _ = _check_targets(quantile=quantile, y=y)
    diff = y - quantile
    return torch.maximum(q * diff, (q - 1.0) * diff).mean()


def interval_score(lower: Tensor, upper: Tensor, y: Tensor, level: float) -> Tensor:
    """Mean interval (Winkler) score of central prediction intervals at ``level``.

    With ``alpha = 1 - level``, the score of an interval ``[l, u]`` is
    ``(u - l) + 2/alpha (l - y) 1[y < l] + 2/alpha (y - u) 1[y > u]`` (Winkler, 1972; Gneiting &
    Raftery, 2007): the width plus a penalty for each miss proportional to its distance. It is a
    proper score for the ``alpha/2`` and ``1 - alpha/2`` quantiles. Lower is better.

    Parameters
    ----------
    lower:
        Lower bounds, shape ``(B,)`` or ``(B, D)``.
    upper:
        Upper bounds, same shape; ``lower <= upper``.
    y:
        Targets, same shape.
    level:
        Nominal coverage of the intervals, strictly between 0 and 1 (e.g. 0.9).

    Returns
    -------
    Tensor
        0-d tensor, non-negative, in the units of ``y`` (mean over all ``B * D`` entries).
    """
    level = _check_open_level(level, "level", "level=0.9 for 90% intervals")
    (lower, upper, y), _ = _check_targets(lower=lower, upper=upper, y=y)
    _check_interval(lower, upper)
    penalty = 2.0 / (1.0 - level)
    below = (lower - y).clamp_min(0.0)
    above = (y - upper).clamp_min(0.0)
    return (upper - lower + penalty * (below + above)).mean()


def _resolve_levels(levels: object, like: Tensor) -> Tensor:
    if isinstance(levels, Integral) and not isinstance(levels, bool):
        if levels < 1:
            raise ValueError(f"levels must be a positive int or a 1-d tensor, got {levels!r}.")
        n = int(levels)
        return torch.arange(1, n + 1, dtype=like.dtype, device=like.device) / (n + 1)
    if isinstance(levels, (Tensor, np.ndarray)):
        grid = check_real(as_tensor(levels, "levels"), "levels")
        check_ndim(grid, "levels", (1,), "(L,) (quantile levels)")
        check_nonempty(grid, "levels")
        if not bool(((grid > 0) & (grid < 1)).all()):
            raise ValueError(
                f"every level must lie strictly between 0 and 1, got values in "
                f"[{float(grid.min()):.4g}, {float(grid.max()):.4g}]."
            )
        return grid.to(dtype=like.dtype, device=like.device)
    raise TypeError(
        f"levels must be an int (that many equally spaced levels k / (levels + 1)) or a 1-d "
        f"tensor of levels in (0, 1), got {type(levels).__name__}."
    )


def quantile_calibration_curve(
    means: Tensor, variances: Tensor, y: Tensor, levels: int | Tensor = 19
) -> tuple[Tensor, Tensor]:
    """Observed against expected frequency of ``y`` below the predicted quantiles.

    For each level ``p`` the observed frequency is the fraction of targets at or below the
    mixture's ``p``-quantile. Since the mixture CDF ``F`` is continuous and increasing,
    ``y <= F^{-1}(p)`` exactly when the probability integral transform ``F(y) <= p``, so the
    ``F(y)`` are computed once (no quantile search). A calibrated model gives
    ``observed ~= expected``; observed above expected at high levels and below at low levels
    means the intervals are too wide (under-confident), the reverse too narrow.

    Parameters
    ----------
    means:
        Component means of the predictive mixture, shape ``(S, B)`` or ``(S, B, D)``.
    variances:
        Component variances, same shape as ``means``; positive.
    y:
        Targets, shape ``(B,)`` or ``(B, D)``.
    levels:
        An int ``L`` for the ``L`` equally spaced levels ``k / (L + 1)``, ``k = 1..L`` (19 gives
        0.05, 0.10, ..., 0.95), or a 1-d tensor of levels in ``(0, 1)``.

    Returns
    -------
    expected:
        The levels, shape ``(L,)``.
    observed:
        Fraction of targets (over all ``B * D`` entries) at or below each predicted quantile,
        shape ``(L,)``.
    """
    means, variances, y = _check_mixture(means, variances, y)
    expected = _resolve_levels(levels, means)
    pit = torch.special.ndtr((y - means) / variances.sqrt()).mean(0).flatten()
    observed = (pit[None, :] <= expected[:, None]).to(means.dtype).mean(1)
    return expected, observed


def quantile_calibration_error(
    means: Tensor, variances: Tensor, y: Tensor, levels: int | Tensor = 19
) -> Tensor:
    """Mean absolute gap between observed and expected quantile frequencies.

    ``1/L sum_p |observed(p) - p|`` over the levels of :func:`quantile_calibration_curve`
    (the regression analogue of the ECE; Kuleshov et al., 2018). 0 is perfect.

    Parameters
    ----------
    means:
        Component means, shape ``(S, B)`` or ``(S, B, D)``.
    variances:
        Component variances, same shape; positive.
    y:
        Targets, shape ``(B,)`` or ``(B, D)``.
    levels:
        As for :func:`quantile_calibration_curve`.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1)``.
    """
    expected, observed = quantile_calibration_curve(means, variances, y, levels)
    return (observed - expected).abs().mean()
