"""Accuracy, proper scoring rules and calibration of predicted class probabilities.

All functions take predictive probabilities ``probs`` of shape ``(B, C)`` (rows on the simplex,
e.g. :attr:`~bayesdl.predictions.ClassificationPrediction.probs`) and integer labels ``y`` of
shape ``(B,)``; numpy arrays are accepted too. Scalar metrics come back as 0-d tensors on the
device and in the dtype of ``probs``.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from bayesdl._options import resolve
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

__all__ = [
    "Binning",
    "ReliabilityCurve",
    "accuracy",
    "adaptive_ece",
    "brier",
    "calibration_bins",
    "classwise_ece",
    "ece",
    "mce",
    "nll",
    "reliability_curve",
]

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
    return _bin_means(_uniform_bin_index(confidence, n_bins), confidence, correct, n_bins)


def _uniform_edges(n_bins: int, like: Tensor) -> Tensor:
    # Edges i / n_bins, each correctly rounded, so that a confidence written as the same decimal
    # (e.g. 0.3 with 10 bins) lands exactly on its edge and goes in the bin below it.
    return torch.arange(n_bins + 1, dtype=like.dtype, device=like.device) / n_bins


def _uniform_bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each confidence, ``(B,)`` long: bin ``i`` is ``(i/n, (i+1)/n]``."""
    edges = _uniform_edges(n_bins, confidence)
    # First edge >= confidence is edge i+1 for confidence in (i/n, (i+1)/n]; 0 goes in bin 0.
    return (torch.searchsorted(edges, confidence, right=False) - 1).clamp(0, n_bins - 1)


