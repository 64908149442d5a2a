"""benchmarks/forecast.py runs end to end (the --quick configuration, seconds) on the S&P 500
data embedded in ``arch``, and writes the tables it promises."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("arch")
pytest.importorskip("scipy")

from benchmarks import forecast as bench


def test_quick_run_writes_both_methods_and_every_level(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "forecast_sp500_quick.json").read_text())
    rows = results["intervals"]
    assert {(r["method"], r["level"]) for r in rows} == {
        (m, level)
        for m in ("deep ensemble", "deep ensemble + ACI", "GARCH(1,1)-t")
        for level in (0.9, 0.95, 0.99)
    }
    for r in rows:
        assert 0.5 < r["coverage"] <= 1.0 and r["interval_score"] > 0
        assert sorted(r["coverage_per_year"]) == ["2014", "2015", "2016", "2017", "2018"]
    for r in results["value_at_risk"]:
        assert r["days"] == 1258 and 0 <= r["kupiec_p"] <= 1
    assert results["crps"]["GARCH(1,1)-t"] > 0 and results["crps"]["deep ensemble"] > 0
    assert "GARCH(1,1)-t" in (tmp_path / "forecast_sp500_quick.md").read_text()


def test_garch_forecasts_use_only_the_past():
    # Forecasts for the days of one block must not change when later data are altered.
    _, r = bench.load_returns()
    times = np.arange(3000, 3040)
    before = bench.garch_run(r, times, [0])
    changed = r.copy()
    changed[3040:] *= 5.0
    changed[3020] += 10.0  # a shock on day 3020 may move forecasts from day 3021 on only
    after = bench.garch_run(changed, times, [0])
    np.testing.assert_array_equal(before[1][:21], after[1][:21])
    assert not np.array_equal(before[1][21:], after[1][21:])
