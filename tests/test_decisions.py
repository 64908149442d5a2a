"""Referral with a guaranteed error rate and the out-of-distribution gate (bayesdl.decisions).

The guarantees are checked statistically, with fixed seeds, over many calibration draws: the
share of draws whose error rate among decided cases exceeds the target is at most ``delta`` plus
three binomial standard errors, and the gate's false-alarm rate on in-distribution inputs lies
in its binomial band.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import bayesdl as bdl
from bayesdl.decisions import (
    Decision,
    OODGate,
    Referral,
    binomial_cdf,
    decision_rules,
    min_cases_to_certify,
    referral_threshold,
    uncertainty_score,
)
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction


# ---------------------------------------------------------------------------- the binomial tail
@pytest.mark.parametrize("n", [1, 7, 45, 230, 1000])
@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.9])
def test_binomial_cdf_matches_scipy(n, p):
    for k in sorted({0, 1, n // 10, n // 2, n - 1}):
        assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-15)


def test_binomial_cdf_edges():
    assert binomial_cdf(-1, 10, 0.3) == 0.0
    assert binomial_cdf(10, 10, 0.3) == 1.0
    assert binomial_cdf(3, 10, 0.0) == 1.0
    assert binomial_cdf(3, 10, 1.0) == 0.0
    with pytest.raises(ValueError, match="p must"):
        binomial_cdf(1, 10, 1.5)


def test_min_cases_to_certify():
    assert min_cases_to_certify(0.01, 0.1) == 230  # 0.99^229 > 0.1 >= 0.99^230
    assert min_cases_to_certify(0.05, 0.1) == 45
    for target, delta in [(0.01, 0.1), (0.02, 0.05), (0.05, 0.1), (0.2, 0.01)]:
        m = min_cases_to_certify(target, delta)
        assert (1 - target) ** m <= delta < (1 - target) ** (m - 1)
        # m error-free cases certify the target; m - 1 cannot
        fit = referral_threshold(
            torch.arange(m, dtype=torch.float64), torch.zeros(m), target, delta
        )
        assert fit.n_kept == m and fit.threshold == m - 1
        fit = referral_threshold(torch.arange(m - 1.0), torch.zeros(m - 1), target, delta)
        assert fit.n_kept == 0 and fit.threshold == -math.inf and fit.risk is None


# ------------------------------------------------------------------------- the LTT guarantee
def _population_draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores uniform on [0, 1], error probability 0.3 s^2: the error rate among the cases with
    score <= t is 0.1 t^2 (t <= 1), in closed form."""
    s = torch.rand(n, generator=g, dtype=torch.float64)
    return s, (torch.rand(n, generator=g, dtype=torch.float64) < 0.3 * s**2).double()


@pytest.mark.parametrize(
    ("n", "target", "delta", "share"), [(1000, 0.05, 0.1, 0.6), (300, 0.02, 0.2, 0.35)]
)
def test_guarantee_holds_over_calibration_draws(n, target, delta, share):
    g = torch.Generator().manual_seed(0)
    draws, violations, coverages = 600, 0, []
    for _ in range(draws):
        fit = referral_threshold(*_population_draw(n, g), target, delta)
        t = min(max(fit.threshold, 0.0), 1.0)
        violations += 0.1 * t**2 > target  # the rule's true error rate among decided cases
        coverages.append(t)
    assert violations / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    # and it is not vacuous: on average it decides a good share of what the oracle would (less
    # with few calibration cases: 80 error-free ones are needed to certify 2% at delta 0.2)
    oracle = math.sqrt(target / 0.1)
    assert sum(coverages) / draws > share * oracle


def test_guarantee_fails_without_the_bound():
    """The plain empirical rule (largest threshold whose calibration error rate is at most the
    target) violates the target about half the time: the test can tell the two apart."""
    g = torch.Generator().manual_seed(1)
    violations = 0
    for _ in range(200):
        s, e = _population_draw(1000, g)
        order = torch.argsort(s)
        risk = e[order].cumsum(0) / torch.arange(1, 1001)
        t = float(s[order][torch.nonzero(risk <= 0.05).max()])
        violations += 0.1 * t**2 > 0.05
    assert violations / 200 > 0.3


def test_ties_are_kept_or_referred_together():
    scores = torch.tensor([0.1] * 60 + [0.2] * 60 + [0.3] * 60, dtype=torch.float64)
    errors = torch.zeros(180)
    errors[150:] = 1  # the 0.3 group is half wrong
    fit = referral_threshold(scores, errors, 0.05, 0.1, n_thresholds=7)
    assert fit.n_kept in (60, 120) and fit.threshold in (0.1, 0.2)
    assert fit.n_kept == 120  # both error-free groups pass
    assert fit.coverage == pytest.approx(120 / 180) and fit.risk == 0.0


