"""Metrics for predictive uncertainty: a functional core of plain tensor functions.

* :mod:`~bayesdl.metrics.classification`: accuracy, NLL, Brier score, calibration (bins, ECE, MCE).
* :mod:`~bayesdl.metrics.ood`: out-of-distribution detection (AUROC, AUPR, FPR at a TPR).
* :mod:`~bayesdl.metrics.selective`: selective prediction (risk-coverage curve, AURC, accuracy at a
  coverage).
* :mod:`~bayesdl.metrics.regression`: RMSE, Gaussian-mixture NLL, interval coverage and width.

Every function takes torch tensors (or numpy arrays), validates them, and returns a 0-d tensor
(scalar metrics) or a tuple of 1-d tensors (curves and bins) on the inputs' device.
"""

from bayesdl.metrics.classification import accuracy, brier, calibration_bins, ece, mce, nll
from bayesdl.metrics.ood import fpr95, fpr_at_tpr, ood_aupr, ood_auroc
from bayesdl.metrics.regression import gaussian_mixture_nll, mpiw, picp, rmse
from bayesdl.metrics.selective import accuracy_at_coverage, aurc, risk_coverage_curve

__all__ = [
    "accuracy",
    "accuracy_at_coverage",
    "aurc",
    "brier",
    "calibration_bins",
    "ece",
    "fpr95",
    "fpr_at_tpr",
    "gaussian_mixture_nll",
    "mce",
    "mpiw",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "picp",
    "risk_coverage_curve",
    "rmse",
]
