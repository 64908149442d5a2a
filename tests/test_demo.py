"""The main job runs end to end (tiny settings) through the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from bayesdl.cli import main

KEYS = {
    "accuracy",
    "nll",
    "ece",
    "ood_auroc_confidence",
    "ood_auroc_epistemic",
    "accuracy_at_80_coverage",
}


def test_demo_json(capsys):
    assert main(["demo", "--json", "--epochs", "3", "--members", "2", "--samples", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "digits" in result["dataset"]
    assert set(result["methods"]) == {"deterministic", "mc_dropout", "deep_ensemble"}
    for name, row in result["methods"].items():
        assert KEYS <= set(row)
        for key in KEYS - {"ood_auroc_epistemic", "nll"}:
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert math.isfinite(row["nll"]) and row["nll"] > 0
    assert result["methods"]["deterministic"]["ood_auroc_epistemic"] is None
    assert 0.0 <= result["methods"]["mc_dropout"]["ood_auroc_epistemic"] <= 1.0
    # even three epochs learn something about digits 0-4 (chance is 0.2)
    assert result["methods"]["deterministic"]["accuracy"] > 0.5


def test_demo_table_via_python_dash_m():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bayesdl",
            "demo",
            "--epochs",
            "2",
            "--members",
            "2",
            "--samples",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    lines = out.splitlines()
    assert any(line.startswith("method") for line in lines)
    for name in ("deterministic", "mc_dropout", "deep_ensemble"):
        assert any(line.startswith(name) for line in lines), out


def test_cli_lists_methods_and_rejects_bad_arguments(capsys):
    assert main(["methods"]) == 0
    assert "mc_dropout" in capsys.readouterr().out.split()
    try:
        main(["demo", "--epochs", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--epochs 0 was accepted")
    assert "positive integer" in capsys.readouterr().err
