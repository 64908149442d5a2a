"""Split conformal prediction: the finite-sample coverage guarantee over many random splits with
deliberately miscalibrated models, hand-computed scores and sets, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesdl as bdl
from bayesdl import conformal
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

F64 = torch.float64
N_SPLITS = 200
ALPHA = 0.1


def miscalibrated_regression(n: int = 1200, seed: int = 0):
    """Noise std 0.5 + |x_2|; the model is biased by 0.3 and claims a constant std of 0.32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = 2 * x[:, 0] - x[:, 1] + (0.5 + x[:, 2].abs()) * torch.randn(n, generator=g, dtype=F64)
    net = nn.Linear(3, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
        net.bias.copy_(torch.tensor([0.3, math.log(0.1)]))
    return bdl.Deterministic(net, "gaussian"), x, y


def overconfident_classifier(n: int = 1500, seed: int = 0):
    """Labels from softmax(x W); the model's logits are 4 x W x plus a wrong bias."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=g, dtype=F64)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.multinomial(torch.softmax(x @ weight, -1), 1, generator=g)[:, 0]
    net = nn.Linear(6, 5).double()
    with torch.no_grad():
        net.weight.copy_(4 * weight.T)
        net.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0]))
    return bdl.Deterministic(net, "categorical"), x, y


def splits(n: int, n_cal: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(N_SPLITS):
        perm = torch.randperm(n, generator=g)
        yield perm[:n_cal], perm[n_cal:]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    v = torch.tensor(values, dtype=F64)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def sub(pred: RegressionPrediction, idx: torch.Tensor) -> RegressionPrediction:
    return RegressionPrediction(pred.means[:, idx], pred.variances[:, idx])


# ---------------------------------------------------------------- coverage over random splits


def test_regression_intervals_cover_over_random_splits():
    post, x, y = miscalibrated_regression()
    pred = post.predict(x)  # the model's outputs, computed once
    lower, upper = pred.interval(1 - ALPHA)
    naive = float(((lower <= y) & (y <= upper)).double().mean())
    assert naive < 0.6  # the model's own 90% intervals are far too narrow
    n_cal = 200
    coverage, radii = [], []
    for cal, test in splits(len(x), n_cal, seed=1):
        bands = conformal.split_conformal_regression(sub(pred, cal), y[cal], sub(pred, test), ALPHA)
        coverage.append(float(bands.contains(y[test]).double().mean()))
        radii.append(float(bands.radius))
    mean, se = mean_and_se(coverage)
    assert mean >= 1 - ALPHA - 3 * se, (mean, se)
    assert mean <= 1 - ALPHA + 1 / (n_cal + 1) + 3 * se, (mean, se)  # and not trivially wide
    assert min(radii) > 1.645  # wider than the model's own z-interval


def test_joint_intervals_for_two_targets_cover():
    # a hand-built mixture of 4 draws per example, too sure of itself, for 2 targets
    g = torch.Generator().manual_seed(4)
    n = 1000
    truth = torch.randn(n, 2, generator=g, dtype=F64)
    y = truth + torch.randn(n, 2, generator=g, dtype=F64) * torch.tensor([1.0, 0.3], dtype=F64)
    means = truth + 0.1 * torch.randn(4, n, 2, generator=g, dtype=F64)
    pred = RegressionPrediction(means, torch.full((4, n, 2), 0.05, dtype=F64))
    coverage = []
    for cal, test in splits(n, 150, seed=5):
        bands = conformal.split_conformal_regression(sub(pred, cal), y[cal], sub(pred, test), ALPHA)
        assert bands.lower.shape == (len(test), 2)
        coverage.append(float(bands.contains(y[test]).double().mean()))
    mean, se = mean_and_se(coverage)
    assert mean >= 1 - ALPHA - 3 * se, (mean, se)


@pytest.mark.parametrize("randomized", [True, False])
def test_aps_sets_cover_over_random_splits(randomized):
    post, x, y = overconfident_classifier()
    pred = post.predict(x)
    probs = pred.probs
    g = torch.Generator().manual_seed(2)
    naive = conformal.aps_sets(
        probs, torch.tensor(1 - ALPHA, dtype=F64), torch.rand(len(y), generator=g, dtype=F64)
    )
    assert float(naive[torch.arange(len(y)), y].double().mean()) < 1 - ALPHA - 0.05
    n_cal = 500
    coverage, sizes = [], []
    for cal, test in splits(len(x), n_cal, seed=3):
        sets = conformal.split_conformal_classification(
            ClassificationPrediction(pred.log_probs[:, cal]),
            y[cal],
            ClassificationPrediction(pred.log_probs[:, test]),
            ALPHA,
            randomized=randomized,
            generator=g,
        )
        coverage.append(float(sets.contains(y[test]).double().mean()))
        sizes.append(float(sets.sizes.double().mean()))
    mean, se = mean_and_se(coverage)
    assert mean >= 1 - ALPHA - 3 * se, (mean, se)
    if randomized:
        assert mean <= 1 - ALPHA + 1 / (n_cal + 1) + 3 * se, (mean, se)
    assert 1.0 < sum(sizes) / len(sizes) < 5.0  # informative: not every class


# ---------------------------------------------------------------- the quantile and the scores


def test_rank_and_minimum_calibration_size():
    assert conformal.conformal_rank(9, 0.1) == 9
    assert conformal.conformal_rank(10, 0.1) == 10  # ceil(11 * 0.9) = ceil(9.9)
    assert conformal.conformal_rank(99, 0.01) == 99
    for alpha, need in ((0.1, 9), (0.05, 19), (0.01, 99), (0.2, 4), (0.5, 1), (0.3, 3)):
        assert conformal.min_calibration_size(alpha) == need
    for alpha in torch.linspace(0.005, 0.995, 199).tolist():
        need = conformal.min_calibration_size(alpha)
        assert conformal.conformal_rank(need, alpha) <= need
        assert need == 1 or conformal.conformal_rank(need - 1, alpha) > need - 1


def test_conformal_quantile_by_hand():
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 10.0, 4.0, 8.0, 6.0])
    # n = 10, alpha = 0.2: k = ceil(11 * 0.8) = 9 -> the 9th smallest is 9
    assert conformal.conformal_quantile(scores, 0.2).item() == 9.0
    # alpha = 0.5: k = ceil(5.5) = 6
    assert conformal.conformal_quantile(scores, 0.5).item() == 6.0


def test_aps_scores_and_sets_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=F64)
    y = torch.tensor([1, 0])
    u = torch.tensor([0.5, 0.25], dtype=F64)
    # example 0: ranked 0, 1, 2; mass above class 1 = 0.5 -> 0.5 + 0.5 * 0.3 = 0.65
    # example 1: ranked 1, 2, 0; mass above class 0 = 0.9 -> 0.9 + 0.25 * 0.1 = 0.925
    torch.testing.assert_close(
        conformal.aps_scores(probs, y, u), torch.tensor([0.65, 0.925], dtype=F64)
    )
    torch.testing.assert_close(conformal.aps_scores(probs, y), torch.tensor([0.5, 0.9], dtype=F64))
    q = torch.tensor(0.65, dtype=F64)
    # randomised at 0.65: example 0: 0 + .25, .5 + .15, .8 + .1 -> {0, 1}
    #                     example 1: .9 + .025, 0 + .15, .6 + .075 -> {1}
    sets = conformal.aps_sets(probs, q, u)
    assert sets.tolist() == [[True, True, False], [False, True, False]]
    # non-randomised at 0.65: mass above <= 0.65: example 0 {0, 1}; example 1 {1, 2}
    assert conformal.aps_sets(probs, q).tolist() == [[True, True, False], [False, True, True]]
    # never empty, even at a threshold below every probability
    assert conformal.aps_sets(probs, torch.tensor(0.0, dtype=F64)).sum(-1).tolist() == [1, 1]


def test_normalized_residuals_by_hand():
    pred = RegressionPrediction(
        torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[4.0, 1.0]], dtype=F64)
    )
    scores = conformal.normalized_residuals(pred, torch.tensor([3.0, -1.0], dtype=F64))
    torch.testing.assert_close(scores, torch.tensor([1.5, 2.0], dtype=F64))


# ---------------------------------------------------------------- on a posterior


def test_posterior_functions_equal_the_prediction_functions():
    post, x, y = miscalibrated_regression(n=300)
    bands = conformal.conformal_intervals(post, x[:100], y[:100], x[100:], alpha=0.2)
    again = conformal.split_conformal_regression(
        post.predict(x[:100]), y[:100], post.predict(x[100:]), 0.2
    )
    torch.testing.assert_close(bands.lower, again.lower)
    torch.testing.assert_close(bands.upper, again.upper)
    assert bands.n_calibration == 100 and bands.alpha == 0.2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5)).double()
    clf, xc, yc = bdl.MCDropout(net, "categorical"), *overconfident_classifier(n=300)[1:]
    clf.fit((xc[:150], yc[:150]), epochs=2, seed=0)
    sets = conformal.conformal_sets(
        clf,
        xc[150:250],
        yc[150:250],
        xc[250:],
        0.1,
        n_samples=8,
        generator=torch.Generator().manual_seed(1),
    )
    g = torch.Generator().manual_seed(1)
    p_cal, p_test = clf.predict(xc[150:250], 8, generator=g), clf.predict(xc[250:], 8, generator=g)
    same = conformal.split_conformal_classification(p_cal, yc[150:250], p_test, 0.1, generator=g)
    assert torch.equal(sets.sets, same.sets)
    assert sets.sets.shape == (50, 5) and sets.randomized


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_the_unit_interval(alpha):
    post, x, y = miscalibrated_regression(n=60)
    with pytest.raises(ValueError, match="alpha is the allowed miscoverage and must lie strictly"):
        conformal.conformal_intervals(post, x[:30], y[:30], x[30:], alpha)


def test_bad_input():
    post, x, y = miscalibrated_regression(n=60)
    clf, xc, yc = overconfident_classifier(n=60)
    with pytest.raises(TypeError, match="alpha must be a number"):
        conformal.conformal_intervals(post, x[:30], y[:30], x[30:], "0.1")
    with pytest.raises(ValueError, match="alpha=0.01 needs at least 99 calibration points.*got 30"):
        conformal.conformal_intervals(post, x[:30], y[:30], x[30:], 0.01)
    with pytest.raises(ValueError, match="alpha=0.05 needs at least 19 calibration points.*got 10"):
        conformal.conformal_sets(clf, xc[:10], yc[:10], xc[30:], 0.05)
    with pytest.raises(ValueError, match="x_cal has 30 examples but y_cal has 29"):
        conformal.conformal_intervals(post, x[:30], y[:29], x[30:], 0.1)
    with pytest.raises(ValueError, match=r"y_cal must have shape \(30,\)"):
        conformal.conformal_intervals(post, x[:30], torch.zeros(30, 2, dtype=F64), x[30:], 0.1)
    post.input_shape = (3,)
    with pytest.raises(ValueError, match="wrong number of features"):
        conformal.conformal_intervals(post, x[:30, :2], y[:30], x[30:], 0.1)
    with pytest.raises(ValueError, match="needs a regression posterior.*conformal_sets"):
        conformal.conformal_intervals(clf, xc[:30], yc[:30], xc[30:], 0.1)
    with pytest.raises(ValueError, match="needs a classification posterior.*conformal_intervals"):
        conformal.conformal_sets(post, x[:30], y[:30], x[30:], 0.1)
    with pytest.raises(ValueError, match=r"labels in \[0, 5\) for a model with 5 classes"):
        conformal.conformal_sets(clf, xc[:30], yc[:30] + 5, xc[30:], 0.1)
    with pytest.raises(TypeError, match="integer class labels"):
        conformal.conformal_sets(clf, xc[:30], yc[:30].double(), xc[30:], 0.1)
    with pytest.raises(TypeError, match="randomized must be True or False"):
        conformal.conformal_sets(clf, xc[:30], yc[:30], xc[30:], 0.1, randomized="yes")
    with pytest.raises(TypeError, match="expected a fitted bayesdl Posterior"):
        conformal.conformal_sets(nn.Linear(6, 5), xc[:30], yc[:30], xc[30:], 0.1)
    pred = clf.predict(xc)
    wider = ClassificationPrediction(torch.log_softmax(torch.zeros(1, 4, 6, dtype=F64), -1))
    with pytest.raises(ValueError, match="5 classes but test predictions 6"):
        conformal.split_conformal_classification(pred, yc, wider, 0.1)
    with pytest.raises(TypeError, match="pred_cal must be a RegressionPrediction"):
        conformal.split_conformal_regression(pred, yc, pred, 0.1)


# ---------------------------------------------------------------- the fitted threshold


def test_conformalize_regression_matches_the_one_shot_intervals():
    post, x, y = miscalibrated_regression(n=400)
    want = conformal.conformal_intervals(post, x[:200], y[:200], x[200:], 0.1)
    fitted = conformal.conformalize(post, x[:200], y[:200], 0.1)
    assert isinstance(fitted, conformal.ConformalPredictor)
    assert fitted.threshold == float(want.radius) and fitted.n_calibration == 200
    got = fitted.intervals(x[200:])
    torch.testing.assert_close(got.lower, want.lower, rtol=0, atol=0)
    torch.testing.assert_close(got.upper, want.upper, rtol=0, atol=0)
    # it predicts like the posterior it wraps, and covers about 1 - alpha of fresh data
    torch.testing.assert_close(fitted.predict(x[:5]).mean, post.predict(x[:5]).mean)
    assert 0.85 < float(got.contains(y[200:]).double().mean()) < 0.96
    with pytest.raises(ValueError, match="needs a classification posterior.*intervals"):
        fitted.sets(x[200:])


def test_conformalize_classification_matches_the_one_shot_sets():
    clf, x, y = overconfident_classifier(n=600)
    want = conformal.conformal_sets(clf, x[:300], y[:300], x[300:], 0.1, randomized=False)
    fitted = conformal.conformalize(clf, x[:300], y[:300], 0.1, randomized=False)
    assert fitted.threshold == float(want.threshold) and not fitted.randomized
    got = fitted.sets(x[300:])
    assert torch.equal(got.sets, want.sets)
    g = torch.Generator().manual_seed(0)
    randomized = conformal.conformalize(clf, x[:300], y[:300], 0.1, generator=g)
    a = randomized.sets(x[300:], generator=torch.Generator().manual_seed(1)).sets
    b = randomized.sets(x[300:], generator=torch.Generator().manual_seed(1)).sets
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs a regression posterior.*sets"):
        fitted.intervals(x[300:])
    with pytest.raises(TypeError, match="expected a fitted bayesdl Posterior"):
        conformal.conformalize(nn.Linear(6, 5), x[:300], y[:300])
    with pytest.raises(ValueError, match="x_cal has 300 examples but y_cal has 299"):
        conformal.conformalize(clf, x[:300], y[:299])
    with pytest.raises(ValueError, match="alpha=0.01 needs at least 99"):
        conformal.conformalize(clf, x[:30], y[:30], 0.01)
