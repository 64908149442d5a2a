"""The Laplace approximation (MacKay, 1992; Daxberger et al., 2021) of an already trained network.

``fit`` takes the module at its current (trained, MAP) weights ``theta*`` and computes the
curvature of the negative log-likelihood there, the generalised Gauss-Newton matrix ``H``
(:mod:`~bayesdl.posteriors.laplace.curvature`). With a Gaussian prior ``N(0, I / lambda)`` the
posterior over the subset's weights is ``N(theta*, (H + lambda I)^-1)``; ``lambda`` is chosen by
the closed-form marginal likelihood (:mod:`~bayesdl.posteriors.laplace.marglik`) or on
validation data. ``fit`` does not train, unless asked to with ``epochs`` (then the shared fit
loop finds the MAP first, exactly like :class:`~bayesdl.posteriors.deterministic.Deterministic`).

For the output layer (``subset="last_layer"``, the default) nothing is differentiated: the
network runs once up to the layer (a forward pre-hook captures its inputs ``a``), and both the
curvature and the linearised predictive follow from ``a`` in closed form, since the Jacobian of
``f = W a + b`` with respect to ``[W | b]`` is ``I_K (x) [a, 1]^T``. Other subsets use per-example
Jacobians from ``torch.func`` (diagonal, full) or forward hooks and backward passes (KFAC).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from bayesdl import distributed as _distributed
from bayesdl import training
from bayesdl.data import TensorData, as_inputs
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import NetworkObjective, Posterior, register
from bayesdl.posteriors.laplace import curvature as curv
from bayesdl.posteriors.laplace.blocks import public_index, select
from bayesdl.posteriors.laplace.linearized import LinearizedNetwork
from bayesdl.posteriors.laplace.marglik import log_marginal_likelihood, optimal_prior_precision
from bayesdl.posteriors.laplace.options import (
    HessianStructure,
    Predictive,
    PriorFit,
    Subset,
    resolve,
)
from bayesdl.posteriors.laplace.predictive import (
    RegressionMoments,
    closed_form_nll,
    probit,
    regression_moments,
)
from bayesdl.posteriors.laplace.structures import (
    Curvature,
    Diagonal,
    Full,
    Kron,
    from_state,
    row_chunks,
)

__all__ = ["DEFAULT_PRIOR_GRID", "Laplace"]

#: Prior precisions tried by ``prior_fit="validation"``: 41 values from 1e-4 to 1e4.
DEFAULT_PRIOR_GRID: tuple[float, ...] = tuple(10.0 ** (k / 5) for k in range(-20, 21))

_STRUCTURES: dict[HessianStructure, type[Curvature]] = {
    HessianStructure.DIAG: Diagonal,
    HessianStructure.KRON: Kron,
    HessianStructure.FULL: Full,
}
# Rows per chunk when fit walks through tensors (a DataLoader brings its own batches).
_FIT_CHUNK = 2**13
# Training options that mean something without training (batch_size: curvature chunk size).
_WITHOUT_TRAINING = frozenset({"batch_size", "seed", "progress", "distributed"})
_STATE = "laplace."


def _positive(value, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


@register
class Laplace(Posterior):
    """Laplace approximation over a subset of the weights of a trained ``model``.

    Parameters
    ----------
    model:
        The user's trained module (its current weights are the posterior mean).
    likelihood:
        ``"categorical"``, ``"gaussian"`` (heteroscedastic: mean and log-variance outputs) or
        ``"homoscedastic_gaussian"`` (its learned noise is kept fixed), or a matching
        :class:`~bayesdl.likelihoods.Likelihood`.
    subset:
        ``"last_layer"`` (default; the output ``nn.Linear``), ``"all"`` (every trainable
        parameter) or a list of parameter or module names (see :class:`Subset`).
    hessian:
        ``"kron"`` (default; KFAC, ``nn.Linear`` layers only), ``"diag"`` or ``"full"`` (see
        :class:`HessianStructure`).
    prior_precision:
        ``lambda`` of the prior ``N(0, I / lambda)``; the value used when ``prior_fit="none"``
        (``fit`` replaces it otherwise). Settable after ``fit`` (cheap: no new curvature).
    prior_fit:
        ``"marglik"`` (default), ``"validation"`` (needs ``val_data`` in ``fit``) or ``"none"``.
    predictive:
        ``"glm"`` (default; linearised network) or ``"mc"`` (weight-space draws); see
        :class:`Predictive`.
    prior_grid:
        Prior precisions tried by ``prior_fit="validation"`` (default
        :data:`DEFAULT_PRIOR_GRID`).

    Notes
    -----
    ``sample_outputs(x, n_samples)`` returns ``(S, B, K)`` draws of the likelihood's natural
    parameters; ``predict`` turns them into a Prediction. The closed forms are
    :meth:`predictive_probs` (probit) and :meth:`predictive_moments` (regression). Predicting
    before ``fit`` raises a ``ValueError``.
    """

    name = "laplace"
    default_n_samples = 100
    #: There is no posterior before ``fit``: predicting raises (the contract test knows).
    requires_fit: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        subset: Subset | str | list[str] | tuple[str, ...] = Subset.LAST_LAYER,
        hessian: HessianStructure | str = HessianStructure.KRON,
        prior_precision: float = 1.0,
        prior_fit: PriorFit | str = PriorFit.MARGLIK,
        predictive: Predictive | str = Predictive.GLM,
        prior_grid: tuple[float, ...] | list[float] | None = None,
    ) -> None:
        super().__init__(model, likelihood)
        self.hessian = resolve(HessianStructure, hessian, "hessian")
        self.prior_fit = resolve(PriorFit, prior_fit, "prior_fit")
        self.predictive = resolve(Predictive, predictive, "predictive")
        self._prior_precision = _positive(prior_precision, "prior_precision")
        grid = DEFAULT_PRIOR_GRID if prior_grid is None else tuple(prior_grid)
        if not grid:
            raise ValueError("prior_grid must hold at least one prior precision.")
        self.prior_grid = tuple(_positive(v, "every prior_grid value") for v in grid)
        output_hessian = curv.OutputHessian(self.likelihood)
        self.selection = select(model, subset, self.hessian)
        self._subset = subset.value if isinstance(subset, Subset) else subset
        self._public = public_index(self.selection.blocks, self.selection.names)
        self._curvature: Curvature | None = None
        self._log_likelihood: Tensor | None = None
        self._net = LinearizedNetwork(model, self.selection, self.hessian, output_hessian)

    def options(self) -> dict:
        return {
            "subset": self._subset if isinstance(self._subset, str) else list(self._subset),
            "hessian": self.hessian.value,
            "prior_precision": self._prior_precision,
            "prior_fit": self.prior_fit.value,
            "predictive": self.predictive.value,
            "prior_grid": list(self.prior_grid),
        }

    # ----------------------------------------------------------------- properties
    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names (in ``model.named_parameters()``) of the weights with a posterior."""
        return self.selection.names

    @property
    def n_params(self) -> int:
        """Number ``P`` of weights with a posterior."""
        return self.selection.n_params

    @property
    def is_fitted(self) -> bool:
        return self._curvature is not None

    @property
    def prior_precision(self) -> float:
        """``lambda`` of the prior ``N(0, I / lambda)`` over the subset."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _positive(value, "prior_precision")

    # ----------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _evaluating(self):
        was_training = self.network.training
        self.network.eval()
        try:
            yield
        finally:
            self.network.train(was_training)

    def _require_fit(self, action: str) -> Curvature:
        if self._curvature is None:
            raise ValueError(
                f"this Laplace posterior has not been fitted, so it cannot {action}. Call "
                "fit((x_train, y_train)) (or fit(loader)) on the training data of the trained "
                "network first; it computes the curvature at the current weights."
            )
        return self._curvature

    def _inputs(self, x) -> Tensor:
        x = as_inputs(x, dtype=self.dtype, device=self.device)
        self._check_input_shape(x)
        return x

    def _to_public(self, internal: Tensor) -> Tensor:
        index = self._public.to(internal.device)
        return internal[..., index] if internal.ndim == 1 else internal[index][:, index]

    def _objective(self) -> NetworkObjective:
        return NetworkObjective(self.network)

    def _record_input_shape(self, x: Tensor) -> None:
        # The base class probes the output width with draws; before fit there are none, so the
        # probe runs the network at its weights.
        if self.input_shape is not None:
            self._check_input_shape(x)
        with torch.no_grad(), self._evaluating():
            self.likelihood.check_params(self.network(x[:2]))
        self.input_shape = tuple(x.shape[1:])

    # ----------------------------------------------------------------- fitting
    def fit(self, data, *, val_data=None, **training_options) -> training.History:
        """Compute the curvature of the trained network on ``data`` and choose the prior.

        Parameters
        ----------
        data:
            The training data: ``(x, y)`` tensors or numpy arrays, or a DataLoader of
            ``(x, y)`` batches.
        val_data:
            ``(x, y)`` for ``prior_fit="validation"`` (and early stopping when training).
        **training_options:
            Without ``epochs`` nothing is trained: the curvature is taken at the module's
            current weights; ``batch_size`` then sets the rows per curvature chunk (``seed`` and
            ``progress`` are accepted and do nothing). With ``epochs``, the network is first
            trained (MAP) by the shared fit loop with the options of
            :class:`~bayesdl.training.TrainConfig`.

        Returns
        -------
        The :class:`~bayesdl.training.History` of the training, empty when nothing was trained.
        """
        try:
            training.TrainConfig(**training_options)
        except TypeError as err:
            known = ", ".join(training.TrainConfig.__dataclass_fields__)
            raise TypeError(f"{err}; fit accepts {known} and val_data.") from None
        trains = "epochs" in training_options
        unused = sorted(set(training_options) - _WITHOUT_TRAINING)
        if unused and not trains:
            raise ValueError(
                f"Laplace.fit trains only when epochs is given, so {unused} would have no "
                "effect. Pass epochs=... to train the network first, or drop them to compute "
                "the posterior of the network as it is."
            )
        if self.prior_fit is PriorFit.VALIDATION and val_data is None:
            raise ValueError(
                "prior_fit='validation' chooses the prior precision on held-out data: pass "
                "val_data=(x_val, y_val) to fit, or use prior_fit='marglik'."
            )
        if val_data is not None and not trains and self.prior_fit is not PriorFit.VALIDATION:
            raise ValueError(
                "val_data is used only with prior_fit='validation' or for early stopping when "
                "training (epochs=...); drop it, or choose one of those."
            )
        if data is None:
            raise ValueError(
                "Laplace.fit needs the training data, (x, y) or a DataLoader: the curvature is "
                "a sum over the training examples."
            )
        train = self._training_data(data)
        val = None if val_data is None else self._validation_data(val_data)
        history = training.History()
        if trains:
            history = super().fit(data, val_data=val_data, **training_options)
        elif isinstance(train, TensorData):
            self._record_input_shape(train.x)
        chunk = _FIT_CHUNK if trains else training_options.get("batch_size", _FIT_CHUNK)
        group = _distributed.resolve(training_options.get("distributed"))
        if group is not None and isinstance(train, TensorData):
            training._check_same_data(group, train, None)
            lo, hi = group.share(len(train))
            train = train.subset(torch.arange(lo, hi, device=train.x.device))
        self._accumulate(self._batches(train, chunk), group)
        if self.prior_fit is PriorFit.MARGLIK:
            self.optimize_prior_precision()
        elif self.prior_fit is PriorFit.VALIDATION:
            self.optimize_prior_precision(PriorFit.VALIDATION, val_data=val)
        return history

    def _validation_data(self, val_data) -> TensorData:
        val = self._training_data(val_data)
        if not isinstance(val, TensorData):
            raise TypeError("val_data must be a pair (x_val, y_val) of tensors or numpy arrays.")
        self._check_input_shape(val.x)
        return val

    def _batches(self, train, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(train, TensorData):
            for start in range(0, len(train), chunk):
                yield train.x[start : start + chunk], train.y[start : start + chunk]
            return
        for x, y in training.loader_batches(train, self._prepare_batch):
            if self.input_shape is None:
                self._record_input_shape(x)
            yield x, y

    def _accumulate(
        self, batches: Iterator[tuple[Tensor, Tensor]], group: _distributed.Group | None = None
    ) -> None:
        """The curvature and log-likelihood summed over ``batches``; with a process ``group``,
        over every process's batches (each brings its shard of the rows)."""
        sums: dict[str, Tensor] = {}
        log_lik = torch.zeros((), dtype=self.dtype, device=self.device)
        with self._evaluating(), torch.no_grad():
            for x, y in batches:
                f, terms = self._net.curvature_terms(x)
                log_lik = log_lik - self.likelihood.nll(self.likelihood(f), y).sum()
                for key, value in terms.items():
                    sums[key] = sums[key] + value if key in sums else value
            if group is not None:  # a process without rows adds zeros
                shapes = _STRUCTURES[self.hessian].state_shapes(self.selection.blocks)
                for key, shape in shapes.items():
                    if key not in sums:
                        sums[key] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                group.sum_([*sums.values(), log_lik])
                if float(sums.get("n_data", torch.ones(()))) == 0:
                    sums = {}
        if not sums:
            raise ValueError("the training data is empty; pass at least one example.")
        if not all(bool(torch.isfinite(v).all()) for v in sums.values()):
            raise ValueError(
                "the curvature is not finite (NaN or inf): the network's outputs overflow on "
                "this data. Standardise the inputs, or check the trained weights."
            )
        self._curvature = from_state(_STRUCTURES[self.hessian], self.selection.blocks, sums)
        self._log_likelihood = log_lik

    # ----------------------------------------------------------------- prior precision
    def log_marginal_likelihood(self, prior_precision: float | None = None) -> Tensor:
        """Laplace log marginal likelihood of the training data (0-d tensor).

        ``log p(D | theta*) + P/2 log(lambda) - lambda/2 ||theta*||^2 - 1/2 log det(H + lambda
        I)`` at ``prior_precision`` (default: the current one); ``theta*`` is the subset's
        current weights.
        """
        c = self._require_fit("compute its marginal likelihood")
        lam = self._prior_precision if prior_precision is None else prior_precision
        lam = _positive(lam, "prior_precision")
        theta = self._net.theta()
        return log_marginal_likelihood(self._log_likelihood, c.eigenvalues(), theta @ theta, lam)

    def optimize_prior_precision(
        self, method: PriorFit | str = PriorFit.MARGLIK, *, val_data=None
    ) -> float:
        """Choose the prior precision, set it, and return it.

        ``method="marglik"`` maximises :meth:`log_marginal_likelihood` exactly (1-d root
        finding); ``"validation"`` takes the value of ``prior_grid`` with the lowest mean
        negative log predictive density (probit for classification, the closed-form Gaussian
        moments for regression) on ``val_data=(x, y)``.
        """
        method = resolve(PriorFit, method, "method")
        c = self._require_fit("choose its prior precision")
        if method is PriorFit.MARGLIK:
            theta = self._net.theta()
            self._prior_precision = optimal_prior_precision(c.eigenvalues(), theta @ theta)
        elif method is PriorFit.VALIDATION:
            if val_data is None:
                raise ValueError("method='validation' needs val_data=(x_val, y_val).")
            val = val_data if isinstance(val_data, TensorData) else self._validation_data(val_data)
            nll = self.validation_nll(val.x, val.y, self.prior_grid)
            self._prior_precision = self.prior_grid[int(torch.argmin(nll))]
        return self._prior_precision

    def validation_nll(self, x, y, prior_precisions) -> Tensor:
        """Mean closed-form negative log predictive density of ``(x, y)`` for each prior
        precision, ``(G,)``; the criterion of ``prior_fit="validation"``."""
        self._require_fit("score a prior precision")
        val = self._validation_data((x, y))
        grid = [_positive(v, "prior precision") for v in prior_precisions]
        totals = torch.zeros(len(grid), dtype=torch.float64)
        with self._evaluating(), torch.no_grad():
            for rows in row_chunks(len(val), 4 * self.n_params):
                f, cache = self._net.linearize(val.x[rows])
                for i, lam in enumerate(grid):
                    cov = self._net.covariance(self._curvature, cache, lam)
                    nll = closed_form_nll(self.likelihood, f, cov, val.y[rows])
                    totals[i] += float(nll.double().sum())
        return totals / len(val)

    # ----------------------------------------------------------------- predictive
    def functional_distribution(self, x) -> tuple[Tensor, Tensor]:
        """The linearised network's Gaussian over raw outputs at ``x``.

        Returns
        -------
        ``(f, cov)``: the outputs at the posterior mean ``(B, K)`` and ``J Sigma J^T``
        ``(B, K, K)``.
        """
        self._require_fit("predict")
        x = self._inputs(x)
        with self._evaluating(), torch.no_grad():
            f, cache = self._net.linearize(x)
            return f, self._net.covariance(self._curvature, cache, self._prior_precision)

    def predictive_probs(self, x) -> Tensor:
        """Probit approximation of the linearised predictive, ``(B, C)`` (classification)."""
        if self.task != "classification":
            raise ValueError(
                "predictive_probs is for classification; for regression use predictive_moments."
            )
        return probit(*self.functional_distribution(x))

    def predictive_moments(self, x) -> RegressionMoments:
        """Closed-form mean, aleatoric and epistemic variance of the linearised predictive."""
        if self.task != "regression":
            raise ValueError(
                "predictive_moments is for regression; for classification use predictive_probs."
            )
        return regression_moments(self.likelihood, *self.functional_distribution(x))

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        c = self._require_fit("predict")
        with self._evaluating():
            raw = self._net.sample(
                c, x, n_samples, self._prior_precision, self.predictive, generator
            )
        return self.likelihood(raw)

    # ----------------------------------------------------------------- dense views
    def posterior_mean(self) -> Tensor:
        """The subset's weights ``theta*`` ``(P,)``, in the order of :attr:`parameter_names`."""
        return self._to_public(self._net.theta())

    def hessian_matrix(self) -> Tensor:
        """The GGN ``H`` as a dense ``(P, P)`` matrix (public order); for small subsets."""
        return self._to_public(self._require_fit("give its Hessian").dense())

    def posterior_precision(self) -> Tensor:
        """``H + lambda I``, dense ``(P, P)`` (public order)."""
        h = self.hessian_matrix()
        return h + self._prior_precision * torch.eye(len(h), dtype=h.dtype, device=h.device)

    def posterior_covariance(self) -> Tensor:
        """``(H + lambda I)^-1``, dense ``(P, P)`` (public order)."""
        c = self._require_fit("give its covariance")
        return self._to_public(c.dense_covariance(self._prior_precision))

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Tensor]:
        state = super()._extra_state()
        if self._curvature is not None:
            state.update({f"{_STATE}curvature.{k}": v for k, v in self._curvature.state().items()})
            state[f"{_STATE}log_likelihood"] = self._log_likelihood
            ref = self._log_likelihood
            state[f"{_STATE}prior_precision"] = torch.tensor(
                self._prior_precision, dtype=torch.float64, device=ref.device
            )
        return state

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        own = {k: v for k, v in state.items() if k.startswith(_STATE)}
        super()._load_extra_state({k: v for k, v in state.items() if k not in own})
        if not own:
            self._curvature = self._log_likelihood = None
            return
        kind = _STRUCTURES[self.hessian]
        want = {
            f"{_STATE}curvature.{k}": shape
            for k, shape in kind.state_shapes(self.selection.blocks).items()
        }
        want[f"{_STATE}log_likelihood"] = want[f"{_STATE}prior_precision"] = ()
        missing, unexpected = sorted(set(want) - set(own)), sorted(set(own) - set(want))
        if missing or unexpected:
            raise RuntimeError(
                f"missing keys {missing}, unexpected keys {unexpected} (was it saved with "
                f"hessian={self.hessian.value!r} and the same subset?)"
            )
        for key, shape in want.items():
            if tuple(own[key].shape) != shape:
                raise RuntimeError(f"{key} has shape {tuple(own[key].shape)}, expected {shape}")
        prefix = f"{_STATE}curvature."
        tensors = {
            k.removeprefix(prefix): v.to(device=self.device, dtype=self.dtype)
            for k, v in own.items()
            if k.startswith(prefix)
        }
        self._curvature = from_state(kind, self.selection.blocks, tensors)
        self._log_likelihood = own[f"{_STATE}log_likelihood"].to(self.device, self.dtype)
        self._prior_precision = _positive(
            float(own[f"{_STATE}prior_precision"]), "the saved prior_precision"
        )
