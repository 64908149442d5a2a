"""bayesdl.forecast: windows without look-ahead, walk-forward refits without leakage, adaptive
conformal intervals that keep their coverage through a regime change, and risk measures and
backtests against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bayesdl as bdl
from bayesdl import forecast
from bayesdl.conformal import split_conformal_regression
from bayesdl.forecast import walkforward
from bayesdl.predictions import RegressionPrediction

scipy_stats = pytest.importorskip("scipy.stats")
scipy_integrate = pytest.importorskip("scipy.integrate")


# ------------------------------------------------------------------------------------ windows
def test_lagged_rows_hold_only_the_past():
    y = torch.arange(10.0) ** 2
    e = torch.stack([torch.arange(10.0) + 100, -torch.arange(10.0)], dim=1)
    data = forecast.lagged(y, 3, exog=e, exog_names=["a", "b"], dtype=torch.float64)
    assert data.x.shape == (7, 9) and data.y.shape == (7,) and len(data) == 7
    assert data.time.tolist() == list(range(3, 10))
    assert data.feature_names[:3] == ("y[t-3]", "y[t-2]", "y[t-1]")
    assert data.feature_names[3:6] == ("a[t-3]", "a[t-2]", "a[t-1]")
    for i, t in enumerate(data.time.tolist()):
        assert data.y[i] == y[t]
        assert data.x[i, :3].tolist() == y[t - 3 : t].tolist()
        assert data.x[i, 3:6].tolist() == e[t - 3 : t, 0].tolist()
        assert data.x[i, 6:9].tolist() == e[t - 3 : t, 1].tolist()


@pytest.mark.parametrize(
    ("series", "kwargs", "match"),
    [
        (np.zeros((5, 2)), {}, "one-dimensional"),
        ([1.0, 2.0, 3.0], {"lags": 3}, "at least 4"),
        ([1.0, float("nan"), 3.0, 4.0], {}, "position 1"),
        (np.zeros(10), {"exog": np.zeros(9)}, "T = 10"),
        (np.zeros(10), {"lags": 0}, "positive integer"),
        (np.zeros(10), {"exog": np.zeros((10, 2)), "exog_names": ["a"]}, "1 names for 2"),
    ],
)
def test_lagged_refuses_bad_input(series, kwargs, match):
    kwargs = {"lags": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        forecast.lagged(series, **kwargs)


# ------------------------------------------------------------------------------- walk-forward
def small_forecaster(n_features: int):
    return bdl.Deterministic(bdl.models.mlp(n_features, 2, hidden=(8,)), "gaussian")


@pytest.fixture(scope="module")
def series():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(400, dtype=torch.float32)
    return torch.sin(t / 10) + 0.1 * torch.randn(400, generator=g)


@pytest.mark.parametrize(("window", "size"), [("expanding", None), ("rolling", 60)])
def test_walk_forward_trains_on_the_past_only(series, monkeypatch, window, size):
    data = forecast.lagged(series, 4)
    seen = []
    fit = walkforward.Standardizer.fit

    def spy(x, y):
        seen.append((x.clone(), y.clone()))
        return fit(x, y)

    monkeypatch.setattr(walkforward.Standardizer, "fit", staticmethod(spy))
    run = forecast.walk_forward(
        small_forecaster, data, start=150, refit_every=50, window=window, window_size=size,
        fit_options={"epochs": 2, "lr": 1e-2},
    )  # fmt: skip
    starts = list(range(150, len(data), 50))
    assert [s for s, _ in run.refits] == starts and len(seen) == len(starts)
    for (s, n_train), (x_train, y_train) in zip(run.refits, seen, strict=True):
        first = 0 if window == "expanding" else s - size
        assert n_train == s - first
        # exactly the rows before the block: every training target precedes every forecast
        assert torch.equal(y_train, data.y[first:s]) and torch.equal(x_train, data.x[first:s])
        assert int(data.time[s - 1]) < int(data.time[s])
    assert run.prediction.means.shape == (1, len(data) - 150)
    assert torch.equal(run.y, data.y[150:]) and torch.equal(run.time, data.time[150:])


def test_walk_forward_is_one_fit_per_block_on_the_series_scale(series):
    data = forecast.lagged(series * 50 + 1000, 4)  # far from 0: the scale must come back
    run = forecast.walk_forward(
        small_forecaster, data, start=300, refit_every=1000, fit_options={"epochs": 3}, seed=7
    )
    # the same fit by hand: standardise on the training rows, fit with the refit's seed
    scaler = bdl.data.uci.Standardizer.fit(data.x[:300], data.y[:300])
    torch.manual_seed(7)  # the first refit's seed
    post = small_forecaster(4)
    post.fit((scaler.transform_x(data.x[:300]), scaler.transform_y(data.y[:300])), epochs=3,
             seed=7)  # fmt: skip
    pred = post.predict(scaler.transform_x(data.x[300:]))
    assert torch.allclose(run.prediction.means, pred.means * scaler.y_std + scaler.y_mean)
    assert torch.allclose(run.prediction.variances, pred.variances * scaler.y_std**2)


def test_walk_forward_refuses_bad_input(series):
    data = forecast.lagged(series, 4)
    with pytest.raises(ValueError, match="leaves nothing to forecast"):
        forecast.walk_forward(small_forecaster, data, start=len(data))
    with pytest.raises(ValueError, match="'expanding' or 'rolling'"):
        forecast.walk_forward(small_forecaster, data, start=100, window="sliding")
    with pytest.raises(ValueError, match="window='rolling' only"):
        forecast.walk_forward(small_forecaster, data, start=100, window_size=50)
    with pytest.raises(TypeError, match="LaggedData"):
        forecast.walk_forward(small_forecaster, (data.x, data.y), start=100)
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        forecast.walk_forward(
            lambda f: bdl.Deterministic(bdl.models.mlp(f, 3), "categorical"), data, start=100
        )


# ------------------------------------------------------------------- adaptive conformal
def regime_change(n: int, seed: int) -> tuple[RegressionPrediction, torch.Tensor]:
    """A forecaster that always says N(0, 1), and outcomes whose noise triples halfway."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.where(torch.arange(n) < n // 2, 1.0, 3.0).double()
    y = sd * torch.randn(n, generator=g, dtype=torch.float64)
    pred = RegressionPrediction(torch.zeros(1, n, dtype=torch.float64), torch.ones(1, n).double())
    return pred, y


