"""A point estimate: the user's network as it is, trained by maximum likelihood (or MAP with
weight decay). Every draw is the same network, so the epistemic part is zero; it is the baseline
every Bayesian method is compared with, behind the same contract."""

from __future__ import annotations

import torch
from torch import Tensor

from bayesdl.posteriors.base import NetworkObjective, Posterior, register

__all__ = ["Deterministic"]


@register
class Deterministic(Posterior):
    """Point-mass posterior on the module's current weights.

    ``sample_outputs(x, n_samples)`` returns ``(S, B, K)`` with ``S`` identical draws (a view of
    one forward pass; ``S`` defaults to 1).
    """

    name = "deterministic"
    default_n_samples = 1

    def _objective(self) -> NetworkObjective:
        return NetworkObjective(self.network)

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        was_training = self.network.training
        self.network.eval()
        try:
            out = self.network(x)
        finally:
            self.network.train(was_training)
        return out.unsqueeze(0).expand(n_samples, *out.shape)
