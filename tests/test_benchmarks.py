"""The speed benchmark runs end to end with tiny sizes and reports what the issue asks for."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bayesdl as bdl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import speed  # noqa: E402

ISSUE_CASES = {"ensemble_train_small", "ensemble_train_small_homoscedastic"}
ISSUE_CASES |= {"mc_dropout_predict_10k"} | {
    f"mlp_predict_s100_{name}"
    for name in bdl.available_posteriors()
    if name != "deterministic" and name in speed.MLP_BUILDERS
}
ISSUE_CASES |= {"laplace_fit_last_layer_kron", "laplace_predict_glm"}
ISSUE_CASES |= {"vi_train_epoch_mlp", "vi_train_small", "ivon_train_epoch_mlp"}
ISSUE_CASES |= {"save_ensemble_1m", "load_ensemble_1m"}
# comparison rows appear only where the other libraries are installed (make bench)
OPTIONAL_CASES = {"vi_train_small_bayesian_torch", "vi_train_small_blitz"}


@pytest.fixture(scope="module")
def quick_json() -> dict:
    """``python -m benchmarks.speed --quick --json`` from the repo root, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_json_structure(quick_json):
    assert set(quick_json) == {"cases", "torch", "threads", "device"}
    assert isinstance(quick_json["torch"], str)
    assert isinstance(quick_json["threads"], int) and quick_json["threads"] >= 1
    names = [row["name"] for row in quick_json["cases"]]
    assert len(names) == len(set(names))
    assert ISSUE_CASES <= set(names) <= ISSUE_CASES | OPTIONAL_CASES


def test_rows_are_consistent(quick_json):
    for row in quick_json["cases"]:
        for key in ("seconds", "baseline_seconds", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, row
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"], rel=1e-12)
        if row["target"] is None:  # a case the issue asks only to report
            assert row["met"] is None
        else:
            assert row["met"] == (row["ratio"] <= row["target"])
        assert row["quick"] is True  # quick output says it is quick
        assert isinstance(row["baseline"], str) and row["baseline"]
        extra = row.get("extra_seconds", {})
        assert set(extra) == set(row.get("extra_ratios", {})) == set(row.get("extra_baselines", {}))
        for label, seconds in extra.items():
            assert row["extra_ratios"][label] == pytest.approx(row["seconds"] / seconds, rel=1e-12)


def test_load_row_reports_the_lazy_baseline_too(quick_json):
    (row,) = [r for r in quick_json["cases"] if r["name"] == "load_ensemble_1m"]
    assert set(row["extra_ratios"]) == {"lazy_load_file"}
    assert row["file_bytes"] > 0


def test_targets_are_the_issues():
    cases, _ = speed.all_cases()
    want = {"ensemble_train_small": 1.5, "ensemble_train_small_homoscedastic": 1.5}
    want |= {"mc_dropout_predict_10k": 0.2}
    want |= {"laplace_fit_last_layer_kron": 1.5, "laplace_predict_glm": 0.05}
    want |= {"vi_train_epoch_mlp": 1.6, "vi_train_small": None, "ivon_train_epoch_mlp": 1.3}
    want |= {"save_ensemble_1m": 1.5, "load_ensemble_1m": 1.5}
    want |= {name: None for name in OPTIONAL_CASES}
    for name, build in cases.items():
        info = build(True, torch.device("cpu"))[2]
        assert info["target"] == want.get(name, 1.15), name


def test_main_in_process_selects_cases_and_prints_a_table(capsys):
    result = speed.main(["--quick", "--cases", "mc_dropout_predict_10k", "--repeats", "1"])
    assert [row["name"] for row in result["cases"]] == ["mc_dropout_predict_10k"]
    assert result["cases"][0]["repeats"] == 1
    out = capsys.readouterr().out
    assert "QUICK" in out and "mc_dropout_predict_10k" in out
    assert ("ok" in out) or ("MISSED" in out)


def test_extra_baselines_are_timed_and_printed(capsys):
    result = speed.main(["--quick", "--cases", "load_ensemble_1m", "--repeats", "1"])
    (row,) = result["cases"]
    assert row["extra_seconds"]["lazy_load_file"] > 0
    assert "also against lazy_load_file" in capsys.readouterr().out


def test_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--quick", "--cases", "no_such_case"])
    assert "no_such_case" in capsys.readouterr().err


def test_time_pair_interleaves_after_one_warm_up():
    calls = []
    seconds, base = speed.time_pair(lambda: calls.append("A"), lambda: calls.append("B"), 3)
    assert calls == ["A", "B"] * 4
    assert seconds >= 0 and base >= 0


def test_method_without_builder_is_skipped_with_a_note(monkeypatch):
    monkeypatch.delitem(speed.MLP_BUILDERS, "deep_ensemble")
    cases, notes = speed.all_cases()
    assert "mlp_predict_s100_deep_ensemble" not in cases
    assert "mlp_predict_s100_mc_dropout" in cases
    assert any("deep_ensemble" in note and "skipped" in note for note in notes)


def test_epoch_parts_add_up_to_the_epoch():
    """``python -m benchmarks.epoch_parts --quick --json``: for the plain and the IVON epoch,
    the timed parts are positive and add up to the total."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.epoch_parts", "--quick", "--json", "--epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result["quick"] is True
    for kind in ("plain", "ivon"):
        ms = result["ms_per_epoch"][kind]
        assert all(ms[k] > 0 for k in ("backward", "step", "forward_and_loop", "total"))
        parts = ms["backward"] + ms["step"] + ms["forward_and_loop"]
        assert parts == pytest.approx(ms["total"], abs=0.05)
