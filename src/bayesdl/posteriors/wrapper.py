"""What wraps a fitted posterior (a calibration, a conformal threshold) and predicts like it.

A :class:`PosteriorWrapper` holds a fitted :class:`~bayesdl.posteriors.base.Posterior` (or
another wrapper) and exposes the prediction side of its contract: ``sample_outputs`` and
``predict``, after an optional :meth:`~PosteriorWrapper.transform` of the draws' outputs. A
subclass adds its own few numbers, which :meth:`~PosteriorWrapper.wrapper_options` reports as
plain JSON so that model files (:mod:`bayesdl.io`) can save and rebuild the whole chain.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import Posterior
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

__all__ = ["PosteriorWrapper", "check_posterior"]


class PosteriorWrapper:
    """Base class: a fitted posterior with something fitted on top of it.

    Parameters
    ----------
    posterior:
        A fitted :class:`~bayesdl.posteriors.base.Posterior` or another wrapper.
    """

    #: Name in model files, e.g. ``"calibration"``.
    wrapper_name: ClassVar[str]

    def __init__(self, posterior: Posterior | PosteriorWrapper) -> None:
        check_posterior(posterior)
        self.posterior = posterior

    # The read-only properties of the wrapped posterior.
    @property
    def likelihood(self) -> Likelihood:
        return self.posterior.likelihood

    @property
    def task(self) -> str:
        return self.posterior.task

    @property
    def dtype(self) -> torch.dtype:
        return self.posterior.dtype

    @property
    def device(self) -> torch.device:
        return self.posterior.device

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.posterior.input_shape

    @property
    def default_n_samples(self) -> int:
        return self.posterior.default_n_samples

    @property
    def base(self) -> Posterior:
        """The posterior at the bottom of the chain of wrappers."""
        inner = self.posterior
        return inner.base if isinstance(inner, PosteriorWrapper) else inner

    def transform(self, outputs: Tensor) -> Tensor:
        """The wrapped posterior's outputs ``(S, B, K)`` as this wrapper predicts from them
        (unchanged unless a subclass says otherwise)."""
        return outputs

    def sample_outputs(
        self,
        x,
        n_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        distributed: bool = False,
    ) -> Tensor:
        """The wrapped posterior's outputs under ``S`` draws, transformed; ``(S, B, K)``."""
        return self.transform(
            self.posterior.sample_outputs(
                x, n_samples, generator=generator, distributed=distributed
            )
        )

    def predict(
        self,
        x,
        n_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        distributed: bool = False,
    ) -> ClassificationPrediction | RegressionPrediction:
        """Predictive distribution at ``x`` from ``S`` draws of the transformed outputs."""
        outputs = self.sample_outputs(x, n_samples, generator=generator, distributed=distributed)
        return self.likelihood.predictive(outputs)

    def wrapper_options(self) -> dict:
        """This wrapper's own numbers as plain JSON values: ``type(self)._rewrap(posterior,
        wrapper_options())`` rebuilds it around the same posterior."""
        raise NotImplementedError

    @classmethod
    def _rewrap(cls, posterior, options: dict) -> PosteriorWrapper:
        return cls(posterior, **options)


def check_posterior(posterior: object) -> None:
    """A fitted bayesdl Posterior or wrapper, else a ``TypeError``."""
    if not isinstance(posterior, (Posterior, PosteriorWrapper)):
        raise TypeError(
            "expected a fitted bayesdl Posterior (e.g. bdl.DeepEnsemble) or a posterior wrapped "
            f"by calibration or conformal prediction, got {type(posterior).__name__}."
        )
