"""The Laplace approximation of the log marginal likelihood, and the prior precision that
maximises it.

With ``P`` weights at ``theta*``, a Gaussian prior ``N(0, I / lambda)`` and the GGN ``H`` (with
eigenvalues ``e_i``),

    log p(D) ~ log p(D | theta*) + (P / 2) log(lambda) - (lambda / 2) ||theta*||^2
               - (1 / 2) sum_i log(e_i + lambda),

which is exact for a linear-Gaussian model at its posterior mean (Bayesian linear regression).
Its derivative in ``lambda`` is ``(gamma(lambda) - lambda ||theta*||^2) / (2 lambda)`` with
``gamma = sum_i e_i / (e_i + lambda)`` (the effective number of parameters). ``gamma`` falls and
``lambda ||theta*||^2`` rises with ``lambda``, so the maximiser is the unique root of
``gamma(lambda) = lambda ||theta*||^2`` (MacKay's fixed point), found here by bisection in
``log lambda`` to machine precision.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["PRIOR_PRECISION_BOUNDS", "log_marginal_likelihood", "optimal_prior_precision"]

#: Range searched for the prior precision.
PRIOR_PRECISION_BOUNDS = (1e-8, 1e8)


def log_marginal_likelihood(
    log_likelihood: Tensor, eigenvalues: Tensor, sq_norm: Tensor, prior_precision: float
) -> Tensor:
    """The Laplace log marginal likelihood (see the module docstring); a 0-d tensor."""
    lam = torch.as_tensor(prior_precision, dtype=eigenvalues.dtype, device=eigenvalues.device)
    p = eigenvalues.numel()
    return (
        log_likelihood
        + 0.5 * p * lam.log()
        - 0.5 * lam * sq_norm
        - 0.5 * torch.log(eigenvalues + lam).sum()
    )


def optimal_prior_precision(eigenvalues: Tensor, sq_norm: Tensor, iterations: int = 200) -> float:
    """The prior precision that maximises :func:`log_marginal_likelihood` (a float).

    Bisection on the sign of ``gamma(lambda) - lambda ||theta||^2`` over
    :data:`PRIOR_PRECISION_BOUNDS`, in float64; warns when the maximum lies at a bound.
    """
    e = eigenvalues.detach().double().clamp_min(0)
    norm = float(sq_norm)

    def slope(log_lam: float) -> float:  # sign of d log p(D) / d lambda
        lam = math.exp(log_lam)
        return float((e / (e + lam)).sum()) - lam * norm

    lo, hi = (math.log(b) for b in PRIOR_PRECISION_BOUNDS)
    if slope(lo) <= 0 or slope(hi) >= 0:
        edge = PRIOR_PRECISION_BOUNDS[0] if slope(lo) <= 0 else PRIOR_PRECISION_BOUNDS[1]
        warnings.warn(
            f"the Laplace marginal likelihood is maximised at the edge of the searched range: "
            f"prior_precision={edge:g} (||theta||^2 = {norm:.3g}, effective number of parameters "
            f"at that precision {float((e / (e + edge)).sum()):.3g}). The curvature or the "
            "weights may be degenerate; consider setting prior_precision yourself.",
            stacklevel=3,
        )
        return edge
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return math.exp(0.5 * (lo + hi))
