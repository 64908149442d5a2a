"""What a network's outputs mean.

A likelihood is a small ``nn.Module`` that sits on top of the user's network:

* :meth:`Likelihood.forward` maps the network's raw outputs to the likelihood's natural
  parameters (logits; or mean and log-variance). It is the identity except where the likelihood
  owns parameters of its own (the learned noise of :class:`HomoscedasticGaussian`), so those
  parameters are trained, sampled, stacked over ensemble members and saved exactly like the
  network's, by every posterior, without special cases.
* :meth:`Likelihood.nll` is the per-example negative log-likelihood on natural parameters: what
  every reported score uses. :meth:`Likelihood.training_loss` is what the fit loops minimise; it
  is the NLL unless the likelihood is told otherwise (the ``beta`` of the Gaussians: Seitzer et
  al.'s beta-NLL). :meth:`Likelihood.validation_loss` is what validation and early stopping
  monitor: the NLL, unless a subclass overrides it.
* :meth:`Likelihood.predictive` turns natural parameters under ``S`` posterior draws,
  ``(S, B, ...)``, into a :class:`~bayesdl.predictions.ClassificationPrediction` or
  :class:`~bayesdl.predictions.RegressionPrediction`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import Enum

import torch
from torch import Tensor, nn

from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

__all__ = [
    "Categorical",
    "Gaussian",
    "HomoscedasticGaussian",
    "Likelihood",
    "LikelihoodName",
    "get_likelihood",
    "likelihood_from_options",
]


class Likelihood(nn.Module, ABC):
    """Base class: maps network outputs to a loss and to a predictive distribution."""

    task: str
    #: Registry name (see :class:`LikelihoodName`); ``None`` for a likelihood of the user's own.
    name: str | None = None

    def options(self) -> dict:
        """Constructor options as plain JSON values: ``type(self)(**options())`` rebuilds it
        (learned parameters, such as a learned noise, are state, saved with the weights)."""
        return {}

    def forward(self, outputs: Tensor) -> Tensor:
        """Natural parameters from raw network outputs; ``(..., K_raw) -> (..., K)``."""
        return outputs

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Width of the natural parameters' last axis."""

    @abstractmethod
    def nll(self, params: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood per example.

        ``params`` is ``(..., B, K)`` and ``y`` is ``(B,)`` or ``(B, D)`` or carries the same
        leading axes; the result has shape ``(..., B)``, so a stack of draws or of ensemble
        members is scored in one call.
        """

    def training_loss(self, params: Tensor, y: Tensor) -> Tensor:
        """Per-example loss the fit loops minimise, shapes as :meth:`nll`; the NLL by default."""
        return self.nll(params, y)

    def validation_loss(self, params: Tensor, y: Tensor) -> Tensor:
        """Per-example loss that validation and early stopping monitor, shapes as :meth:`nll`;
        the NLL by default (override it to stop on, e.g., the training objective instead)."""
        return self.nll(params, y)

    @abstractmethod
    def predictive(self, params: Tensor) -> ClassificationPrediction | RegressionPrediction:
        """Predictive distribution from natural parameters of ``S`` draws, ``(S, B, K)``."""

    @abstractmethod
    def check_targets(self, y: Tensor) -> Tensor:
        """Validate targets at the boundary and return them in canonical shape and dtype."""

    def check_params(self, params: Tensor) -> None:
        """Raise a ``ValueError`` when the network's output width does not fit this likelihood."""
        if params.ndim < 2 or params.shape[-1] != self.n_outputs:
            raise ValueError(
                f"{type(self).__name__} expects network outputs of shape (B, "
                f"{self.n_outputs_raw}), but the network returned {tuple(params.shape[-2:])}. "
                f"{self._width_hint()}"
            )

    @property
    def n_outputs_raw(self) -> int:
        """Width the user's network must output."""
        return self.n_outputs

    def _width_hint(self) -> str:
        return ""


class Categorical(Likelihood):
    """Categorical likelihood over ``n_classes`` classes from logits ``(B, C)``.

    Targets are integer labels in ``[0, C)``, shape ``(B,)``.
    """

    task = "classification"
    name = "categorical"

    def __init__(self, n_classes: int | None = None) -> None:
        super().__init__()
        if n_classes is not None and (not isinstance(n_classes, int) or n_classes < 2):
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
        self.n_classes = n_classes

    def options(self) -> dict:
        return {"n_classes": self.n_classes}

    @property
    def n_outputs(self) -> int:
        return -1 if self.n_classes is None else self.n_classes

    def check_params(self, params: Tensor) -> None:
        if params.ndim < 2 or (self.n_classes is not None and params.shape[-1] != self.n_classes):
            raise ValueError(
                f"Categorical expects logits of shape (B, {self.n_classes or 'C'}), but the "
                f"network returned {tuple(params.shape[-2:])}. Make the last layer output one "
                "logit per class."
            )

    def nll(self, params: Tensor, y: Tensor) -> Tensor:
        log_p = torch.log_softmax(params, dim=-1)
        y = y.expand(params.shape[:-1]).unsqueeze(-1)
        return -log_p.gather(-1, y).squeeze(-1)

    def predictive(self, params: Tensor) -> ClassificationPrediction:
        return ClassificationPrediction(torch.log_softmax(params, dim=-1))

    def check_targets(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y)
        if y.is_floating_point():
            if not torch.isfinite(y).all():
                raise ValueError("y contains NaN or inf; class labels must be integers.")
            if (y != y.round()).any():
                raise TypeError(
                    "Categorical targets must be integer class labels; got non-integer floats. "
                    "Pass labels, not one-hot vectors or probabilities."
                )
        elif y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"Categorical targets must be integer class labels, got {y.dtype}.")
        if y.ndim != 1:
            raise ValueError(
                f"Categorical targets must have shape (B,), got {tuple(y.shape)}. "
                "Pass class indices, not one-hot vectors."
            )
        y = y.long()
        if self.n_classes is not None and len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.n_classes}), got values in "
                f"[{int(y.min())}, {int(y.max())}]. Re-encode the labels as 0..C-1."
            )
        if len(y) and y.min() < 0:
            raise ValueError(f"class labels must be non-negative, got {int(y.min())}.")
        return y


