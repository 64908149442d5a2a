"""Accuracy, proper scoring rules and calibration of predicted class probabilities.

All functions take predictive probabilities ``probs`` of shape ``(B, C)`` (rows on the simplex,
e.g. :attr:`~bayesdl.predictions.ClassificationPrediction.probs`) and integer labels ``y`` of
shape ``(B,)``; numpy arrays are accepted too. Scalar metrics come back as 0-d tensors on the
device and in the dtype of ``probs``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayesdl.metrics._validation import (
    as_tensor,
    check_binary,
    check_finite,
    check_floating,
    check_integer_labels,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_real,
    check_same_device,
    check_same_length,
)

__all__ = ["accuracy", "brier", "calibration_bins", "ece", "mce", "nll"]

#: How far a row of ``probs`` may sum from 1 before it is rejected.
SIMPLEX_ATOL = 1e-4


def _check_probs_labels(probs: object, y: object) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` ``(B, C)`` on the simplex and labels ``y`` ``(B,)`` in ``[0, C)``."""
    probs = as_tensor(probs, "probs")
    y = as_tensor(y, "y")
    check_floating(probs, "probs")
    check_ndim(probs, "probs", (2,), "(B, C) (one row of class probabilities per example)")
    check_ndim(y, "y", (1,), "(B,) (one integer class label per example)")
    check_nonempty(probs, "probs")
    check_same_device(probs=probs, y=y)
    check_same_length(probs=probs, y=y)
    check_finite(probs, "probs")
    logits_hint = (
        "If these are logits, pass probs=logits.softmax(-1); if they are log-probabilities, "
        "pass probs=log_probs.exp()."
    )
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"probs must be probabilities in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. "
            + logits_hint
        )
    err = (probs.sum(-1) - 1.0).abs()
    worst = int(err.argmax())
    if float(err[worst]) > SIMPLEX_ATOL:
        raise ValueError(
            f"each row of probs must sum to 1 (within {SIMPLEX_ATOL:g}), but row {worst} sums "
            f"to {float(probs[worst].sum()):.6g}. " + logits_hint
        )
    y = check_integer_labels(y, "y", probs.shape[1])
    return probs, y


def accuracy(probs: Tensor, y: Tensor) -> Tensor:
    """Fraction of examples whose most probable class is the label.

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``. Ties in ``probs`` are broken towards the lowest class index
        (:func:`torch.argmax`).
    """
    probs, y = _check_probs_labels(probs, y)
    return (probs.argmax(-1) == y).to(probs.dtype).mean()


