"""Act on uncertainty: refer the cases a model is unsure of, hand over on inputs it never saw.

Two rules, each fitted once on held-out data and then applied to every new prediction:

* :class:`Referral` (selective prediction with a guarantee). The model decides a case when its
  uncertainty score is at most a threshold and refers it to a person otherwise. The threshold is
  chosen on a labelled calibration set so that the **error rate among the cases it decides is at
  most** ``target_risk`` **with probability at least** ``1 - delta`` over the draw of the
  calibration set, whatever the model and the data distribution (the cases must be exchangeable
  with the calibration cases). The procedure is Learn-then-Test (Angelopoulos, Bates, Candes,
  Jordan and Lei, 2021, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
  Control", arXiv:2110.01052) with the exact binomial tail as p-value, the bound that
  Geifman and El-Yaniv (2017, "Selective Classification for Deep Neural Networks") use, and
  fixed-sequence testing:

  - candidate thresholds keep ``m_1 < m_2 < ...`` of the most certain calibration cases (a grid
    of ``n_thresholds`` coverage levels, placed from the calibration scores alone, never from the
    labels);
  - the null hypothesis at a candidate is "the error rate among the cases this threshold keeps
    exceeds ``target_risk``"; with ``k`` errors among the ``m`` kept cases its p-value is
    ``P(Binomial(m, target_risk) <= k)``;
  - candidates are tested in order of growing coverage, each at level ``delta``, and testing
    stops at the first that is not rejected; the threshold is the last one rejected. Fixed-
    sequence testing controls the family-wise error at ``delta``, which is the guarantee.

  A candidate that keeps fewer than ``ceil(log(delta) / log(1 - target_risk))`` cases cannot be
  rejected even without any error, so it is skipped; when not even the whole calibration set is
  that large (e.g. 230 cases for a 1% target at ``delta = 0.1``), nothing can be certified and
  every case is referred. For regression a case is an error when ``|y - mean|`` exceeds a
  ``tolerance`` the user sets; a fixed rule with no guarantee, "refer when the interval is wider
  than a tolerance", is ``Referral(posterior, threshold=tolerance, score="width")``.

* :class:`OODGate` (hand-over under shift). Each input gets a conformal p-value: the share of
  in-distribution calibration inputs whose score is at least as high,
  ``p = (1 + #{s_cal >= s}) / (n + 1)`` (Vovk et al. 2005; the conformal out-of-distribution
  tests of Bates et al. 2023, "Testing for outliers with conformal p-values"). The gate hands
  over when ``p <= false_alarm``; for an input exchangeable with the calibration inputs this
  happens with probability at most ``false_alarm`` (and at least ``false_alarm - 1/(n+1)`` when
  scores do not tie), so the false-alarm rate on in-distribution data is what the user chose.

Scores (:func:`uncertainty_score`) are per example, higher meaning more uncertain:

==============  ========================  ============================================
name            classification            regression
==============  ========================  ============================================
``confidence``  ``1 - max_c p(c | x)``    n/a
``total``       predictive entropy        predictive standard deviation
``aleatoric``   expected entropy          ``sqrt(E[sigma^2])``
``epistemic``   mutual information        ``sqrt(Var[mu])``
``width``       n/a                       width of the mixture interval at ``level``
==============  ========================  ============================================

With several regression targets the per-target values are summed. A combination is a mapping of
names to weights, e.g. ``{"total": 1.0, "epistemic": 2.0}``, scored as the weighted sum.

Both rules wrap a fitted posterior (:class:`~bayesdl.posteriors.wrapper.PosteriorWrapper`): they
predict exactly like it, add :meth:`~Referral.decide`, and are saved and loaded with it in model
files (:func:`bayesdl.save`).

>>> referral = Referral.fit(posterior, x_cal, y_cal, target_risk=0.02, delta=0.1)  # doctest: +SKIP
>>> decision = referral.decide(x_test)                                            # doctest: +SKIP
>>> decision.refer, decision.coverage                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from bayesdl.posteriors.wrapper import PosteriorWrapper, check_posterior
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

__all__ = [
    "SCORES",
    "Decision",
    "OODGate",
    "Referral",
    "ReferralFit",
    "binomial_cdf",
    "decision_rules",
    "min_cases_to_certify",
    "referral_threshold",
    "uncertainty_score",
]

#: The score names each task knows.
SCORES: dict[str, tuple[str, ...]] = {
    "classification": ("confidence", "total", "aleatoric", "epistemic"),
    "regression": ("total", "aleatoric", "epistemic", "width"),
}


# ------------------------------------------------------------------------------------- scores
def _task_of(prediction: object) -> str:
    if isinstance(prediction, ClassificationPrediction):
        return "classification"
    if isinstance(prediction, RegressionPrediction):
        return "regression"
    raise TypeError(
        "expected a ClassificationPrediction or RegressionPrediction (from posterior.predict), "
        f"got {type(prediction).__name__}."
    )


def _weights(score: str | Mapping[str, float], task: str) -> dict[str, float]:
    """``score`` as ``{name: weight}``, checked against the task's names."""
    if isinstance(score, str):
        weights = {score: 1.0}
    elif isinstance(score, Mapping) and score:
        weights = dict(score)
    else:
        raise TypeError(
            f"score must be a name ({', '.join(SCORES[task])}) or a non-empty mapping of names "
            f"to weights, got {score!r}."
        )
    for name, weight in weights.items():
        if name not in SCORES[task]:
            raise ValueError(
                f"unknown {task} score {name!r}; choose from {', '.join(SCORES[task])} (or a "
                "mapping of them to weights)."
            )
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise TypeError(
                f"the weight of score {name!r} must be a finite number, got {weight!r}."
            )
        if weight < 0:
            raise ValueError(
                f"the weight of score {name!r} must be >= 0 (higher scores mean more uncertain), "
                f"got {weight!r}."
            )
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"at least one score weight must be positive, got {weights!r}.")
    return {k: float(v) for k, v in weights.items()}


