"""One self-contained HTML page that evaluates a model on one data set.

:func:`evaluation_report` turns a prediction, the true targets and a few tables of numbers into a
single HTML document: inline CSS, every figure a ``data:image/png;base64,...`` URI, no script and
no reference to anything outside the file (a Content-Security-Policy in the page forbids any
fetch), so the file can be mailed, archived or opened offline. Every string that comes from the
caller (title, metric names, model details, class names) is escaped; figures draw no caller text,
so nothing the caller writes is read as matplotlib mathtext either.

The figures come from :mod:`bayesdl.report.plots` where one fits, and otherwise are drawn here with
the same object-oriented matplotlib API (no pyplot, no global figure registry); every figure is
cleared as soon as it is encoded. The numbers drawn come from :mod:`bayesdl.metrics`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from bayesdl import metrics
from bayesdl._version import __version__
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction, _check_level
from bayesdl.report.plots import (
    _COLORS,
    _figure,
    _numpy,
    plot_epistemic_histograms,
    plot_regression_calibration,
    plot_reliability_diagram,
    plot_risk_coverage,
)

__all__ = ["evaluation_report"]

# Points drawn in the predicted-against-actual plot: enough to see the pattern, few enough to read.
MAX_POINTS = 300
# Nominal levels of the central-interval coverage curve.
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_DPI = 100
_SEED = 0

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1d232a; background: #ffffff; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.7em; margin: 0 0 4px 0; }
h2 { font-size: 1.25em; border-bottom: 2px solid #d8dee4; padding-bottom: 4px; margin-top: 32px; }
p.sub, figcaption, p.note { color: #57606a; font-size: 0.92em; }
table { border-collapse: collapse; margin: 8px 0 16px 0; font-size: 0.93em; }
th, td { border: 1px solid #d8dee4; padding: 4px 10px; text-align: left; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; vertical-align: top; max-width: 100%; margin: 12px 24px 20px 0; }
figure img { width: 100%; height: auto; border: 1px solid #eef0f2; }
footer { margin-top: 40px; color: #8c959f; font-size: 0.85em; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------- input checks


def _check_prediction(
    prediction: object, name: str
) -> ClassificationPrediction | RegressionPrediction:
    if isinstance(prediction, ClassificationPrediction):
        return prediction
    if isinstance(prediction, RegressionPrediction):
        if prediction.mean.ndim != 1:
            raise ValueError(
                f"{name} must be a one-target RegressionPrediction (mean of shape (N,)), got mean "
                f"of shape {tuple(prediction.mean.shape)}; report each target on its own."
            )
        return prediction
    raise TypeError(
        f"{name} must be a ClassificationPrediction or RegressionPrediction (what "
        f"posterior.predict(x) returns), got {type(prediction).__name__}."
    )


def _check_targets(prediction: object, y: object) -> Tensor:
    if not isinstance(y, (Tensor, np.ndarray)):
        raise TypeError(
            f"y must be a torch.Tensor or numpy.ndarray, got {type(y).__name__}; wrap it with "
            f"torch.as_tensor(y)."
        )
    y = torch.as_tensor(y)
    if isinstance(prediction, ClassificationPrediction):
        n, n_classes = prediction.probs.shape
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}.")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},) like the prediction, got {tuple(y.shape)}.")
        if n and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"class indices must lie in [0, {n_classes}), got values in "
                f"[{int(y.min())}, {int(y.max())}]."
            )
        return y.long().to(prediction.probs.device)
    n = prediction.mean.shape[0]
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) like the prediction, got {tuple(y.shape)}.")
    y = y.to(prediction.mean.dtype).to(prediction.mean.device)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y must be finite; drop or fill the rows with missing targets first.")
    return y


def _check_numbers(table: object, name: str) -> dict[str, float]:
    if not isinstance(table, Mapping):
        raise TypeError(
            f"{name} must be a dict of name -> number, e.g. {{'NLL': 0.31}}, got "
            f"{type(table).__name__}."
        )
    out = {}
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r} ({type(key).__name__}).")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, Real):
            raise TypeError(
                f"{name}[{key!r}] must be a real number, got {type(value).__name__}; pass "
                f"float(value)."
            )
        out[key] = float(value)
    return out


def _check_info(info: object) -> dict[str, str]:
    if not isinstance(info, Mapping):
        raise TypeError(
            f"info must be a dict of str -> str (e.g. {{'method': 'ensemble'}}), got "
            f"{type(info).__name__}."
        )
    for key in info:
        if not isinstance(key, str):
            raise TypeError(f"info keys must be strings, got {key!r} ({type(key).__name__}).")
    return {key: str(value) for key, value in info.items()}


def _check_intervals(intervals: object, n: int) -> tuple[Tensor, Tensor]:
    if not isinstance(intervals, (tuple, list)) or len(intervals) != 2:
        raise TypeError(
            f"intervals must be a pair (lower, upper) of (N,) tensors, got "
            f"{type(intervals).__name__}."
        )
    lower, upper = (torch.as_tensor(b, dtype=torch.float64) for b in intervals)
    if lower.shape != (n,) or upper.shape != (n,):
        raise ValueError(
            f"intervals must be two tensors of shape ({n},), got {tuple(lower.shape)} and "
            f"{tuple(upper.shape)}."
        )
    if not bool((torch.isfinite(lower) & torch.isfinite(upper)).all()):
        raise ValueError(
            "intervals must be finite; drop the examples whose bounds are NaN or infinite."
        )
    if not bool((lower <= upper).all()):
        raise ValueError("intervals must satisfy lower <= upper everywhere; check their order.")
    return lower, upper


def _check_class_names(class_names: object, n_classes: int) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(
            f"class_names must be a list of {n_classes} strings, got {type(class_names).__name__}."
        )
    if len(class_names) != n_classes:
        raise ValueError(
            f"class_names must name all {n_classes} classes of the prediction, got "
            f"{len(class_names)} names."
        )
    return [str(name) for name in class_names]


# ---------------------------------------------------------------- HTML pieces


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str | float]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_fmt(c)}</td>'
            if isinstance(c, (float, int))
            else f"<td>{html.escape(str(c))}</td>"
            for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png(fig: Figure) -> str:
    """Encode a figure as a PNG data URI, then clear it so nothing of it is kept."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_html(fig: Figure, alt: str, caption: str) -> str:
    # The figure box takes the image's width, so that the caption wraps under the image and
    # small figures sit side by side.
    width = round(fig.get_figwidth() * _DPI)
    return (
        f'<figure style="width: {width}px"><img src="{_png(fig)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _section(key: str, heading: str, *parts: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(heading)}</h2>{"".join(parts)}</section>'


# ---------------------------------------------------------------- figures drawn here


def _split_histograms(panels: Sequence[tuple[str, Tensor]], correct: Tensor) -> Figure:
    """One histogram per score, examples predicted right and wrong stacked in two colours."""
    fig = _figure(4.2 * len(panels), 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    right = _numpy(correct, "correct") > 0.5
    for ax, (xlabel, score) in zip(axes, panels, strict=True):
        values = _numpy(score, xlabel)
        edges = np.histogram_bin_edges(values, bins=30)
        ax.hist(
            [values[right], values[~right]],
            edges,
            stacked=True,
            color=[_COLORS[0], _COLORS[3]],
            label=["correct", "wrong"],
        )
        ax.set(xlabel=xlabel, ylabel="count")
        ax.legend(fontsize=8)
    return fig


def _subsample(n: int) -> Tensor:
    if n <= MAX_POINTS:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_SEED)
    return torch.randperm(n, generator=generator)[:MAX_POINTS].sort().values


def _predicted_vs_actual(
    y: Tensor, mean: Tensor, lower: Tensor, upper: Tensor, label: str, coverage: float
) -> Figure:
    keep = _subsample(len(y))
    ys, ms = _numpy(y[keep], "y"), _numpy(mean[keep], "mean")
    lo, hi = _numpy(lower[keep], "lower"), _numpy(upper[keep], "upper")
    inside = (lo <= ys) & (ys <= hi)
    fig = _figure(5.4, 4.6)
    ax = fig.subplots()
    for mask, color, name in ((inside, _COLORS[0], "y inside"), (~inside, _COLORS[3], "outside")):
        if mask.any():
            # bars as lines from lower to upper: a supplied interval need not contain the mean
            ax.vlines(ys[mask], lo[mask], hi[mask], color=color, lw=0.8, alpha=0.5)
            ax.plot(ys[mask], ms[mask], "o", ms=3, color=color, alpha=0.8, label=name)
    span = [min(ys.min(), lo.min()), max(ys.max(), hi.max())]
    ax.plot(span, span, ls="--", color="0.4", lw=1, label="predicted = actual")
    ax.set(
        xlabel="actual",
        ylabel=f"predicted mean and {label}",
        title=f"coverage {coverage:.3f} over all {len(y)} (showing {len(keep)})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _central_coverage(prediction: RegressionPrediction, y: Tensor) -> Tensor:
    """Observed coverage of the mixture's central intervals at :data:`COVERAGE_LEVELS`, ``(L,)``.

    ``y`` lies in the central interval at level ``l`` exactly when its mixture CDF value ``F(y)``
    lies in ``[(1 - l) / 2, (1 + l) / 2]``, so one CDF per example serves every level.
    """
    pit = prediction.cdf(y).to(torch.float64)
    levels = torch.tensor(COVERAGE_LEVELS, dtype=torch.float64)
    return ((pit[None, :] - 0.5).abs() <= levels[:, None] / 2).to(torch.float64).mean(1)


def _coverage_figure(observed: Tensor, supplied: tuple[float, float] | None) -> Figure:
    fig = _figure(4.4, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect")
    ax.plot(
        COVERAGE_LEVELS,
        _numpy(observed, "coverage"),
        marker="o",
        ms=4,
        color=_COLORS[0],
        label="predictive mixture",
    )
    if supplied is not None:
        ax.plot(*supplied, marker="D", ms=7, ls="none", color=_COLORS[1], label="supplied interval")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal level", ylabel="observed coverage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _std_histogram(prediction: RegressionPrediction) -> Figure:
    epistemic = _numpy(prediction.epistemic.sqrt(), "epistemic")
    aleatoric = _numpy(prediction.aleatoric.sqrt(), "aleatoric")
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    edges = np.histogram_bin_edges(np.concatenate([epistemic, aleatoric]), bins=40)
    ax.hist(epistemic, edges, alpha=0.6, color=_COLORS[0], label="epistemic std")
    ax.hist(aleatoric, edges, alpha=0.45, color=_COLORS[2], label="aleatoric std")
    ax.set(xlabel="standard deviation (target units)", ylabel="count")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- sections


def _classification_sections(
    prediction: ClassificationPrediction, y: Tensor, class_names: list[str]
) -> list[str]:
    probs, label, confidence = prediction.probs, prediction.label, prediction.confidence
    correct = (label == y).to(torch.float64)
    per_class = []
    for k, name in enumerate(class_names):
        members = y == k
        predicted = label == k
        support = int(members.sum())
        per_class.append(
            [
                name,
                support,
                int(predicted.sum()),
                float(correct[members].mean()) if support else math.nan,
                float(confidence[predicted].mean()) if predicted.any() else math.nan,
            ]
        )
    reliability = plot_reliability_diagram({"predictive": (probs, y)})
    histograms = _split_histograms(
        [
            ("confidence (largest probability)", confidence),
            ("epistemic uncertainty (mutual information)", prediction.epistemic),
        ],
        correct,
    )
    loss = 1.0 - correct
    risk = plot_risk_coverage(
        {
            "1 - confidence": (1.0 - confidence, loss),
            "mutual information": (prediction.epistemic, loss),
            "predictive entropy": (prediction.total, loss),
        }
    )
    return [
        _section(
            "classes",
            "Classes",
            _table(
                ["class", "examples", "predicted", "recall", "mean confidence when predicted"],
                per_class,
            ),
        ),
        _section(
            "calibration",
            "Calibration",
            _figure_html(
                reliability,
                "reliability diagram",
                "Accuracy per confidence bin against the diagonal of perfect calibration; the "
                "counts below use a log scale.",
            ),
        ),
        _section(
            "uncertainty",
            "Uncertainty",
            _figure_html(
                histograms,
                "histograms of confidence and of mutual information",
                "Confidence and epistemic uncertainty of the examples predicted right and wrong "
                "(stacked).",
            ),
        ),
        _section(
            "selective",
            "Selective prediction",
            _figure_html(
                risk,
                "risk-coverage curves",
                "Error rate of the examples kept when the most uncertain are referred, for three "
                "uncertainty scores (AURC in the legend; lower is better).",
            ),
        ),
    ]


def _regression_sections(
    prediction: RegressionPrediction,
    y: Tensor,
    level: float,
    intervals: tuple[Tensor, Tensor] | None,
) -> list[str]:
    if intervals is None:
        # The bisection behind interval() stops at a relative width of 1e-10, which float32
        # cannot reach (it then runs all its iterations); in float64 it stops after ~40.
        wide = RegressionPrediction(prediction.means.double(), prediction.variances.double())
        lower, upper = (b.to(prediction.mean.dtype) for b in wide.interval(level))
        label = f"{level:.0%} predictive interval"
    else:
        lower, upper = (b.to(prediction.mean) for b in intervals)
        label = f"{level:.0%} supplied interval"
    coverage = float(metrics.picp(lower, upper, y))
    width = float(metrics.mpiw(lower, upper))
    scatter = _predicted_vs_actual(y, prediction.mean, lower, upper, label, coverage)
    observed = _central_coverage(prediction, y)
    supplied = (level, coverage) if intervals is not None else None
    coverage_rows = [
        [f"{nominal:g}", float(obs)]
        for nominal, obs in zip(COVERAGE_LEVELS, observed.tolist(), strict=True)
    ]
    return [
        _section(
            "intervals",
            "Predictions and intervals",
            f'<p class="note">{html.escape(label)}: coverage {_fmt(coverage)}, mean width '
            f"{_fmt(width)}.</p>",
            _figure_html(
                scatter,
                "predicted against actual with interval bars",
                f"Predicted mean against the actual value with the {label} as a bar; red where "
                f"the actual value falls outside.",
            ),
        ),
        _section(
            "coverage",
            "Interval calibration",
            _figure_html(
                _coverage_figure(observed, supplied),
                "coverage of central intervals against their nominal level",
                "Fraction of actual values inside the predictive mixture's central interval, at "
                "several nominal levels (on the diagonal when calibrated; below it when the "
                "intervals are too narrow).",
            ),
            _figure_html(
                plot_regression_calibration({"predictive": (prediction, y)}),
                "quantile calibration curve",
                "Fraction of actual values below each predicted quantile.",
            ),
            _table(["nominal level", "observed coverage"], coverage_rows),
        ),
        _section(
            "uncertainty",
            "Uncertainty",
            _figure_html(
                _std_histogram(prediction),
                "histogram of epistemic and aleatoric standard deviations",
                "Epistemic standard deviation (disagreement between posterior draws) and "
                "aleatoric standard deviation (predicted noise) of each example.",
            ),
        ),
    ]


def _ood_scores(prediction: ClassificationPrediction | RegressionPrediction) -> dict[str, Tensor]:
    """Per-example scores, higher meaning more likely out of distribution."""
    if isinstance(prediction, ClassificationPrediction):
        return {
            "mutual information": prediction.epistemic,
            "1 - confidence": 1 - prediction.confidence,
        }
    return {"epistemic std": prediction.epistemic.sqrt(), "total std": prediction.std}


def _ood_section(
    prediction: ClassificationPrediction | RegressionPrediction,
    ood_prediction: ClassificationPrediction | RegressionPrediction | None,
    ood_metrics: dict[str, float] | None,
) -> str:
    parts = []
    if ood_metrics is not None:
        parts.append(_table(["metric", "value"], list(ood_metrics.items())))
    if ood_prediction is not None:
        inside, outside = _ood_scores(prediction), _ood_scores(ood_prediction)
        pairs = {name: (inside[name], outside[name]) for name in inside}
        if ood_metrics is None:
            rows = [
                [
                    name,
                    float(metrics.ood_auroc(*pair)),
                    float(metrics.ood_aupr(*pair)),
                    float(metrics.fpr95(*pair)),
                ]
                for name, pair in pairs.items()
            ]
            parts.append(_table(["score", "AUROC", "AUPR", "FPR at 95% TPR"], rows))
        parts.append(
            _figure_html(
                plot_epistemic_histograms(pairs, xlabel="score (higher = more likely OOD)"),
                "histograms of uncertainty scores in and out of distribution",
                f"Scores of the {len(inside[next(iter(inside))])} evaluation examples and of the "
                f"{len(outside[next(iter(outside))])} out-of-distribution examples (AUROC in the "
                f"titles: 1 separates them perfectly, 0.5 not at all).",
            )
        )
    return _section("ood", "Out-of-distribution detection", *parts)


# ---------------------------------------------------------------- the page


def evaluation_report(
    prediction: ClassificationPrediction | RegressionPrediction,
    y: Tensor,
    *,
    title: str,
    metrics: Mapping[str, float],
    info: Mapping[str, str],
    level: float = 0.9,
    intervals: tuple[Tensor, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    ood_prediction: ClassificationPrediction | RegressionPrediction | None = None,
    ood_metrics: Mapping[str, float] | None = None,
) -> str:
    """A self-contained HTML evaluation report of one model on one data set.

    The page holds the title and a table of the model's details, a table of metrics, then for
    classification a per-class table, the reliability diagram, histograms of confidence and of
    epistemic uncertainty (mutual information) split by right and wrong predictions and the
    risk-coverage curves; for regression predicted against actual values with interval bars (a
    seeded subsample of at most :data:`MAX_POINTS` examples), the coverage of central intervals
    against their nominal level (:data:`COVERAGE_LEVELS`, with a table) and the quantile
    calibration curve, and histograms of the epistemic and aleatoric standard deviations. With
    ``ood_prediction`` or ``ood_metrics`` a last section compares the uncertainty scores of the
    evaluation and out-of-distribution examples. Nothing in the page is fetched from elsewhere
    and it needs no JavaScript; the same arguments give the same page.

    Parameters
    ----------
    prediction:
        The model's :class:`~bayesdl.predictions.ClassificationPrediction` (probabilities
        ``(N, C)``) or one-target :class:`~bayesdl.predictions.RegressionPrediction` (mean
        ``(N,)``) on the evaluation examples, in the target's units.
    y:
        True class indices ``(N,)`` (integers in ``[0, C)``) or true targets ``(N,)``.
    title:
        Heading and window title of the page.
    metrics:
        ``{name: value}`` shown in the metrics table, in the given order.
    info:
        ``{name: text}`` describing the model (method, task, features, version...); values
        that are not strings are shown with ``str``.
    level:
        Nominal coverage of the regression intervals drawn as bars, in ``(0, 1)``.
    intervals:
        Optional ``(lower, upper)``, each ``(N,)``, e.g. conformal intervals at ``level``,
        drawn instead of the predictive mixture's central interval (regression only).
    class_names:
        Names of the ``C`` classes (classification only); default ``"0"``, ``"1"``, ...
    ood_prediction:
        The same model's prediction of the same kind on out-of-distribution examples ``(M, ...)``.
    ood_metrics:
        ``{name: value}`` of OOD detection metrics (e.g. AUROC per score); without it and with
        ``ood_prediction`` the AUROC, AUPR and FPR at 95% TPR of each score are computed here.

    Returns
    -------
    str
        The HTML document.
    """
    prediction = _check_prediction(prediction, "prediction")
    y = _check_targets(prediction, y)
    if not isinstance(title, str):
        raise TypeError(f"title must be a string, got {type(title).__name__}.")
    metric_values = _check_numbers(metrics, "metrics")
    details = _check_info(info)
    level = _check_level(level)
    classification = isinstance(prediction, ClassificationPrediction)
    n = len(y)
    if n == 0:
        raise ValueError("the prediction holds no examples; evaluate on at least one row.")
    if intervals is not None:
        if classification:
            raise ValueError("intervals are for regression; a classification report takes none.")
        intervals = _check_intervals(intervals, n)
    if class_names is not None and not classification:
        raise ValueError("class_names are for classification; a regression report takes none.")
    if classification:
        n_classes = prediction.probs.shape[1]
        names = (
            _check_class_names(class_names, n_classes)
            if class_names is not None
            else [str(k) for k in range(n_classes)]
        )
    if ood_prediction is not None:
        ood_prediction = _check_prediction(ood_prediction, "ood_prediction")
        if type(ood_prediction) is not type(prediction):
            raise TypeError(
                f"ood_prediction must be a {type(prediction).__name__} like prediction, got "
                f"{type(ood_prediction).__name__}."
            )
    ood_values = _check_numbers(ood_metrics, "ood_metrics") if ood_metrics is not None else None

    task = "classification" if classification else "regression"
    if classification:
        body = _classification_sections(prediction, y, names)
    else:
        body = _regression_sections(prediction, y, level, intervals)
    if ood_prediction is not None or ood_values is not None:
        body.append(_ood_section(prediction, ood_prediction, ood_values))
    metric_part = (
        _table(["metric", "value"], list(metric_values.items()))
        if metric_values
        else '<p class="note">No metrics were given.</p>'
    )
    heading = html.escape(title)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="bayesdl {__version__}">',
            f"<title>{heading}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<header><h1>{heading}</h1>",
            f'<p class="sub">{task}, {n} examples, {prediction.n_samples} posterior draws</p>',
            "</header>",
            _section("model", "Model", _table(["detail", "value"], list(details.items()))),
            _section("metrics", "Metrics", metric_part),
            *body,
            f"<footer>Written by bayesdl {__version__}.</footer>",
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )
