"""Out-of-distribution detection from a per-example score.

Convention: **OOD is the positive class and a higher score means "more likely OOD"** (e.g.
predictive entropy or mutual information). For a confidence-like score, where higher means "more
likely in-distribution" (max probability), pass its negative.

Every function takes the scores of the in-distribution examples ``score_in`` ``(N_in,)`` and of
the OOD examples ``score_out`` ``(N_out,)``; numpy arrays are accepted too. Integer scores are
allowed; the result is a 0-d tensor in the promoted floating dtype of the scores (the default
dtype if neither is floating), on their device. All three metrics are computed from exact integer
counts per distinct score, so ties are handled the same way as by scikit-learn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesdl.metrics._validation import (
    as_tensor,
    check_finite,
    check_fraction,
    check_ndim,
    check_nonempty,
    check_real,
    check_same_device,
    result_dtype,
)

__all__ = ["fpr95", "fpr_at_tpr", "ood_aupr", "ood_auroc"]


def _check_scores(score_in: object, score_out: object) -> tuple[Tensor, Tensor, torch.dtype]:
    score_in = check_real(as_tensor(score_in, "score_in"), "score_in")
    score_out = check_real(as_tensor(score_out, "score_out"), "score_out")
    for score, name, layout in (
        (score_in, "score_in", "(N_in,)"),
        (score_out, "score_out", "(N_out,)"),
    ):
        check_ndim(score, name, (1,), layout)
        check_nonempty(score, name)
        check_finite(score, name)
    check_same_device(score_in=score_in, score_out=score_out)
    common = torch.promote_types(score_in.dtype, score_out.dtype)
    return score_in.to(common), score_out.to(common), result_dtype(score_in, score_out)


def _counts_per_threshold(score_in: Tensor, score_out: Tensor) -> tuple[Tensor, Tensor]:
    """Numbers of in- and out-of-distribution examples at each distinct score, highest first.

    Returns two ``int64`` tensors of shape ``(G,)``, ``G`` the number of distinct scores.
    """
    scores = torch.cat([score_in, score_out])
    is_out = torch.cat(
        [
            torch.zeros(len(score_in), dtype=torch.long, device=scores.device),
            torch.ones(len(score_out), dtype=torch.long, device=scores.device),
        ]
    )
    distinct, group = torch.unique(scores, sorted=True, return_inverse=True)
    n_out = torch.zeros(len(distinct), dtype=torch.long, device=scores.device)
    n_out = n_out.scatter_add(0, group, is_out)
    n_all = torch.bincount(group, minlength=len(distinct))
    return (n_all - n_out).flip(0), n_out.flip(0)


def ood_auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Area under the ROC curve for telling OOD (positive) from in-distribution examples.

    Equals the Mann-Whitney statistic with midranks,
    ``P(s_out > s_in) + 1/2 P(s_out = s_in)`` over all ``N_in * N_out`` pairs, and
    :func:`sklearn.metrics.roc_auc_score` with OOD labelled 1. It is computed exactly from integer
    counts per distinct score.

    Parameters
    ----------
    score_in:
        Scores of in-distribution examples, shape ``(N_in,)``; higher means "more likely OOD".
    score_out:
        Scores of OOD examples, shape ``(N_out,)``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``; 0.5 is chance, 1 is perfect separation.
    """
    score_in, score_out, dtype = _check_scores(score_in, score_out)
    n_in, n_out = _counts_per_threshold(score_in, score_out)
    # In-distribution examples strictly below each threshold (thresholds are highest first).
    n_in_below = len(score_in) - n_in.cumsum(0)
    twice_wins = (n_out * (2 * n_in_below + n_in)).sum()
    return twice_wins.to(dtype) / (2 * len(score_in) * len(score_out))


def ood_aupr(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with OOD as the positive class (average precision).

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct scores ``t`` taken as thresholds from the
    highest down, flagging ``score >= t``, with ``R_t`` the fraction of OOD examples flagged and
    ``P_t`` the fraction of flagged examples that are OOD. This is the step-wise (not
    trapezoidal) area, equal to :func:`sklearn.metrics.average_precision_score` with OOD labelled
    1. Note that its chance level is the OOD fraction ``N_out / (N_in + N_out)``.

    Parameters
    ----------
    score_in:
        Scores of in-distribution examples, shape ``(N_in,)``; higher means "more likely OOD".
    score_out:
        Scores of OOD examples, shape ``(N_out,)``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    score_in, score_out, dtype = _check_scores(score_in, score_out)
    n_in, n_out = _counts_per_threshold(score_in, score_out)
    true_pos = n_out.cumsum(0).to(dtype)
    flagged = (n_in + n_out).cumsum(0).to(dtype)
    return (n_out.to(dtype) * (true_pos / flagged)).sum() / len(score_out)


def _min_count_for_rate(rate: float, total: int) -> int:
    """Smallest integer ``k`` with ``k / total >= rate`` in float64 (as numpy evaluates it)."""
    k = min(max(math.ceil(rate * total), 0), total)
    while k > 0 and (k - 1) / total >= rate:
        k -= 1
    while k < total and k / total < rate:
        k += 1
    return k


def fpr_at_tpr(score_in: Tensor, score_out: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate at the first threshold that reaches a true-positive rate of ``tpr``.

    Thresholds are the distinct scores, from the highest down; an example is flagged as OOD when
    ``score >= threshold``. The result is the fraction of in-distribution examples flagged at the
    highest threshold whose TPR (fraction of OOD examples flagged) is at least ``tpr``, i.e. the
    FPR of the first point of ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` with
    ``tpr_point >= tpr`` (the TPR is compared as ``k / N_out >= tpr`` in float64, as numpy
    does). Lower is better.

    Parameters
    ----------
    score_in:
        Scores of in-distribution examples, shape ``(N_in,)``; higher means "more likely OOD".
    score_out:
        Scores of OOD examples, shape ``(N_out,)``.
    tpr:
        Target true-positive rate in ``(0, 1]``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    tpr = check_fraction(tpr, "tpr")
    score_in, score_out, dtype = _check_scores(score_in, score_out)
    n_in, n_out = _counts_per_threshold(score_in, score_out)
    needed = _min_count_for_rate(tpr, len(score_out))
    first = int(torch.searchsorted(n_out.cumsum(0), needed))
    return n_in.cumsum(0)[first].to(dtype) / len(score_in)


def fpr95(score_in: Tensor, score_out: Tensor) -> Tensor:
    """FPR at 95% TPR: :func:`fpr_at_tpr` with ``tpr=0.95``.

    Parameters
    ----------
    score_in:
        Scores of in-distribution examples, shape ``(N_in,)``; higher means "more likely OOD".
    score_out:
        Scores of OOD examples, shape ``(N_out,)``.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    return fpr_at_tpr(score_in, score_out, tpr=0.95)
