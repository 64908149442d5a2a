"""The MNIST hand-over benchmark runs end to end (``--quick`` on generated IDX files, so the
shared data are not needed) and its numbers agree with each other and with their definitions."""

from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import handover  # noqa: E402

N_PER_CLASS = 100


def strokes(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 ``uint8`` images of 10 classes: class ``k`` is a bright stroke through
    the middle at ``18 k`` degrees, jittered in position, length and brightness."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images, labels = [], []
    for k in range(10):
        angle = math.radians(18.0 * k)
        d = torch.tensor([math.cos(angle), -math.sin(angle)])
        for _ in range(n_per_class):
            cx, cy = 13.5 + 2 * torch.randn(2, generator=g)
            length = 8 + 2 * torch.rand(1, generator=g)
            px, py = xx - cx, yy - cy
            along = px * d[0] + py * d[1]
            across = (px * d[1] - py * d[0]).abs()
            stroke = (across < 1.5) & (along.abs() < length)
            value = (0.6 + 0.4 * torch.rand(1, generator=g)) * stroke
            images.append((255 * value).round().to(torch.uint8))
            labels.append(k)
    return torch.stack(images).numpy(), np.array(labels, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    """``python -m benchmarks.handover --quick`` on generated IDX files, as a user runs it."""
    folder = tmp_path_factory.mktemp("handover")
    images, labels = strokes(N_PER_CLASS)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.handover",
            "--quick",
            "--quiet",
            "--data",
            str(folder),
            "--out",
            str(folder),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((folder / "handover_mnist_quick.json").read_text())
    return results, (folder / "handover_mnist_quick.md").read_text()


SETS = [*handover.SHIFTS, handover.UNSEEN]


def test_json_describes_the_run(quick):
    results, _ = quick
    assert results["quick"] is True
    assert results["config"] == asdict(handover.QUICK)
    data = results["data"]
    assert data["n_images"] == 10 * N_PER_CLASS
    assert data["class_counts"] == [N_PER_CLASS] * 10
    assert data["known_classes"] == list(range(8)) and data["unseen_classes"] == [8, 9]
    q = handover.QUICK
    assert (data["n_train"], data["n_calibration"]) == (q.n_train, q.n_cal)
    assert data["n_test"] == min(q.n_test, 8 * N_PER_CLASS - q.n_train - q.n_cal)
    assert data["n_unseen"] == min(q.n_unseen, 2 * N_PER_CLASS)
    assert set(data["test_sets"]) == set(SETS)
    assert set(results["methods"]) == set(handover.METHODS)
    for method in handover.METHODS:
        assert list(results["methods"][method]) == SETS
        seconds = results["seconds"][method]
        assert seconds["fit"] > 0 and seconds["gate_and_predict"] > 0
    assert results["seconds"]["total"] >= sum(
        s["fit"] + s["gate_and_predict"] for m, s in results["seconds"].items() if m != "total"
    )


def test_rows_agree_with_their_definitions(quick):
    results, _ = quick
    n_test, n_unseen = results["data"]["n_test"], results["data"]["n_unseen"]
    for method, rows in results["methods"].items():
        for name, row in rows.items():
            unseen = name == handover.UNSEEN
            assert row["n"] == (n_unseen if unseen else n_test)
            assert (row["accuracy"] is None) == unseen
            assert row["auroc_epistemic"] is None or 0 <= row["auroc_epistemic"] <= 1
            assert (row["auroc_confidence"] is None) == (name == "clean")
            assert (row["auroc_epistemic"] is None) == (
                name == "clean" or method == "deterministic"
            )
            assert set(row["gates"]) == set(handover.GATE_SCORES[method])
            for gate in row["gates"].values():
                n, kept, handed = row["n"], gate["n_kept"], gate["n_handed_over"]
                assert kept + handed == n
                assert gate["handover_rate"] == pytest.approx(handed / n, abs=1e-12)
                assert (gate["kept_error"] is None) == (kept == 0)
                assert (gate["handed_over_error"] is None) == (handed == 0)
                if unseen:  # every case of an unseen class is an error
                    assert gate["kept_error"] in (None, 1.0)
                    assert gate["handed_over_error"] in (None, 1.0)
                else:  # the errors of the two groups add up to all errors
                    errors = kept * (gate["kept_error"] or 0) + handed * (
                        gate["handed_over_error"] or 0
                    )
                    assert errors == pytest.approx(n * (1 - row["accuracy"]), abs=1e-6)


def test_false_alarm_entries(quick):
    results, _ = quick
    n_test, n_cal = results["data"]["n_test"], results["data"]["n_calibration"]
    alpha = results["config"]["false_alarm"]
    for method, per in results["false_alarm"].items():
        assert set(per) == set(handover.GATE_SCORES[method])
        for score, entry in per.items():
            clean = results["methods"][method]["clean"]["gates"][score]
            assert entry["rate"] == clean["handover_rate"]
            assert entry["n_calibration"] == n_cal
            lo, hi = entry["binomial_band"]
            wide_lo, wide_hi = entry["band_with_calibration"]
            assert wide_lo <= lo <= alpha <= hi <= wide_hi
            assert entry["inside_binomial_band"] == (lo <= entry["rate"] <= hi)
            assert list(handover.binomial_band(n_test, alpha)) == [lo, hi]


def test_markdown_has_every_row_and_column(quick):
    results, text = quick
    assert text.startswith("# Hand-over under shift on MNIST (quick")
    for name in SETS:
        assert name in text
    for method, scores in handover.GATE_SCORES.items():
        for score in scores:
            assert f"| {method}, {score} |" in text
    assert "## Summary per gate" in text and "## False alarms on clean test images" in text
    assert "| deterministic, epistemic |" not in text  # no epistemic score for a point estimate
    assert f"total {results['seconds']['total']:.0f}" in text


# ----------------------------------------------------------------------------- parts
@pytest.mark.parametrize(("n", "rate"), [(1017, 0.05), (200, 0.05), (50, 0.1), (7, 0.5)])
def test_binomial_band_is_scipys_quantiles(n, rate):
    lo, hi = handover.binomial_band(n, rate, 0.95)
    assert lo * n == stats.binom.ppf(0.025, n, rate)
    assert hi * n == stats.binom.ppf(0.975, n, rate)


@pytest.mark.parametrize(("n", "n_cal", "alpha"), [(1017, 1000, 0.05), (200, 200, 0.05)])
def test_beta_binomial_band_is_scipys_quantiles(n, n_cal, alpha):
    m = math.floor(alpha * (n_cal + 1))
    lo, hi = handover.beta_binomial_band(n, n_cal, alpha, 0.95)
    assert lo * n == stats.betabinom.ppf(0.025, n, m, n_cal + 1 - m)
    assert hi * n == stats.betabinom.ppf(0.975, n, m, n_cal + 1 - m)


def test_beta_binomial_band_matches_a_simulated_gate():
    """The count a conformal gate hands over, over many draws of calibration and test scores,
    has the beta-binomial's spread: the band holds about 95% of the simulated counts."""
    g = torch.Generator().manual_seed(0)
    n_cal, n_test, alpha = 199, 100, 0.05
    m = math.floor(alpha * (n_cal + 1))
    scores = torch.rand(4000, n_cal + n_test, generator=g)
    threshold = scores[:, :n_cal].sort(dim=1).values[:, n_cal - m]
    counts = (scores[:, n_cal:] > threshold[:, None]).sum(1)
    lo, hi = handover.beta_binomial_band(n_test, n_cal, alpha, 0.95)
    inside = ((counts >= round(lo * n_test)) & (counts <= round(hi * n_test))).float().mean()
    assert 0.94 <= inside <= 0.99  # the bounds of a discrete band cover at least 95%
    narrow = handover.binomial_band(n_test, alpha, 0.95)
    inside_narrow = (counts >= round(narrow[0] * n_test)) & (counts <= round(narrow[1] * n_test))
    assert inside_narrow.float().mean() < inside  # the test-only band is too narrow here


def test_gate_row_counts():
    refer = torch.tensor([True, False, False, True, False])
    correct = torch.tensor([False, True, False, True, True])
    row = handover.gate_row(refer, correct)
    assert row == {
        "handover_rate": 0.4,
        "n_handed_over": 2,
        "n_kept": 3,
        "kept_error": pytest.approx(1 / 3),
        "handed_over_error": 0.5,
    }
    unseen = handover.gate_row(refer, None)
    assert unseen["kept_error"] == 1.0 and unseen["handed_over_error"] == 1.0
    none_kept = handover.gate_row(torch.ones(3, dtype=torch.bool), None)
    assert none_kept["kept_error"] is None and none_kept["n_kept"] == 0


def test_split_is_disjoint_seeded_and_keeps_unseen_classes_out():
    n = 400
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 12, 12)
    y = torch.arange(n) % 10
    config = handover.Config(n_train=150, n_cal=60, n_test=None, seed=3)
    a = handover.split(x, y, config)
    ids = [part[:, 0, 0, 0].long() for part in (a.x_train, a.x_cal, a.x_test, a.x_unseen)]
    assert [len(i) for i in ids] == [150, 60, 320 - 210, 80]
    assert len(torch.cat(ids).unique()) == n  # disjoint and complete
    for part, labels in zip(ids, (a.y_train, a.y_cal, a.y_test, a.y_unseen), strict=True):
        assert torch.equal(y[part], labels)
    assert a.y_train.max() < 8 and a.y_cal.max() < 8 and a.y_test.max() < 8
    assert set(a.y_unseen.tolist()) == {8, 9}
    b = handover.split(x, y, config)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    c = handover.split(x, y, handover.Config(n_train=150, n_cal=60, seed=4))
    assert not torch.equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match="no test images"):
        handover.split(x, y, handover.Config(n_train=300, n_cal=20))


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 12, 16)])
def test_cnn_fits_the_image_size(shape):
    net = handover.cnn(8, shape, 0.5)
    assert net(torch.zeros(3, *shape)).shape == (3, 8)
    with pytest.raises(ValueError, match="too small"):
        handover.cnn(8, (1, 8, 8), 0.5)


def test_missing_data_says_which_file(tmp_path):
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte.gz"):
        handover.main(["--quick", "--quiet", "--data", str(tmp_path), "--out", str(tmp_path)])
