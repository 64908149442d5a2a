"""Selective prediction: keep the most certain examples and refer the rest to a human.

Every function takes a per-example ``uncertainty`` ``(B,)`` where **lower means more certain**
(e.g. predictive entropy; for a confidence pass its negative), together with a per-example
``loss`` or ``correct`` flag. Numpy arrays are accepted too. Results are on the device of the
inputs, in their promoted floating dtype (the default dtype if none is floating).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesdl.metrics._validation import (
    as_tensor,
    check_binary,
    check_finite,
    check_fraction,
    check_ndim,
    check_nonempty,
    check_real,
    check_same_device,
    check_same_length,
    result_dtype,
)

__all__ = ["accuracy_at_coverage", "aurc", "risk_coverage_curve"]


def _check_pair(
    uncertainty: object, values: object, values_name: str, binary: bool
) -> tuple[Tensor, Tensor, torch.dtype]:
    uncertainty = check_real(as_tensor(uncertainty, "uncertainty"), "uncertainty")
    values = check_real(as_tensor(values, values_name), values_name)
    check_ndim(uncertainty, "uncertainty", (1,), "(B,) (one uncertainty per example)")
    check_ndim(values, values_name, (1,), f"(B,) (one {values_name} per example)")
    check_nonempty(uncertainty, "uncertainty")
    check_same_device(uncertainty=uncertainty, **{values_name: values})
    check_same_length(uncertainty=uncertainty, **{values_name: values})
    check_finite(uncertainty, "uncertainty")
    if binary:
        check_binary(values, values_name)
    else:
        check_finite(values, values_name)
    dtype = result_dtype(uncertainty, values)
    return uncertainty, values.to(dtype), dtype


def _grouped_risk(uncertainty: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Group sizes and risks at each distinct uncertainty, most certain first.

    Returns ``(sizes, risk)``, both ``(G,)``: ``sizes[g]`` examples share the ``g``-th smallest
    uncertainty, and ``risk[g]`` is the mean loss of all examples with uncertainty at most that
    one. Summing losses per group first makes the result independent of the order of ties.
    """
    _, group = torch.unique(uncertainty, sorted=True, return_inverse=True)
    n_groups = int(group.max()) + 1
    sizes = torch.bincount(group, minlength=n_groups)
    loss_sums = torch.zeros(n_groups, dtype=loss.dtype, device=loss.device)
    loss_sums = loss_sums.scatter_add(0, group, loss)
    kept = sizes.cumsum(0)
    return sizes, loss_sums.cumsum(0) / kept.to(loss.dtype)


def risk_coverage_curve(uncertainty: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Risk of the kept examples against the fraction kept, one point per distinct uncertainty.

    Examples are kept in order of increasing uncertainty. For each distinct uncertainty ``u``
    (from the smallest up) all examples with uncertainty ``<= u`` are kept, so tied examples enter
    together and the curve does not depend on their order.

    Parameters
    ----------
    uncertainty:
        Per-example uncertainty, shape ``(B,)``; lower means more certain.
    loss:
        Per-example loss, shape ``(B,)``; for classification ``1 - correct`` (0-1 loss).

    Returns
    -------
    coverage:
        Fraction of examples kept, shape ``(G,)`` with ``G`` the number of distinct
        uncertainties; increasing, ending at 1.
    risk:
        Mean loss of the kept examples, shape ``(G,)``.
    """
    uncertainty, loss, _ = _check_pair(uncertainty, loss, "loss", binary=False)
    sizes, risk = _grouped_risk(uncertainty, loss)
    coverage = sizes.cumsum(0).to(loss.dtype) / len(loss)
    return coverage, risk


def aurc(uncertainty: Tensor, loss: Tensor) -> Tensor:
    """Area under the risk-coverage curve (lower is better).

    Defined as the mean, over ``k = 1..B``, of the risk of the ``k`` most certain examples:
    ``AURC = 1/B sum_k r_k``. When uncertainties tie, "the ``k`` most certain" is ambiguous, so
    every ``k`` inside a tied group gets the risk at that group's threshold: if groups of sizes
    ``n_1, n_2, ...`` (most certain first) have risks ``R_1, R_2, ...`` (``R_g`` the mean loss of
    all examples in groups ``1..g``), then ``AURC = 1/B sum_g n_g R_g``. Without ties this is
    the plain mean of the ``B`` prefix risks.

    Example: ``uncertainty = [0.1, 0.2, 0.2]`` and ``loss = [0, 1, 0]`` give the groups
    ``{0}`` with risk 0 and ``{1, 2}`` with risk ``1/3``, so ``AURC = (1*0 + 2*(1/3)) / 3 = 2/9``.

    Parameters
    ----------
    uncertainty:
        Per-example uncertainty, shape ``(B,)``; lower means more certain.
    loss:
        Per-example loss, shape ``(B,)``; for classification ``1 - correct``.

    Returns
    -------
    Tensor
        0-d tensor between the smallest and the largest loss.
    """
    uncertainty, loss, _ = _check_pair(uncertainty, loss, "loss", binary=False)
    sizes, risk = _grouped_risk(uncertainty, loss)
    return (sizes.to(risk.dtype) * risk).sum() / len(loss)


def _n_kept(coverage: float, total: int) -> int:
    """``ceil(coverage * total)``, forgiving round-off such as ``0.07 * 100 = 7.000...01``."""
    return min(max(math.ceil(coverage * total * (1.0 - 1e-12)), 1), total)


def accuracy_at_coverage(uncertainty: Tensor, correct: Tensor, coverage: float) -> Tensor:
    """Accuracy on the ``ceil(coverage * B)`` most certain examples.

    Examples are ordered by a *stable* ascending sort of ``uncertainty``, so among tied
    uncertainties the one with the lower index is kept first. ``ceil`` is taken with a relative
    tolerance of ``1e-12`` so that round-off in ``coverage * B`` does not keep one example too
    many (``0.07 * 100`` is ``7.000000000000001`` in float64, and 7 examples are kept).

    Parameters
    ----------
    uncertainty:
        Per-example uncertainty, shape ``(B,)``; lower means more certain.
    correct:
        Whether each prediction was right, shape ``(B,)``: booleans or numbers that are 0 or 1.
    coverage:
        Fraction of examples to keep, in ``(0, 1]``; at least one example is always kept.

    Returns
    -------
    Tensor
        0-d tensor in ``[0, 1]``.
    """
    coverage = check_fraction(coverage, "coverage")
    uncertainty, correct, _ = _check_pair(uncertainty, correct, "correct", binary=True)
    order = torch.sort(uncertainty, stable=True).indices
    return correct[order[: _n_kept(coverage, len(correct))]].mean()
