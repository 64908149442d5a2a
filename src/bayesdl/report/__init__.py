"""Reports for people: figures of calibration, selective prediction, OOD scores and intervals.

This package is a face of the library (it imports matplotlib); nothing in the core imports it.
See :mod:`bayesdl.report.plots`.
"""

from bayesdl.report.html import evaluation_report
from bayesdl.report.plots import (
    plot_epistemic_histograms,
    plot_regression_calibration,
    plot_regression_intervals,
    plot_reliability_diagram,
    plot_risk_coverage,
)

__all__ = [
    "evaluation_report",
    "plot_epistemic_histograms",
    "plot_regression_calibration",
    "plot_regression_intervals",
    "plot_reliability_diagram",
    "plot_risk_coverage",
]
