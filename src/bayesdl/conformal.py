"""Split conformal prediction on top of any posterior: a finite-sample coverage guarantee.

Given ``n`` calibration examples that are exchangeable with the test examples, a conformity
score ``E`` (large = the model fits the example badly) and ``alpha`` in ``(0, 1)``, the
threshold ``q`` is the ``k``-th smallest calibration score with ``k = ceil((n + 1)(1 - alpha))``
(the empirical ``k / n`` quantile). The prediction region ``{y : E(x, y) <= q}`` then contains the
test label with probability at least ``1 - alpha`` over calibration and test draws (Vovk et al.,
2005; Lei et al., 2018), whatever the model, and, when the scores have no ties, at most
``1 - alpha + 1 / (n + 1)``. ``k <= n`` needs ``n >= (1 - alpha) / alpha`` calibration points
(:func:`min_calibration_size`).

* **Regression** (:func:`conformal_intervals`): the normalised residual
  ``E = |y - mean| / std`` of the predictive mixture, so the intervals ``mean +- q std`` are wide
  where the posterior is unsure. For ``D`` targets the score is the largest coordinate's, so
  the box of intervals covers all ``D`` targets together.
* **Classification** (:func:`conformal_sets`): adaptive prediction sets (APS; Romano, Sesia &
  Candes, 2020). With the classes ranked by predictive probability and ``m(c)`` the mass of the
  classes ranked above ``c``:

  - randomised: ``E = m(y) + u p(y)`` with ``u ~ U(0, 1)``, set ``{c : m(c) + u p(c) <= q}``
    (one ``u`` per example); coverage is ``1 - alpha`` up to ``1 / (n + 1)``, and a set can be
    empty;
  - non-randomised (``u = 0``): ``E = m(y)``, set ``{c : m(c) <= q}``: the top-ranked classes up
    to and including the one at which their cumulative mass first exceeds ``q``. Never empty
    (nothing is ranked above the top class); ``E`` ties at 0 whenever the label is the top class,
    so coverage can exceed ``1 - alpha`` by more than ``1 / (n + 1)``.

Both are exact split-conformal regions for their score, so the ``1 - alpha`` guarantee holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from bayesdl.calibration import require_task
from bayesdl.posteriors.wrapper import PosteriorWrapper, check_posterior
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

__all__ = [
    "ConformalIntervals",
    "ConformalPredictor",
    "ConformalSets",
    "aps_scores",
    "aps_sets",
    "conformal_intervals",
    "conformal_quantile",
    "conformal_rank",
    "conformal_sets",
    "conformalize",
    "min_calibration_size",
    "normalized_residuals",
    "split_conformal_classification",
    "split_conformal_regression",
]


# ---------------------------------------------------------------- the finite-sample quantile


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(
            f"alpha must be a number in (0, 1), got {alpha!r} ({type(alpha).__name__})."
        )
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"alpha is the allowed miscoverage and must lie strictly between 0 and 1, got "
            f"{alpha!r}; e.g. alpha=0.1 for 90% coverage."
        )
    return alpha


def conformal_rank(n: int, alpha: float) -> int:
    """``k = ceil((n + 1)(1 - alpha))``: the rank of the conformal threshold among ``n`` scores.

    The product is rounded down by a relative ``1e-12`` before the ceiling, so round-off such as
    ``10 * 0.9 = 9.000000000000002`` does not add a rank.
    """
    alpha = _check_alpha(alpha)
    return math.ceil((n + 1) * (1.0 - alpha) * (1.0 - 1e-12))


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration points for which ``conformal_rank(n, alpha) <= n``.

    About ``(1 - alpha) / alpha``: 9 for ``alpha = 0.1``, 19 for 0.05, 99 for 0.01.
    """
    alpha = _check_alpha(alpha)
    n = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def conformal_quantile(scores: Tensor, alpha: float) -> Tensor:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` calibration scores, a 0-d tensor.

    Raises a ``ValueError`` naming :func:`min_calibration_size` when there are too few scores.
    """
    alpha = _check_alpha(alpha)
    n = scores.numel()
    k = conformal_rank(n, alpha)
    if k > n:
        need = min_calibration_size(alpha)
        raise ValueError(
            f"alpha={alpha:g} needs at least {need} calibration points (the threshold is the "
            f"ceil((n + 1)(1 - alpha))-th smallest score, which must exist), got {n}. Pass at "
            f"least {need} calibration examples or a larger alpha."
        )
    return scores.reshape(-1).kthvalue(k).values


# ---------------------------------------------------------------- scores and regions


def normalized_residuals(prediction: RegressionPrediction, y: Tensor) -> Tensor:
    """Regression conformity scores ``|y - mean| / std``, the largest over targets, ``(B,)``."""
    y = _regression_targets(prediction, y, "y")
    score = (y - prediction.mean).abs() / prediction.std
    return score if score.ndim == 1 else score.amax(-1)


def _mass_above(probs: Tensor) -> Tensor:
    """Mass of the classes ranked above each class (descending stable sort), ``(B, C)``."""
    p_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cum = p_sorted.cumsum(-1)
    above_sorted = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
    return torch.empty_like(probs).scatter_(-1, order, above_sorted)


def aps_scores(probs: Tensor, y: Tensor, u: Tensor | None = None) -> Tensor:
    """APS conformity scores of labels ``y``: ``m(y) + u p(y)``, ``(B,)``.

    Parameters
    ----------
    probs:
        Predictive probabilities, ``(B, C)``.
    y:
        Labels, ``(B,)`` long.
    u:
        Uniform draws ``(B,)`` for the randomised score; ``None`` for the non-randomised one
        (``u = 0``: the mass ranked strictly above ``y``).
    """
    above = _mass_above(probs).gather(-1, y[:, None]).squeeze(-1)
    if u is None:
        return above
    return above + u * probs.gather(-1, y[:, None]).squeeze(-1)


def aps_sets(probs: Tensor, threshold: Tensor, u: Tensor | None = None) -> Tensor:
    """APS prediction sets at ``threshold``, a boolean mask ``(B, C)`` (True = in the set).

    ``u`` as in :func:`aps_scores`: uniform draws ``(B,)`` for randomised sets, ``None`` for the
    non-randomised ones (see the module docstring).
    """
    above = _mass_above(probs)
    if u is None:
        return above <= threshold
    return above + u[:, None] * probs <= threshold


@dataclass(frozen=True, eq=False)
class ConformalIntervals:
    """Split-conformal prediction intervals ``mean +- radius * std``.

    Attributes
    ----------
    lower, upper:
        Bounds, shape ``(B,)`` or ``(B, D)``.
    radius:
        The calibrated threshold ``q`` on ``|y - mean| / std``, 0-d.
    alpha:
        The allowed miscoverage: the intervals hold ``y`` with probability ``>= 1 - alpha``.
    n_calibration:
        Number of calibration examples.
    """

    lower: Tensor
    upper: Tensor
    radius: Tensor
    alpha: float
    n_calibration: int

    def contains(self, y: Tensor) -> Tensor:
        """Whether each target lies inside its interval (all ``D`` coordinates), ``(B,)`` bool."""
        y = torch.as_tensor(y, dtype=self.lower.dtype, device=self.lower.device)
        if y.shape != self.lower.shape:
            raise ValueError(f"y must have shape {tuple(self.lower.shape)}, got {tuple(y.shape)}.")
        inside = (self.lower <= y) & (y <= self.upper)
        return inside if inside.ndim == 1 else inside.all(-1)


@dataclass(frozen=True, eq=False)
class ConformalSets:
    """Split-conformal (APS) prediction sets.

    Attributes
    ----------
    sets:
        Boolean mask ``(B, C)``: ``sets[i, c]`` is True when class ``c`` is in example ``i``'s set.
    threshold:
        The calibrated APS threshold ``q``, 0-d.
    alpha:
        The allowed miscoverage.
    randomized:
        Whether the randomised APS variant was used.
    n_calibration:
        Number of calibration examples.
    """

    sets: Tensor
    threshold: Tensor
    alpha: float
    randomized: bool
    n_calibration: int

    @property
    def sizes(self) -> Tensor:
        """Number of classes in each set, ``(B,)`` long."""
        return self.sets.sum(-1)

    def contains(self, y: Tensor) -> Tensor:
        """Whether each label is in its set, ``(B,)`` bool."""
        y = _labels(y, len(self.sets), self.sets.shape[1], self.sets.device, "y")
        return self.sets.gather(-1, y[:, None]).squeeze(-1)


# ---------------------------------------------------------------- checks


def _regression_targets(prediction: RegressionPrediction, y: object, name: str) -> Tensor:
    y = torch.as_tensor(y, dtype=prediction.means.dtype, device=prediction.means.device)
    want = tuple(prediction.mean.shape)
    if y.ndim == 2 and y.shape[1] == 1 and len(want) == 1:
        y = y[:, 0]
    if tuple(y.shape) != want:
        raise ValueError(
            f"{name} must have shape {want} to match the model's predictions on the calibration "
            f"inputs, got {tuple(y.shape)}. Pass one target (row) per calibration example."
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains NaN or inf; remove those calibration examples.")
    return y


def _labels(y: object, n: int, n_classes: int, device: torch.device, name: str) -> Tensor:
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}.")
    if tuple(y.shape) != (n,):
        raise ValueError(
            f"{name} must have shape ({n},), one label per example, got {tuple(y.shape)}."
        )
    if n and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{name} must hold labels in [0, {n_classes}) for a model with {n_classes} classes, "
            f"got values in [{int(y.min())}, {int(y.max())}]."
        )
    return y.long()


def _check_prediction(prediction: object, kind: type, name: str) -> None:
    if not isinstance(prediction, kind):
        raise TypeError(
            f"{name} must be a {kind.__name__} (from posterior.predict), got "
            f"{type(prediction).__name__}."
        )


# ---------------------------------------------------------------- on predictions


def split_conformal_regression(
    pred_cal: RegressionPrediction, y_cal, pred_test: RegressionPrediction, alpha: float = 0.1
) -> ConformalIntervals:
    """Normalised split-conformal intervals from predictions on calibration and test inputs.

    Parameters
    ----------
    pred_cal:
        Predictions on the ``n`` calibration inputs.
    y_cal:
        Calibration targets, ``(n,)`` or ``(n, D)``.
    pred_test:
        Predictions on the test inputs (``B`` examples, same ``D``).
    alpha:
        Allowed miscoverage in ``(0, 1)``.

    Returns
    -------
    ConformalIntervals
        ``lower``/``upper`` of shape ``(B,)`` or ``(B, D)``.
    """
    alpha = _check_alpha(alpha)
    _check_prediction(pred_cal, RegressionPrediction, "pred_cal")
    _check_prediction(pred_test, RegressionPrediction, "pred_test")
    radius = _regression_radius(pred_cal, y_cal, alpha)
    if pred_cal.mean.shape[1:] != pred_test.mean.shape[1:]:
        raise ValueError(
            f"calibration and test predictions have different targets per example: "
            f"{tuple(pred_cal.mean.shape[1:])} and {tuple(pred_test.mean.shape[1:])}."
        )
    return _intervals(pred_test, radius, alpha, len(pred_cal.mean))


def _regression_radius(pred_cal: RegressionPrediction, y_cal, alpha: float) -> Tensor:
    """The conformal threshold on the normalised residuals of the calibration data, 0-d."""
    _check_prediction(pred_cal, RegressionPrediction, "pred_cal")
    std_cal = pred_cal.std
    if not bool((std_cal > 0).all()):
        raise ValueError(
            "the predictive std is 0 for some calibration example, so the normalised residual "
            "|y - mean| / std is undefined; give the likelihood a positive min_variance."
        )
    y_cal = _regression_targets(pred_cal, y_cal, "y_cal")
    return conformal_quantile(normalized_residuals(pred_cal, y_cal), alpha)


def _intervals(
    pred: RegressionPrediction, radius: Tensor, alpha: float, n: int
) -> ConformalIntervals:
    half = radius * pred.std
    return ConformalIntervals(pred.mean - half, pred.mean + half, radius, alpha, n)


def split_conformal_classification(
    pred_cal: ClassificationPrediction,
    y_cal,
    pred_test: ClassificationPrediction,
    alpha: float = 0.1,
    *,
    randomized: bool = True,
    generator: torch.Generator | None = None,
) -> ConformalSets:
    """APS prediction sets from predictions on calibration and test inputs.

    Parameters
    ----------
    pred_cal:
        Predictions on the ``n`` calibration inputs.
    y_cal:
        Calibration labels, ``(n,)``.
    pred_test:
        Predictions on the ``B`` test inputs (same classes).
    alpha:
        Allowed miscoverage in ``(0, 1)``.
    randomized:
        Randomised APS (coverage close to exact, sets may be empty) or not (never empty, can
        over-cover).
    generator:
        Generator of the uniform draws of the randomised variant, on the predictions' device.

    Returns
    -------
    ConformalSets
        ``sets`` of shape ``(B, C)``.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(randomized, bool):
        raise TypeError(f"randomized must be True or False, got {randomized!r}.")
    _check_prediction(pred_cal, ClassificationPrediction, "pred_cal")
    _check_prediction(pred_test, ClassificationPrediction, "pred_test")
    threshold = _aps_threshold(pred_cal, y_cal, alpha, randomized, generator)
    n_classes = pred_cal.probs.shape[1]
    if pred_test.probs.shape[1] != n_classes:
        raise ValueError(
            f"calibration predictions have {n_classes} classes but test predictions "
            f"{pred_test.probs.shape[1]}; use the same model for both."
        )
    return _sets(pred_test, threshold, alpha, randomized, len(pred_cal.probs), generator)


def _aps_threshold(
    pred_cal: ClassificationPrediction, y_cal, alpha: float, randomized: bool, generator
) -> Tensor:
    """The conformal APS threshold of the calibration data, 0-d (draws ``u`` if randomised)."""
    if not isinstance(randomized, bool):
        raise TypeError(f"randomized must be True or False, got {randomized!r}.")
    _check_prediction(pred_cal, ClassificationPrediction, "pred_cal")
    probs = pred_cal.probs
    n, n_classes = probs.shape
    y = _labels(y_cal, n, n_classes, probs.device, "y_cal")
    u = None
    if randomized:
        u = torch.rand(n, generator=generator, dtype=probs.dtype, device=probs.device)
    return conformal_quantile(aps_scores(probs, y, u), alpha)


def _sets(
    pred: ClassificationPrediction,
    threshold: Tensor,
    alpha: float,
    randomized: bool,
    n: int,
    generator,
) -> ConformalSets:
    probs = pred.probs
    u = None
    if randomized:
        u = torch.rand(len(probs), generator=generator, dtype=probs.dtype, device=probs.device)
    return ConformalSets(aps_sets(probs, threshold, u), threshold, alpha, randomized, n)


# ---------------------------------------------------------------- on a posterior


def _check_pair_lengths(pred_len: int, y, name: str) -> None:
    n = len(torch.as_tensor(y))
    if n != pred_len:
        raise ValueError(
            f"x_cal has {pred_len} examples but {name} has {n}; pass one target per "
            "calibration input."
        )


def conformal_intervals(
    posterior,
    x_cal,
    y_cal,
    x_test,
    alpha: float = 0.1,
    *,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> ConformalIntervals:
    """Split-conformal regression intervals around any fitted regression posterior.

    Parameters
    ----------
    posterior:
        A fitted regression posterior (any registered method, or a calibrated one).
    x_cal, y_cal:
        Calibration data not used in training: inputs ``(n, ...)`` and targets ``(n,)`` or
        ``(n, D)``; ``n >= min_calibration_size(alpha)``.
    x_test:
        Test inputs ``(B, ...)``.
    alpha:
        Allowed miscoverage in ``(0, 1)``: the intervals cover with probability ``>= 1 - alpha``.
    n_samples, generator:
        Passed to ``posterior.predict``.

    Returns
    -------
    ConformalIntervals
    """
    alpha = _check_alpha(alpha)
    require_task(posterior, "regression", "conformal_sets")
    pred_cal = posterior.predict(x_cal, n_samples, generator=generator)
    _check_pair_lengths(len(pred_cal.mean), y_cal, "y_cal")
    pred_test = posterior.predict(x_test, n_samples, generator=generator)
    return split_conformal_regression(pred_cal, y_cal, pred_test, alpha)


def conformal_sets(
    posterior,
    x_cal,
    y_cal,
    x_test,
    alpha: float = 0.1,
    *,
    randomized: bool = True,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> ConformalSets:
    """APS prediction sets around any fitted classification posterior.

    Parameters
    ----------
    posterior:
        A fitted classification posterior (any registered method, or a calibrated one).
    x_cal, y_cal:
        Calibration data not used in training: inputs ``(n, ...)`` and labels ``(n,)``;
        ``n >= min_calibration_size(alpha)``.
    x_test:
        Test inputs ``(B, ...)``.
    alpha:
        Allowed miscoverage in ``(0, 1)``.
    randomized:
        Randomised APS or not (see the module docstring).
    n_samples, generator:
        Passed to ``posterior.predict``; the generator also draws the randomisation.

    Returns
    -------
    ConformalSets
    """
    alpha = _check_alpha(alpha)
    require_task(posterior, "classification", "conformal_intervals")
    pred_cal = posterior.predict(x_cal, n_samples, generator=generator)
    _check_pair_lengths(len(pred_cal.probs), y_cal, "y_cal")
    pred_test = posterior.predict(x_test, n_samples, generator=generator)
    return split_conformal_classification(
        pred_cal, y_cal, pred_test, alpha, randomized=randomized, generator=generator
    )


class ConformalPredictor(PosteriorWrapper):
    """A fitted posterior with a split-conformal threshold, fitted once on calibration data.

    It predicts like the posterior (``predict``, ``sample_outputs``) and adds the conformal
    regions at any new inputs: :meth:`intervals` (regression) or :meth:`sets` (classification),
    which hold the true value with probability at least ``1 - alpha`` for test data exchangeable
    with the calibration data. Build it with :func:`conformalize`; it saves into model files.

    Parameters
    ----------
    posterior:
        The fitted posterior (or a calibrated one) the threshold was computed for.
    threshold:
        The radius ``q`` on ``|y - mean| / std`` (regression) or the APS threshold
        (classification).
    alpha:
        The allowed miscoverage.
    n_calibration:
        Number of calibration examples.
    randomized:
        Classification: whether the sets are randomised APS (see the module docstring).
    """

    wrapper_name = "conformal"

    def __init__(
        self,
        posterior,
        threshold: float,
        alpha: float,
        n_calibration: int,
        randomized: bool = True,
    ) -> None:
        super().__init__(posterior)
        self.alpha = _check_alpha(alpha)
        if isinstance(threshold, Tensor):
            threshold = float(threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, Real):
            raise TypeError(f"threshold must be a number, got {threshold!r}.")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}.")
        if isinstance(n_calibration, bool) or not isinstance(n_calibration, int):
            raise TypeError(f"n_calibration must be an integer, got {n_calibration!r}.")
        if not isinstance(randomized, bool):
            raise TypeError(f"randomized must be True or False, got {randomized!r}.")
        self.threshold = float(threshold)
        self.n_calibration = n_calibration
        self.randomized = randomized

    def __repr__(self) -> str:
        inner = type(self.posterior).__name__
        return (
            f"ConformalPredictor({inner}, alpha={self.alpha:g}, threshold={self.threshold:.6g}, "
            f"n_calibration={self.n_calibration})"
        )

    def wrapper_options(self) -> dict:
        return {
            "threshold": self.threshold,
            "alpha": self.alpha,
            "n_calibration": self.n_calibration,
            "randomized": self.randomized,
        }

    def _threshold(self) -> Tensor:
        return torch.tensor(self.threshold, dtype=self.dtype, device=self.device)

    def intervals(
        self, x, n_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> ConformalIntervals:
        """Conformal intervals at inputs ``x`` ``(B, ...)``: bounds ``(B,)`` or ``(B, D)``."""
        require_task(self, "regression", "sets")
        pred = self.predict(x, n_samples, generator=generator)
        return _intervals(pred, self._threshold(), self.alpha, self.n_calibration)

    def sets(
        self, x, n_samples: int | None = None, *, generator: torch.Generator | None = None
    ) -> ConformalSets:
        """Conformal APS sets at inputs ``x`` ``(B, ...)``: a mask ``(B, C)``; the generator
        also draws the randomisation."""
        require_task(self, "classification", "intervals")
        pred = self.predict(x, n_samples, generator=generator)
        return _sets(
            pred, self._threshold(), self.alpha, self.randomized, self.n_calibration, generator
        )


def conformalize(
    posterior,
    x_cal,
    y_cal,
    alpha: float = 0.1,
    *,
    randomized: bool = True,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> ConformalPredictor:
    """Fit the split-conformal threshold of a fitted posterior on calibration data, once.

    Parameters
    ----------
    posterior:
        A fitted posterior of either task (or a calibrated one).
    x_cal, y_cal:
        Calibration data not used in training: inputs ``(n, ...)`` and targets ``(n,)`` /
        ``(n, D)`` or labels ``(n,)``; ``n >= min_calibration_size(alpha)``.
    alpha:
        Allowed miscoverage in ``(0, 1)``.
    randomized:
        Classification: randomised APS or not (see the module docstring).
    n_samples, generator:
        Passed to ``posterior.predict``; the generator also draws the randomisation.

    Returns
    -------
    ConformalPredictor
        Its :meth:`~ConformalPredictor.intervals` or :meth:`~ConformalPredictor.sets` give the
        regions at new inputs.
    """
    alpha = _check_alpha(alpha)
    check_posterior(posterior)
    pred_cal = posterior.predict(x_cal, n_samples, generator=generator)
    n = len(pred_cal.probs if posterior.task == "classification" else pred_cal.mean)
    _check_pair_lengths(n, y_cal, "y_cal")
    if posterior.task == "classification":
        threshold = _aps_threshold(pred_cal, y_cal, alpha, randomized, generator)
    else:
        threshold = _regression_radius(pred_cal, y_cal, alpha)
    return ConformalPredictor(posterior, float(threshold), alpha, n, randomized)
