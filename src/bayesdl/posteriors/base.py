"""The contract every approximate posterior implements, and the registry that names them.

A :class:`Posterior` wraps the user's ``nn.Module`` and a likelihood. Subclasses implement two
hooks:

* ``_sample_outputs(x, n_samples, generator) -> (S, B, K)``: the likelihood's natural
  parameters (logits; mean and log-variance) under ``S`` parameter draws, computed in batched
  kernels, never a Python loop of ``S`` forward passes;
* ``_objective()``: what the shared fit loop (:mod:`bayesdl.training`) minimises.

Everything at the boundary (input conversion and checks, ``n_samples``, the generator, output
width, fitting, saving) lives here once.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from bayesdl import distributed as _distributed
from bayesdl import training
from bayesdl.data import TensorData, as_inputs, as_training_data
from bayesdl.likelihoods import Likelihood, get_likelihood
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

__all__ = [
    "Network",
    "NetworkObjective",
    "Posterior",
    "available_posteriors",
    "get_posterior",
    "register",
]

_INPUT_SHAPE_KEY = "meta.input_shape"

#: ``(lo, hi, total)`` while one process of a distributed prediction computes rows ``[lo, hi)``
#: of ``total``: methods that size their chunks by the rows, or draw noise per row, use it to
#: draw exactly what a single process draws for those rows.
PREDICTION_SHARE: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar(
    "bayesdl_prediction_share", default=None
)


def prediction_rows(rows: int) -> int:
    """The rows of the whole prediction: ``rows``, or all processes' during a distributed one
    (for methods that size their chunks of draws by the rows, as a single process does)."""
    share = PREDICTION_SHARE.get()
    return rows if share is None else share[2]


def refuse_options(method: str, options: dict, fixed: dict[str, tuple], why: str) -> None:
    """A ``ValueError`` for a ``fit`` option ``method`` sets itself: one of ``fixed`` (name ->
    the values allowed) given another value; ``why`` says what replaces it."""
    for name, allowed in fixed.items():
        if name in options and options[name] not in allowed:
            raise ValueError(f"{method} sets {name} itself ({why}); drop {name}={options[name]!r}.")


def prediction_offset(rows: int) -> tuple[int, int]:
    """``(first, total)``: where this call's ``rows`` rows start among all the rows of the
    prediction, and how many those are (``(0, rows)`` unless a distributed prediction runs, see
    :data:`PREDICTION_SHARE`). Noise drawn per row for ``total`` rows and narrowed to
    ``[first, first + rows)`` is what a single process draws for these rows."""
    share = PREDICTION_SHARE.get()
    if share is None:
        return 0, rows
    lo, hi, total = share
    if hi - lo != rows:
        raise RuntimeError(f"drawing for {rows} rows, but this process's share is {hi - lo}")
    return lo, total


def shared_rows(draw, rows: int, *, axis: int = 0) -> Tensor:
    """``draw(n)`` of noise with ``n`` rows along ``axis``: for ``rows`` rows alone, or, during a
    distributed prediction (:data:`PREDICTION_SHARE`), the process's slice of a draw for all
    the rows, so each row gets the noise it gets in a single process."""
    lo, total = prediction_offset(rows)
    return draw(rows) if total == rows else draw(total).narrow(axis, lo, rows)


class Network(nn.Module):
    """The user's module followed by the likelihood's link: ``x -> likelihood(model(x))``."""

    def __init__(self, model: nn.Module, likelihood: Likelihood) -> None:
        super().__init__()
        self.model = model
        self.likelihood = likelihood

    def forward(self, x: Tensor) -> Tensor:
        return self.likelihood(self.model(x))


class NetworkObjective:
    """Training objective of one network: mean NLL over the batch (plus nothing else).

    The shared objective of the methods that train the user's network as it is (the point
    estimate, MC dropout); ``loss`` is what the fit loop minimises.
    """

    n_orders = 1

    def __init__(self, network: Network) -> None:
        self.network = network

    def parameters(self) -> list[Tensor]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def state(self) -> list[Tensor]:
        return [*self.network.parameters(), *self.network.buffers()]

    def train(self, mode: bool) -> None:
        self.network.train(mode)

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        return self.network.likelihood.training_loss(self.network(x), y).mean()

    def val_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.network.likelihood.validation_loss(self.network(x), y).mean()


class Posterior(ABC):
    """An approximate posterior over the parameters of one user network.

    Parameters
    ----------
    model:
        The user's ``nn.Module``; batch-first inputs ``(B, ...)``, outputs ``(B, K)``.
    likelihood:
        A :class:`~bayesdl.likelihoods.Likelihood` or its name: ``"categorical"`` (logits),
        ``"gaussian"`` (mean and log-variance outputs) or ``"homoscedastic_gaussian"``.
    """

    #: Registry key, e.g. ``"mc_dropout"``.
    name: ClassVar[str]
    #: Draws used when ``n_samples`` is ``None``.
    default_n_samples: ClassVar[int] = 100

    def __init__(self, model: nn.Module, likelihood: str | Likelihood = "categorical") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        ref = next(model.parameters(), None)
        if ref is None:
            raise ValueError("model has no parameters; there is nothing to put a posterior on.")
        self.likelihood = get_likelihood(likelihood).to(device=ref.device, dtype=ref.dtype)
        self.network = Network(model, self.likelihood)
        #: Shape of one input example, recorded by ``fit`` and checked by ``predict``.
        self.input_shape: tuple[int, ...] | None = None

    # ----------------------------------------------------------------- properties
    @property
    def model(self) -> nn.Module:
        """The user's module."""
        return self.network.model

    @property
    def _reference(self) -> Tensor:
        return next(self.network.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self._reference.dtype

    @property
    def device(self) -> torch.device:
        return self._reference.device

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``, from the likelihood."""
        return self.likelihood.task

    # ----------------------------------------------------------------- hooks
    @abstractmethod
    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Natural parameters under ``n_samples`` draws, ``(S, B, K)``; ``x`` is validated."""

    @abstractmethod
    def _objective(self) -> training.Objective:
        """The objective the shared fit loop minimises."""

    def _resolve_n_samples(self, n_samples: int | None) -> int:
        if n_samples is None:
            return self.default_n_samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        return n_samples

    def options(self) -> dict:
        """The method's constructor options as plain JSON values: ``type(self)(model,
        likelihood, **options())`` builds an equal, unfitted posterior (model files record it)."""
        return {}

    @classmethod
    def _from_options(cls, model: nn.Module, likelihood: Likelihood, options: dict) -> Posterior:
        """Build from what :meth:`options` returned (a method whose options are not all plain
        values, such as a prior object, converts them back here)."""
        return cls(model, likelihood, **options)

    def _extra_state(self) -> dict[str, Tensor]:
        """Tensors of the method's own state; by default the network's state dict."""
        return {f"network.{k}": v for k, v in self.network.state_dict().items()}

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.network.load_state_dict(
            {k.removeprefix("network."): v for k, v in state.items()}, strict=True
        )

    # ----------------------------------------------------------------- the contract
    def fit(self, data, *, val_data=None, **training_options) -> training.History:
        """Train on ``data``: a pair ``(x, y)`` of tensors or numpy arrays, or a DataLoader.

        Keyword arguments are those of :class:`bayesdl.training.TrainConfig` (``epochs``,
        ``batch_size``, ``lr``, ``weight_decay``, ``optimizer``, ``val_fraction``,
        ``patience``, ``seed``, ``progress``, ``checkpoint_dir``, ``checkpoint_every``,
        ``resume`` for checkpoints that a killed fit resumes from, and ``distributed``,
        ``parallel`` for a fit over several processes, see :mod:`bayesdl.distributed`);
        ``val_data`` is an optional ``(x, y)`` pair.
        Returns the :class:`~bayesdl.training.History`. If the loss diverges, a
        :class:`~bayesdl.training.TrainingDivergedError` is raised and the posterior keeps the
        weights of the last good epoch.
        """
        try:
            config = training.TrainConfig(**training_options)
        except TypeError as err:
            known = ", ".join(training.TrainConfig.__dataclass_fields__)
            raise TypeError(f"{err}; fit accepts {known} and val_data.") from None
        train = self._training_data(data)
        val = None if val_data is None else self._training_data(val_data)
        if isinstance(train, TensorData):
            self._record_input_shape(train.x)
        if val is not None:
            self._check_input_shape(val.x)
        group = _distributed.resolve(config.distributed)
        sharded = group is not None and config.parallel is training.Parallel.MEMBERS
        with self._member_shard(group) if sharded else contextlib.nullcontext() as members:
            return training.fit(
                self._objective(),
                train,
                config,
                val=val,
                prepare=self._prepare_batch,
                device=self.device,
                identity=self._identity(),
                members=members,
            )

    def _member_shard(self, group: _distributed.Group):
        """A context in which the posterior holds only this process's share of its stacked
        members, yielding the :class:`~bayesdl.distributed.MemberShard` (and gathering the
        members on leaving); ``None`` for methods without stacked members."""
        return contextlib.nullcontext()

    def _identity(self) -> dict:
        """What a checkpoint of this posterior's fit must match to be resumed: the method, its
        options and the likelihood (the loop adds the shapes of the trained tensors)."""
        return {
            "method": self.name,
            "options": self.options(),
            "likelihood": self.likelihood.name or type(self.likelihood).__name__,
            "likelihood_options": self.likelihood.options(),
        }

    def sample_outputs(
        self,
        x,
        n_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        distributed: bool = False,
    ) -> Tensor:
        """Network outputs (the likelihood's natural parameters) under ``S`` posterior draws.

        Parameters
        ----------
        x:
            Inputs ``(B, ...)``, tensor or numpy array.
        n_samples:
            Number of draws ``S``; ``None`` uses the method's default.
        generator:
            A ``torch.Generator`` on the model's device for reproducible draws.
        distributed:
            ``True``: every process of the ``torch.distributed`` group calls this with the same
            ``x``; each computes a contiguous share of the rows and all get the gathered
            outputs. With the same generator state on every process, the weight draws are those
            of a single process (per-example noise, such as dropout masks, differs). Default
            ``False``: this process alone (the safe choice when only some processes predict).

        Returns
        -------
        Tensor of shape ``(S, B, K)``.
        """
        x = as_inputs(x, dtype=self.dtype, device=self.device)
        self._check_input_shape(x)
        n = self._resolve_n_samples(n_samples)
        self._check_generator(generator)
        group = _distributed.resolve(distributed) if distributed is not False else None
        with torch.no_grad():
            if group is None:
                out = self._sample_outputs(x, n, generator)
            else:
                out = self._sample_share(x, n, generator, group)
        self.likelihood.check_params(out)
        return out

    def _sample_share(self, x: Tensor, n: int, generator, group: _distributed.Group) -> Tensor:
        lo, hi = group.share(len(x))
        # A process without rows draws for the first row (discarded), in step with the others.
        share = (lo, hi, len(x)) if hi > lo else (0, 1, len(x))
        token = PREDICTION_SHARE.set(share)
        try:
            out = self._sample_outputs(x[share[0] : share[1]], n, generator)[:, : hi - lo]
        finally:
            PREDICTION_SHARE.reset(token)
        return group.gather(out.to(group.device), dim=1).to(self.device)

    def predict(
        self,
        x,
        n_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        distributed: bool = False,
    ) -> ClassificationPrediction | RegressionPrediction:
        """Predictive distribution at ``x`` from ``S`` draws (see :mod:`bayesdl.predictions`);
        ``distributed`` as for :meth:`sample_outputs`."""
        outputs = self.sample_outputs(x, n_samples, generator=generator, distributed=distributed)
        return self.likelihood.predictive(outputs)

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to rebuild this posterior on the same module (flat, tensors only)."""
        state = dict(self._extra_state())
        if self.input_shape is not None:
            state[_INPUT_SHAPE_KEY] = torch.tensor(self.input_shape, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, Tensor], *, assign: bool = False) -> None:
        """Load what :meth:`state_dict` returned (from a posterior built the same way).

        With ``assign=True`` (as ``nn.Module.load_state_dict``'s), methods that can take the
        given tensors as their own storage instead of copying them (the stacked members of
        deep ensembles and SWAG): faster for large states; the tensors must not be used
        elsewhere afterwards.
        """
        state = dict(state)
        shape = state.pop(_INPUT_SHAPE_KEY, None)
        self._assigning = assign
        try:
            self._load_extra_state(state)
        except RuntimeError as err:
            raise ValueError(
                f"this state does not fit {type(self).__name__} on this model: {err}. Build the "
                "posterior with the same module and options as the one that was saved."
            ) from None
        finally:
            self._assigning = False
        self.input_shape = None if shape is None else tuple(int(s) for s in shape)

    _assigning = False

    def _take(self, target: Tensor, source: Tensor) -> None:
        """Load ``source`` into ``target`` (same shape): a copy, or with ``assign`` (see
        :meth:`load_state_dict`) ``source`` itself as ``target``'s storage (converted to its
        dtype and device where they differ)."""
        placeholder = target.numel() > 1 and 0 in target.stride()  # see StackedMembers
        with torch.no_grad():
            if self._assigning or placeholder:
                target.set_(source.to(dtype=target.dtype, device=target.device).contiguous())
            else:
                target.copy_(source)

    # ----------------------------------------------------------------- boundary helpers
    def _training_data(self, data):
        return as_training_data(
            data,
            dtype=self.dtype,
            device=self.device,
            check_targets=self.likelihood.check_targets,
        )

    def _prepare_batch(self, batch) -> tuple[Tensor, Tensor]:
        x = as_inputs(batch[0], dtype=self.dtype, device=self.device)
        self._check_input_shape(x)
        y = self.likelihood.check_targets(torch.as_tensor(batch[1]))
        if len(y) != len(x):
            raise ValueError(f"a batch has {len(x)} inputs but {len(y)} targets.")
        return x, (y.to(self.dtype) if y.is_floating_point() else y).to(self.device)

    def _probe_n_samples(self) -> int:
        """Draws used to check the output width before training (few: it is only a probe)."""
        return self._resolve_n_samples(None)

    def _record_input_shape(self, x: Tensor) -> None:
        if self.input_shape is not None:
            self._check_input_shape(x)
            return  # checked when it was recorded
        with torch.no_grad():
            self.likelihood.check_params(self._sample_outputs(x[:2], self._probe_n_samples(), None))
        self.input_shape = tuple(x.shape[1:])

    def _check_input_shape(self, x: Tensor) -> None:
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            n = self.input_shape[0] if len(self.input_shape) == 1 else self.input_shape
            got = x.shape[1] if x.ndim == 2 else tuple(x.shape[1:])
            raise ValueError(
                f"x has the wrong number of features: the model was fitted on examples of shape "
                f"{self.input_shape} ({n} features), got {tuple(x.shape[1:])} ({got}). Pass "
                f"inputs of shape (B, {', '.join(map(str, self.input_shape))})."
            )

    def _check_generator(self, generator: torch.Generator | None) -> None:
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator.device.type != self.device.type:
            raise ValueError(
                f"the generator lives on {generator.device} but the model on {self.device}; "
                f"create it with torch.Generator(device={str(self.device)!r})."
            )


_REGISTRY: dict[str, type[Posterior]] = {}


def register(cls: type[Posterior]) -> type[Posterior]:
    """Class decorator: make a posterior available by its ``name`` (CLI, benchmarks, tests)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a posterior named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


def available_posteriors() -> list[str]:
    """Names of the registered posteriors."""
    return sorted(_REGISTRY)


def get_posterior(name: str) -> type[Posterior]:
    """The posterior class registered under ``name`` (e.g. ``"mc_dropout"``)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        choices = ", ".join(repr(n) for n in available_posteriors())
        raise ValueError(f"unknown posterior {name!r}; choose one of {choices}.") from None