def test_testing_stops_at_the_first_failure():
    """Fixed-sequence testing: a later candidate that would pass is not reached once one fails."""
    n = 1000
    scores = torch.arange(n, dtype=torch.float64)
    errors = torch.zeros(n)
    errors[100:130] = 1  # 30 errors among the 130 most certain: 23% there
    fit = referral_threshold(scores, errors, 0.05, 0.1, n_thresholds=10)
    assert fit.n_kept == 100 and fit.n_tested == 2  # passes at 100, fails at 200 (30/200)
    assert fit.p_value == pytest.approx(0.95**100)


def test_bad_threshold_input():
    s, e = torch.rand(50), torch.zeros(50)
    with pytest.raises(ValueError, match="target_risk"):
        referral_threshold(s, e, 0.0)
    with pytest.raises(ValueError, match="delta"):
        referral_threshold(s, e, 0.05, 1.0)
    with pytest.raises(ValueError, match="one length"):
        referral_threshold(s, e[:-1], 0.05)
    with pytest.raises(ValueError, match="0 or 1"):
        referral_threshold(s, e + 0.5, 0.05)
    with pytest.raises(ValueError, match="finite"):
        referral_threshold(torch.full((50,), math.nan), e, 0.05)
    with pytest.raises(ValueError, match="n_thresholds"):
        referral_threshold(s, e, 0.05, n_thresholds=0)


# ----------------------------------------------------------------------------------- scores
def _classification_prediction(g) -> ClassificationPrediction:
    logits = torch.randn(6, 10, 4, generator=g, dtype=torch.float64)
    return bdl.Categorical().predictive(logits)


def test_classification_scores():
    pred = _classification_prediction(torch.Generator().manual_seed(0))
    torch.testing.assert_close(uncertainty_score(pred, "confidence"), 1 - pred.probs.max(-1).values)
    for name in ("total", "aleatoric", "epistemic"):
        torch.testing.assert_close(uncertainty_score(pred, name), getattr(pred, name))
    torch.testing.assert_close(
        uncertainty_score(pred, {"total": 1.0, "epistemic": 2.5}),
        pred.total + 2.5 * pred.epistemic,
    )
    with pytest.raises(ValueError, match="unknown classification score 'width'"):
        uncertainty_score(pred, "width")
    with pytest.raises(ValueError, match=">= 0"):
        uncertainty_score(pred, {"total": -1.0})
    with pytest.raises(TypeError, match="Prediction"):
        uncertainty_score(pred.probs, "total")


def test_regression_scores():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 5, 2, generator=g, dtype=torch.float64)
    pred = RegressionPrediction(means, torch.rand(8, 5, 2, generator=g, dtype=torch.float64) + 0.1)
    torch.testing.assert_close(uncertainty_score(pred, "total"), pred.std.sum(-1))
    torch.testing.assert_close(uncertainty_score(pred, "epistemic"), pred.epistemic.sqrt().sum(-1))
    lower, upper = pred.interval(0.8)
    torch.testing.assert_close(uncertainty_score(pred, "width", level=0.8), (upper - lower).sum(-1))
    one = RegressionPrediction(means[..., 0], torch.ones(8, 5, dtype=torch.float64))
    assert uncertainty_score(one, "aleatoric").shape == (5,)
    with pytest.raises(ValueError, match="unknown regression score 'confidence'"):
        uncertainty_score(pred, "confidence")


# ------------------------------------------------------------------------ referral end to end
def _two_class_problem(n: int, g: torch.Generator):
    """Labels from a logistic model: P(y=1 | x) = sigmoid(3 x_0); inputs in 2-D."""
    x = torch.randn(n, 2, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(3 * x[:, 0])).long()
    return x, y


@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    post = bdl.DeepEnsemble(bdl.models.mlp(2, 2, hidden=(16,)), "categorical", n_members=3, seed=0)
    post.fit(_two_class_problem(800, g), epochs=15, batch_size=100, lr=1e-2, seed=0)
    return post


