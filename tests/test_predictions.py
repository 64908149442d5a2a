"""Closed-form checks of the uncertainty decompositions, in float64."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from bayesdl.predictions import ClassificationPrediction, RegressionPrediction


def _cls(probs) -> ClassificationPrediction:
    return ClassificationPrediction(torch.as_tensor(probs, dtype=torch.float64).log())


def test_agreeing_draws_have_zero_epistemic():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    pred = _cls(p.expand(6, 2, 3))
    torch.testing.assert_close(
        pred.epistemic, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(pred.total, pred.aleatoric)
    torch.testing.assert_close(pred.probs, p)


def test_two_draws_mutual_information_by_hand():
    # draws [0.9, 0.1] and [0.1, 0.9]: mean [0.5, 0.5] has entropy log 2; each draw has
    # entropy h = -(0.9 log 0.9 + 0.1 log 0.1); MI = log 2 - h.
    pred = _cls([[[0.9, 0.1]], [[0.1, 0.9]]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert pred.total.item() == pytest.approx(math.log(2), abs=1e-12)
    assert pred.aleatoric.item() == pytest.approx(h, abs=1e-12)
    assert pred.epistemic.item() == pytest.approx(math.log(2) - h, abs=1e-12)
    assert pred.label.item() in (0, 1)
    assert pred.confidence.item() == pytest.approx(0.5)


def test_classification_log_prob_is_log_of_mean_probability():
    probs = torch.tensor(
        [[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], [[0.2, 0.5, 0.3], [0.1, 0.0, 0.9]]],
        dtype=torch.float64,
    )
    pred = _cls(probs)
    y = torch.tensor([1, 2])
    want = torch.log(probs.mean(0)[torch.arange(2), y])
    torch.testing.assert_close(pred.log_prob(y), want)
    # a zero probability is handled (0 log 0 = 0) and stays finite
    assert torch.isfinite(pred.total).all() and torch.isfinite(pred.aleatoric).all()


def test_classification_log_prob_rejects_bad_labels():
    pred = _cls(torch.full((2, 3, 4), 0.25))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pred.log_prob(torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="shape"):
        pred.log_prob(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        pred.log_prob(torch.tensor([0.0, 1.0, 2.0]))


@st.composite
def _prob_stacks(draw):
    s = draw(st.integers(1, 5))
    b = draw(st.integers(1, 4))
    c = draw(st.integers(2, 6))
    logits = draw(
        st.lists(st.floats(-30, 30, allow_nan=False), min_size=s * b * c, max_size=s * b * c)
    )
    return torch.tensor(logits, dtype=torch.float64).reshape(s, b, c)


@settings(max_examples=200, deadline=None)
@given(_prob_stacks())
def test_entropies_are_non_negative_and_total_bounds_aleatoric(logits):
    pred = ClassificationPrediction(torch.log_softmax(logits, -1))
    c = logits.shape[-1]
    assert (pred.total >= -1e-12).all()
    assert (pred.aleatoric >= -1e-12).all()
    assert (pred.epistemic >= 0).all()
    assert (pred.total >= pred.aleatoric - 1e-9).all()
    assert (pred.total <= math.log(c) + 1e-9).all()
    # MI is at most the entropy of the mixture and at most log S
    assert (pred.epistemic <= math.log(logits.shape[0]) + 1e-9).all()


def _reg(means, variances) -> RegressionPrediction:
    return RegressionPrediction(
        torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(variances, dtype=torch.float64)
    )


def test_regression_total_is_mixture_variance():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(7, 5, generator=g, dtype=torch.float64)
    variances = torch.rand(7, 5, generator=g, dtype=torch.float64) + 0.1
    pred = _reg(means, variances)
    torch.testing.assert_close(pred.aleatoric, variances.mean(0))
    torch.testing.assert_close(pred.epistemic, means.var(0, correction=0))
    # law of total variance, computed directly from the mixture's second moment
    second = (variances + means**2).mean(0)
    torch.testing.assert_close(pred.total, second - means.mean(0) ** 2)
    torch.testing.assert_close(pred.std, pred.total.sqrt())


def test_single_gaussian_interval_equals_normal_quantiles():
    mu, var = torch.tensor([[0.5, -2.0]]), torch.tensor([[4.0, 0.25]])
    pred = _reg(mu, var)
    for level in (0.5, 0.9, 0.99):
        lo, hi = pred.interval(level)
        z = stats.norm.ppf((1 + level) / 2)
        np.testing.assert_allclose(lo, (mu - z * var.sqrt())[0], atol=1e-8)
        np.testing.assert_allclose(hi, (mu + z * var.sqrt())[0], atol=1e-8)


def test_mixture_cdf_at_interval_ends_equals_tail_mass():
    g = torch.Generator().manual_seed(1)
    means = 3 * torch.randn(20, 8, generator=g, dtype=torch.float64)
    variances = torch.rand(20, 8, generator=g, dtype=torch.float64) * 2 + 0.01
    pred = _reg(means, variances)
    lo, hi = pred.interval(0.8)
    # the mixture CDF computed independently with scipy
    cdf = lambda y: stats.norm.cdf(y.numpy(), means.numpy(), variances.sqrt().numpy()).mean(0)  # noqa: E731
    np.testing.assert_allclose(cdf(lo), 0.1, atol=1e-8)
    np.testing.assert_allclose(cdf(hi), 0.9, atol=1e-8)
    # and it is not the moment-matched Gaussian interval
    z = stats.norm.ppf(0.9)
    assert not torch.allclose(hi, pred.mean + z * pred.std, atol=1e-3)


def test_regression_log_prob_matches_scipy_mixture():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(6, 4, generator=g, dtype=torch.float64)
    variances = torch.rand(6, 4, generator=g, dtype=torch.float64) + 0.05
    y = torch.randn(4, generator=g, dtype=torch.float64)
    pred = _reg(means, variances)
    dens = stats.norm.pdf(y.numpy(), means.numpy(), variances.sqrt().numpy()).mean(0)
    np.testing.assert_allclose(pred.log_prob(y).numpy(), np.log(dens), rtol=1e-10)
    np.testing.assert_allclose(
        pred.cdf(y).numpy(),
        stats.norm.cdf(y.numpy(), means.numpy(), variances.sqrt().numpy()).mean(0),
        rtol=1e-10,
    )


def test_multi_target_log_prob_sums_coordinates_within_a_draw():
    f64 = torch.float64
    means = torch.tensor([[[0.0, 1.0]], [[1.0, -1.0]]], dtype=f64)
    variances = torch.tensor([[[1.0, 2.0]], [[0.5, 1.0]]], dtype=f64)
    y = torch.tensor([[0.3, 0.2]], dtype=f64)
    pred = _reg(means, variances)
    per_draw = stats.norm.logpdf(y.numpy(), means.numpy(), variances.sqrt().numpy()).sum(-1)
    want = np.log(np.exp(per_draw).mean(0))
    np.testing.assert_allclose(pred.log_prob(y).numpy(), want, rtol=1e-10)
    assert pred.mean.shape == (1, 2)


def test_regression_bad_input():
    pred = _reg(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        pred.interval(1.0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        pred.interval(0)
    with pytest.raises(ValueError, match="shape"):
        pred.log_prob(torch.zeros(4))
    with pytest.raises(ValueError, match="share a shape"):
        RegressionPrediction(torch.zeros(2, 3), torch.ones(2, 4))


def test_regression_crps_of_one_gaussian_is_the_known_formula_per_point():
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    var = torch.tensor([[1.0, 0.25, 4.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 0.3, 5.0], dtype=torch.float64)
    sd = var.sqrt()[0].numpy()
    z = (y.numpy() - mu[0].numpy()) / sd
    want = sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))
    got = RegressionPrediction(mu, var).crps(y)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
