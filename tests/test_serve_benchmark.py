"""The load test of ``bayesdl serve`` runs end to end (``--quick``: a tiny model, the real server
on a loopback port) and its figures agree with each other."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import serve  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[int, dict, str]:
    """``benchmarks.serve.main(["--quick", "--out", folder])``: exit status, JSON, markdown."""
    folder = tmp_path_factory.mktemp("serve")
    status = serve.main(["--quick", "--out", str(folder)])
    results = json.loads((folder / "serve_cpu_quick.json").read_text())
    return status, results, (folder / "serve_cpu_quick.md").read_text()


def test_every_request_is_answered(quick):
    status, results, _ = quick
    assert status == 0
    assert [level["concurrency"] for level in results["levels"]] == list(serve.LEVELS)
    for level in results["levels"]:
        assert level["errors"] == 0, level["error_examples"]
        assert level["requests"] == results["requests_per_level"] == 40
        served = level["health_after"]["instances"] - level["health_before"]["instances"]
        assert served == level["instances"] == 40


def test_figures_are_consistent(quick):
    _, results, _ = quick
    base = results["in_process"]
    for row in [base, *results["levels"]]:
        latency = row["latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"]
        assert row["requests_per_s"] == pytest.approx(row["requests"] / row["wall_s"])
    for level in results["levels"]:
        assert level["ratio"] == pytest.approx(level["instances_per_s"] / base["instances_per_s"])
        assert level["mean_batch"] >= 1
        assert level["max_probability_difference"] < 1e-5  # batching does not change answers
    assert results["levels"][0]["mean_batch"] == 1  # one request in flight: batches of one
    assert 0 <= results["referred_share"] <= 1


def test_markdown_has_the_table(quick):
    _, results, markdown = quick
    assert "| level | requests | errors | req/s | p50 ms | p99 ms | mean batch |" in markdown
    for level in results["levels"]:
        assert f"| {level['concurrency']} | 40 | 0 |" in markdown
    assert "127.0.0.1" in results["server"]["command"]


def test_refused_requests_count_as_errors(tmp_path):
    """Requests over the server's --max-instances (1000) get 413: errors, and exit status 1."""
    status = serve.main(
        ["--quick", "--requests", "2", "--instances-per-request", "1001", "--out", str(tmp_path)]
    )
    results = json.loads((tmp_path / "serve_cpu_quick.json").read_text())
    assert status == 1
    for level in results["levels"]:
        assert level["errors"] == 2
        assert "status 413" in level["error_examples"][0]
        assert level["mean_batch"] is None and level["max_probability_difference"] is None
    assert "| 32 | 2 | 2 |" in (tmp_path / "serve_cpu_quick.md").read_text()
