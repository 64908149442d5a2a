"""Every plot runs, draws what the metrics say, writes a non-empty PNG, stays out of the core."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bayesdl import metrics, report
from bayesdl.cli import main
from bayesdl.predictions import RegressionPrediction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def classification_case(seed: int, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, 4, generator=g)
    y = torch.distributions.Categorical(logits=logits / 2).sample()
    return torch.softmax(logits, -1), y


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_reliability_diagram_draws_the_curve(tmp_path):
    results = {"a": classification_case(0), "b": classification_case(1)}
    fig = report.plot_reliability_diagram(results, n_bins=10, path=tmp_path / "rel.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "rel.png")
    curve = metrics.reliability_curve(*results["a"], 10)
    full = curve.counts > 0
    top, bottom = fig.axes[0], fig.axes[2]  # column "a": diagram above its counts
    heights = [p.get_height() for p in top.patches[: int(full.sum())]]
    np.testing.assert_allclose(heights, curve.accuracy[full].numpy(), rtol=1e-6)
    counts = [p.get_height() for p in bottom.patches]
    assert counts == curve.counts[full].tolist()
    ece = float(metrics.ece(*results["a"], 10))
    assert f"ECE {ece:.3f}" in top.get_title()
    # equal-mass bins are drawn too
    report.plot_reliability_diagram(results, 5, "equal_mass", path=tmp_path / "rel_em.png")
    assert_png(tmp_path / "rel_em.png")


def test_risk_coverage_several_methods_in_one_figure(tmp_path):
    probs, y = classification_case(2)
    loss = (probs.argmax(-1) != y).double()
    entropy = -(probs * probs.log()).sum(-1)
    results = {"entropy": (entropy, loss), "random": (torch.rand(len(y)), loss)}
    fig = report.plot_risk_coverage(results, path=tmp_path / "rc.png")
    assert_png(tmp_path / "rc.png")
    (ax,) = fig.axes
    coverage, risk = metrics.risk_coverage_curve(entropy, loss)
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), coverage.numpy())
    np.testing.assert_allclose(line.get_ydata(), risk.numpy())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 2 and f"AURC {float(metrics.aurc(entropy, loss)):.4f}" in labels[0]


def test_epistemic_histograms(tmp_path):
    g = torch.Generator().manual_seed(3)
    s_in, s_out = torch.rand(200, generator=g) * 0.1, torch.rand(150, generator=g) * 0.3
    fig = report.plot_epistemic_histograms(
        {"x": (s_in, s_out), "y": (s_in, s_in)}, bins=20, path=tmp_path / "h.png"
    )
    assert_png(tmp_path / "h.png")
    assert len(fig.axes) == 2
    assert f"AUROC {float(metrics.ood_auroc(s_in, s_out)):.3f}" in fig.axes[0].get_title()
    # the in-distribution density integrates to one over the shared bins
    bars = fig.axes[0].patches[:20]
    assert sum(p.get_height() * p.get_width() for p in bars) == pytest.approx(1.0)


def regression_prediction(x: torch.Tensor, seed: int = 4) -> RegressionPrediction:
    g = torch.Generator().manual_seed(seed)
    means = torch.sin(x[:, 0]) + 0.1 * x[:, 0] * torch.randn(5, 1, generator=g)
    return RegressionPrediction(means, torch.full_like(means, 0.04))


def test_regression_intervals_and_calibration(tmp_path):
    x = torch.linspace(-3, 3, 120)[:, None]
    pred = regression_prediction(x)
    y = torch.sin(x[:, 0]) + 0.3 * torch.randn(120, generator=torch.Generator().manual_seed(5))
    lower, upper = pred.interval(0.8)
    fig = report.plot_regression_intervals(
        x,
        {"ens": pred, "again": pred},
        level=0.8,
        observed=(x, y),
        intervals={"ens": (lower - 0.1, upper + 0.1)},
        path=tmp_path / "iv.png",
    )
    assert_png(tmp_path / "iv.png")
    mean_line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "mean")
    np.testing.assert_allclose(mean_line.get_ydata(), pred.mean.numpy(), rtol=1e-6)
    fig = report.plot_regression_calibration(
        {"ens": (pred, y), "wide": (RegressionPrediction(pred.means, pred.variances * 9), y)},
        levels=9,
        path=tmp_path / "cal.png",
    )
    assert_png(tmp_path / "cal.png")
    expected, observed = metrics.quantile_calibration_curve(pred.means, pred.variances, y, 9)
    line = fig.axes[0].get_lines()[1]
    np.testing.assert_allclose(line.get_xdata(), expected.numpy())
    np.testing.assert_allclose(line.get_ydata(), observed.numpy())


def test_bad_plot_input():
    probs, y = classification_case(0, n=20)
    with pytest.raises(TypeError, match="non-empty mapping from a method's name"):
        report.plot_reliability_diagram({})
    with pytest.raises(TypeError, match="non-empty mapping"):
        report.plot_risk_coverage([(probs, y)])
    with pytest.raises(TypeError, match=r"results\['a'\] must be a pair \(probs, y\)"):
        report.plot_reliability_diagram({"a": probs})
    with pytest.raises(ValueError, match=r"x must have shape \(B,\) or \(B, 1\)"):
        report.plot_regression_intervals(
            torch.zeros(5, 2), {"a": regression_prediction(torch.zeros(5, 1))}
        )
    with pytest.raises(ValueError, match="one-target RegressionPrediction on the 6 inputs"):
        report.plot_regression_intervals(
            torch.zeros(6), {"a": regression_prediction(torch.zeros(5, 1))}
        )
    with pytest.raises(ValueError, match="probabilities in"):
        report.plot_reliability_diagram({"a": (probs * 2, y)})


def test_core_does_not_import_matplotlib():
    code = (
        "import sys, bayesdl, bayesdl.calibration, bayesdl.conformal, bayesdl.metrics, "
        "bayesdl.demo, bayesdl.cli; "
        "bad = [m for m in sys.modules if m.startswith('matplotlib')]; "
        "assert not bad, bad; "
        "import bayesdl.report; "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_demo_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "figures"
    argv = ["demo", "--json", "--epochs", "2", "--members", "2", "--samples", "4"]
    assert main([*argv, "--plots", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["plots"]) == 5
    for path in result["plots"]:
        assert path.startswith(str(out))
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert {"deterministic", "mc_dropout", "deep_ensemble"} == set(result["methods"])
