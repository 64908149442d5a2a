"""bayesdl: Bayesian deep learning for any PyTorch module.

>>> import torch.nn as nn, bayesdl as bdl
>>> net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))
>>> post = bdl.MCDropout(net, likelihood="categorical")
>>> pred = post.predict(torch.randn(8, 4), n_samples=50)  # doctest: +SKIP
>>> pred.probs.shape, pred.epistemic.shape                  # doctest: +SKIP
"""

from bayesdl import decisions, models
from bayesdl._version import __version__
from bayesdl.files import ModelFileError
from bayesdl.io import ModelInfo, inspect, load, save
from bayesdl.likelihoods import (
    Categorical,
    Gaussian,
    HomoscedasticGaussian,
    Likelihood,
    get_likelihood,
)
from bayesdl.posteriors import (
    IVON,
    SGMCMC,
    SWAG,
    Candidate,
    DeepEnsemble,
    Deterministic,
    Laplace,
    MCDropout,
    MeanFieldVI,
    Posterior,
    available_posteriors,
    get_posterior,
)
from bayesdl.predictions import ClassificationPrediction, Prediction, RegressionPrediction
from bayesdl.priors import GaussianPrior, Prior, ScaleMixturePrior
from bayesdl.training import History, TrainingDivergedError

__all__ = [
    "IVON",
    "SGMCMC",
    "SWAG",
    "Candidate",
    "Categorical",
    "ClassificationPrediction",
    "DeepEnsemble",
    "Deterministic",
    "Gaussian",
    "GaussianPrior",
    "History",
    "HomoscedasticGaussian",
    "Laplace",
    "Likelihood",
    "MCDropout",
    "MeanFieldVI",
    "ModelFileError",
    "ModelInfo",
    "Posterior",
    "Prediction",
    "Prior",
    "RegressionPrediction",
    "ScaleMixturePrior",
    "TrainingDivergedError",
    "__version__",
    "available_posteriors",
    "decisions",
    "get_likelihood",
    "get_posterior",
    "inspect",
    "load",
    "models",
    "save",
]