def _bin_means(
    index: Tensor, confidence: Tensor, correct: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Counts, mean ``correct`` and mean ``confidence`` per bin given each example's bin."""
    dtype = confidence.dtype
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


# ---------------------------------------------------------------- reliability, adaptive, classwise


class Binning(str, Enum):
    """How the confidences of a reliability diagram are binned."""

    #: ``n_bins`` equal-width bins on ``[0, 1]``, as in :func:`calibration_bins`.
    UNIFORM = "uniform"
    #: ``n_bins`` bins holding equally many examples (sizes differ by at most one).
    EQUAL_MASS = "equal_mass"


class ReliabilityCurve(NamedTuple):
    """The data of a reliability diagram (top-label), one entry per bin.

    Attributes
    ----------
    edges:
        Bin edges, shape ``(n_bins + 1,)``, from 0 to 1, non-decreasing.
    counts:
        Examples per bin, shape ``(n_bins,)``, ``int64``.
    accuracy:
        Fraction correct per bin, shape ``(n_bins,)``; 0 for an empty bin.
    confidence:
        Mean confidence per bin, shape ``(n_bins,)``; 0 for an empty bin.
    """

    edges: Tensor
    counts: Tensor
    accuracy: Tensor
    confidence: Tensor


def _resolve_binning(binning: object) -> Binning:
    return resolve(Binning, binning, "binning")


def _equal_mass_bins(confidence: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Bin index ``(B,)`` and edges ``(n_bins + 1,)`` of equal-mass bins of ``confidence``.

    Examples are ordered by a stable ascending sort; the first ``B mod n_bins`` bins get
    ``ceil(B / n_bins)`` examples and the rest ``floor(B / n_bins)`` (``numpy.array_split``), so
    bins past the ``B``-th are empty when ``n_bins > B``. Interior edges lie half-way between
    the last confidence of one bin and the first of the next (1 after the last non-empty bin).
    """
    batch = len(confidence)
    sorted_conf, order = torch.sort(confidence, stable=True)
    device = confidence.device
    sizes = batch // n_bins + (torch.arange(n_bins, device=device) < batch % n_bins).long()
    index = torch.empty(batch, dtype=torch.long, device=device)
    index[order] = torch.repeat_interleave(torch.arange(n_bins, device=device), sizes)
    starts = (sizes.cumsum(0) - sizes)[1:]
    inside = starts < batch
    safe = starts.clamp_max(batch - 1)
    midpoints = 0.5 * (sorted_conf[(safe - 1).clamp_min(0)] + sorted_conf[safe])
    interior = torch.where(inside, midpoints, torch.ones_like(midpoints))
    ends = torch.tensor([0.0, 1.0], dtype=confidence.dtype, device=device)
    return index, torch.cat([ends[:1], interior, ends[1:]])


def reliability_curve(
    probs: Tensor, y: Tensor, n_bins: int = 15, binning: Binning | str = Binning.UNIFORM
) -> ReliabilityCurve:
    """Per-bin accuracy against confidence of the argmax prediction: a reliability diagram.

    The confidence of an example is its largest probability; it is correct when the argmax
    (ties: lowest index) equals the label. ``binning="uniform"`` gives the bins of
    :func:`calibration_bins` (so ``sum(counts / B * |accuracy - confidence|)`` is :func:`ece`);
    ``"equal_mass"`` gives bins of equally many examples (that sum is :func:`adaptive_ece`).

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.
    n_bins:
        Number of bins, a positive int.
    binning:
        A :class:`Binning` or its value.

    Returns
    -------
    ReliabilityCurve
        ``(edges, counts, accuracy, confidence)``; see :class:`ReliabilityCurve`.
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    binning = _resolve_binning(binning)
    probs, y = _check_probs_labels(probs, y)
    confidence, prediction = probs.max(-1)
    if binning is Binning.UNIFORM:
        index, edges = _uniform_bin_index(confidence, n_bins), _uniform_edges(n_bins, confidence)
    else:
        index, edges = _equal_mass_bins(confidence, n_bins)
    counts, accuracy, mean_confidence = _bin_means(index, confidence, prediction == y, n_bins)
    return ReliabilityCurve(edges, counts, accuracy, mean_confidence)


def adaptive_ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Adaptive (equal-mass) expected calibration error of the argmax prediction.

    ``sum_b (n_b / B) |acc_b - conf_b|`` as in :func:`ece`, but over ``n_bins`` bins that each
    hold (up to one) the same number of examples, taken in order of increasing confidence
    (Nixon et al., 2019): the estimate is not dominated by a few crowded high-confidence bins.
    Examples with equal confidence may fall in neighbouring bins (the stable sort keeps their
    input order).

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.
    n_bins:
        Number of equal-mass bins.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    curve = reliability_curve(probs, y, n_bins, Binning.EQUAL_MASS)
    gaps = (curve.accuracy - curve.confidence).abs()
    return (curve.counts.to(gaps.dtype) * gaps).sum() / curve.counts.sum()


def classwise_ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> Tensor:
    """Class-wise expected calibration error: the ECE of every class's probability, averaged.

    For each class ``c`` the probabilities ``p_ic`` of all ``B`` examples are put in the
    equal-width bins of :func:`calibration_bins`, and
    ``ECE_c = sum_b (n_b / B) |freq_b - conf_b|`` with ``freq_b`` the fraction of the bin whose
    label is ``c`` and ``conf_b`` its mean ``p_ic``. The result is ``1/C sum_c ECE_c``
    (Kull et al., 2019): it checks every probability, not only the top one.

    Parameters
    ----------
    probs:
        Predicted class probabilities, shape ``(B, C)``; rows sum to 1.
    y:
        Integer class labels in ``[0, C)``, shape ``(B,)``.
    n_bins:
        Number of equal-width bins per class.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    n_bins = check_positive_int(n_bins, "n_bins")
    probs, y = _check_probs_labels(probs, y)
    batch, n_classes = probs.shape
    classes = torch.arange(n_classes, device=probs.device)
    confidence = probs.T.reshape(-1)  # class-major: (C * B,)
    is_class = (y[None, :] == classes[:, None]).reshape(-1)
    index = _uniform_bin_index(confidence, n_bins) + (classes * n_bins).repeat_interleave(batch)
    counts, freq, mean_p = _bin_means(index, confidence, is_class, n_classes * n_bins)
    weighted = counts.to(probs.dtype) * (freq - mean_p).abs()
    return weighted.sum() / (batch * n_classes)
