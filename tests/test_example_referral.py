"""examples/medical_referral.py runs with tiny arguments, its counts add up, and the saved
model with its referral rule decides as the fitted one did."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

import bayesdl as bdl
from bayesdl.decisions import Referral

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "medical_referral.py"


@pytest.fixture
def example(monkeypatch):
    """The example's ``main``, with one torch thread (the networks are tiny) restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", [SCRIPT.name])
    yield runpy.run_path(str(SCRIPT), run_name="example")["main"]
    torch.set_num_threads(threads)


def test_decides_at_five_percent_and_saves_the_rule(example, tmp_path, capsys):
    results = example(
        ["--members", "2", "--epochs", "30", "--target", "0.05", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    n_test = results["n_test"]
    assert n_test == 190  # a third of 569 after the training third, stratified
    assert results["n_decided"] + results["n_referred"] == n_test
    assert results["n_decided"] > 0  # 5% needs 45 decided calibration cases; there are 190
    assert 0 <= results["n_errors_decided"] <= results["n_decided"]
    assert results["decided_error"] == results["n_errors_decided"] / results["n_decided"]
    assert 0.5 < results["accuracy"] <= 1
    assert results["min_cases"] == 45
    assert 0 < results["calibration_coverage"] <= 1
    assert f"decides {results['n_decided']} cases" in out
    assert f"refers {results['n_referred']} to a pathologist" in out
    assert "same decisions: True" in out and results["same_decisions"] is True
    path = Path(results["path"])
    assert path == tmp_path / "referral.safetensors" and path.exists()
    loaded = bdl.load(path)
    assert isinstance(loaded, Referral)
    assert loaded.threshold == results["threshold"]
    assert loaded.target_risk == 0.05 and loaded.score == "total"
    info = bdl.inspect(path)
    assert [name for name, _ in info.wrappers] == ["referral"]
    assert info.feature_names is not None and len(info.feature_names) == 30
    assert info.standardizer is not None


def test_one_percent_refers_every_case(example, tmp_path, capsys):
    """190 calibration cases cannot certify 1% (it needs 230): the example says so."""
    results = example(
        ["--members", "2", "--epochs", "5", "--target", "0.01", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert results["n_decided"] == 0 and results["n_referred"] == results["n_test"]
    assert results["decided_error"] is None and results["min_cases"] == 230
    assert results["threshold"] == float("-inf")
    assert "nothing could be certified: it needs at least 230" in out
    assert results["same_decisions"] is True
