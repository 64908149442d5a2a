"""Proper scores and calibration metrics (regression and classification) against closed forms,
numerical integration, Monte Carlo, scikit-learn and hand-computed values, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import mean_pinball_loss

from bayesdl import metrics
from bayesdl.metrics import regression as regression_module
from bayesdl.predictions import RegressionPrediction

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x))


def gaussian_crps(mu, sd, y):
    """The known closed form for one Gaussian (Gneiting & Raftery, 2007)."""
    z = (y - mu) / sd
    return sd * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def mixture(rng, n_draws, batch):
    means = rng.normal(size=(n_draws, batch)) * 1.5
    variances = rng.uniform(0.05, 2.0, size=(n_draws, batch))
    y = rng.normal(size=batch) * 2
    return means, variances, y


# ---------------------------------------------------------------- CRPS


@pytest.mark.parametrize("batch", [1, 7, 200])
def test_crps_single_gaussian_is_the_closed_form(batch):
    rng = np.random.default_rng(batch)
    mu, sd, y = rng.normal(size=batch), rng.uniform(0.1, 3.0, size=batch), rng.normal(size=batch)
    got = metrics.crps_gaussian_mixture(t(mu[None]), t(sd[None] ** 2), t(y))
    assert got.dtype == F64 and got.shape == ()
    assert got.item() == pytest.approx(gaussian_crps(mu, sd, y).mean(), rel=1e-13, abs=1e-15)


def test_crps_mixture_matches_numerical_integration():
    # CRPS(F, y) = int (F(t) - 1[t >= y])^2 dt, integrated with quad on each side of y.
    rng = np.random.default_rng(3)
    means, variances, y = mixture(rng, 4, 6)
    got = [
        metrics.crps_gaussian_mixture(t(means[:, [b]]), t(variances[:, [b]]), t(y[[b]])).item()
        for b in range(6)
    ]
    for b in range(6):
        sd = np.sqrt(variances[:, b])

        def cdf(x, b=b, sd=sd):
            return norm.cdf((x - means[:, b]) / sd).mean()

        left = integrate.quad(lambda x, cdf=cdf: cdf(x) ** 2, -np.inf, y[b], epsabs=1e-13)[0]
        right = integrate.quad(lambda x, cdf=cdf: (1 - cdf(x)) ** 2, y[b], np.inf, epsabs=1e-13)
        assert got[b] == pytest.approx(left + right[0], rel=1e-7)


def test_crps_mixture_matches_large_sample_monte_carlo():
    # CRPS = E|X - y| - E|X - X'| / 2; estimate both with 400k independent pairs per example and
    # compare within 4 standard errors of the estimator.
    rng = np.random.default_rng(11)
    n_draws, batch, n_mc = 5, 4, 400_000
    means, variances, y = mixture(rng, n_draws, batch)
    exact = [
        metrics.crps_gaussian_mixture(t(means[:, [b]]), t(variances[:, [b]]), t(y[[b]])).item()
        for b in range(batch)
    ]
    for b in range(batch):
        comp = rng.integers(n_draws, size=(2, n_mc))
        draws = means[comp, b] + np.sqrt(variances[comp, b]) * rng.normal(size=(2, n_mc))
        terms = np.abs(draws[0] - y[b]) - 0.5 * np.abs(draws[0] - draws[1])
        estimate, se = terms.mean(), terms.std(ddof=1) / math.sqrt(n_mc)
        assert abs(exact[b] - estimate) < 4 * se, (b, exact[b], estimate, se)
        assert se < 0.01  # the check is sharp


def test_crps_chunking_and_targets():
    rng = np.random.default_rng(5)
    means, variances = rng.normal(size=(6, 50, 3)), rng.uniform(0.1, 1.0, size=(6, 50, 3))
    y = rng.normal(size=(50, 3))
    whole = metrics.crps_gaussian_mixture(t(means), t(variances), t(y))
    per_target = [
        metrics.crps_gaussian_mixture(t(means[..., d]), t(variances[..., d]), t(y[:, d]))
        for d in range(3)
    ]
    assert whole.item() == pytest.approx(np.mean([p.item() for p in per_target]), rel=1e-13)
    old = regression_module._CRPS_CHUNK_ELEMENTS
    try:
        regression_module._CRPS_CHUNK_ELEMENTS = 100  # one example per chunk
        chunked = metrics.crps_gaussian_mixture(t(means), t(variances), t(y))
    finally:
        regression_module._CRPS_CHUNK_ELEMENTS = old
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-13)


def test_crps_identical_components_and_point_mass_limit():
    mu, var, y = t([[0.3, -1.0]]), t([[0.5, 2.0]]), t([1.0, -1.0])
    one = metrics.crps_gaussian_mixture(mu, var, y)
    many = metrics.crps_gaussian_mixture(mu.expand(5, 2), var.expand(5, 2), y)
    assert many.item() == pytest.approx(one.item(), rel=1e-13)
    # a nearly degenerate Gaussian scores the absolute error
    sharp = metrics.crps_gaussian_mixture(mu, torch.full_like(var, 1e-16), y)
    assert sharp.item() == pytest.approx(float((mu[0] - y).abs().mean()), abs=1e-7)


# ---------------------------------------------------------------- pinball and interval score


@pytest.mark.parametrize("q", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1,), (40,), (30, 3)])
def test_pinball_matches_sklearn(q, shape):
    rng = np.random.default_rng(len(shape) + int(100 * q))
    pred, y = rng.normal(size=shape), rng.normal(size=shape)
    expected = mean_pinball_loss(y, pred, alpha=q)
    assert metrics.pinball_loss(t(pred), t(y), q).item() == pytest.approx(expected, rel=1e-13)


def test_pinball_hand_computed():
    # q = 0.8: under-predict by 2 costs 1.6, over-predict by 1 costs 0.2 -> mean 0.9.
    out = metrics.pinball_loss(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0]), 0.8)
    assert out.item() == pytest.approx(0.9)


def test_interval_score_hand_computed():
    lower, upper = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 2.0])
    y = torch.tensor([0.5, 1.5, -1.0])
    # level 0.8 -> alpha 0.2, penalty 2 / 0.2 = 10: widths 1, 1, 2; misses 0, 0.5, 1.
    # scores 1, 1 + 5, 2 + 10 -> mean 19 / 3.
    got = metrics.interval_score(lower, upper, y, 0.8)
    assert got.item() == pytest.approx(19 / 3, rel=1e-6)


def test_interval_score_is_twice_the_pinball_losses_over_alpha():
    # IS_alpha(l, u; y) = 2/alpha (rho_{alpha/2}(y - l) + rho_{1 - alpha/2}(y - u)).
    rng = np.random.default_rng(9)
    centre, half, y = rng.normal(size=300), rng.uniform(0, 2, size=300), rng.normal(size=300)
    lower, upper, alpha = centre - half, centre + half, 0.1
    expected = (
        2
        / alpha
        * (
            mean_pinball_loss(y, lower, alpha=alpha / 2)
            + mean_pinball_loss(y, upper, alpha=1 - alpha / 2)
        )
    )
    got = metrics.interval_score(t(lower), t(upper), t(y), 1 - alpha)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- quantile calibration


def test_quantile_calibration_curve_counts_y_below_the_scipy_quantiles():
    rng = np.random.default_rng(2)
    mu, sd = rng.normal(size=500), rng.uniform(0.5, 2.0, size=500)
    y = mu + 1.7 * sd * rng.normal(size=500)  # too narrow by a factor 1.7
    levels = np.array([0.05, 0.25, 0.5, 0.9, 0.99])
    expected, observed = metrics.quantile_calibration_curve(
        t(mu[None]), t(sd[None] ** 2), t(y), t(levels)
    )
    by_hand = [(y <= norm.ppf(p, loc=mu, scale=sd)).mean() for p in levels]
    np.testing.assert_allclose(expected.numpy(), levels)
    np.testing.assert_allclose(observed.numpy(), by_hand, rtol=0, atol=0)
    error = metrics.quantile_calibration_error(t(mu[None]), t(sd[None] ** 2), t(y), t(levels))
    assert error.item() == pytest.approx(np.abs(np.array(by_hand) - levels).mean(), rel=1e-12)


def test_quantile_calibration_of_a_mixture_uses_its_quantiles():
    rng = np.random.default_rng(4)
    means, variances, _ = mixture(rng, 3, 400)
    y = rng.normal(size=400) * 2
    pred = RegressionPrediction(t(means), t(variances))
    expected, observed = metrics.quantile_calibration_curve(t(means), t(variances), t(y), 9)
    np.testing.assert_allclose(expected.numpy(), np.arange(1, 10) / 10, rtol=1e-15)
    by_hand = [float((t(y) <= pred.quantile(float(p))).double().mean()) for p in expected]
    np.testing.assert_allclose(observed.numpy(), by_hand, atol=0)


def test_quantile_calibration_of_the_true_distribution_is_small():
    rng = np.random.default_rng(6)
    means, variances, _ = mixture(rng, 3, 20_000)
    comp = rng.integers(3, size=20_000)
    cols = np.arange(20_000)
    y = means[comp, cols] + np.sqrt(variances[comp, cols]) * rng.normal(size=20_000)
    calibrated = metrics.quantile_calibration_error(t(means), t(variances), t(y)).item()
    assert calibrated < 0.01
    # and components twice too narrow are flagged
    narrow = metrics.quantile_calibration_error(t(means), t(variances / 4), t(y)).item()
    assert narrow > 5 * calibrated


# ---------------------------------------------------------------- adaptive, classwise, reliability


def test_adaptive_ece_by_hand():
    probs = torch.tensor(
        [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.55, 0.45], [0.95, 0.05]], dtype=F64
    )
    y = torch.tensor([0, 1, 1, 0, 0, 0])
    # confidences 0.9 0.8 0.7 0.6 0.55 0.95, correct 1 0 1 0 1 1.
    # sorted: 0.55(1) 0.6(0) | 0.7(1) 0.8(0) | 0.9(1) 0.95(1)  -> 3 bins of 2.
    # gaps: |0.5 - 0.575| = 0.075, |0.5 - 0.75| = 0.25, |1 - 0.925| = 0.075 -> mean 0.4 / 3.
    assert metrics.adaptive_ece(probs, y, n_bins=3).item() == pytest.approx(0.4 / 3, rel=1e-12)
    curve = metrics.reliability_curve(probs, y, 3, "equal_mass")
    assert curve.counts.tolist() == [2, 2, 2]
    np.testing.assert_allclose(curve.edges.numpy(), [0.0, 0.65, 0.85, 1.0])
    np.testing.assert_allclose(curve.confidence.numpy(), [0.575, 0.75, 0.925])
    np.testing.assert_allclose(curve.accuracy.numpy(), [0.5, 0.5, 1.0])


@pytest.mark.parametrize(("batch", "n_bins"), [(100, 15), (37, 5), (7, 10)])
def test_adaptive_ece_matches_array_split_reference(batch, n_bins):
    rng = np.random.default_rng(batch)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=batch)
    y = rng.integers(4, size=batch)
    conf, correct = probs.max(1), probs.argmax(1) == y
    order = np.argsort(conf, kind="stable")
    expected = sum(
        len(chunk) / batch * abs(correct[chunk].mean() - conf[chunk].mean())
        for chunk in np.array_split(order, n_bins)
        if len(chunk)
    )
    assert metrics.adaptive_ece(t(probs), t(y), n_bins).item() == pytest.approx(expected)
    counts = metrics.reliability_curve(t(probs), t(y), n_bins, "equal_mass").counts
    assert counts.tolist() == [len(c) for c in np.array_split(order, n_bins)]


def test_classwise_ece_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    # two bins (0, .5], (.5, 1]. class 0: p = .7 .2 .6, is0 = 1 1 0:
    #   bin0 {.2}: |1 - .2| = .8 (1 of 3); bin1 {.7, .6}: |.5 - .65| = .15 (2 of 3) -> .8/3 + .3/3
    # class 1: p = .3 .8 .4, is1 = 0 0 1:
    #   bin0 {.3, .4}: |.5 - .35| = .15 (2 of 3); bin1 {.8}: |0 - .8| = .8 -> .3/3 + .8/3
    assert metrics.classwise_ece(probs, y, n_bins=2).item() == pytest.approx(1.1 / 3, rel=1e-12)


@pytest.mark.parametrize("n_bins", [5, 15])
def test_classwise_ece_matches_sklearn_calibration_curve(n_bins):
    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.ones(3), size=400)
    y = rng.integers(3, size=400)
    per_class = []
    for c in range(3):
        p, hit = probs[:, c], (y == c).astype(float)
        frac, mean_p = calibration_curve(hit, p, n_bins=n_bins, strategy="uniform")
        index = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p)
        counts = np.bincount(index, minlength=n_bins)
        per_class.append((counts[counts > 0] / len(p) * np.abs(frac - mean_p)).sum())
    got = metrics.classwise_ece(t(probs), t(y), n_bins)
    assert got.item() == pytest.approx(np.mean(per_class), rel=1e-10)


def test_uniform_reliability_curve_is_calibration_bins_and_ece():
    rng = np.random.default_rng(1)
    probs, y = t(rng.dirichlet(np.ones(5), size=300)), t(rng.integers(5, size=300))
    curve = metrics.reliability_curve(probs, y, 10)
    counts, acc, conf = metrics.calibration_bins(
        probs.max(1).values, probs.argmax(1) == y, n_bins=10
    )
    assert torch.equal(curve.counts, counts)
    torch.testing.assert_close(curve.accuracy, acc)
    torch.testing.assert_close(curve.confidence, conf)
    torch.testing.assert_close(curve.edges, torch.linspace(0, 1, 11, dtype=F64))
    gaps = (curve.accuracy - curve.confidence).abs()
    ece = (curve.counts * gaps).sum() / 300
    torch.testing.assert_close(ece, metrics.ece(probs, y, 10))


def test_equal_mass_with_more_bins_than_examples():
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1])
    curve = metrics.reliability_curve(probs, y, 5, metrics.Binning.EQUAL_MASS)
    assert curve.counts.tolist() == [1, 1, 1, 0, 0]
    edges = curve.edges.tolist()
    assert edges == sorted(edges) and edges[0] == 0.0 and edges[-1] == 1.0
    # confidences 0.6 (right), 0.9 (wrong), 0.7 (right): gaps 0.4, 0.9, 0.3, one example each
    assert metrics.adaptive_ece(probs, y, 5).item() == pytest.approx((0.4 + 0.9 + 0.3) / 3)


# ---------------------------------------------------------------- bad input

M, V, Y = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: metrics.pinball_loss(Y, Y, 1.0), ValueError, "q must lie strictly between 0"),
        (lambda: metrics.pinball_loss(Y, Y, 0), ValueError, "strictly between 0 and 1"),
        (lambda: metrics.pinball_loss(Y, Y, True), TypeError, "q must be a number"),
        (lambda: metrics.pinball_loss(Y, Y[:2], 0.5), ValueError, "same shape"),
        (lambda: metrics.interval_score(Y, Y + 1, Y, 90), ValueError, "level=0.9"),
        (lambda: metrics.interval_score(Y + 1, Y, Y, 0.9), ValueError, "lower must be <= upper"),
        (lambda: metrics.crps_gaussian_mixture(M, -V, Y), ValueError, "variances must be pos"),
        (lambda: metrics.crps_gaussian_mixture(M, V, Y[:2]), ValueError, r"means.shape\[1:\]"),
        (lambda: metrics.crps_gaussian_mixture(M[0], V[0], Y), ValueError, r"\(S, B\)"),
        (lambda: metrics.quantile_calibration_curve(M, V, Y, 0), ValueError, "positive int"),
        (
            lambda: metrics.quantile_calibration_curve(M, V, Y, torch.tensor([0.5, 1.0])),
            ValueError,
            "strictly between 0 and 1",
        ),
        (lambda: metrics.quantile_calibration_error(M, V, Y, 0.5), TypeError, "levels must be"),
        (
            lambda: metrics.reliability_curve(torch.eye(2), torch.tensor([0, 1]), 5, "quantile"),
            ValueError,
            "unknown binning 'quantile'; choose one of 'uniform', 'equal_mass'",
        ),
        (lambda: metrics.adaptive_ece(torch.eye(2), torch.tensor([0, 1]), 0), ValueError, "n_bins"),
        (
            lambda: metrics.classwise_ece(torch.eye(2) * 2, torch.tensor([0, 1])),
            ValueError,
            "probabilities in",
        ),
        (
            lambda: metrics.classwise_ece(torch.eye(2), torch.tensor([0, 2])),
            ValueError,
            r"class labels in \[0, 2\)",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
