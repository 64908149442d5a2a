"""Laplace approximation of a trained network, behind the :class:`~bayesdl.Posterior` contract.

The package: :mod:`.options` (the option enums), :mod:`.blocks` (which weights, in which
layout), :mod:`.curvature` (the GGN sums), :mod:`.structures` (diagonal, KFAC and full
posteriors), :mod:`.marglik` (marginal likelihood and prior precision), :mod:`.predictive`
(probit and regression closed forms) and :mod:`.posterior` (the :class:`Laplace` class).
"""

from bayesdl.posteriors.laplace.options import HessianStructure, Predictive, PriorFit, Subset
from bayesdl.posteriors.laplace.posterior import DEFAULT_PRIOR_GRID, Laplace
from bayesdl.posteriors.laplace.predictive import RegressionMoments

__all__ = [
    "DEFAULT_PRIOR_GRID",
    "HessianStructure",
    "Laplace",
    "Predictive",
    "PriorFit",
    "RegressionMoments",
    "Subset",
]