def _cut(pred: RegressionPrediction, a: int, b: int) -> RegressionPrediction:
    return RegressionPrediction(pred.means[:, a:b], pred.variances[:, a:b])


def test_adaptive_conformal_holds_coverage_where_static_conformal_fails():
    pred, y = regime_change(6000, seed=0)
    cal = (_cut(pred, 0, 1000), y[:1000])
    test_pred, y_test = _cut(pred, 1000, 6000), y[1000:]
    static = split_conformal_regression(*cal, test_pred, alpha=0.1)
    inside = (static.lower <= y_test) & (y_test <= static.upper)
    after = slice(2000, None)  # the test steps after the change (at 3000 - 1000)
    assert (
        float(inside[after].double().mean()) < 0.6
    )  # static: 1-sigma-sized intervals, 3-sigma noise
    bands = forecast.adaptive_conformal(test_pred, y_test, level=0.9, gamma=0.01, calibration=cal)
    assert abs(bands.coverage() - 0.9) <= 0.01
    assert abs(float(bands.covered[after].double().mean()) - 0.9) <= 0.02
    # the intervals widened after the change: about 3 times, as the noise did
    width = bands.upper - bands.lower
    ratio = float(width[3000:].median() / width[:1500].median())
    assert 2.4 < ratio < 3.6, ratio