def test_referral_guarantee_over_random_splits(classifier):
    """Over random calibration / test splits, the test error among decided cases exceeds the
    target in at most delta of the splits (plus binomial tolerance)."""
    g = torch.Generator().manual_seed(1)
    x, y = _two_class_problem(20_000, g)
    pred = classifier.predict(x)
    scores, errors = uncertainty_score(pred, "total"), (pred.label != y).double()
    target, delta, splits, violations, kept = 0.05, 0.1, 200, 0, []
    for _ in range(splits):
        perm = torch.randperm(len(x), generator=g)
        cal, test = perm[:1000], perm[1000:]
        fit = referral_threshold(scores[cal], errors[cal], target, delta)
        decided = scores[test] <= fit.threshold
        if decided.any():
            violations += float(errors[test][decided].mean()) > target
        kept.append(float(decided.double().mean()))
    assert violations / splits <= delta + 3 * math.sqrt(delta * (1 - delta) / splits)
    # the overall error is about 0.2; referral still decides about a third of the cases
    assert sum(kept) / splits > 0.3


def test_referral_fit_and_decide(classifier):
    g = torch.Generator().manual_seed(2)
    x_cal, y_cal = _two_class_problem(2000, g)
    referral = Referral.fit(classifier, x_cal, y_cal, target_risk=0.05, delta=0.1)
    assert referral.certified and referral.score == "total"
    summary = referral.summary()
    assert summary["n_calibration"] == 2000 and summary["min_cases"] == 45
    assert summary["calibration_risk"] <= 0.05 and 0 < summary["calibration_coverage"] < 1
    x, y = _two_class_problem(5000, g)
    decision = referral.decide(x)
    assert isinstance(decision, Decision) and decision.rule == "referral"
    assert decision.refer.shape == (5000,) and decision.refer.dtype == torch.bool
    torch.testing.assert_close(decision.refer, decision.score > referral.threshold)
    assert 0 < decision.coverage < 1 and set(decision.actions) == {"accept", "refer"}
    accepted = decision.prediction.label[decision.accept]
    error = float((accepted != y[decision.accept]).double().mean())
    overall = float((decision.prediction.label != y).double().mean())
    assert error < overall and error < 0.08
    # a prediction made elsewhere gives the same decision
    again = referral.decide(classifier.predict(x))
    torch.testing.assert_close(again.refer, decision.refer)


def test_referral_refers_everything_when_nothing_can_be_certified(classifier):
    g = torch.Generator().manual_seed(3)
    x_cal, y_cal = _two_class_problem(200, g)  # fewer than the 230 cases a 1% target needs
    referral = Referral.fit(classifier, x_cal, y_cal, target_risk=0.01, delta=0.1)
    assert not referral.certified and referral.threshold == -math.inf
    assert bool(referral.decide(x_cal).refer.all())
    assert referral.summary()["min_cases"] == 230


def test_regression_referral():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3000, 1, generator=g) * 4 - 2
    y = x[:, 0] + (0.05 + 0.3 * x[:, 0].abs()) * torch.randn(3000, generator=g)
    torch.manual_seed(0)
    post = bdl.DeepEnsemble(bdl.models.mlp(1, 2, hidden=(32,)), "gaussian", n_members=3, seed=0)
    post.fit((x[:1000], y[:1000]), epochs=40, batch_size=100, lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="tolerance"):
        Referral.fit(post, x[1000:2000], y[1000:2000])
    referral = Referral.fit(post, x[1000:2000], y[1000:2000], target_risk=0.1, tolerance=0.5)
    assert referral.score == "width" and referral.certified
    decision = referral.decide(x[2000:])
    miss = (decision.prediction.mean - y[2000:]).abs() > 0.5
    assert float(miss[decision.accept].double().mean()) <= 0.1 + 0.03
    assert float(miss[decision.refer].double().mean()) > float(
        miss[decision.accept].double().mean()
    )
    # the fixed rule: refer when the 90% interval is wider than 1.0
    fixed = Referral(post, threshold=1.0, score="width", level=0.9)
    lower, upper = decision.prediction.interval(0.9)
    torch.testing.assert_close(fixed.decide(decision.prediction).refer, (upper - lower) > 1.0)


