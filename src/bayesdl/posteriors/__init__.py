"""Approximate posteriors, one module per method, all behind :class:`Posterior`."""

from bayesdl.posteriors.base import (
    Network,
    Posterior,
    available_posteriors,
    get_posterior,
    register,
)
from bayesdl.posteriors.deep_ensemble import DeepEnsemble
from bayesdl.posteriors.deterministic import Deterministic
from bayesdl.posteriors.ivon import IVON
from bayesdl.posteriors.laplace import Laplace
from bayesdl.posteriors.mc_dropout import MCDropout
from bayesdl.posteriors.mean_field_vi import MeanFieldVI
from bayesdl.posteriors.selection import Candidate
from bayesdl.posteriors.sgmcmc import SGMCMC
from bayesdl.posteriors.swag import SWAG

__all__ = [
    "IVON",
    "SGMCMC",
    "SWAG",
    "Candidate",
    "DeepEnsemble",
    "Deterministic",
    "Laplace",
    "MCDropout",
    "MeanFieldVI",
    "Network",
    "Posterior",
    "available_posteriors",
    "get_posterior",
    "register",
]
