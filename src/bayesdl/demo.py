"""The main job: can a network say "I don't know"?

Train a deterministic network, MC dropout and a deep ensemble on the handwritten digits 0-4
(scikit-learn's embedded 8x8 digits, no download), then show them digits 5-9, classes they never
saw. For each method: accuracy, NLL and ECE on held-out 0-4; how well the max-softmax confidence
and the epistemic score (mutual information) separate 0-4 from 5-9 (OOD AUROC); and the accuracy
when the 20% most uncertain cases (highest predictive entropy) are referred to a human.

With ``plots_dir`` the demo also writes its figures there (reliability diagrams, risk-coverage
curves, histograms of the epistemic score in and out of distribution) and, to show the regression
side, fits a small deep ensemble to a 1-D heteroscedastic problem and draws its intervals
(mixture and split-conformal) and its calibration curve before and after variance scaling.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from bayesdl import metrics
from bayesdl.data import DigitsOOD, load_digits_ood
from bayesdl.posteriors import DeepEnsemble, Deterministic, MCDropout, Posterior
from bayesdl.predictions import ClassificationPrediction

__all__ = ["DemoConfig", "format_table", "run_demo"]

METRIC_KEYS = (
    "accuracy",
    "nll",
    "ece",
    "ood_auroc_confidence",
    "ood_auroc_epistemic",
    "accuracy_at_80_coverage",
)


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in well under a minute on 2 cores."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    hidden: int = 128
    dropout: float = 0.2
    n_members: int = 5
    n_samples: int = 100
    seed: int = 0


def _network(n_features: int, n_classes: int, config: DemoConfig) -> nn.Module:
    h = config.hidden
    return nn.Sequential(
        nn.Linear(n_features, h),
        nn.ReLU(),
        nn.Dropout(config.dropout),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Dropout(config.dropout),
        nn.Linear(h, n_classes),
    )


def _evaluate(
    pred_in: ClassificationPrediction,
    pred_out: ClassificationPrediction,
    y: torch.Tensor,
    bayesian: bool,
) -> dict[str, float | None]:
    correct = (pred_in.label == y).to(pred_in.probs.dtype)
    return {
        "accuracy": float(metrics.accuracy(pred_in.probs, y)),
        "nll": float(metrics.nll(pred_in.probs, y)),
        "ece": float(metrics.ece(pred_in.probs, y, n_bins=15)),
        # OOD is the positive class and a higher score means "more likely OOD".
        "ood_auroc_confidence": float(metrics.ood_auroc(-pred_in.confidence, -pred_out.confidence)),
        "ood_auroc_epistemic": (
            float(metrics.ood_auroc(pred_in.epistemic, pred_out.epistemic)) if bayesian else None
        ),
        "accuracy_at_80_coverage": float(metrics.accuracy_at_coverage(pred_in.total, correct, 0.8)),
    }


def run_demo(
    config: DemoConfig | None = None,
    data: DigitsOOD | None = None,
    *,
    plots_dir: str | os.PathLike | None = None,
) -> dict:
    """Train the three methods and evaluate them; returns the JSON-ready result dict.

    With ``plots_dir`` the figures are written there as PNG files (the folder is created) and
    the result gets a ``"plots"`` entry listing their paths.
    """
    config = config or DemoConfig()
    data = data or load_digits_ood(seed=config.seed)
    n_features = data.x_train.shape[1]
    train = (data.x_train, data.y_train)
    fit_options = dict(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    posteriors: dict[str, tuple[Posterior, int | None]] = {}
    torch.manual_seed(config.seed)
    posteriors["deterministic"] = (
        Deterministic(_network(n_features, data.n_classes, config), "categorical"),
        None,
    )
    posteriors["mc_dropout"] = (
        MCDropout(_network(n_features, data.n_classes, config), "categorical"),
        config.n_samples,
    )
    posteriors["deep_ensemble"] = (
        DeepEnsemble(
            _network(n_features, data.n_classes, config),
            "categorical",
            n_members=config.n_members,
            seed=config.seed,
        ),
        None,
    )
    results: dict[str, dict] = {}
    predictions: dict[str, tuple[ClassificationPrediction, ClassificationPrediction]] = {}
    for name, (posterior, n_samples) in posteriors.items():
        start = time.perf_counter()
        posterior.fit(train, **fit_options)
        generator = torch.Generator().manual_seed(config.seed)
        pred_in = posterior.predict(data.x_test, n_samples, generator=generator)
        pred_out = posterior.predict(data.x_ood, n_samples, generator=generator)
        results[name] = _evaluate(pred_in, pred_out, data.y_test, bayesian=name != "deterministic")
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
        predictions[name] = (pred_in, pred_out)
    result = {
        "dataset": "sklearn-digits: train on 0-4, out-of-distribution 5-9",
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "n_ood": len(data.x_ood),
        "config": asdict(config),
        "methods": results,
    }
    if plots_dir is not None:
        result["plots"] = write_plots(plots_dir, predictions, data.y_test, config)
    return result


def _regression_task(n: int, generator: torch.Generator, low: float = -3.0, high: float = 3.0):
    """1-D heteroscedastic data: ``y = sin(x) + (0.1 + 0.1 |x|) noise``, ``x`` uniform."""
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    y = torch.sin(x[:, 0]) + (0.1 + 0.1 * x[:, 0].abs()) * torch.randn(n, generator=generator)
    return x, y


def _regression_figures(config: DemoConfig, folder: Path) -> list[str]:
    """Fit a small 1-D ensemble; draw its intervals and its calibration before/after scaling."""
    from bayesdl import calibration, conformal, report

    g = torch.Generator().manual_seed(config.seed)
    (x, y), (x_cal, y_cal), (x_test, y_test) = (_regression_task(n, g) for n in (400, 300, 600))
    torch.manual_seed(config.seed)
    net = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    ensemble = DeepEnsemble(net, "gaussian", n_members=config.n_members, seed=config.seed)
    ensemble.fit((x, y), epochs=3 * config.epochs, batch_size=64, lr=3e-3, seed=config.seed)
    scaled = calibration.variance_scale(ensemble, x_cal, y_cal)
    grid = torch.linspace(-5.0, 5.0, 300)[:, None]
    bands = conformal.conformal_intervals(ensemble, x_cal, y_cal, grid, alpha=0.1)
    paths = [folder / "regression_intervals.png", folder / "regression_calibration.png"]
    report.plot_regression_intervals(
        grid,
        {"deep_ensemble": ensemble.predict(grid)},
        level=0.9,
        observed=(x, y),
        intervals={"deep_ensemble": (bands.lower, bands.upper)},
        path=paths[0],
    )
    report.plot_regression_calibration(
        {
            "deep_ensemble": (ensemble.predict(x_test), y_test),
            f"variance-scaled (s={scaled.scale:.2f})": (scaled.predict(x_test), y_test),
        },
        path=paths[1],
    )
    return [str(p) for p in paths]


def write_plots(
    plots_dir: str | os.PathLike,
    predictions: dict[str, tuple[ClassificationPrediction, ClassificationPrediction]],
    y_test: torch.Tensor,
    config: DemoConfig,
) -> list[str]:
    """Write the demo's figures (PNG) into ``plots_dir`` and return their paths."""
    from bayesdl import report  # matplotlib is needed only here

    folder = Path(plots_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "reliability": folder / "reliability.png",
        "risk_coverage": folder / "risk_coverage.png",
        "epistemic": folder / "epistemic_ood.png",
    }
    report.plot_reliability_diagram(
        {name: (p_in.probs, y_test) for name, (p_in, _) in predictions.items()},
        path=paths["reliability"],
    )
    report.plot_risk_coverage(
        {
            name: (p_in.total, (p_in.label != y_test).to(p_in.probs.dtype))
            for name, (p_in, _) in predictions.items()
        },
        path=paths["risk_coverage"],
    )
    report.plot_epistemic_histograms(
        {
            name: (p_in.epistemic, p_out.epistemic)
            for name, (p_in, p_out) in predictions.items()
            if name != "deterministic"
        },
        path=paths["epistemic"],
    )
    return [str(p) for p in paths.values()] + _regression_figures(config, folder)


def format_table(result: dict) -> str:
    """The demo's result as a fixed-width text table, one row per method."""
    headers = ("method", "acc", "NLL", "ECE", "AUROC conf", "AUROC epist", "acc@80%cov", "sec")
    rows = []
    for name, m in result["methods"].items():
        values = [m[k] for k in METRIC_KEYS] + [m["seconds"]]
        rows.append([name] + ["-" if v is None else f"{v:.3f}" for v in values])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    intro = (
        f"{result['dataset']} ({result['n_train']} train, {result['n_test']} test, "
        f"{result['n_ood']} OOD)\n"
        "AUROC: separating unseen digits 5-9 from 0-4 by low confidence / high mutual "
        "information. acc@80%cov: accuracy after referring the 20% most uncertain.\n"
    )
    return intro + "\n".join(
        [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    )


def result_json(result: dict) -> str:
    return json.dumps(result, indent=2)
