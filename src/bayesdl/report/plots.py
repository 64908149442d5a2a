"""The plots people look at, drawn with matplotlib's Agg renderer (no display needed).

Each function takes the results of one or several methods as a mapping from a method's name to
its data, draws one figure, optionally saves it (``path=...``; the format follows the suffix,
e.g. ``.png``) and returns the :class:`matplotlib.figure.Figure`. Figures are built with the
object-oriented API on a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`: pyplot is
never imported, so no global backend or figure registry is touched and nothing needs closing.

The numbers drawn come from :mod:`bayesdl.metrics`, so a plot and a metric never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from bayesdl import metrics
from bayesdl.predictions import RegressionPrediction

__all__ = [
    "plot_epistemic_histograms",
    "plot_regression_calibration",
    "plot_regression_intervals",
    "plot_reliability_diagram",
    "plot_risk_coverage",
]

PathLike = str | os.PathLike
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110)
    return fig


def _numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")


def _results(results: object, name: str, what: str) -> Mapping:
    if not isinstance(results, Mapping) or not results:
        raise TypeError(
            f"{name} must be a non-empty mapping from a method's name to {what}, got "
            f"{type(results).__name__}; e.g. {{'ensemble': ...}}."
        )
    return results


def _pair(value: object, name: str, method: str, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"results[{method!r}] must be a pair {what}, got {type(value).__name__}.")
    return tuple(value)


def plot_reliability_diagram(
    results: Mapping[str, tuple[Tensor, Tensor]],
    n_bins: int = 15,
    binning: metrics.Binning | str = metrics.Binning.UNIFORM,
    *,
    path: PathLike | None = None,
) -> Figure:
    """Reliability diagrams with their bin counts, one column per method.

    Top: accuracy per confidence bin (bars) against the diagonal of perfect calibration, with
    the gap to each bin's mean confidence shaded; the title gives the ECE over the same bins.
    Bottom: the number of examples per bin (log scale: most examples are usually confident).

    Parameters
    ----------
    results:
        ``{name: (probs, y)}`` with ``probs`` ``(B, C)`` and labels ``y`` ``(B,)``.
    n_bins, binning:
        As for :func:`bayesdl.metrics.reliability_curve`.
    path:
        Where to save the figure, or ``None``.
    """
    results = _results(results, "results", "(probs, y)")
    fig = _figure(3.4 * len(results), 4.6)
    axes = fig.subplots(2, len(results), squeeze=False, height_ratios=(3, 1), sharex=True)
    for col, (name, value) in enumerate(results.items()):
        probs, y = _pair(value, "results", name, "(probs, y)")
        curve = metrics.reliability_curve(probs, y, n_bins, binning)
        edges, counts = _numpy(curve.edges, "edges"), _numpy(curve.counts, "counts")
        acc, conf = _numpy(curve.accuracy, "accuracy"), _numpy(curve.confidence, "confidence")
        left, width = edges[:-1], np.diff(edges)
        full = counts > 0
        gap = float((counts * np.abs(acc - conf)).sum() / counts.sum())
        top, bottom = axes[0, col], axes[1, col]
        top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect")
        top.bar(
            left[full],
            acc[full],
            width[full],
            align="edge",
            color=_COLORS[0],
            edgecolor="white",
            label="accuracy",
        )
        top.bar(
            left[full],
            (conf - acc)[full],
            width[full],
            bottom=acc[full],
            align="edge",
            color=_COLORS[3],
            alpha=0.3,
            edgecolor=_COLORS[3],
            label="gap",
        )
        top.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}\nECE {gap:.3f}", ylabel="accuracy")
        top.legend(loc="upper left", fontsize=7)
        bottom.bar(
            left[full], counts[full], width[full], align="edge", color="0.5", edgecolor="white"
        )
        bottom.set(xlabel="confidence", ylabel="count (log)", yscale="log")
    return _finish(fig, path)


def plot_risk_coverage(
    results: Mapping[str, tuple[Tensor, Tensor]], *, path: PathLike | None = None
) -> Figure:
    """Risk of the kept examples against the fraction kept, several methods in one figure.

    Parameters
    ----------
    results:
        ``{name: (uncertainty, loss)}``, each ``(B,)``: lower uncertainty is kept first, and the
        loss is e.g. ``1 - correct``. The legend gives each method's AURC.
    path:
        Where to save the figure, or ``None``.
    """
    results = _results(results, "results", "(uncertainty, loss)")
    fig = _figure(5.0, 3.8)
    ax = fig.subplots()
    for i, (name, value) in enumerate(results.items()):
        uncertainty, loss = _pair(value, "results", name, "(uncertainty, loss)")
        coverage, risk = metrics.risk_coverage_curve(uncertainty, loss)
        area = float(metrics.aurc(uncertainty, loss))
        ax.plot(
            _numpy(coverage, "coverage"),
            _numpy(risk, "risk"),
            drawstyle="steps-post",
            color=_COLORS[i % len(_COLORS)],
            label=f"{name} (AURC {area:.4f})",
        )
    ax.set(xlabel="coverage (fraction kept)", ylabel="risk of the kept examples", xlim=(0, 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_epistemic_histograms(
    results: Mapping[str, tuple[Tensor, Tensor]],
    bins: int = 30,
    *,
    xlabel: str = "epistemic uncertainty (mutual information)",
    path: PathLike | None = None,
) -> Figure:
    """Histograms of an uncertainty score in and out of distribution, one panel per method.

    Parameters
    ----------
    results:
        ``{name: (score_in, score_out)}``, each ``(N,)``; the title gives the OOD AUROC of the
        score (higher score = more likely OOD).
    bins:
        Number of histogram bins, shared by both groups of a panel.
    xlabel:
        Name of the score.
    path:
        Where to save the figure, or ``None``.
    """
    results = _results(results, "results", "(score_in, score_out)")
    fig = _figure(3.6 * len(results), 3.2)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, value) in zip(axes, results.items(), strict=True):
        score_in, score_out = _pair(value, "results", name, "(score_in, score_out)")
        auroc = float(metrics.ood_auroc(score_in, score_out))
        s_in, s_out = _numpy(score_in, "score_in"), _numpy(score_out, "score_out")
        edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=bins)
        ax.hist(s_in, edges, density=True, alpha=0.55, color=_COLORS[0], label="in distribution")
        ax.hist(s_out, edges, density=True, alpha=0.55, color=_COLORS[1], label="out of distr.")
        ax.set(title=f"{name}  (AUROC {auroc:.3f})", xlabel=xlabel, ylabel="density")
        ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_regression_intervals(
    x: Tensor,
    predictions: Mapping[str, RegressionPrediction],
    level: float = 0.9,
    *,
    observed: tuple[Tensor, Tensor] | None = None,
    intervals: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Predictions over a 1-D input with their intervals, one panel per method.

    Each panel shows the predictive mean, the mixture's central interval at ``level`` (total
    uncertainty) and, darker, the same-level band of the epistemic part alone
    (``mean +- z sqrt(epistemic)``), plus optional data points and extra intervals (e.g.
    conformal) as dashed lines.

    Parameters
    ----------
    x:
        Inputs, ``(B,)`` or ``(B, 1)``.
    predictions:
        ``{name: prediction}``, one-target :class:`~bayesdl.predictions.RegressionPrediction`
        on ``x``.
    level:
        Nominal coverage of the drawn intervals.
    observed:
        Optional ``(x_data, y_data)`` drawn as points.
    intervals:
        Optional ``{name: (lower, upper)}`` on ``x`` drawn as dashed lines in that method's panel.
    path:
        Where to save the figure, or ``None``.
    """
    predictions = _results(predictions, "predictions", "a RegressionPrediction")
    xs = _numpy(x, "x")
    if xs.ndim == 2 and xs.shape[1] == 1:
        xs = xs[:, 0]
    if xs.ndim != 1:
        raise ValueError(f"x must have shape (B,) or (B, 1) for a 1-D plot, got {xs.shape}.")
    order = np.argsort(xs, kind="stable")
    z = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    fig = _figure(4.2 * len(predictions), 3.4)
    axes = fig.subplots(1, len(predictions), squeeze=False, sharey=True)[0]
    for i, (ax, (name, pred)) in enumerate(zip(axes, predictions.items(), strict=True)):
        if not isinstance(pred, RegressionPrediction) or pred.mean.shape != (len(xs),):
            raise ValueError(
                f"predictions[{name!r}] must be a one-target RegressionPrediction on the {len(xs)} "
                f"inputs of x (mean of shape ({len(xs)},))."
            )
        color = _COLORS[i % len(_COLORS)]
        mean = _numpy(pred.mean, "mean")[order]
        lower, upper = (_numpy(b, "interval")[order] for b in pred.interval(level))
        epi = z * np.sqrt(_numpy(pred.epistemic, "epistemic"))[order]
        ax.fill_between(
            xs[order], lower, upper, color=color, alpha=0.2, label=f"{level:.0%} predictive"
        )
        ax.fill_between(
            xs[order],
            mean - epi,
            mean + epi,
            color=color,
            alpha=0.45,
            label=f"{level:.0%} epistemic",
        )
        ax.plot(xs[order], mean, color=color, lw=1.5, label="mean")
        if intervals is not None and name in intervals:
            lo, hi = _pair(intervals[name], "intervals", name, "(lower, upper)")
            for bound, label in ((lo, "conformal"), (hi, None)):
                ax.plot(
                    xs[order],
                    _numpy(bound, "bound")[order],
                    ls="--",
                    color="black",
                    lw=1,
                    label=label,
                )
        if observed is not None:
            xo, yo = (_numpy(v, "observed") for v in observed)
            ax.scatter(xo.reshape(len(xo), -1)[:, 0], yo, s=4, color="0.3", alpha=0.5, label="data")
        ax.set(title=name, xlabel="x")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("y")
    return _finish(fig, path)


