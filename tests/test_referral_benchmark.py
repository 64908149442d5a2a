"""The breast-cancer referral benchmark runs end to end (``--quick``, as a user runs it) and its
numbers agree with each other, with their definitions and with what the guarantee allows."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import referral  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    """``python -m benchmarks.referral --quick`` into a temporary folder."""
    folder = tmp_path_factory.mktemp("referral")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.referral", "--quick", "--quiet", "--out", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((folder / "referral_breast_cancer_quick.json").read_text())
    return results, (folder / "referral_breast_cancer_quick.md").read_text()


def entries(results: dict):
    for method, entry in results["methods"].items():
        for score, by_target in entry["scores"].items():
            for key, e in by_target.items():
                yield method, score, key, e


def test_json_describes_the_run(quick):
    results, _ = quick
    assert results["quick"] is True
    assert results["config"] == json.loads(json.dumps(asdict(referral.QUICK)))
    data = results["data"]
    assert (data["n_cases"], data["n_features"]) == (569, 30)
    assert data["classes"] == ["malignant", "benign"] and data["class_counts"] == [212, 357]
    assert results["split_sizes"] == {"train": 190, "calibration": 190, "test": 189}
    assert results["min_cases_to_certify"] == {"0.01": 230, "0.02": 114, "0.05": 45}
    tol = results["violation_tolerance"]
    assert tol["max_violations"] == referral.violation_tolerance(3, 0.1, 0.95)
    assert tol["max_rate"] == tol["max_violations"] / 3
    assert list(results["methods"]) == list(referral.METHODS)
    for method, entry in results["methods"].items():
        assert tuple(entry["scores"]) == referral.SCORES[method]
        for by_target in entry["scores"].values():
            assert list(by_target) == ["0.01", "0.02", "0.05"]
    seconds = results["seconds"]
    assert all(seconds[m]["fit"] > 0 and seconds[m]["refer"] > 0 for m in referral.METHODS)
    assert seconds["total"] >= sum(
        seconds[m]["fit"] + seconds[m]["refer"] for m in seconds if m != "total"
    )


def test_rows_agree_with_their_definitions(quick):
    results, _ = quick
    n_splits, n_test = results["config"]["n_splits"], results["split_sizes"]["test"]
    tolerance = results["violation_tolerance"]["max_violations"]
    for entry in results["methods"].values():
        acc = entry["accuracy"]
        assert len(acc["per_split"]) == n_splits
        assert all(0 <= a <= 1 for a in acc["per_split"])
        assert acc["mean"] == pytest.approx(statistics.fmean(acc["per_split"]))
    for _, _, key, e in entries(results):
        target = float(key)
        per = e["per_split"]
        decided, errors = per["n_decided"], per["n_errors"]
        assert len(decided) == len(errors) == len(per["calibration_coverage"]) == n_splits
        assert all(0 <= k <= d <= n_test for k, d in zip(errors, decided, strict=True))
        rates = [k / d for k, d in zip(errors, decided, strict=True) if d]
        assert e["decided_error"]["n"] == len(rates)
        assert (e["decided_error"]["mean"] is None) == (not rates)
        if rates:
            assert e["decided_error"]["mean"] == pytest.approx(statistics.fmean(rates))
            assert e["pooled_decided_error"] == pytest.approx(sum(errors) / sum(decided))
        assert e["referred"]["mean"] == pytest.approx(
            statistics.fmean(1 - d / n_test for d in decided)
        )
        assert 0 <= e["referred"]["mean"] <= 1 and e["referred"]["std"] >= 0
        assert e["n_violations"] == sum(1 for r in rates if r > target)
        assert e["violation_rate"] == e["n_violations"] / n_splits
        assert e["within_tolerance"] == (e["n_violations"] <= tolerance)
        assert e["n_all_referred"] == decided.count(0)
        for cov, risk, threshold in zip(
            per["calibration_coverage"], per["calibration_risk"], per["threshold"], strict=True
        ):
            assert 0 <= cov <= 1
            # a rule with a threshold decided calibration cases, with at most the target's risk
            assert (threshold is None) == (cov == 0) == (risk is None)
            assert risk is None or 0 <= risk <= target


def test_one_percent_cannot_be_certified_on_190_calibration_cases(quick):
    """230 decided calibration cases are needed for 1% at delta 0.1: every rule refers all."""
    results, _ = quick
    n_splits = results["config"]["n_splits"]
    for _, _, key, e in entries(results):
        if key == "0.01":
            assert e["n_all_referred"] == n_splits
            assert e["per_split"]["calibration_coverage"] == [0.0] * n_splits
            assert e["referred"]["mean"] == 1.0


def test_comparisons_are_paired_differences(quick):
    results, _ = quick
    n_test = results["split_sizes"]["test"]
    n_splits = results["config"]["n_splits"]
    assert len(results["comparisons"]) == len(results["config"]["targets"]) * 10
    for c in results["comparisons"]:
        key = referral.target_key(c["target"])
        (ma, sa), (mb, sb) = c["a"], c["b"]
        a = results["methods"][ma]["scores"][sa][key]["per_split"]["n_decided"]
        b = results["methods"][mb]["scores"][sb][key]["per_split"]["n_decided"]
        diff = [(db - da) / n_test for da, db in zip(a, b, strict=True)]
        assert c["referred_difference"]["mean"] == pytest.approx(statistics.fmean(diff))
        assert c["referred_a"] == pytest.approx(
            results["methods"][ma]["scores"][sa][key]["referred"]["mean"]
        )
        assert c["n_a_refers_fewer"] + c["n_a_refers_more"] + c["n_same"] == n_splits
        assert c["n_a_refers_fewer"] == sum(1 for d in diff if d < 0)


def test_markdown_has_every_rule(quick):
    results, text = quick
    assert text.startswith("# Medical referral on the breast-cancer biopsies (quick")
    for method, scores in referral.SCORES.items():
        for score in scores:
            assert text.count(f"| {method} | {score} |") == 3  # one row per target
    for heading in ("## Target risk 1%", "## Target risk 2%", "## Target risk 5%"):
        assert heading in text
    assert "nothing can be certified, every case is referred" in text
    assert "## Paired comparisons of the share referred" in text
    assert f"total {results['seconds']['total']:.0f}." in text


# ----------------------------------------------------------------------------- parts
def test_stratified_split_is_disjoint_complete_seeded_and_keeps_proportions():
    y = torch.tensor([0] * 212 + [1] * 357)[
        torch.randperm(569, generator=torch.Generator().manual_seed(0))
    ]
    a = referral.stratified_split(y, 1 / 3, 1 / 3, seed=5)
    parts = (a.train, a.calibration, a.test)
    assert [len(p) for p in parts] == [190, 190, 189]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(569))
    for part in parts:
        counts = torch.bincount(y[part], minlength=2)
        assert abs(int(counts[0]) - 212 * len(part) / 569) <= 1  # proportions kept
    b = referral.stratified_split(y, 1 / 3, 1 / 3, seed=5)
    assert all(
        torch.equal(p, q) for p, q in zip(parts, (b.train, b.calibration, b.test), strict=True)
    )
    c = referral.stratified_split(y, 1 / 3, 1 / 3, seed=6)
    assert not torch.equal(a.train, c.train)
    with pytest.raises(ValueError, match="summing to less than 1"):
        referral.stratified_split(y, 0.5, 0.5, seed=0)


@pytest.mark.parametrize(("n", "delta"), [(50, 0.1), (3, 0.1), (200, 0.05)])
def test_violation_tolerance_is_scipys_quantile(n, delta):
    assert referral.violation_tolerance(n, delta, 0.95) == stats.binom.ppf(0.95, n, delta)


def test_summarize_counts():
    per = {
        "n_decided": [100, 0, 50, 80],
        "n_errors": [3, 0, 1, 1],
        "calibration_coverage": [0.5, 0.0, 0.3, 0.4],
    }
    s = referral.summarize(per, n_test=100, target=0.02)
    assert s["decided_error"]["mean"] == pytest.approx((0.03 + 0.02 + 0.0125) / 3)
    assert s["decided_error"]["n"] == 3
    assert s["pooled_decided_error"] == pytest.approx(5 / 230)
    assert s["referred"]["mean"] == pytest.approx((0 + 1 + 0.5 + 0.2) / 4)
    assert s["referred_when_deciding"]["mean"] == pytest.approx((0 + 0.5 + 0.2) / 3)
    assert s["n_violations"] == 1  # 3/100 > 2%; 1/50 = 2% is not above the target
    assert s["violation_rate"] == 0.25 and s["n_all_referred"] == 1
    assert s["calibration_coverage"]["mean"] == pytest.approx(0.3)
    none = referral.summarize(
        {"n_decided": [0, 0], "n_errors": [0, 0], "calibration_coverage": [0, 0]}, 10, 0.05
    )
    assert none["decided_error"]["mean"] is None and none["pooled_decided_error"] is None
    assert none["referred"] == {"mean": 1.0, "std": 0.0, "n": 2} and none["n_violations"] == 0


def test_main_rejects_bad_counts(tmp_path):
    with pytest.raises(SystemExit):
        referral.main(["--quick", "--quiet", "--splits", "0", "--out", str(tmp_path)])
