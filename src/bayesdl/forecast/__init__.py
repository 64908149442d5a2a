"""Forecasting with prediction intervals that hold when the series changes.

* :func:`lagged`: a series (and exogenous features) to supervised rows, without look-ahead;
* :func:`walk_forward`: refit any posterior with a Gaussian likelihood on the past, every ``K``
  steps (expanding or rolling window), and forecast one step ahead, with no leakage;
* :func:`adaptive_conformal`: intervals whose level adapts online to hold long-run coverage
  under distribution shift (Gibbs and Candes 2021);
* :func:`value_at_risk`, :func:`expected_shortfall` from the predictive mixture, and the
  backtests :func:`kupiec_test` and :func:`christoffersen_test`. Interval and quantile scores
  are in :mod:`bayesdl.metrics` (``interval_score``, ``pinball_loss``, ``crps_gaussian_mixture``).

Example::

    from bayesdl import forecast
    data = forecast.lagged(returns, lags=20)
    run = forecast.walk_forward(
        lambda f: bdl.DeepEnsemble(bdl.models.mlp(f, 2, hidden=(32,)), "gaussian", n_members=5),
        data, start=1000, refit_every=20, fit_options={"epochs": 30, "lr": 1e-2},
    )
    bands = forecast.adaptive_conformal(run.prediction, run.y, level=0.9)
    bands.coverage()
"""

from bayesdl.forecast.adaptive import AdaptiveIntervals, aci_coverage_bound, adaptive_conformal
from bayesdl.forecast.risk import (
    BacktestResult,
    christoffersen_test,
    expected_shortfall,
    kupiec_test,
    value_at_risk,
)
from bayesdl.forecast.walkforward import WalkForward, walk_forward
from bayesdl.forecast.windows import LaggedData, lagged

__all__ = [
    "AdaptiveIntervals",
    "BacktestResult",
    "LaggedData",
    "WalkForward",
    "aci_coverage_bound",
    "adaptive_conformal",
    "christoffersen_test",
    "expected_shortfall",
    "kupiec_test",
    "lagged",
    "value_at_risk",
    "walk_forward",
]