def _check_level(level: object) -> float:
    if isinstance(level, bool) or not isinstance(level, Real) or not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}.")
    return float(level)


def _per_example(values: Tensor) -> Tensor:
    """``(B,)`` from ``(B,)`` or, summing over targets, ``(B, D)``."""
    return values.sum(-1) if values.ndim == 2 else values


def uncertainty_score(
    prediction: ClassificationPrediction | RegressionPrediction,
    score: str | Mapping[str, float] = "total",
    *,
    level: float = 0.9,
) -> Tensor:
    """Per-example uncertainty of a prediction, higher meaning less sure; shape ``(B,)``.

    Parameters
    ----------
    prediction:
        A prediction of ``B`` examples from ``posterior.predict``.
    score:
        A name from the module's table (classification: ``"confidence"``, ``"total"``,
        ``"aleatoric"``, ``"epistemic"``; regression: ``"total"``, ``"aleatoric"``,
        ``"epistemic"``, ``"width"``) or a mapping of names to non-negative weights.
    level:
        Regression ``"width"``: the level of the mixture interval.

    Returns
    -------
    Tensor
        ``(B,)`` in the prediction's dtype.
    """
    task = _task_of(prediction)
    weights = _weights(score, task)
    total: Tensor | None = None
    for name, weight in weights.items():
        if task == "classification":
            if name == "confidence":
                value = 1.0 - prediction.confidence
            else:
                value = getattr(prediction, name)
        elif name == "width":
            lower, upper = prediction.interval(_check_level(level))
            value = _per_example(upper - lower)
        else:
            value = _per_example(getattr(prediction, name).clamp_min(0).sqrt())
        value = weight * value
        total = value if total is None else total + value
    return total


# ------------------------------------------------------------------------- binomial tail bound
def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, exactly (a sum of log-space terms in float64).

    ``k < 0`` gives 0 and ``k >= n`` gives 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}.")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(i + 1)
        - torch.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    return min(1.0, float(torch.logsumexp(log_pmf, 0).exp()))


