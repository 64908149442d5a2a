"""The options of :class:`~bayesdl.posteriors.laplace.Laplace`, as ``str`` enums."""

from __future__ import annotations

from enum import Enum

from bayesdl._options import resolve

__all__ = ["HessianStructure", "Predictive", "PriorFit", "Subset", "resolve"]


class Subset(str, Enum):
    """Which weights get a posterior (the rest stay at their trained values)."""

    #: The output ``nn.Linear`` layer (weight and bias): cheap, with closed-form Jacobians.
    LAST_LAYER = "last_layer"
    #: Every trainable parameter of the model.
    ALL = "all"


class HessianStructure(str, Enum):
    """How the generalised Gauss-Newton (GGN) matrix of the subset is represented."""

    #: Its diagonal.
    DIAG = "diag"
    #: One Kronecker product per ``nn.Linear`` layer (KFAC), exact in the prior precision.
    KRON = "kron"
    #: The dense matrix (last layer, or all weights of a small network).
    FULL = "full"


class PriorFit(str, Enum):
    """How ``fit`` chooses the prior precision."""

    #: Maximise the closed-form Laplace log marginal likelihood (exact 1-d root finding).
    MARGLIK = "marglik"
    #: The grid value with the lowest negative log predictive density on ``val_data``.
    VALIDATION = "validation"
    #: Keep the ``prior_precision`` given to the constructor.
    NONE = "none"


class Predictive(str, Enum):
    """What ``sample_outputs`` (and so ``predict``) draws."""

    #: The linearised network (GLM): draws of the outputs from the function-space Gaussian
    #: ``N(f(x), J Sigma J^T)``, cheap and exact for the linearised model.
    GLM = "glm"
    #: Monte Carlo in weight space: ``S`` weight draws from ``N(theta, Sigma)``, each run
    #: through the network (one vectorised call). For the last layer, whose output is linear in
    #: its weights, this is the same distribution as ``"glm"``.
    MC = "mc"