def nll(probs: Tensor, y: Tensor) -> Tensor:
    """Mean negative log-likelihood ``-1/B sum_i log p_i[y_i]`` (natural log).

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.

    Returns
    -------
    Tensor
        0-d tensor. Probabilities are clamped below at ``torch.finfo(probs.dtype).tiny`` so that a
        zero probability on the label gives a large finite value rather than ``inf``.
    """
    probs, y = _check_probs_labels(probs, y)
    p_y = probs.gather(-1, y[:, None]).squeeze(-1)
    return -p_y.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def brier(probs: Tensor, y: Tensor) -> Tensor:
    """Multi-class Brier score ``1/B sum_i sum_c (p_ic - 1[y_i = c])^2``.

    This is the original (Brier, 1950) score, in ``[0, 2]``; it is *not* halved. For two classes
    it equals twice the usual binary Brier score ``1/B sum_i (p_i1 - y_i)^2``.

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 2]``.
    """
    probs, y = _check_probs_labels(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean()


def _calibration_bins(
    confidence: Tensor, correct: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Unchecked core of :func:`calibration_bins` (inputs already validated)."""
    dtype = confidence.dtype
    # Edges i / n_bins, each correctly rounded, so that a confidence written as the same decimal
    # (e.g. 0.3 with 10 bins) lands exactly on its edge and goes in the bin below it.
    edges = torch.arange(n_bins + 1, dtype=dtype, device=confidence.device) / n_bins
    # First edge >= confidence is edge i+1 for confidence in (i/n, (i+1)/n]; 0 goes in bin 0.
    index = (torch.searchsorted(edges, confidence, right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    zeros = torch.zeros(n_bins, dtype=dtype, device=confidence.device)
    correct_sum = zeros.scatter_add(0, index, correct.to(dtype))
    confidence_sum = zeros.scatter_add(0, index, confidence)
    denom = counts.clamp_min(1).to(dtype)
    return counts, correct_sum / denom, confidence_sum / denom


def calibration_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width binning of confidences on ``[0, 1]``: the data of a reliability diagram.

    Bin ``i`` (``0 <= i < n_bins``) holds the examples with confidence in
    ``(i / n_bins, (i + 1) / n_bins]``; a confidence of exactly 0 goes in bin 0. Edges are the
    correctly rounded values of ``i / n_bins`` in the dtype of ``confidence``, so a confidence
    equal to an edge (e.g. ``0.3`` with 10 bins) goes in the bin below that edge.

    Parameters
    ----------
    confidence:
        Confidence of each prediction in ``[0, 1]``, shape ``(B,)``, floating point (e.g. the
        largest predicted probability).
    correct:
        Whether each prediction was right, shape ``(B,)``: booleans or numbers that are 0 or 1.
    n_bins:
        Number of equal-width bins, a positive int.

    Returns
    -------
    bin_counts:
        Number of examples per bin, shape ``(n_bins,)``, ``int64``.
    bin_accuracy:
        Mean of ``correct`` per bin, shape ``(n_bins,)``; 0 for an empty bin.
    bin_confidence:
        Mean confidence per bin, shape ``(n_bins,)``; 0 for an empty bin.
    """
    confidence = as_tensor(confidence, "confidence")
    correct = check_real(as_tensor(correct, "correct"), "correct")
    n_bins = check_positive_int(n_bins, "n_bins")
    check_floating(confidence, "confidence")
    check_ndim(confidence, "confidence", (1,), "(B,) (one confidence per example)")
    check_ndim(correct, "correct", (1,), "(B,) (one correct/incorrect flag per example)")
    check_nonempty(confidence, "confidence")
    check_same_device(confidence=confidence, correct=correct)
    check_same_length(confidence=confidence, correct=correct)
    check_finite(confidence, "confidence")
    lo, hi = float(confidence.min()), float(confidence.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"confidence must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. Pass a "
            "probability such as probs.max(-1).values, not a logit or an entropy."
        )
    check_binary(correct, "correct")
    return _calibration_bins(confidence, correct, n_bins)


def _binned_gaps(probs: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Bin counts and ``|accuracy - confidence|`` per bin for argmax predictions."""
    n_bins = check_positive_int(n_bins, "n_bins")
    probs, y = _check_probs_labels(probs, y)
    confidence, prediction = probs.max(-1)
    counts, bin_accuracy, bin_confidence = _calibration_bins(confidence, prediction == y, n_bins)
    return counts, (bin_accuracy - bin_confidence).abs()


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error of the argmax prediction (top-label ECE).

    ``ECE = sum_b (n_b / B) |acc_b - conf_b|`` over the equal-width bins of
    :func:`calibration_bins`, where the confidence of an example is its largest probability and
    it is correct when the argmax (ties: lowest index) equals the label.

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.
    n_bins:
        Number of equal-width confidence bins on ``[0, 1]``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    counts, gaps = _binned_gaps(probs, y, n_bins)
    return (counts.to(gaps.dtype) * gaps).sum() / counts.sum()


def mce(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Maximum calibration error: ``max_b |acc_b - conf_b|`` over the non-empty bins.

    Same bins, confidences and correctness as :func:`ece`.

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.
    n_bins:
        Number of equal-width confidence bins on ``[0, 1]``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    counts, gaps = _binned_gaps(probs, y, n_bins)
    return gaps[counts > 0].max()