def min_cases_to_certify(target_risk: float, delta: float) -> int:
    """Fewest decided cases that can certify ``target_risk`` at confidence ``1 - delta``.

    With ``m`` cases and no error the binomial p-value is ``(1 - target_risk)^m``, so ``m``
    must reach ``log(delta) / log(1 - target_risk)`` (230 for 1% at ``delta = 0.1``, 45 for 5%).
    """
    target_risk, delta = (
        _check_fraction(target_risk, "target_risk"),
        _check_fraction(delta, "delta"),
    )
    return max(1, math.ceil(math.log(delta) / math.log1p(-target_risk) - 1e-12))


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class ReferralFit:
    """What :func:`referral_threshold` chose, on the calibration data.

    Attributes
    ----------
    threshold: accept a case when its score is at most this; ``-inf`` when nothing could be
        certified (every case is referred).
    n_calibration: calibration cases.
    n_kept: calibration cases the threshold keeps.
    n_errors: errors among them.
    p_value: the binomial p-value at the threshold (``1.0`` when none was certified).
    n_tested: candidate thresholds tested before testing stopped.
    """

    threshold: float
    n_calibration: int
    n_kept: int
    n_errors: int
    p_value: float
    n_tested: int

    @property
    def coverage(self) -> float:
        """Share of calibration cases decided."""
        return self.n_kept / self.n_calibration

    @property
    def risk(self) -> float | None:
        """Error rate among the decided calibration cases (``None`` when none is decided)."""
        return self.n_errors / self.n_kept if self.n_kept else None


