"""benchmarks/distributed.py runs end to end (``--quick``: torchrun on 1 and on 2 processes, tiny
sizes) and reports every configuration: positive times, a finite speed-up, and 2-process
data-parallel states equal to the 1-process ones up to float round-off."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed.py"
CONFIGS = {
    "mean_field_vi": "data",
    "deterministic": "data",
    "deep_ensemble_data": "data",
    "deep_ensemble_members": "members",
}

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="torchrun with gloo on the loopback address"
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("distributed-bench")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "distributed_cpu_quick.json").read_text()), out


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_configuration_is_timed_on_one_and_two_processes(quick):
    results, _ = quick
    assert results["quick"] is True
    assert set(results["summary"]) == set(CONFIGS)
    assert results["runs"]["p1"]["processes"] == 1 and results["runs"]["p2"]["processes"] == 2
    for label in ("p1", "p2", "p1_thin"):
        assert set(results["runs"][label]["configs"]) == set(CONFIGS)
        assert results["threads"][label] >= 1
    for name, row in results["summary"].items():
        assert row["parallel"] == CONFIGS[name]
        for key in ("seconds_per_epoch_1", "seconds_per_epoch_2", "seconds_per_epoch_1_thin"):
            assert _positive(row[key]), (name, key, row[key])
        assert _positive(row["speedup"])
        assert row["speedup"] == pytest.approx(
            row["seconds_per_epoch_1"] / row["seconds_per_epoch_2"], rel=1e-12
        )
        assert _positive(row["all_reduce_ms"])


def test_two_processes_train_what_one_does(quick):
    results, _ = quick
    for name, row in results["summary"].items():
        diff = row["max_abs_difference"]
        assert isinstance(diff, float) and math.isfinite(diff) and diff >= 0, (name, diff)
        if row["parallel"] == "data":
            assert diff < 1e-4, (name, diff)


def test_markdown_reports_the_table(quick):
    results, out = quick
    text = (out / "distributed_cpu_quick.md").read_text()
    assert results["environment"]["torch"] in text
    for row in results["summary"].values():
        assert f"{row['posterior']}, parallel={row['parallel']}" in text
    assert "What limits the speed-up" in text


def test_quick_needs_an_output_folder():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--out" in proc.stderr