def plot_regression_calibration(
    results: Mapping[str, tuple[RegressionPrediction, Tensor]],
    levels: int | Tensor = 19,
    *,
    path: PathLike | None = None,
) -> Figure:
    """Regression calibration curves: observed against expected frequency below each quantile.

    Parameters
    ----------
    results:
        ``{name: (prediction, y)}``; the curve is
        :func:`bayesdl.metrics.quantile_calibration_curve` and the legend gives its mean
        absolute gap (:func:`~bayesdl.metrics.quantile_calibration_error`).
    levels:
        As for :func:`bayesdl.metrics.quantile_calibration_curve`.
    path:
        Where to save the figure, or ``None``.
    """
    results = _results(results, "results", "(prediction, y)")
    fig = _figure(4.2, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect")
    for i, (name, value) in enumerate(results.items()):
        pred, y = _pair(value, "results", name, "(prediction, y)")
        if not isinstance(pred, RegressionPrediction):
            raise TypeError(
                f"results[{name!r}][0] must be a RegressionPrediction, got {type(pred).__name__}."
            )
        expected, observed = metrics.quantile_calibration_curve(
            pred.means, pred.variances, y, levels
        )
        gap = float((observed - expected).abs().mean())
        ax.plot(
            _numpy(expected, "expected"),
            _numpy(observed, "observed"),
            marker="o",
            ms=3,
            color=_COLORS[i % len(_COLORS)],
            label=f"{name} (error {gap:.3f})",
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="expected quantile level",
        ylabel="observed frequency of y below it",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _finish(fig, path)