def referral_threshold(
    scores: Tensor,
    errors: Tensor,
    target_risk: float,
    delta: float = 0.1,
    *,
    n_thresholds: int = 100,
) -> ReferralFit:
    """The Learn-then-Test threshold on calibration ``scores`` for 0/1 ``errors``.

    Parameters
    ----------
    scores:
        Uncertainty of each calibration case, ``(n,)``; higher means less sure.
    errors:
        ``(n,)``, 1 (or True) where the model's answer for that case is wrong.
    target_risk:
        The error rate allowed among decided cases, in ``(0, 1)``.
    delta:
        The allowed probability, over the calibration draw, that the rule's error rate exceeds
        ``target_risk``.
    n_thresholds:
        Candidate coverage levels ``1/n_thresholds, 2/n_thresholds, ...`` (each moved down to a
        boundary between distinct scores, so tied cases are kept or referred together).

    Returns
    -------
    ReferralFit
    """
    target_risk = _check_fraction(target_risk, "target_risk")
    delta = _check_fraction(delta, "delta")
    if isinstance(n_thresholds, bool) or not isinstance(n_thresholds, int) or n_thresholds < 1:
        raise ValueError(f"n_thresholds must be a positive integer, got {n_thresholds!r}.")
    scores = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    errors = torch.as_tensor(errors).detach().reshape(-1).to("cpu")
    if len(scores) == 0 or len(scores) != len(errors):
        raise ValueError(
            f"scores and errors must be non-empty and of one length, got {len(scores)} and "
            f"{len(errors)}."
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite; the calibration predictions hold NaN or inf.")
    errors = errors.to(torch.float64)
    if not ((errors == 0) | (errors == 1)).all():
        raise ValueError("errors must be 0 or 1 (is the answer for each case wrong?).")
    n = len(scores)
    order = torch.argsort(scores, stable=True)
    sorted_scores, cum_errors = scores[order], errors[order].cumsum(0)
    # Kept counts that end at a boundary between distinct scores.
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    boundaries = counts.cumsum(0)
    grid = torch.tensor(
        [math.ceil(n * j / n_thresholds) for j in range(1, n_thresholds + 1)], dtype=torch.long
    )
    # The largest boundary at or below each grid count (none below the first boundary).
    at = torch.searchsorted(boundaries, grid, right=True) - 1
    candidates = sorted({int(boundaries[i]) for i in at.tolist() if i >= 0})
    smallest = min_cases_to_certify(target_risk, delta)
    chosen, chosen_p, tested = 0, 1.0, 0
    for m in candidates:
        if m < smallest:
            continue  # cannot be rejected even without errors: not a hypothesis worth testing
        tested += 1
        p = binomial_cdf(int(cum_errors[m - 1]), m, target_risk)
        if p > delta:
            break
        chosen, chosen_p = m, p
    return ReferralFit(
        threshold=float(sorted_scores[chosen - 1]) if chosen else -math.inf,
        n_calibration=n,
        n_kept=chosen,
        n_errors=int(cum_errors[chosen - 1]) if chosen else 0,
        p_value=chosen_p,
        n_tested=tested,
    )


# ---------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    """What a rule decided for ``B`` cases.

    Attributes
    ----------
    refer:
        ``(B,)`` bool: True where the case goes to a person (:class:`Referral`) or control is
        handed over (:class:`OODGate`).
    score:
        ``(B,)`` the uncertainty score the rule compared.
    threshold:
        The rule refers when ``score > threshold``.
    rule:
        ``"referral"`` or ``"ood_gate"``.
    p_value:
        :class:`OODGate`: ``(B,)`` conformal p-values (small: unlike the calibration inputs);
        ``None`` for a referral.
    prediction:
        The prediction the decision was made on.
    """

    refer: Tensor
    score: Tensor
    threshold: float
    rule: str
    p_value: Tensor | None = None
    prediction: ClassificationPrediction | RegressionPrediction | None = None

    @property
    def accept(self) -> Tensor:
        """``(B,)`` bool: the cases the model decides itself (``~refer``)."""
        return ~self.refer

    @property
    def coverage(self) -> float:
        """Share of the cases the model decides itself."""
        return float(self.accept.float().mean())

    @property
    def actions(self) -> list[str]:
        """One word per case: ``"accept"`` / ``"refer"`` for a referral, ``"proceed"`` /
        ``"hand_over"`` for a gate."""
        words = ("accept", "refer") if self.rule == "referral" else ("proceed", "hand_over")
        return [words[int(r)] for r in self.refer.tolist()]


class _Rule(PosteriorWrapper):
    """A wrapper that decides from a score of the predictions it makes."""

    score: str | dict[str, float]
    level: float

    def _prediction(self, x_or_prediction, n_samples, generator):
        if isinstance(x_or_prediction, (ClassificationPrediction, RegressionPrediction)):
            if _task_of(x_or_prediction) != self.task:
                raise TypeError(
                    f"this {self.wrapper_name} rule was fitted for {self.task}, but got a "
                    f"{_task_of(x_or_prediction)} prediction."
                )
            return x_or_prediction
        return self.predict(x_or_prediction, n_samples, generator=generator)

    def scores(self, x_or_prediction, n_samples: int | None = None, *, generator=None) -> Tensor:
        """The rule's uncertainty score of each case, ``(B,)``."""
        prediction = self._prediction(x_or_prediction, n_samples, generator)
        return uncertainty_score(prediction, self.score, level=self.level)


def _score_option(score) -> str | dict[str, float]:
    return score if isinstance(score, str) else dict(score)


def _number(value: object, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    return float(value)


class Referral(_Rule):
    """A fitted posterior that refers the cases it is unsure of: accept when the uncertainty
    score is at most :attr:`threshold`, refer otherwise.

    Build it with :meth:`fit` for the guarantee (see the module docstring), or directly with a
    threshold of your own (no guarantee; e.g. ``score="width"`` and ``threshold=tolerance``
    refers regression cases whose interval is wider than ``tolerance``).

    Parameters
    ----------
    posterior:
        The fitted posterior (or a calibrated / conformal one).
    threshold:
        Accept when ``score <= threshold``; ``None`` or ``-inf`` refers every case.
    score:
        The uncertainty score (:func:`uncertainty_score`).
    level:
        Regression ``"width"``: the interval's level.
    target_risk, delta, tolerance, n_calibration, calibration_coverage, calibration_risk:
        What :meth:`fit` certified and measured; recorded, and reported by :meth:`summary`.
    """

    wrapper_name = "referral"

    def __init__(
        self,
        posterior,
        threshold: float | None,
        *,
        score: str | Mapping[str, float] = "total",
        level: float = 0.9,
        target_risk: float | None = None,
        delta: float | None = None,
        tolerance: float | None = None,
        n_calibration: int | None = None,
        calibration_coverage: float | None = None,
        calibration_risk: float | None = None,
    ) -> None:
        super().__init__(posterior)
        _weights(score, self.task)
        self.score = _score_option(score)
        self.level = _check_level(level)
        threshold = _number(threshold, "threshold", allow_none=True)
        if threshold is not None and (math.isnan(threshold) or threshold == math.inf):
            raise ValueError(f"threshold must be a finite number or -inf, got {threshold!r}.")
        self.threshold = -math.inf if threshold is None else threshold
        self.target_risk = None if target_risk is None else _check_fraction(target_risk, "target")
        self.delta = None if delta is None else _check_fraction(delta, "delta")
        self.tolerance = _number(tolerance, "tolerance", allow_none=True)
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {tolerance!r}.")
        if n_calibration is not None and (
            isinstance(n_calibration, bool) or not isinstance(n_calibration, int)
        ):
            raise TypeError(f"n_calibration must be an integer, got {n_calibration!r}.")
        self.n_calibration = n_calibration
        self.calibration_coverage = _number(
            calibration_coverage, "calibration_coverage", allow_none=True
        )
        self.calibration_risk = _number(calibration_risk, "calibration_risk", allow_none=True)

    def __repr__(self) -> str:
        inner = type(self.posterior).__name__
        guarantee = (
            f", target_risk={self.target_risk:g}, delta={self.delta:g}"
            if self.target_risk is not None and self.delta is not None
            else ""
        )
        return f"Referral({inner}, score={self.score!r}, threshold={self.threshold:.6g}{guarantee})"

    @property
    def certified(self) -> bool:
        """Whether any case can be decided (the threshold is not ``-inf``)."""
        return self.threshold > -math.inf

    def wrapper_options(self) -> dict:
        return {
            "threshold": self.threshold if self.certified else None,
            "score": _score_option(self.score),
            "level": self.level,
            "target_risk": self.target_risk,
            "delta": self.delta,
            "tolerance": self.tolerance,
            "n_calibration": self.n_calibration,
            "calibration_coverage": self.calibration_coverage,
            "calibration_risk": self.calibration_risk,
        }

    @classmethod
    def fit(
        cls,
        posterior,
        x_cal,
        y_cal,
        *,
        target_risk: float = 0.05,
        delta: float = 0.1,
        score: str | Mapping[str, float] | None = None,
        tolerance: float | None = None,
        level: float = 0.9,
        n_thresholds: int = 100,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Referral:
        """Choose the threshold on labelled calibration data for the guarantee.

        Parameters
        ----------
        posterior:
            A fitted posterior (or a calibrated / conformal one).
        x_cal, y_cal:
            Calibration data not used in training: inputs ``(n, ...)``, and labels ``(n,)``
            (classification) or targets ``(n,)`` / ``(n, D)`` (regression).
        target_risk:
            Error rate allowed among the decided cases.
        delta:
            Allowed probability (over the calibration draw) that the error rate exceeds
            ``target_risk``.
        score:
            The uncertainty score; default ``"total"`` (classification) or ``"width"``
            (regression).
        tolerance:
            Regression only, required: a case is an error when ``|y - mean| > tolerance`` (for
            any target).
        level:
            Regression ``"width"``: the interval's level.
        n_thresholds:
            Candidate coverage levels (see :func:`referral_threshold`).
        n_samples, generator:
            Passed to ``posterior.predict``.

        Returns
        -------
        Referral
            ``threshold`` is ``-inf`` (every case referred) when the calibration data cannot
            certify ``target_risk``; :meth:`summary` says why.
        """
        check_posterior(posterior)
        task = posterior.task
        score = ("total" if task == "classification" else "width") if score is None else score
        _weights(score, task)
        prediction = posterior.predict(x_cal, n_samples, generator=generator)
        errors = _errors(prediction, y_cal, tolerance)
        scores = uncertainty_score(prediction, score, level=level)
        chosen = referral_threshold(scores, errors, target_risk, delta, n_thresholds=n_thresholds)
        return cls(
            posterior,
            chosen.threshold if chosen.n_kept else None,
            score=score,
            level=level,
            target_risk=target_risk,
            delta=delta,
            tolerance=tolerance,
            n_calibration=chosen.n_calibration,
            calibration_coverage=chosen.coverage,
            calibration_risk=chosen.risk,
        )

    def decide(self, x_or_prediction, n_samples: int | None = None, *, generator=None) -> Decision:
        """Accept or refer each case of inputs ``x`` ``(B, ...)`` or of a prediction of them."""
        prediction = self._prediction(x_or_prediction, n_samples, generator)
        score = uncertainty_score(prediction, self.score, level=self.level)
        return Decision(
            refer=~(score <= self.threshold),
            score=score,
            threshold=self.threshold,
            rule=self.wrapper_name,
            prediction=prediction,
        )

    def summary(self) -> dict:
        """The rule as plain values: score, threshold, the guarantee, what calibration
        measured, and ``min_cases`` (fewest decided calibration cases that could certify the
        target)."""
        out = {"rule": self.wrapper_name, **self.wrapper_options()}
        out["threshold"] = self.threshold
        if self.target_risk is not None and self.delta is not None:
            out["min_cases"] = min_cases_to_certify(self.target_risk, self.delta)
        return out


def _errors(prediction, y, tolerance: float | None) -> Tensor:
    """0/1 per calibration case: wrong label, or ``|y - mean| > tolerance``."""
    if isinstance(prediction, ClassificationPrediction):
        if tolerance is not None:
            raise ValueError(
                "tolerance is for regression; a classification error is a wrong label."
            )
        n, n_classes = prediction.probs.shape
        y = torch.as_tensor(y, device=prediction.probs.device)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y_cal must hold integer class labels, got dtype {y.dtype}.")
        if y.shape != (n,):
            raise ValueError(
                f"y_cal must have shape ({n},), one label per case, got {tuple(y.shape)}."
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"y_cal must hold class labels in [0, {n_classes}).")
        return (prediction.label != y).to(torch.float64)
    if tolerance is None:
        raise ValueError(
            "a regression referral needs a tolerance: a case counts as an error when "
            "|y - mean| > tolerance (in the units of y). Pass Referral.fit(..., tolerance=...)."
        )
    tolerance = _number(tolerance, "tolerance")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}.")
    y = prediction._check_y(y)
    miss = (y - prediction.mean).abs() > tolerance
    if miss.ndim == 2:
        miss = miss.any(-1)
    return miss.to(torch.float64)


class OODGate(_Rule):
    """A fitted posterior that hands over control on inputs unlike its calibration inputs.

    Each input's conformal p-value is the share of in-distribution calibration scores at least
    as high as its own, ``(1 + #{s_cal >= s}) / (n + 1)``; the gate hands over when it is at most
    ``false_alarm``. Build it with :meth:`fit`.

    Parameters
    ----------
    posterior:
        The fitted posterior (or a wrapped one).
    calibration_scores:
        ``(n,)`` scores of in-distribution calibration inputs.
    false_alarm:
        The share of in-distribution inputs allowed to be handed over.
    score, level:
        The uncertainty score (:func:`uncertainty_score`).
    """

    wrapper_name = "ood_gate"

    def __init__(
        self,
        posterior,
        calibration_scores,
        *,
        false_alarm: float = 0.05,
        score: str | Mapping[str, float] = "epistemic",
        level: float = 0.9,
    ) -> None:
        super().__init__(posterior)
        _weights(score, self.task)
        self.score = _score_option(score)
        self.level = _check_level(level)
        self.false_alarm = _check_fraction(false_alarm, "false_alarm")
        cal = torch.as_tensor(calibration_scores, dtype=torch.float64).detach().reshape(-1)
        cal = cal.to("cpu")
        if not torch.isfinite(cal).all():
            raise ValueError("calibration_scores must be finite.")
        n = len(cal)
        # Hand over iff #{s_cal >= s} <= false_alarm (n + 1) - 1, which needs n + 1 >= 1/alpha.
        allowed = math.floor(self.false_alarm * (n + 1) + 1e-9) - 1
        if allowed < 0:
            raise ValueError(
                f"{n} calibration inputs cannot give a false-alarm rate of {self.false_alarm:g}: "
                f"the smallest conformal p-value is 1/(n + 1); use at least "
                f"{math.ceil(1 / self.false_alarm) - 1} calibration inputs."
            )
        self.calibration_scores = torch.sort(cal).values
        #: The gate hands over when ``score > threshold``.
        self.threshold = float(self.calibration_scores[n - 1 - allowed])
        if float(cal.max()) == float(cal.min()):
            raise ValueError(
                f"the {self.score!r} score is the same for every calibration input, so it cannot "
                "tell new inputs apart (a deterministic network has no epistemic uncertainty); "
                "choose another score, e.g. 'confidence' or 'total'."
            )

    def __repr__(self) -> str:
        inner = type(self.posterior).__name__
        return (
            f"OODGate({inner}, score={self.score!r}, false_alarm={self.false_alarm:g}, "
            f"n_calibration={len(self.calibration_scores)})"
        )

    def wrapper_options(self) -> dict:
        return {
            "calibration_scores": self.calibration_scores.tolist(),
            "false_alarm": self.false_alarm,
            "score": _score_option(self.score),
            "level": self.level,
        }

    @classmethod
    def fit(
        cls,
        posterior,
        x_cal,
        *,
        false_alarm: float = 0.05,
        score: str | Mapping[str, float] = "epistemic",
        level: float = 0.9,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> OODGate:
        """Score in-distribution calibration inputs ``x_cal`` ``(n, ...)`` (not used in
        training; no labels needed) and build the gate."""
        check_posterior(posterior)
        _weights(score, posterior.task)
        prediction = posterior.predict(x_cal, n_samples, generator=generator)
        scores = uncertainty_score(prediction, score, level=level)
        return cls(posterior, scores, false_alarm=false_alarm, score=score, level=level)

    def p_values(self, x_or_prediction, n_samples: int | None = None, *, generator=None) -> Tensor:
        """Conformal p-value of each case, ``(B,)`` in ``[1/(n+1), 1]``."""
        return self._p_values(self.scores(x_or_prediction, n_samples, generator=generator))

    def _p_values(self, score: Tensor) -> Tensor:
        cal = self.calibration_scores.to(score.device)
        n = len(cal)
        at_least = n - torch.searchsorted(cal, score.detach().to(torch.float64), right=False)
        return ((1 + at_least).to(torch.float64) / (n + 1)).to(score.dtype)

    def decide(self, x_or_prediction, n_samples: int | None = None, *, generator=None) -> Decision:
        """Proceed or hand over for inputs ``x`` ``(B, ...)`` or a prediction of them."""
        prediction = self._prediction(x_or_prediction, n_samples, generator)
        score = uncertainty_score(prediction, self.score, level=self.level)
        p = self._p_values(score)
        return Decision(
            refer=p <= self.false_alarm,
            score=score,
            threshold=self.threshold,
            rule=self.wrapper_name,
            p_value=p,
            prediction=prediction,
        )

    def summary(self) -> dict:
        """The rule as plain values (without the calibration scores themselves)."""
        return {
            "rule": self.wrapper_name,
            "score": _score_option(self.score),
            "false_alarm": self.false_alarm,
            "threshold": self.threshold,
            "n_calibration": len(self.calibration_scores),
        }


def decision_rules(posterior) -> list[Referral | OODGate]:
    """The decision rules in a chain of wrappers, from the outside in (empty for a bare
    posterior)."""
    check_posterior(posterior)
    rules = []
    inner = posterior
    while isinstance(inner, PosteriorWrapper):
        if isinstance(inner, _Rule):
            rules.append(inner)
        inner = inner.posterior
    return rules
