"""One-day-ahead intervals for S&P 500 returns that keep their coverage when volatility shifts.

    pip install arch          # the S&P 500 prices ship inside it
    python examples/forecast_sp500.py [--members 5] [--epochs 30] [--level 0.95]

A deep ensemble of small heteroscedastic networks reads the last 20 daily returns and their
absolute values, is refitted every quarter on the last 2500 days (walk-forward, no look-ahead),
and forecasts each day of 2013-2018. 2013 calibrates adaptive conformal intervals; 2014-2018
is scored: the coverage of the ensemble's own intervals and of the adaptive ones, and the 99%
value at risk with Kupiec's test. ``benchmarks/forecast.py`` runs the same against GARCH(1,1)-t.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import bayesdl as bdl
from bayesdl import forecast
from bayesdl.predictions import RegressionPrediction


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--level", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        from arch.data import sp500
    except ImportError:
        raise SystemExit(
            "this example reads the S&P 500 prices shipped with arch: pip install arch"
        ) from None
    torch.set_num_threads(1)
    prices = sp500.load()["Adj Close"]
    returns = 100.0 * np.log(prices).diff().dropna()
    years = returns.index.year.to_numpy()
    r = returns.to_numpy()

    data = forecast.lagged(r, 20, exog=np.abs(r), exog_names=["|r|"])
    start = int(np.searchsorted(data.time.numpy(), np.searchsorted(years, 2013)))

    def ensemble(n_features: int) -> bdl.DeepEnsemble:
        net = bdl.models.mlp(n_features, 2, hidden=(32,))  # mean and log-variance
        return bdl.DeepEnsemble(net, "gaussian", n_members=args.members)

    run = forecast.walk_forward(
        ensemble,
        data, start=start, refit_every=63, window="rolling", window_size=2500,
        fit_options={"epochs": args.epochs, "lr": 3e-3, "batch_size": 256},
    )  # fmt: skip
    test = torch.from_numpy(years[run.time.numpy()] >= 2014)
    pred = run.prediction

    def part(mask):
        return RegressionPrediction(pred.means[:, mask], pred.variances[:, mask])

    y_test = run.y[test]
    lower, upper = part(test).interval(args.level)
    own = float(((y_test >= lower) & (y_test <= upper)).double().mean())
    adaptive = forecast.adaptive_conformal(
        part(test), y_test, level=args.level, calibration=(part(~test), run.y[~test])
    )
    var99 = forecast.value_at_risk(part(test), 0.99)
    kupiec = forecast.kupiec_test(y_test < -var99, 0.99)
    print(f"{len(y_test)} trading days of 2014-2018, {len(run.refits)} refits")
    print(
        f"{args.level:.0%} intervals: the ensemble's own cover {own:.3f}, "
        f"adaptive {adaptive.coverage():.3f}"
    )
    print(
        f"99% VaR exceeded on {kupiec.exceedances} days ({kupiec.rate:.2%}); "
        f"Kupiec p = {kupiec.p_value:.3f}"
    )
    return {
        "own": own,
        "adaptive": adaptive.coverage(),
        "kupiec_p": kupiec.p_value,
        "days": len(y_test),
    }


if __name__ == "__main__":
    main()