def test_referral_bad_input(classifier):
    x, y = _two_class_problem(300, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="tolerance is for regression"):
        Referral.fit(classifier, x, y, tolerance=0.1)
    with pytest.raises(TypeError, match="integer class labels"):
        Referral.fit(classifier, x, y.float())
    with pytest.raises(ValueError, match=r"shape \(300,\)"):
        Referral.fit(classifier, x, y[:-1])
    with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
        Referral.fit(classifier, x, y + 1)
    with pytest.raises(ValueError, match="unknown classification score"):
        Referral.fit(classifier, x, y, score="width")
    with pytest.raises(TypeError, match="fitted bayesdl Posterior"):
        Referral.fit(nn.Linear(2, 2), x, y)
    referral = Referral(classifier, threshold=0.3)
    regression = RegressionPrediction(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(TypeError, match="fitted for classification"):
        referral.decide(regression)


# ------------------------------------------------------------------------------- the OOD gate
def test_gate_p_values_by_hand(classifier):
    gate = OODGate(classifier, [0.1, 0.2, 0.2, 0.5], false_alarm=0.4, score="total")
    pred = bdl.Categorical().predictive(torch.zeros(1, 4, 2))
    scores = torch.tensor([0.05, 0.2, 0.3, 0.6], dtype=torch.float64)
    # (1 + #{s_cal >= s}) / (n + 1)
    torch.testing.assert_close(gate._p_values(scores), torch.tensor([1.0, 0.8, 0.4, 0.2]).double())
    # hand over iff p <= 0.4: #{s_cal >= s} <= 1, i.e. s > 0.2 (the second largest)
    assert gate.threshold == 0.2
    # uniform probabilities: entropy log 2 = 0.69 > 0.5, p = 1/5
    decision = gate.decide(pred)
    assert decision.refer.tolist() == [True] * 4
    torch.testing.assert_close(decision.p_value, torch.full((4,), 0.2))
    with pytest.raises(ValueError, match="at least 19 calibration"):
        OODGate(classifier, torch.rand(10), false_alarm=0.05, score="total")
    with pytest.raises(ValueError, match="same for every calibration input"):
        OODGate(classifier, torch.zeros(100), score="epistemic")


def test_gate_false_alarm_rate_in_the_binomial_band(classifier):
    g = torch.Generator().manual_seed(6)
    x, _ = _two_class_problem(20_000, g)
    scores = uncertainty_score(classifier.predict(x), "epistemic")
    alpha, n_cal, splits = 0.05, 500, 200
    rates = []
    for _ in range(splits):
        perm = torch.randperm(len(x), generator=g)
        gate = OODGate(classifier, scores[perm[:n_cal]], false_alarm=alpha)
        rates.append(float((gate._p_values(scores[perm[n_cal:]]) <= alpha).double().mean()))
    mean = sum(rates) / splits
    # marginally: alpha - 1/(n+1) <= P(hand over) <= alpha; the average over splits of
    # 19,500 test inputs each has a standard error below sqrt(alpha (1 - alpha) / n_cal / splits)
    tol = 3 * math.sqrt(alpha * (1 - alpha) / n_cal / splits) + 3e-4
    assert alpha - 1 / (n_cal + 1) - tol <= mean <= alpha + tol


def test_gate_hands_over_far_away_inputs(classifier):
    g = torch.Generator().manual_seed(7)
    x_cal, _ = _two_class_problem(1000, g)
    gate = OODGate.fit(classifier, x_cal, false_alarm=0.05)
    x_in, _ = _two_class_problem(2000, g)
    far = torch.randn(2000, 2, generator=g) * 3 + torch.tensor([0.0, 12.0])
    inside, outside = gate.decide(x_in), gate.decide(far)
    assert inside.rule == "ood_gate" and inside.p_value.shape == (2000,)
    assert set(inside.actions) <= {"proceed", "hand_over"}
    assert 1 - inside.coverage < 0.1 and 1 - outside.coverage > 0.5
    torch.testing.assert_close(outside.refer, outside.p_value <= 0.05)


# ------------------------------------------------------------------------------ model files
def test_rules_save_and_load(tmp_path, classifier):
    from bayesdl.calibration import temperature_scale

    g = torch.Generator().manual_seed(8)
    x_cal, y_cal = _two_class_problem(1000, g)
    calibrated = temperature_scale(classifier, x_cal[:500], y_cal[:500])
    referral = Referral.fit(
        calibrated,
        x_cal[500:],
        y_cal[500:],
        target_risk=0.1,
        score={"total": 1.0, "epistemic": 3.0},
    )
    gate = OODGate.fit(referral, x_cal[500:], false_alarm=0.1)
    assert decision_rules(gate) == [gate, referral] and decision_rules(classifier) == []
    bdl.save(gate, tmp_path / "m.safetensors")
    info = bdl.inspect(tmp_path / "m.safetensors")
    assert [name for name, _ in info.wrappers] == ["ood_gate", "referral", "calibration"]
    loaded = bdl.load(tmp_path / "m.safetensors", model=bdl.models.mlp(2, 2, hidden=(16,)))
    assert isinstance(loaded, OODGate) and isinstance(loaded.posterior, Referral)
    x, _ = _two_class_problem(500, g)
    for before, after in zip(decision_rules(gate), decision_rules(loaded), strict=True):
        assert after.summary() == before.summary()
        a, b = before.decide(x), after.decide(x)
        torch.testing.assert_close(a.score, b.score)
        assert torch.equal(a.refer, b.refer)