class _GaussianBase(Likelihood):
    """Gaussian observation model with natural parameters ``[mean, log_variance]``, ``(B, 2D)``.

    ``beta`` in ``[0, 1]`` makes the training loss beta-NLL (Seitzer et al., 2022): each
    example's NLL weighted by its predicted variance to the power ``beta``, the weight held
    constant in the gradient (``stop_grad(var) ** beta * nll``). With ``beta = 0`` it is the NLL;
    with ``beta = 1`` the mean receives exactly the gradient of half the squared error, so points
    given a large variance still pull on the mean, while the variance keeps its NLL optimum
    (``var = E[(y - mean)^2]``). It changes only what training minimises: validation, early
    stopping, predictions and scores use the NLL.
    """

    task = "regression"

    def __init__(self, n_targets: int = 1, min_variance: float = 1e-6, beta: float = 0.0) -> None:
        super().__init__()
        if not isinstance(n_targets, int) or n_targets < 1:
            raise ValueError(f"n_targets must be a positive integer, got {n_targets!r}.")
        if not min_variance >= 0:
            raise ValueError(f"min_variance must be >= 0, got {min_variance!r}.")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(
                f"beta must be a number in [0, 1] (0: the NLL, 1: the mean trained as by the "
                f"squared error), got {beta!r}."
            )
        self.n_targets = n_targets
        self.min_variance = float(min_variance)
        self.beta = float(beta)

    def options(self) -> dict:
        return {"n_targets": self.n_targets, "min_variance": self.min_variance, "beta": self.beta}

    def extra_repr(self) -> str:
        return f"n_targets={self.n_targets}, beta={self.beta}" if self.beta else ""

    @property
    def n_outputs(self) -> int:
        return 2 * self.n_targets

    def mean_variance(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Split natural parameters ``(..., 2D)`` into mean and variance, each ``(...)`` for
        ``D = 1`` or ``(..., D)`` otherwise. The variance is ``exp(log_var) + min_variance``."""
        mean, log_var = params[..., : self.n_targets], params[..., self.n_targets :]
        var = log_var.exp() + self.min_variance
        if self.n_targets == 1:
            return mean.squeeze(-1), var.squeeze(-1)
        return mean, var

    def _nll_per_target(self, params: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.mean_variance(params)
        return 0.5 * ((y - mean) ** 2 / var + var.log() + math.log(2 * math.pi)), var

    def nll(self, params: Tensor, y: Tensor) -> Tensor:
        out, _ = self._nll_per_target(params, y)
        return out if self.n_targets == 1 else out.sum(-1)

    def training_loss(self, params: Tensor, y: Tensor) -> Tensor:
        out, var = self._nll_per_target(params, y)
        if self.beta:
            out = out * var.detach() ** self.beta
        return out if self.n_targets == 1 else out.sum(-1)

    def predictive(self, params: Tensor) -> RegressionPrediction:
        mean, var = self.mean_variance(params)
        return RegressionPrediction(mean, var)

    def check_targets(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            y = y.to(torch.get_default_dtype())
        want = (-1,) if self.n_targets == 1 else (-1, self.n_targets)
        if self.n_targets == 1 and y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != len(want) or (self.n_targets > 1 and y.shape[1] != self.n_targets):
            shape = "(B,) or (B, 1)" if self.n_targets == 1 else f"(B, {self.n_targets})"
            raise ValueError(
                f"regression targets must have shape {shape} for n_targets={self.n_targets}, "
                f"got {tuple(y.shape)}."
            )
        if not torch.isfinite(y).all():
            raise ValueError("y contains NaN or inf; remove or impute those rows before fitting.")
        return y


class Gaussian(_GaussianBase):
    """Heteroscedastic Gaussian: the network outputs a mean and a log-variance per target.

    The network's output is ``(B, 2D)``: means in the first ``D`` columns, log-variances in the
    last ``D``. The variance is ``exp(log_var) + min_variance`` (a floor that keeps the loss
    bounded). Targets are ``(B,)`` for ``D = 1`` (``(B, 1)`` is accepted) or ``(B, D)``.
    ``beta > 0`` trains with beta-NLL (see the base class); ``Gaussian(beta=1.0)`` often gives a
    more accurate mean on small data sets, where the plain NLL lets the network explain hard
    points away with a large variance.
    """

    name = "gaussian"

    def _width_hint(self) -> str:
        return (
            f"Make the last layer output 2 * n_targets = {self.n_outputs} numbers (mean and "
            "log-variance per target), or use likelihood='homoscedastic_gaussian' for a "
            "network that outputs only the mean."
        )


class HomoscedasticGaussian(_GaussianBase):
    """Gaussian with one learned noise variance per target, shared by all inputs.

    The network outputs only the mean, ``(B, D)``; the learned log-variance (a parameter of this
    module, initialised at ``log(init_variance)``) is appended to make the natural parameters
    ``(B, 2D)``.
    """

    name = "homoscedastic_gaussian"

    def __init__(
        self,
        n_targets: int = 1,
        init_variance: float = 1.0,
        min_variance: float = 1e-6,
        beta: float = 0.0,
    ) -> None:
        super().__init__(n_targets, min_variance, beta)
        if not init_variance > 0:
            raise ValueError(f"init_variance must be > 0, got {init_variance!r}.")
        self.init_variance = float(init_variance)
        self.log_variance = nn.Parameter(torch.full((n_targets,), math.log(init_variance)))

    def options(self) -> dict:
        return {**super().options(), "init_variance": self.init_variance}

    @property
    def n_outputs_raw(self) -> int:
        return self.n_targets

    def forward(self, outputs: Tensor) -> Tensor:
        if outputs.ndim < 2 or outputs.shape[-1] != self.n_targets:
            raise ValueError(
                f"HomoscedasticGaussian expects network outputs of shape (B, {self.n_targets}) "
                f"(one mean per target), but the network returned {tuple(outputs.shape)}."
            )
        log_var = self.log_variance.to(outputs.dtype).expand(*outputs.shape[:-1], -1)
        return torch.cat([outputs, log_var], dim=-1)

    def stacked_forward(self, outputs: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """:meth:`forward` of ``M`` stacked members at once: ``outputs`` ``(M, B, ...,
        n_targets)`` and ``tensors["log_variance"]`` ``(M, n_targets)``, one per member."""
        if outputs.ndim < 3 or outputs.shape[-1] != self.n_targets:
            raise ValueError(
                f"HomoscedasticGaussian expects network outputs of shape (B, {self.n_targets}) "
                f"(one mean per target), but the network returned {tuple(outputs.shape[1:])}."
            )
        log_var = tensors["log_variance"].to(outputs.dtype)
        log_var = log_var.view(len(log_var), *[1] * (outputs.ndim - 2), -1)
        return torch.cat([outputs, log_var.expand(*outputs.shape[:-1], -1)], dim=-1)


class LikelihoodName(str, Enum):
    """Likelihoods that can be named by a string."""

    #: Integer class labels from logits.
    CATEGORICAL = "categorical"
    #: Heteroscedastic Gaussian: the network outputs mean and log-variance.
    GAUSSIAN = "gaussian"
    #: Gaussian with a learned noise variance shared by all inputs.
    HOMOSCEDASTIC_GAUSSIAN = "homoscedastic_gaussian"


_LIKELIHOODS: dict[LikelihoodName, type[Likelihood]] = {
    LikelihoodName.CATEGORICAL: Categorical,
    LikelihoodName.GAUSSIAN: Gaussian,
    LikelihoodName.HOMOSCEDASTIC_GAUSSIAN: HomoscedasticGaussian,
}


def likelihood_from_options(name: str, options: dict) -> Likelihood:
    """The library's likelihood ``name`` built with ``options`` (see :meth:`Likelihood.options`);
    ``ValueError``/``TypeError`` for an unknown name or bad options."""
    try:
        cls = _LIKELIHOODS[LikelihoodName(name)]
    except ValueError:
        choices = ", ".join(repr(n.value) for n in LikelihoodName)
        raise ValueError(f"unknown likelihood {name!r}; choose one of {choices}.") from None
    return cls(**options)


def get_likelihood(spec: str | Likelihood) -> Likelihood:
    """Resolve a likelihood from its name (see :class:`LikelihoodName`) or return it as is."""
    if isinstance(spec, Likelihood):
        return spec
    if isinstance(spec, str):
        try:
            return _LIKELIHOODS[LikelihoodName(spec)]()
        except ValueError:
            pass
    choices = ", ".join(repr(n.value) for n in LikelihoodName)
    raise ValueError(f"unknown likelihood {spec!r}; choose one of {choices} or pass a Likelihood.")
