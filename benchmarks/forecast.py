"""One-day-ahead intervals for S&P 500 returns: a deep ensemble (raw, and with adaptive conformal
inference) against GARCH(1,1) with Student-t innovations.

Run from the repository root (needs ``arch``, the benchmark extra: ``pip install arch``)::

    python -m benchmarks.forecast [--out DIR] [--quick]

Data: the daily S&P 500 prices embedded in ``arch`` (``arch.data.sp500``, 1999-2018); returns
are ``100 * log(adj close_t / adj close_{t-1})``. Rows hold the last 20 returns and their absolute
values (``bayesdl.forecast.lagged``). Walk-forward (``bayesdl.forecast.walk_forward``): a rolling
window of the last 2500 days, refit every 63 days (a quarter), forecasts from 2013 on; 2013 is the
adaptive intervals' calibration year, 2014-2018 the test period. The ensemble: 5 networks
40 -> 32 -> 2 (mean, log-variance), 30 epochs, Adam 3e-3, batch 256. GARCH(1,1)-t with a
constant mean is refitted on the same windows at the same days and forecasts each day from the
data before it (its parameters fixed between refits). Scores on the test period: coverage of the
central 90/95/99% intervals per year and overall, Kupiec's test of the lower-tail exceedances
(value at risk at 95% and 99%) per year, the interval (Winkler) score and the CRPS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import bayesdl as bdl
from bayesdl import forecast, metrics
from bayesdl.predictions import RegressionPrediction
from benchmarks._results import environment, write_results

LEVELS = (0.9, 0.95, 0.99)
LAGS, WINDOW, REFIT = 20, 2500, 63
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_returns():
    from arch.data import sp500

    prices = sp500.load()["Adj Close"]
    returns = 100.0 * np.log(prices).diff().dropna()
    return returns.index, returns.to_numpy()


def ensemble_run(r, first, quick: bool):
    data = forecast.lagged(r, LAGS, exog=np.abs(r), exog_names=["|r|"])
    start = int(np.searchsorted(data.time.numpy(), first))
    members, epochs = (2, 3) if quick else (5, 30)

    def make(n_features):
        return bdl.DeepEnsemble(
            bdl.models.mlp(n_features, 2, hidden=(32,)), "gaussian", n_members=members
        )

    run = forecast.walk_forward(
        make, data, start=start, refit_every=REFIT, window="rolling", window_size=WINDOW,
        fit_options={"epochs": epochs, "lr": 3e-3, "batch_size": 256},
    )  # fmt: skip
    return run


def garch_run(r, times: np.ndarray, refit_starts: list[int]):
    """Means and variances of GARCH(1,1)-t one-day forecasts for the days ``times``, refitted
    on the rolling window before each block start; and the degrees of freedom per day."""
    from arch import arch_model

    mean, var, nu = np.empty(len(times)), np.empty(len(times)), np.empty(len(times))
    blocks = [*refit_starts, len(times)]
    for b in range(len(blocks) - 1):
        t0 = int(times[blocks[b]])  # the first day forecast by this fit
        t1 = int(times[blocks[b + 1] - 1]) + 1
        model = arch_model(r[:t1], mean="Constant", vol="GARCH", p=1, q=1, dist="t")
        res = model.fit(first_obs=t0 - WINDOW, last_obs=t0, disp="off")
        # forecasts made at the end of day t - 1 for day t, for t in [t0, t1)
        fc = res.forecast(horizon=1, start=t0 - 1, reindex=False)
        m = fc.mean.to_numpy()[: t1 - t0, 0]
        v = fc.variance.to_numpy()[: t1 - t0, 0]
        sl = slice(blocks[b], blocks[b + 1])
        mean[sl], var[sl], nu[sl] = m, v, float(res.params["nu"])
    return mean, var, nu


def t_interval(mean, var, nu, level):
    from scipy import stats

    scale = np.sqrt(var * (nu - 2.0) / nu)
    q = stats.t.ppf(0.5 + level / 2.0, nu)
    return mean - q * scale, mean + q * scale


def t_quantile(mean, var, nu, p):
    from scipy import stats

    return mean + stats.t.ppf(p, nu) * np.sqrt(var * (nu - 2.0) / nu)


def crps_t(y, mean, var, nu):
    """Closed-form CRPS of a location-scale Student t (Jordan, Krueger and Lerch 2019)."""
    from scipy import special, stats

    s = np.sqrt(var * (nu - 2.0) / nu)
    z = (y - mean) / s
    term = (
        z * (2.0 * stats.t.cdf(z, nu) - 1.0)
        + 2.0 * stats.t.pdf(z, nu) * (nu + z**2) / (nu - 1.0)
        - 2.0
        * np.sqrt(nu)
        * special.beta(0.5, nu - 0.5)
        / ((nu - 1.0) * special.beta(0.5, nu / 2.0) ** 2)
    )
    return float(np.mean(s * term))


def score_block(y, lower, upper, level):
    inside = (y >= lower) & (y <= upper)
    width = upper - lower
    alpha = 1.0 - level
    below = np.where(y < lower, lower - y, 0.0)
    above = np.where(y > upper, y - upper, 0.0)
    penalty = (2.0 / alpha) * (below + above)
    return float(inside.mean()), float(np.mean(width + penalty))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny ensemble, for a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    dates, r = load_returns()
    years = dates.year.to_numpy()
    first_cal = int(np.searchsorted(years, 2013))
    run = ensemble_run(r, first_cal, args.quick)
    _log(f"ensemble walk-forward: {len(run.refits)} refits, {time.perf_counter() - start:.0f} s")
    times = run.time.numpy()
    y = run.y.double().numpy()
    pred = RegressionPrediction(run.prediction.means.double(), run.prediction.variances.double())
    refit_starts = [s - run.refits[0][0] for s, _ in run.refits]
    g_mean, g_var, g_nu = garch_run(r, times, refit_starts)
    test = years[times] >= 2014
    cal = ~test
    n_cal = int(cal.sum())
    test_pred = RegressionPrediction(pred.means[:, test], pred.variances[:, test])
    cal_pred = RegressionPrediction(pred.means[:, cal], pred.variances[:, cal])
    y_t = y[test]
    year_t = years[times][test]
    rows = []
    for level in LEVELS:
        lo, hi = (v.numpy() for v in test_pred.interval(level))
        aci = forecast.adaptive_conformal(
            test_pred, torch.from_numpy(y_t), level=level, gamma=0.005,
            calibration=(cal_pred, torch.from_numpy(y[cal])),
        )  # fmt: skip
        a_lo, a_hi = aci.lower.numpy(), aci.upper.numpy()
        gl, gh = t_interval(g_mean[test], g_var[test], g_nu[test], level)
        for name, (l_, h_) in (
            ("deep ensemble", (lo, hi)),
            ("deep ensemble + ACI", (a_lo, a_hi)),
            ("GARCH(1,1)-t", (gl, gh)),
        ):
            cov, score = score_block(y_t, l_, h_, level)
            yearly = {
                int(yr): round(
                    score_block(y_t[year_t == yr], l_[year_t == yr], h_[year_t == yr], level)[0], 4
                )
                for yr in np.unique(year_t)
            }
            rows.append(
                {
                    "method": name,
                    "level": level,
                    "coverage": cov,
                    "interval_score": score,
                    "coverage_per_year": yearly,
                }
            )
    crps = {
        "deep ensemble": float(
            metrics.crps_gaussian_mixture(
                test_pred.means, test_pred.variances, torch.from_numpy(y_t)
            )
        ),
        "GARCH(1,1)-t": crps_t(y_t, g_mean[test], g_var[test], g_nu[test]),
    }
    var_rows = []
    for conf in (0.95, 0.99):
        e_ens = y_t < -forecast.value_at_risk(test_pred, conf).numpy()
        e_g = y_t < t_quantile(g_mean[test], g_var[test], g_nu[test], 1 - conf)
        for name, e in (("deep ensemble", e_ens), ("GARCH(1,1)-t", e_g)):
            k = forecast.kupiec_test(torch.from_numpy(e), conf)
            yearly = {}
            for yr in np.unique(year_t):
                ky = forecast.kupiec_test(torch.from_numpy(e[year_t == yr]), conf)
                yearly[int(yr)] = {
                    "exceedances": ky.exceedances,
                    "days": ky.n,
                    "p_value": round(ky.p_value, 4),
                }
            var_rows.append(
                {
                    "method": name,
                    "confidence": conf,
                    "exceedances": k.exceedances,
                    "days": k.n,
                    "rate": k.rate,
                    "kupiec_p": k.p_value,
                    "per_year": yearly,
                }
            )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        "quick": args.quick,
        "data": (
            f"arch.data.sp500, {dates[0].date()} to {dates[-1].date()}; calibration year 2013 "
            f"({n_cal} days), test 2014-2018 ({int(test.sum())} days)"
        ),
        "intervals": rows,
        "crps": crps,
        "value_at_risk": var_rows,
        "seconds": {"total": time.perf_counter() - start},
    }
    stem = "forecast_sp500_quick" if args.quick else "forecast_sp500"
    write_results(results, args.out, stem, write_markdown, _log)
    return 0


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# One-day-ahead S&P 500 intervals: deep ensemble against GARCH(1,1)-t",
        "",
        f"{results['date']}; {results['data']}. Protocol: `benchmarks/forecast.py`. "
        f"{results['seconds']['total']:.0f} s on {results['environment']['threads']} torch "
        "thread(s).",
        "",
        "| method | level | coverage | interval score | coverage per year |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["intervals"]:
        yearly = ", ".join(f"{y}: {c:.3f}" for y, c in row["coverage_per_year"].items())
        lines.append(
            f"| {row['method']} | {row['level']:g} | {row['coverage']:.3f} | "
            f"{row['interval_score']:.3f} | {yearly} |"
        )
    lines += [
        "",
        "CRPS (lower is better): " + ", ".join(f"{k} {v:.4f}" for k, v in results["crps"].items()),
        "",
    ]
    lines += [
        "| method | VaR | exceedances / days | rate | Kupiec p | years with Kupiec p > 0.05 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["value_at_risk"]:
        ok = sum(1 for v in row["per_year"].values() if v["p_value"] > 0.05)
        lines.append(
            f"| {row['method']} | {row['confidence']:g} | {row['exceedances']} / {row['days']} | "
            f"{row['rate']:.4f} | {row['kupiec_p']:.3f} | {ok} of {len(row['per_year'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