@pytest.mark.parametrize("gamma", [0.002, 0.01, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_conformal_miss_rate_obeys_its_bound_on_any_sequence(gamma, seed):
    # Gibbs and Candes' Proposition 4.1 holds for every sequence, even an adversarial one:
    # here outcomes that jump between tiny and huge in long blocks.
    g = torch.Generator().manual_seed(seed)
    n = 3000
    scale = torch.where((torch.arange(n) // 250) % 2 == 0, 0.1, 20.0).double()
    y = scale * torch.randn(n, generator=g, dtype=torch.float64)
    pred = RegressionPrediction(torch.zeros(1, n).double(), torch.ones(1, n).double())
    bands = forecast.adaptive_conformal(pred, y, level=0.9, gamma=gamma, window=100)
    for t in (100, 1000, n):
        miss = 1.0 - float(bands.covered[:t].double().mean())
        assert abs(miss - 0.1) <= forecast.aci_coverage_bound(0.9, gamma, t) + 1e-12
    assert (bands.lower <= bands.upper).all()


def test_adaptive_conformal_with_gamma_zero_is_online_split_conformal():
    pred, y = regime_change(400, seed=3)
    bands = forecast.adaptive_conformal(pred, y, level=0.8, gamma=0.0)
    scores = y.abs().numpy()
    for t in (3, 10, 57, 399):
        k = math.ceil((t + 1) * 0.8 * (1 - 1e-12))
        expected = math.inf if k > t else np.sort(scores[:t])[k - 1]
        assert bands.threshold[t].item() == expected
    assert torch.isinf(bands.upper[:4]).all()  # too few scores yet: the whole line, covered
    assert bands.covered[:4].all() and (bands.alpha == pytest.approx(0.2))


def test_adaptive_conformal_refuses_bad_input():
    pred, y = regime_change(50, seed=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        forecast.adaptive_conformal(pred, y, level=90)
    with pytest.raises(ValueError, match="gamma"):
        forecast.adaptive_conformal(pred, y, gamma=-0.1)
    with pytest.raises(ValueError, match="window"):
        forecast.adaptive_conformal(pred, y, window=0)


# ------------------------------------------------------------------------------------- risk
def test_var_and_es_of_one_gaussian_are_the_closed_forms():
    mu, sd = torch.tensor([[0.05, -0.2]]).double(), torch.tensor([[1.3, 0.7]]).double()
    pred = RegressionPrediction(mu, sd**2)
    for c in (0.95, 0.99):
        z = scipy_stats.norm.ppf(1 - c)
        var = forecast.value_at_risk(pred, c)
        es = forecast.expected_shortfall(pred, c)
        assert torch.allclose(var, -(mu[0] + sd[0] * z), atol=1e-8)
        closed = -mu[0] + sd[0] * scipy_stats.norm.pdf(z) / (1 - c)
        assert torch.allclose(es, closed, atol=1e-7)
        assert (es > var).all()


def test_var_and_es_of_a_mixture_match_numerical_integration():
    means = torch.tensor([[-0.5], [0.3], [1.0]]).double()
    variances = torch.tensor([[0.2], [1.5], [0.6]]).double()
    pred = RegressionPrediction(means, variances)
    comps = [
        scipy_stats.norm(float(m), math.sqrt(float(v)))
        for m, v in zip(means, variances, strict=True)
    ]

    def cdf(v):
        return np.mean([c.cdf(v) for c in comps])

    for c in (0.95, 0.99):
        v = -float(forecast.value_at_risk(pred, c))
        assert cdf(v) == pytest.approx(1 - c, abs=1e-9)
        tail_mean, _ = scipy_integrate.quad(
            lambda t: t * np.mean([k.pdf(t) for k in comps]), -np.inf, v
        )
        assert float(forecast.expected_shortfall(pred, c)) == pytest.approx(
            -tail_mean / (1 - c), rel=1e-6
        )


def test_kupiec_matches_the_likelihood_ratio_and_scipy():
    e = torch.zeros(250, dtype=torch.bool)
    e[[10, 50, 120, 121, 200, 240]] = True  # 6 exceedances in 250 days at 99%
    result = forecast.kupiec_test(e, 0.99)
    n, x, p = 250, 6, 0.01
    lr = -2 * (
        (n - x) * math.log(1 - p) + x * math.log(p)
        - (n - x) * math.log(1 - x / n) - x * math.log(x / n)
    )  # fmt: skip
    assert result.statistic == pytest.approx(lr, rel=1e-12)
    assert result.p_value == pytest.approx(scipy_stats.chi2.sf(lr, 1), rel=1e-9)
    assert (result.n, result.exceedances, result.rate) == (250, 6, 0.024)
    assert 0.05 < result.p_value < 0.06  # 2.4% against 1% in 250 days: not rejected at 5%
    assert forecast.kupiec_test(torch.zeros(100, dtype=torch.bool), 0.99).p_value == (
        pytest.approx(scipy_stats.chi2.sf(-2 * 100 * math.log(0.99), 1))
    )


def test_christoffersen_counts_transitions_and_matches_scipy():
    e = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    prev, cur = e[:-1].tolist(), e[1:].tolist()
    n = {
        (a, b): sum(1 for p, q in zip(prev, cur, strict=True) if (p, q) == (a, b))
        for a in (0, 1)
        for b in (0, 1)
    }
    pi01, pi11 = n[0, 1] / (n[0, 0] + n[0, 1]), n[1, 1] / (n[1, 0] + n[1, 1])
    pi = (n[0, 1] + n[1, 1]) / len(prev)
    lr = -2 * (
        (n[0, 0] + n[1, 0]) * math.log(1 - pi) + (n[0, 1] + n[1, 1]) * math.log(pi)
        - n[0, 0] * math.log(1 - pi01) - n[0, 1] * math.log(pi01)
        - n[1, 0] * math.log(1 - pi11) - n[1, 1] * math.log(pi11)
    )  # fmt: skip
    ind = forecast.christoffersen_test(e)
    assert ind.statistic == pytest.approx(lr, rel=1e-12) and ind.df == 1
    assert ind.p_value == pytest.approx(scipy_stats.chi2.sf(lr, 1), rel=1e-9)
    cc = forecast.christoffersen_test(e, confidence=0.95)
    assert cc.df == 2
    assert cc.statistic == pytest.approx(lr + forecast.kupiec_test(e, 0.95).statistic)
    assert cc.p_value == pytest.approx(scipy_stats.chi2.sf(cc.statistic, 2), rel=1e-9)


def test_backtests_refuse_bad_input():
    with pytest.raises(ValueError, match="booleans or 0/1"):
        forecast.kupiec_test(torch.tensor([0.0, 2.0]), 0.99)
    with pytest.raises(ValueError, match="non-empty"):
        forecast.kupiec_test(torch.tensor([]), 0.99)
    with pytest.raises(ValueError, match="between 0 and 1"):
        forecast.kupiec_test(torch.tensor([True]), 99)
