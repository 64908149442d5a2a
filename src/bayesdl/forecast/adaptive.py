"""Adaptive conformal inference: intervals whose level adapts online to hold long-run coverage.

Split conformal intervals (:mod:`bayesdl.conformal`) cover ``1 - alpha`` of new cases when they
are exchangeable with the calibration cases. A time series that changes regime breaks that:
after a jump in volatility yesterday's threshold is too small for weeks. Adaptive conformal
inference (Gibbs and Candes 2021, "Adaptive Conformal Inference Under Distribution Shift",
NeurIPS) keeps the conformal threshold but steers the level it is taken at. With the normalised
residual ``s_t = |y_t - mean_t| / std_t`` of the predictive as conformity score, at each step ``t``

* the threshold ``q_t`` is the ``ceil((n + 1)(1 - alpha_t))``-th smallest of the ``n`` scores
  seen so far (the last ``window`` of them, if set; optionally after calibration scores), and
  the interval is ``mean_t +- q_t std_t``; when ``alpha_t <= 0`` or there are too few scores the
  interval is the whole line, when ``alpha_t >= 1`` it is empty;
* once ``y_t`` is seen, ``err_t = 1`` if it fell outside, and
  ``alpha_{t+1} = alpha_t + gamma (alpha - err_t)``: a miss widens the next intervals, a hit
  narrows them a little.

Whatever the data, even chosen by an adversary, the miss rate over any ``T`` steps is within
``(max(alpha_1, 1 - alpha_1) + gamma) / (gamma T)`` of ``alpha`` (their Proposition 4.1): the
long-run coverage holds by construction, and the step size ``gamma`` trades how fast the level
reacts against how much it jitters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayesdl.conformal import conformal_rank, normalized_residuals
from bayesdl.metrics.regression import _check_open_level
from bayesdl.predictions import RegressionPrediction

__all__ = ["AdaptiveIntervals", "aci_coverage_bound", "adaptive_conformal"]


@dataclass(frozen=True)
class AdaptiveIntervals:
    """Intervals from :func:`adaptive_conformal`, one per step, in time order.

    Attributes
    ----------
    lower, upper:
        ``(N,)`` interval bounds (``-inf`` / ``inf`` where the interval was the whole line;
        ``lower == upper == mean`` where it was empty).
    alpha:
        ``(N,)`` the miscoverage level ``alpha_t`` each interval was taken at.
    threshold:
        ``(N,)`` ``q_t``, the multiple of the predictive std (``inf``: whole line, ``0``: empty).
    covered:
        ``(N,)`` bool, whether ``y_t`` fell inside (an empty interval covers nothing).
    level:
        The nominal coverage ``1 - alpha``.
    gamma:
        The step size.
    """

    lower: Tensor
    upper: Tensor
    alpha: Tensor
    threshold: Tensor
    covered: Tensor
    level: float
    gamma: float

    def __len__(self) -> int:
        return len(self.covered)

    def coverage(self) -> float:
        """The share of steps whose interval covered ``y_t``."""
        return float(self.covered.double().mean())


def _level(level: object) -> float:
    return _check_open_level(level, "level", "level=0.9 for 90% intervals")


def aci_coverage_bound(level: float, gamma: float, n_steps: int, alpha_start=None) -> float:
    """The largest possible ``|miss rate - alpha|`` of adaptive conformal inference after
    ``n_steps`` steps: ``(max(alpha_1, 1 - alpha_1) + gamma) / (gamma n_steps)``."""
    alpha = 1.0 - _level(level)
    a1 = alpha if alpha_start is None else float(alpha_start)
    return (max(a1, 1.0 - a1) + gamma) / (gamma * n_steps)


def adaptive_conformal(
    prediction: RegressionPrediction,
    y: object,
    *,
    level: float = 0.9,
    gamma: float = 0.005,
    window: int | None = None,
    calibration: tuple[RegressionPrediction, object] | None = None,
    alpha_start: float | None = None,
) -> AdaptiveIntervals:
    """Online conformal intervals for a sequence of predictions, adapting their level.

    Parameters
    ----------
    prediction:
        One-dimensional regression predictions in time order (``means`` ``(S, N)``), e.g.
        ``walk_forward(...).prediction``.
    y:
        ``(N,)`` the outcomes, revealed one step at a time: interval ``t`` uses ``y`` before
        ``t`` only.
    level:
        Nominal coverage, ``1 - alpha`` (default 0.9).
    gamma:
        Step size of the level's update, ``>= 0`` (default 0.005, Gibbs and Candes' choice).
        ``gamma = 0`` gives online split conformal with a fixed level.
    window:
        Use only the last ``window`` scores for the threshold (default all). A window forgets
        an old regime faster; it needs ``window >= (1 - alpha) / alpha``.
    calibration:
        Optional ``(prediction, y)`` before the first step, whose scores start the history;
        without it the first intervals, until there are enough scores, are the whole line.
    alpha_start:
        ``alpha_1`` (default ``1 - level``).

    Returns
    -------
    AdaptiveIntervals
        ``lower``, ``upper``, ``alpha``, ``threshold``, ``covered``, each ``(N,)``.
    """
    level = _level(level)
    alpha = 1.0 - level
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}.")
    if not isinstance(prediction, RegressionPrediction) or prediction.means.ndim != 2:
        raise TypeError(
            "prediction must be a one-target RegressionPrediction (means (S, N)), got "
            f"{type(prediction).__name__}."
        )
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be a positive integer, got {window!r}.")
    scores = normalized_residuals(prediction, torch.as_tensor(y)).double().cpu().numpy()
    history: list[float] = []
    if calibration is not None:
        cal_pred, cal_y = calibration
        history = normalized_residuals(cal_pred, torch.as_tensor(cal_y)).double().cpu().tolist()
    mean = prediction.mean.double().cpu().numpy()
    std = prediction.std.double().cpu().numpy()
    n = len(scores)
    a = alpha if alpha_start is None else float(alpha_start)
    alphas, thresholds, covered = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
    for t in range(n):
        alphas[t] = a
        past = np.asarray(history[-window:] if window else history)
        if a >= 1.0:
            q = 0.0  # the empty interval
        elif a <= 0.0:
            q = math.inf
        else:
            k = conformal_rank(len(past), a)
            q = math.inf if k > len(past) else float(np.partition(past, k - 1)[k - 1])
        thresholds[t] = q
        covered[t] = a < 1.0 and scores[t] <= q
        a += gamma * (alpha - (0.0 if covered[t] else 1.0))
        history.append(float(scores[t]))
    with np.errstate(invalid="ignore"):
        radius = np.where(np.isinf(thresholds), np.inf, thresholds * std)
    return AdaptiveIntervals(
        lower=torch.from_numpy(mean - radius),
        upper=torch.from_numpy(mean + radius),
        alpha=torch.from_numpy(alphas),
        threshold=torch.from_numpy(thresholds),
        covered=torch.from_numpy(covered),
        level=level,
        gamma=float(gamma),
    )
