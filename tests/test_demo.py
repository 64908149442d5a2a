"""The main job runs end to end (tiny settings) through the command line, and its parts are
right: the out-of-distribution sets, the verdict on mutual information, the referral table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bayesdl.cli import main
from bayesdl.data import load_digits_ood
from bayesdl.demo import OOD_SETS, format_table, ood_inputs

KEYS = {
    "accuracy",
    "nll",
    "ece",
    "ood_auroc_confidence",
    "ood_auroc_epistemic",
    "accuracy_at_80_coverage",
    "mean_confidence",
}
METHODS = {"deterministic", "mc_dropout", "deep_ensemble"}


def test_demo_json(capsys):
    argv = ["demo", "--json", "--epochs", "3", "--members", "2", "--samples", "8"]
    assert main([*argv, "--target-risk", "0.05", "--delta", "0.2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "digits" in result["dataset"]
    assert set(result["methods"]) == METHODS
    assert list(result["ood_sets"]) == list(OOD_SETS)
    assert result["ood_sets"]["digits_5_9"]["n"] == result["n_ood"]
    for key in ("noisy", "inverted", "uniform_noise", "scaled_x3"):
        assert result["ood_sets"][key]["n"] == result["n_test"]
    for name, row in result["methods"].items():
        assert KEYS <= set(row)
        for key in KEYS - {"ood_auroc_epistemic", "nll"}:
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert math.isfinite(row["nll"]) and row["nll"] > 0
        assert set(row["ood"]) == set(OOD_SETS)
        for key, ood in row["ood"].items():
            assert 0.0 <= ood["auroc_confidence"] <= 1.0, (name, key)
            assert 0.2 <= ood["mean_confidence"] <= 1.0, (name, key)  # 5 classes: at least 1/5
            if name == "deterministic":
                assert ood["auroc_epistemic"] is None
            else:
                assert 0.0 <= ood["auroc_epistemic"] <= 1.0, (name, key)
        # the main table's OOD columns are those of digits 5-9
        assert row["ood_auroc_confidence"] == row["ood"]["digits_5_9"]["auroc_confidence"]
        assert row["ood_auroc_epistemic"] == row["ood"]["digits_5_9"]["auroc_epistemic"]
    assert result["methods"]["deterministic"]["ood_auroc_epistemic"] is None
    # even three epochs learn something about digits 0-4 (chance is 0.2)
    assert result["methods"]["deterministic"]["accuracy"] > 0.5

    ref = result["referral"]
    assert (ref["target_risk"], ref["delta"]) == (0.05, 0.2)
    assert ref["n_calibration"] + ref["n_test"] == result["n_test"]
    assert abs(ref["n_calibration"] - ref["n_test"]) <= 1
    # (1 - 0.05)^m <= 0.2 first at m = 32
    assert ref["min_cases"] == 32
    for name, row in result["methods"].items():
        r = row["referral"]
        assert r["score"] == ("confidence" if name == "deterministic" else "total")
        assert 0.0 <= r["calibration_coverage"] <= 1.0
        assert 0 <= r["n_accepted"] <= ref["n_test"]
        assert r["coverage"] == pytest.approx(r["n_accepted"] / ref["n_test"])
        if r["n_accepted"] == 0:
            assert r["error"] is None and r["met_target"] is True
        else:
            assert 0.0 <= r["error"] <= 1.0
            assert r["met_target"] == (r["error"] <= ref["target_risk"])
        if r["threshold"] is None:  # nothing certified: everything referred
            assert r["n_accepted"] == 0 and r["calibration_coverage"] == 0.0
        else:
            assert r["calibration_coverage"] * ref["n_calibration"] >= ref["min_cases"]


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
    # three tables: in-distribution, OOD per set, referral
    assert sum(line.startswith("method") for line in lines) == 2, out
    assert sum(line.startswith("OOD set") for line in lines) == 1, out
    for name in METHODS:
        assert sum(line.startswith(name) for line in lines) == 2, out  # main + referral table
        # one row per OOD set in the OOD table: method and four numbers end the row
        assert sum(line.split()[-5:-4] == [name] for line in lines) == len(OOD_SETS), out
    for short, _ in OOD_SETS.values():
        assert any(line.startswith(short) for line in lines), (short, out)
    assert any(line.startswith("Referral") for line in lines), out
    assert any(line.startswith("Does mutual information") for line in lines), out


def test_ood_inputs_are_the_stated_shifts():
    data = load_digits_ood(seed=0)
    sets = ood_inputs(data, seed=0)
    assert list(sets) == list(OOD_SETS)
    x = data.x_test
    for key, value in sets.items():
        assert value.dtype == torch.float32 and value.shape[1] == x.shape[1], key
    assert torch.equal(sets["digits_5_9"], data.x_ood)
    assert torch.equal(sets["inverted"], 1.0 - x)
    assert torch.equal(sets["scaled_x3"], 3.0 * x)
    noise = sets["noisy"] - x
    assert noise.shape == x.shape
    # 17,280 draws of N(0, 0.5^2): the sample sd is within 0.01 of 0.5 by a wide margin
    assert abs(float(noise.std()) - 0.5) < 0.01 and abs(float(noise.mean())) < 0.02
    assert (sets["noisy"] < 0).any() and (sets["noisy"] > 1).any()  # not clipped
    u = sets["uniform_noise"]
    assert u.shape == x.shape and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    # the same seed gives the same sets, another seed other noise
    again, other = ood_inputs(data, seed=0), ood_inputs(data, seed=1)
    assert all(torch.equal(sets[k], again[k]) for k in sets)
    assert not torch.equal(sets["noisy"], other["noisy"])
    assert not torch.equal(sets["uniform_noise"], other["uniform_noise"])


def _fake_result(aurocs: dict[str, dict[str, tuple[float, float | None]]]) -> dict:
    """A result dict with chosen OOD AUROCs ``{set: {method: (conf, mi)}}``."""
    sets = list(next(iter(aurocs.values())))
    methods = {}
    for name in ("deterministic", "mc_dropout", "deep_ensemble"):
        ood = {
            s: {
                "auroc_confidence": aurocs[name][s][0],
                "auroc_epistemic": aurocs[name][s][1],
                "mean_confidence": 0.9,
            }
            for s in sets
        }
        methods[name] = {
            "accuracy": 0.9,
            "nll": 0.3,
            "ece": 0.05,
            "ood_auroc_confidence": ood[sets[0]]["auroc_confidence"],
            "ood_auroc_epistemic": ood[sets[0]]["auroc_epistemic"],
            "accuracy_at_80_coverage": 0.95,
            "mean_confidence": 0.95,
            "ood": ood,
            "referral": {
                "score": "total",
                "threshold": None,
                "calibration_coverage": 0.0,
                "coverage": 0.0,
                "n_accepted": 0,
                "error": None,
                "met_target": True,
            },
            "seconds": 1.0,
        }
    return {
        "dataset": "fake",
        "n_train": 10,
        "n_test": 10,
        "n_ood": 10,
        "ood_sets": {s: {"name": f"set {s}", "description": "d", "n": 10} for s in sets},
        "referral": {
            "target_risk": 0.02,
            "delta": 0.1,
            "min_cases": 114,
            "n_calibration": 5,
            "n_test": 5,
        },
        "methods": methods,
    }


def test_table_verdict_follows_the_numbers():
    result = _fake_result(
        {
            "deterministic": {"a": (0.9, None), "b": (0.5, None), "c": (0.7, None)},
            "mc_dropout": {"a": (0.9, 0.8), "b": (0.6, 0.7), "c": (0.7, 0.75)},
            "deep_ensemble": {"a": (0.9, 0.9), "b": (0.6, 0.65), "c": (0.7, 0.6)},
        }
    )
    lines = format_table(result).splitlines()
    verdict = {line.split(":")[0].strip(): line for line in lines if line.startswith("  ")}
    assert "set b (+0.050 to +0.100)" in verdict["yes, for mc_dropout and deep_ensemble"]
    assert "set c (-0.100 to +0.050; higher for mc_dropout)" in verdict["for some methods"]
    # a tie is no win
    assert "set a (-0.100 to +0.000)" in verdict["no, confidence is as good or better"]
    rows = [line.split() for line in lines]
    assert ["mc_dropout", "0.600", "0.700", "+0.100", "0.900"] in rows
    assert ["deterministic", "0.500", "-", "-", "0.900"] in [r[-5:] for r in rows]


def test_cli_lists_methods_and_rejects_bad_arguments(capsys):
    assert main(["methods"]) == 0
    assert "mc_dropout" in capsys.readouterr().out.split()
    for argv, message in (
        (["demo", "--epochs", "0"], "positive integer"),
        (["demo", "--target-risk", "1.5"], "in (0, 1)"),
        (["demo", "--delta", "zero"], "in (0, 1)"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
