"""Metrics for predictive uncertainty: a functional core of plain tensor functions.

* :mod:`~bayesdl.metrics.classification`: accuracy, NLL, Brier score, calibration (bins, ECE, MCE,
  adaptive and class-wise ECE, reliability curves).
* :mod:`~bayesdl.metrics.ood`: out-of-distribution detection (AUROC, AUPR, FPR at a TPR).
* :mod:`~bayesdl.metrics.selective`: selective prediction (risk-coverage curve, AURC, accuracy at a
  coverage).
* :mod:`~bayesdl.metrics.regression`: RMSE, Gaussian-mixture NLL and CRPS (closed form), interval
  coverage, width and score, pinball loss, quantile calibration.

Every function takes torch tensors (or numpy arrays), validates them, and returns a 0-d tensor
(scalar metrics) or a tuple of 1-d tensors (curves and bins) on the inputs' device.
"""

from bayesdl.metrics.classification import (
    Binning,
    ReliabilityCurve,
    accuracy,
    adaptive_ece,
    brier,
    calibration_bins,
    classwise_ece,
    ece,
    mce,
    nll,
    reliability_curve,
)
from bayesdl.metrics.ood import fpr95, fpr_at_tpr, ood_aupr, ood_auroc
from bayesdl.metrics.regression import (
    crps_gaussian_mixture,
    crps_gaussian_mixture_per_point,
    gaussian_mixture_nll,
    interval_score,
    mpiw,
    picp,
    pinball_loss,
    quantile_calibration_curve,
    quantile_calibration_error,
    rmse,
)
from bayesdl.metrics.selective import accuracy_at_coverage, aurc, risk_coverage_curve

__all__ = [
    "Binning",
    "ReliabilityCurve",
    "accuracy",
    "accuracy_at_coverage",
    "adaptive_ece",
    "aurc",
    "brier",
    "calibration_bins",
    "classwise_ece",
    "crps_gaussian_mixture",
    "crps_gaussian_mixture_per_point",
    "ece",
    "fpr95",
    "fpr_at_tpr",
    "gaussian_mixture_nll",
    "interval_score",
    "mce",
    "mpiw",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "picp",
    "pinball_loss",
    "quantile_calibration_curve",
    "quantile_calibration_error",
    "reliability_curve",
    "risk_coverage_curve",
    "rmse",
]
