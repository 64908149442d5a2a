"""Every script in examples/ runs with tiny arguments."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "forecast_sp500.py",
        "medical_referral.py",
        "regression_intervals.py",
    }


def test_forecast_sp500(capsys):
    pytest.importorskip("arch")
    module = runpy.run_path(str(EXAMPLES / "forecast_sp500.py"), run_name="example")
    results = module["main"](["--members", "2", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "adaptive" in out and "Kupiec" in out
    assert results["days"] == 1258
    # adaptive conformal holds long-run coverage whatever the (here barely trained) model
    assert abs(results["adaptive"] - 0.95) < 0.02, results


def test_regression_intervals(monkeypatch, capsys):
    argv = ["regression_intervals.py", "--epochs", "40", "--members", "3", "--samples", "30"]
    monkeypatch.setattr(sys, "argv", argv)
    module = runpy.run_path(str(EXAMPLES / "regression_intervals.py"), run_name="example")
    results = module["main"](argv[1:])
    out = capsys.readouterr().out
    assert "mc_dropout" in out and "deep_ensemble" in out
    for name, r in results.items():
        assert all(math.isfinite(v) for v in r.values()), name
        assert 0.5 <= r["picp_90"] <= 1.0, (name, r)
        # outside the training range the models must be less sure than inside it
        assert r["epistemic_outside"] > r["epistemic_inside"], (name, r)


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_have_a_docstring_and_main(script):
    text = (EXAMPLES / script).read_text()
    assert text.startswith('"""') and "def main(" in text
