"""Mean-field variational inference (Bayes by Backprop, Blundell et al. 2015) for any module.

A factorised Gaussian ``q(w) = N(mu, sigma^2)`` over the chosen parameters of the user's module,
with ``sigma = exp(log_std)``. The module is never re-implemented: weights enter it
through a functional call (their slots are swapped for sampled tensors), so Linear, Conv,
recurrent and custom layers all work as written.

Training minimises the negative ELBO per example,

    loss = mean over the batch and the draws of NLL(y | x, w)  +  kl_weight * KL(q || p) / N,

with the KL summed over every Bayesian parameter and divided by the training-set size ``N`` (so
``N * loss`` is the mini-batch estimate of the full negative ELBO; a Gaussian likelihood with
``beta > 0`` replaces the NLL by its beta-NLL training loss). All ``mu`` and ``log_std`` live
in two flat vectors, so sampling and the KL are a handful of large kernels per step, not a few
per parameter tensor.

Gradient estimators (:class:`Estimator`): plain reparameterisation samples the weights (any
layer); the local reparameterisation trick and Flipout serve ``nn.Linear`` and ``nn.Conv1d/2d/3d``
layers by perturbing their outputs instead (the other Bayesian layers of the same model keep
weight sampling). They only change training.

Prediction (:class:`PredictionNoise`) draws ``S`` weight sets at once through
:class:`~bayesdl.posteriors.stacked.StackedModule`, except, by default, in the ``nn.Linear``
layers that take the model's input itself (the first layer of an MLP). Their input is the same
under every draw, so the local reparameterisation trick is exact there and cheap: the
pre-activations of row ``b`` under a draw are ``N(x_b mu_W^T + mu_b, x_b^2 (sigma_W^2)^T +
sigma_b^2)`` (independent units), computed from two matrix products for all draws together plus
``rows x out`` normals per draw, instead of one product and ``in x out`` normals per draw. Every
row's predictive distribution is exactly that of whole weight draws; what changes is that two
rows of one call no longer share that layer's draw (their outputs are independent given the
other layers' weights), as rows already are under MC dropout. ``prediction_noise="weights"``
keeps whole weight sets, e.g. for joint draws over rows.

Training noise (:class:`TrainingNoise`). On a CPU, filling one fresh normal per weight per step
costs as much as a third of a step of the deterministic network (the generator is serial and
does about 200-300 M numbers a second per core). By default a training step's standard normals
are therefore a window at a uniformly random offset of a *pool* of ``POOL_FACTOR * P`` (at least
``MIN_PARALLEL``) fresh normals, redrawn every ``POOL_STEPS`` steps. Any window of an i.i.d.
sequence is i.i.d., so each step's draw is exactly ``N(0, I)`` and each step's gradient estimate
is unbiased as before; what changes is that two steps of the same pool see shifted copies of some
of the same numbers (a weight's noise at two steps still comes from different pool entries
unless the two offsets coincide). Tested: on a 10,000-weight conjugate model, pooled and fresh
noise land equally close to the closed-form optimum. Models with at most
``POOL_FRESH_BELOW / POOL_STEPS`` (8192) Bayesian parameters get disjoint windows, i.e. fresh
numbers. ``training_noise="fresh"`` draws every step's numbers anew. Prediction always uses
fresh, independent draws.

The training step itself (:class:`~bayesdl.posteriors.vi_estimators.SampleWithGaussianKLInto`)
writes the standard deviations, the sampled weights and the two gradients into buffers kept for
the whole fit, instead of allocating four ``P``-sized tensors per step.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesdl._options import resolve
from bayesdl._random import MIN_PARALLEL, randn
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import Posterior, prediction_offset, prediction_rows, register
from bayesdl.posteriors.stacked import (
    LocalLinear,
    PredictionNoise,
    StackedCall,
    StackedModule,
    local_plan,
)
from bayesdl.posteriors.vi_estimators import (
    LOCAL_LAYERS,
    Estimator,
    FitWorkspace,
    LocalNoise,
    SampleWithGaussianKL,
    SampleWithGaussianKLInto,
)
from bayesdl.posteriors.vi_estimators import exp as fast_exp
from bayesdl.priors import GaussianPrior, Prior, prior_from_options

__all__ = ["Estimator", "MeanFieldVI", "PredictionNoise", "TrainingNoise", "VIDiagnostics"]

_DEFAULT_CHUNK_ROWS = 2**11
#: Length of the training-noise pool in units of ``P`` (``training_noise="pooled"``); at least
#: ``MIN_PARALLEL`` numbers, so that the pool is filled by parallel streams.
POOL_FACTOR = 4
#: Training steps served by one pool before it is redrawn.
POOL_STEPS = 128
#: Pools of up to this many numbers hold ``POOL_STEPS`` disjoint windows (fresh noise): for
#: small models fresh numbers cost nothing worth saving.
POOL_FRESH_BELOW = 2**20


class TrainingNoise(str, Enum):
    """Where a training step's standard normals come from (see the module docstring)."""

    #: A window at a random offset of a pool of fresh normals, redrawn every ``POOL_STEPS``.
    POOLED = "pooled"
    #: Every step draws ``P`` (times the draws per step) fresh numbers.
    FRESH = "fresh"


@dataclass
class VIDiagnostics:
    """What a fitted mean-field posterior looks like, per Bayesian parameter tensor.

    Attributes
    ----------
    rows:
        One dict per tensor: ``name``, ``numel``, ``snr`` (mean of ``|mu| / sigma``),
        ``kl_per_parameter`` (nats), ``mean_std``, ``at_floor`` (fraction of stds at the floor).
    total_kl:
        KL(q || p) summed over all Bayesian parameters.
    warnings:
        Collapse warnings in words (also issued with :func:`warnings.warn`).
    """

    rows: list[dict] = field(default_factory=list)
    total_kl: float = 0.0
    warnings: list[str] = field(default_factory=list)


@register
class MeanFieldVI(Posterior):
    """Factorised Gaussian variational posterior over the parameters of ``model``.

    Parameters
    ----------
    model:
        The user's module; its current weights are the initial means (a pretrained net is a
        starting point).
    likelihood:
        See :class:`~bayesdl.posteriors.base.Posterior`.
    prior:
        A :class:`~bayesdl.priors.Prior` (default ``GaussianPrior(1.0)``).
    bayesian:
        Which parameters get a distribution: ``None`` for all of the model's, or names and
        module prefixes (e.g. ``["4"]`` for the module named ``4``, or ``["4.weight"]``). The
        others are point estimates trained alongside.
    init_std:
        Posterior standard deviation at initialisation.
    min_std:
        Optional floor of the standard deviation (default 0: none). The standard deviation is
        parametrised by its logarithm, ``sigma = exp(log_std)``.
    estimator:
        An :class:`Estimator` for every Linear/Conv layer, or a dict ``{module name:
        estimator}``; other Bayesian layers use reparameterisation.
    kl_weight:
        Multiplies ``KL / N``; 1 is the full ELBO.
    kl_annealing_epochs:
        Ramp the KL weight linearly from ``1/A`` to 1 over the first ``A`` epochs (0: off).
    n_train_samples:
        Weight draws per training step (their NLLs are averaged).
    training_noise:
        A :class:`TrainingNoise`: ``"pooled"`` (default; each step's normals are a random window
        of a pool redrawn every ``POOL_STEPS`` steps, exactly ``N(0, I)`` per step) or
        ``"fresh"``. Prediction always draws fresh numbers.
    chunk_size:
        Weight sets sampled at once at prediction (``None``: enough for a parallel draw of the
        noise; they are then applied in chunks of about 2^11 rows, near cache size).
    prediction_noise:
        A :class:`PredictionNoise`: ``"local"`` (default; the local reparameterisation trick in
        the linear layers that take the model's input, exact per row and cheaper) or
        ``"weights"`` (whole weight sets, shared by the rows of a call).
    """

    name = "mean_field_vi"
    default_n_samples = 100

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        prior: Prior | None = None,
        bayesian: Sequence[str] | None = None,
        init_std: float = 1e-3,
        min_std: float = 0.0,
        estimator: Estimator | str | dict[str, Estimator | str] = Estimator.REPARAMETERIZATION,
        kl_weight: float = 1.0,
        kl_annealing_epochs: int = 0,
        n_train_samples: int = 1,
        training_noise: TrainingNoise | str = TrainingNoise.POOLED,
        chunk_size: int | None = None,
        prediction_noise: PredictionNoise | str = PredictionNoise.LOCAL,
    ) -> None:
        super().__init__(model, likelihood)
        self.prior = GaussianPrior(1.0) if prior is None else prior
        if not isinstance(self.prior, Prior):
            raise TypeError(f"prior must be a bayesdl.priors.Prior, got {type(prior).__name__}.")
        if not (isinstance(min_std, (int, float)) and min_std >= 0):
            raise ValueError(f"min_std must be a number >= 0, got {min_std!r}.")
        if not (isinstance(init_std, (int, float)) and init_std > min_std):
            raise ValueError(f"init_std must be a number > min_std ({min_std}), got {init_std!r}.")
        if not (isinstance(kl_weight, (int, float)) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a number >= 0, got {kl_weight!r}.")
        for label, value in (("kl_annealing_epochs", kl_annealing_epochs),):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, got {value!r}.")
        if isinstance(n_train_samples, bool) or not isinstance(n_train_samples, int):
            raise ValueError(
                f"n_train_samples must be a positive integer, got {n_train_samples!r}."
            )
        if n_train_samples < 1:
            raise ValueError(
                f"n_train_samples must be a positive integer, got {n_train_samples!r}."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}.")
        self.min_std = float(min_std)
        self.init_std = float(init_std)
        self.kl_weight = float(kl_weight)
        self.kl_annealing_epochs = kl_annealing_epochs
        self.n_train_samples = n_train_samples
        self.training_noise = resolve(TrainingNoise, training_noise, "training_noise")
        self.chunk_size = chunk_size
        self.prediction_noise = resolve(PredictionNoise, prediction_noise, "prediction_noise")
        self._epoch = 1
        self._noise: Tensor | None = None
        self._noise_next = 0
        self._offsets: list[int] = []
        self._workspace: FitWorkspace | None = None  # set while fit() runs
        self._last_noise: Tensor | None = None  # the latest training draw's noise (for tests)
        self._queued: list[Tensor] = []  # noise drawn ahead by a distributed fit

        names = self._resolve_bayesian(bayesian)
        params = dict(self.network.named_parameters())
        self.bayesian_names: tuple[str, ...] = names
        self._layout: list[tuple[str, int, torch.Size]] = []
        offset = 0
        for name in names:
            shape = params[name].shape
            self._layout.append((name, offset, shape))
            offset += params[name].numel()
        with torch.no_grad():
            mu = torch.cat([params[n].detach().reshape(-1) for n in names])
        #: Flat posterior means and log standard deviations of all Bayesian parameters, ``(P,)``.
        self.mu = mu.clone().requires_grad_(True)
        self.log_std = torch.full_like(mu, math.log(init_std)).requires_grad_(True)
        self.estimators = self._resolve_estimators(estimator)
        self._swap = StackedCall(self.network, names)
        placeholders = {n: p.detach()[None] for n, p in params.items()}
        buffers = {n: b[None] for n, b in self.network.named_buffers()}
        self._stack = StackedModule(self.network, placeholders, buffers)

    # ------------------------------------------------------------------ options
    def options(self) -> dict:
        return {
            "prior": {"name": self.prior.name, "options": self.prior.options()},
            "bayesian": [n.removeprefix("model.") for n in self.bayesian_names],
            "init_std": self.init_std,
            "min_std": self.min_std,
            "estimator": {
                name.removeprefix("model").removeprefix("."): e.value
                for name, e in self.estimators.items()
            },
            "kl_weight": self.kl_weight,
            "kl_annealing_epochs": self.kl_annealing_epochs,
            "n_train_samples": self.n_train_samples,
            "training_noise": self.training_noise.value,
            "chunk_size": self.chunk_size,
            "prediction_noise": self.prediction_noise.value,
        }

    @classmethod
    def _from_options(cls, model, likelihood, options: dict):
        prior = options.get("prior")
        if isinstance(prior, dict):
            options = {**options, "prior": prior_from_options(prior["name"], prior["options"])}
        return cls(model, likelihood, **options)

    def _resolve_bayesian(self, bayesian: Sequence[str] | None) -> tuple[str, ...]:
        model_params = [n for n, _ in self.network.named_parameters() if n.startswith("model.")]
        if bayesian is None:
            return tuple(model_params)
        if isinstance(bayesian, str):
            bayesian = [bayesian]
        chosen: list[str] = []
        for key in bayesian:
            full = f"model.{key}"
            hits = [n for n in model_params if n == full or n.startswith(full + ".")]
            if not hits:
                choices = ", ".join(n.removeprefix("model.") for n in model_params)
                raise ValueError(
                    f"bayesian names {key!r}, which is no parameter or module of the model; "
                    f"parameters are: {choices}."
                )
            chosen += [h for h in hits if h not in chosen]
        return tuple(n for n in model_params if n in chosen)

    def _resolve_estimators(self, estimator) -> dict[str, Estimator]:
        """Estimator per local-capable module (network-level name), for Bayesian weights."""
        modules = dict(self.network.named_modules())
        bayes = set(self.bayesian_names)
        eligible = {
            name: m
            for name, m in modules.items()
            if isinstance(m, LOCAL_LAYERS) and f"{name}.weight" in bayes
        }

        def parse(value) -> Estimator:
            return resolve(Estimator, value, "estimator")

        if not isinstance(estimator, dict):
            chosen = parse(estimator)
            if chosen is Estimator.REPARAMETERIZATION:
                return {}
            return {name: chosen for name in eligible}
        out = {}
        for key, value in estimator.items():
            chosen = parse(value)
            name = f"model.{key}" if key else "model"
            if chosen is Estimator.REPARAMETERIZATION:
                continue
            if name not in eligible:
                kind = type(modules[name]).__name__ if name in modules else "no module"
                raise ValueError(
                    f"estimator {chosen.value!r} cannot serve {key!r} ({kind}): it needs an "
                    "nn.Linear or nn.Conv1d/2d/3d layer with a Bayesian weight; such layers "
                    f"here: {sorted(n.removeprefix('model.') for n in eligible) or 'none'}. Use "
                    "'reparameterization' for other layers."
                )
            out[name] = chosen
        return out

    # ------------------------------------------------------------------ the distribution
    @property
    def sigma(self) -> Tensor:
        """Flat posterior standard deviations ``(P,)``: ``exp(log_std)``, floored at min_std."""
        if self.min_std:
            return fast_exp(self.log_std.clamp_min(math.log(self.min_std)))
        return fast_exp(self.log_std)

    @property
    def n_bayesian(self) -> int:
        """Number of Bayesian parameters ``P``."""
        return self.mu.numel()

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views of a flat ``(..., P)`` tensor, each ``(..., *shape)``."""
        lead = flat.shape[:-1]
        if not lead:  # split: its backward is one concatenation, not a zero-filled P per view
            pieces = torch.split(flat, [shape.numel() for _, _, shape in self._layout])
            return {
                name: piece.view(shape)
                for (name, _, shape), piece in zip(self._layout, pieces, strict=True)
            }
        return {
            name: flat[..., off : off + shape.numel()].reshape(*lead, *shape)
            for name, off, shape in self._layout
        }

    def kl(self, w: Tensor | None = None) -> Tensor:
        """``KL(q || p)`` summed over all Bayesian parameters (0-d tensor)."""
        return self.prior.kl(self.mu, self.sigma, w)

    def _kl_factor(self) -> float:
        if self.kl_annealing_epochs == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, self._epoch / self.kl_annealing_epochs)

    # ------------------------------------------------------------------ training
    def _nll_and_kl(
        self, x: Tensor, y: Tensor, train: bool = True, data_term=None
    ) -> tuple[Tensor, Tensor]:
        """Mean NLL over the batch and the draws (the likelihood's training loss with
        ``train``; ``data_term``, a per-example loss, if given), and the (estimated) KL."""
        s = self.n_train_samples
        if data_term is None:
            data_term = self.likelihood.training_loss if train else self.likelihood.nll
        local = self.estimators
        if not local and s > 1:  # S whole weight sets at once
            sigma = self.sigma
            w = self.mu + sigma * torch.stack([self._next_noise() for _ in range(s)])
            out = self._stack(x, tensors=self._stack_tensors(self._views(w), s))
            nll = data_term(out, y).mean()
            kl = self.prior.kl(self.mu, sigma, None if self.prior.closed_form else w[0])
            return nll, kl
        if not local and s == 1 and type(self.prior) is GaussianPrior and not self.min_std:
            eps = self._next_noise()  # the fused fast path
            ws = self._workspace
            if ws is not None and torch.is_grad_enabled() and ws.fits(self.mu, self.log_std):
                *pieces, kl = SampleWithGaussianKLInto.apply(
                    self.mu, self.log_std, eps, self.prior.scale, ws
                )
                out = self._swap(tuple(pieces), x)
            else:
                w, kl = SampleWithGaussianKL.apply(self.mu, self.log_std, eps, self.prior.scale)
                views = self._views(w)
                out = self._swap(tuple(views[n] for n in self.bayesian_names), x)
            return data_term(out, y).mean(), kl
        sigma = self.sigma
        mean_views = self._views(self.mu) if local else {}
        sigma_views = self._views(sigma) if local else {}
        served = {
            name
            for module_name in local
            for name in (f"{module_name}.weight", f"{module_name}.bias")
            if name in mean_views
        }
        w = None
        if served and self.prior.closed_form:
            # Layers served by output noise need no weight noise (a closed-form KL needs no
            # weight sample either): draw normals only for the weight-sampled parameters.
            rest = [n for n in self.bayesian_names if n not in served]
            eps = randn(
                sum(mean_views[n].numel() for n in rest),
                dtype=sigma.dtype,
                device=sigma.device,
            )
            views, offset = {}, 0
            for name in self.bayesian_names:
                if name in served:
                    continue
                k = mean_views[name].numel()
                noise = eps[offset : offset + k].view_as(mean_views[name])
                views[name] = torch.addcmul(mean_views[name], sigma_views[name], noise)
                offset += k
        else:
            w = torch.addcmul(self.mu, sigma, self._next_noise())
            views = self._views(w)
        table = {}
        for module_name, est in local.items():
            wname, bname = f"{module_name}.weight", f"{module_name}.bias"
            views[wname] = mean_views[wname]
            sigma_b = None
            if bname in mean_views:
                views[bname] = mean_views[bname]
                sigma_b = sigma_views[bname]
            table[id(views[wname])] = (sigma_views[wname], sigma_b, est)
        tensors = tuple(views[n] for n in self.bayesian_names)
        if s > 1:  # output-noise estimators: S draws are S copies of the batch
            x, y = x.repeat(s, *[1] * (x.ndim - 1)), y.repeat(s, *[1] * (y.ndim - 1))
        with LocalNoise(table) if table else contextlib.nullcontext():
            out = self._swap(tensors, x)
        nll = data_term(out, y).mean()
        kl = self.prior.kl(self.mu, sigma, None if self.prior.closed_form else w)
        return nll, kl

    def _stack_tensors(self, views: dict[str, Tensor], s: int) -> tuple[Tensor, ...]:
        """Tensors for every slot of the stacked call: the ``s`` drawn sets of the Bayesian
        parameters, and the point parameters and buffers expanded (not copied) to ``s``."""
        point = tuple(
            views[n] if n in views else p.expand(s, *p.shape)
            for n, p in self.network.named_parameters()
        )
        return point + tuple(b.expand(s, *b.shape) for b in self.network.buffers())

    def negative_elbo(
        self, x: Tensor, y: Tensor, n_data: int, *, training_loss: bool = False
    ) -> Tensor:
        """Mini-batch estimate of the full negative ELBO:
        ``n_data * mean NLL + kl_weight * KL`` (the training loss is this divided by ``n_data``).
        With ``training_loss`` the data term is the likelihood's training loss (differs from the
        NLL only for a Gaussian with ``beta > 0``; then the objective is no longer the ELBO).
        """
        nll, kl = self._nll_and_kl(x, y, train=training_loss)
        return n_data * nll + self._kl_factor() * kl

    def _probe_n_samples(self) -> int:
        return 1

    def _next_noise(self) -> Tensor:
        """The next training draw's noise: one drawn ahead by a distributed fit's
        ``before_step``, or :meth:`_draw_noise`."""
        if self._queued:
            self._last_noise = self._queued.pop(0)
            return self._last_noise
        return self._draw_noise()

    def _draw_noise(self) -> Tensor:
        """The next standard-normal vector ``(P,)`` for one weight draw of a training step.

        ``"fresh"``: drawn in blocks of several steps, so that each block is large enough to be
        filled in parallel (:mod:`bayesdl._random`). ``"pooled"``: a window at a random offset of
        a pool of ``POOL_FACTOR * P`` numbers, redrawn every ``POOL_STEPS`` windows (disjoint
        windows, i.e. fresh numbers, while ``POOL_STEPS * P <= POOL_FRESH_BELOW``). Either way
        the sequence depends only on the seeded generator. The returned tensor is never written
        to later (a new block or pool is a new tensor), so autograd may keep it for backward.
        """
        p = self.n_bayesian
        dtype, device = self.mu.dtype, self.mu.device
        if self.training_noise is TrainingNoise.FRESH:
            if self._noise is None or self._noise_next == len(self._noise):
                block = min(64, max(1, -(-MIN_PARALLEL // p)))
                self._noise = randn(block, p, dtype=dtype, device=device)
                self._noise_next = 0
            self._noise_next += 1
            self._last_noise = self._noise[self._noise_next - 1]
            return self._last_noise
        if not self._offsets:
            if POOL_STEPS * p <= POOL_FRESH_BELOW:  # disjoint windows
                self._noise = randn(POOL_STEPS * p, dtype=dtype, device=device)
                self._offsets = list(range((POOL_STEPS - 1) * p, -1, -p))
            else:
                length = max(POOL_FACTOR * p, MIN_PARALLEL)
                self._noise = randn(length, dtype=dtype, device=device)
                self._offsets = torch.randint(0, length - p + 1, (POOL_STEPS,)).tolist()
        offset = self._offsets.pop()
        self._last_noise = self._noise[offset : offset + p]
        return self._last_noise

    def _objective(self) -> _VIObjective:
        self._epoch = 1
        self._noise = None  # a new fit draws its noise from its own (seeded) generator state
        self._offsets = []
        self._queued = []
        self._workspace = FitWorkspace(
            self.mu,
            self.log_std,
            [shape.numel() for _, _, shape in self._layout],
            [shape for _, _, shape in self._layout],
        )
        return _VIObjective(self)

    def fit(self, data, *, val_data=None, **training_options):
        try:
            history = super().fit(data, val_data=val_data, **training_options)
        finally:
            self._workspace = None
        self._sync_mean()
        return history

    def _sync_mean(self) -> None:
        """Write the posterior means into the module, so ``model`` is the mean network."""
        params = dict(self.network.named_parameters())
        with torch.no_grad():
            for name, view in self._views(self.mu.detach()).items():
                params[name].copy_(view)

    # ------------------------------------------------------------------ prediction
    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        was_training = self.network.training
        self.network.eval()
        self._stack.train(False)
        try:
            local = self._local_layers(x)
            if local:
                return self._sample_local(x, n_samples, generator, local)
            sigma = self.sigma.detach()
            mu = self.mu.detach()
            chunk = self._draws_per_chunk(prediction_rows(x.shape[0]), mu.numel())
            outs = []
            for start in range(0, n_samples, chunk):
                s = min(chunk, n_samples - start)
                eps = randn(s, mu.numel(), generator=generator, dtype=mu.dtype, device=mu.device)
                views = self._views(torch.addcmul(mu, sigma, eps))
                outs.append(self._stack(x, tensors=self._stack_tensors(views, s)))
        finally:
            self.network.train(was_training)
        return torch.cat(outs)

    def _draws_per_chunk(self, rows: int, per_draw: int) -> int:
        """Draws whose noise (``per_draw`` numbers each) is drawn at once: ``chunk_size``, or
        enough for a parallel draw (see bayesdl._random), at least about 2^11 rows' worth; the
        stacked call then runs them in cache-sized chunks of rows. ``rows``: all the rows of
        the prediction, so every process of a distributed one chunks alike."""
        return self.chunk_size or max(_DEFAULT_CHUNK_ROWS // rows, -(-MIN_PARALLEL // per_draw))

    def _local_layers(self, x: Tensor) -> tuple[tuple[str, str | None], ...]:
        """``(weight, bias)`` names of the Bayesian linear layers computed locally at ``x``
        (:func:`~bayesdl.posteriors.stacked.local_plan`)."""
        return local_plan(self, self._stack, x, keep=set(self.bayesian_names))

    def _sample_local(
        self,
        x: Tensor,
        n_samples: int,
        generator: torch.Generator | None,
        local: tuple[tuple[str, str | None], ...],
    ) -> Tensor:
        """Draws with the local reparameterisation trick in the ``local`` layers (one noise
        per row, unit and draw) and whole weight sets for the other Bayesian parameters."""
        mu_views, sigma_views = self._views(self.mu.detach()), self._views(self.sigma.detach())
        params = dict(self.network.named_parameters())
        served = {n for pair in local for n in pair if n in mu_views}
        rest = [n for n in self.bayesian_names if n not in served]
        mu_rest = torch.cat([mu_views[n].reshape(-1) for n in rest]) if rest else None
        sigma_rest = torch.cat([sigma_views[n].reshape(-1) for n in rest]) if rest else None
        n_rest = 0 if mu_rest is None else mu_rest.numel()
        # Per row of the input: the units of every local layer, times any middle dimensions.
        units = [params[w].shape[0] * math.prod(x.shape[1:-1]) for w, _ in local]
        lo, total = prediction_offset(x.shape[0])
        per_draw = n_rest + total * sum(units)
        chunk = self._draws_per_chunk(total, per_draw)
        noise: list[Tensor] = []  # this chunk's row noise of each local layer
        layers = {
            w: self._local_layer(params, mu_views, sigma_views, w, b, noise, i)
            for i, (w, b) in enumerate(local)
        }
        ref = self.mu
        outs = []
        for start in range(0, n_samples, chunk):
            s = min(chunk, n_samples - start)
            eps = randn(s, per_draw, generator=generator, dtype=ref.dtype, device=ref.device)
            rows = eps[:, n_rest:].view(s, total, sum(units)).narrow(1, lo, x.shape[0])
            noise[:] = [part.reshape(s, *x.shape[:-1], -1) for part in rows.split(units, dim=-1)]
            views = {n: mu_views[n].expand(s, *mu_views[n].shape) for n in served}
            if rest:
                w = torch.addcmul(mu_rest, sigma_rest, eps[:, :n_rest])
                views.update(
                    zip(rest, w.split([mu_views[n].numel() for n in rest], dim=1), strict=True)
                )
                views.update({n: views[n].view(s, *mu_views[n].shape) for n in rest})
            outs.append(self._stack(x, tensors=self._stack_tensors(views, s), local=layers))
        return torch.cat(outs)

    @staticmethod
    def _local_layer(
        params: dict[str, Tensor],
        mu_views: dict[str, Tensor],
        sigma_views: dict[str, Tensor],
        weight: str,
        bias: str | None,
        noise: list[Tensor],
        index: int,
    ) -> LocalLinear:
        """The outputs of layer ``weight`` under the current chunk's draws ``noise[index]``,
        ``(s, rows, ..., out)``: means and standard deviations of the pre-activations from the
        shared input (computed on the first call), plus that noise."""
        mean_b = var_b = None
        if bias is not None and bias in mu_views:
            mean_b, var_b = mu_views[bias], sigma_views[bias].square()
        elif bias is not None:
            mean_b = params[bias].detach()
        moments: list[Tensor] = []

        def layer(x: Tensor, members: slice) -> Tensor:
            if not moments:  # the model's input: the same tensor for every chunk of the call
                var = F.linear(x.square(), sigma_views[weight].square(), var_b)
                moments[:] = [F.linear(x, mu_views[weight], mean_b), var.sqrt_()]
            return torch.addcmul(moments[0], moments[1], noise[index][members])

        return layer

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Tensor]:
        state = super()._extra_state()
        state["vi.mu"] = self.mu.detach()
        state["vi.log_std"] = self.log_std.detach()
        return state

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        mu, log_std = state.pop("vi.mu", None), state.pop("vi.log_std", None)
        if mu is None or log_std is None:
            raise RuntimeError("missing keys vi.mu / vi.log_std")
        if mu.shape != self.mu.shape or log_std.shape != self.log_std.shape:
            raise RuntimeError(
                f"vi.mu has {mu.numel()} entries, this posterior has {self.mu.numel()} "
                "Bayesian parameters"
            )
        super()._load_extra_state(state)
        with torch.no_grad():
            self.mu.copy_(mu)
            self.log_std.copy_(log_std)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self, x=None, *, n_samples: int = 32) -> VIDiagnostics:
        """Per-tensor signal-to-noise and KL, with warnings for the two failure modes.

        * collapse to the prior: the KL is near zero and, given inputs ``x``, the predictive
          mean barely varies across them (predictions no longer depend on the input);
        * collapse to a point: most standard deviations sit at the floor ``min_std``.
        """
        mu, sigma = self.mu.detach(), self.sigma.detach()
        report = VIDiagnostics()
        floor = max(self.min_std * 1.01, 1e-6 * getattr(self.prior, "scale", 1.0))
        sigma_views = self._views(sigma)
        for name, view_mu in self._views(mu).items():
            view_sigma = sigma_views[name]
            kl = float(self.prior.kl(view_mu, view_sigma, self._prior_draw(view_mu, view_sigma)))
            report.rows.append(
                {
                    "name": name.removeprefix("model."),
                    "numel": view_mu.numel(),
                    "snr": float((view_mu.abs() / view_sigma).mean()),
                    "kl_per_parameter": kl / view_mu.numel(),
                    "mean_std": float(view_sigma.mean()),
                    "at_floor": float((view_sigma <= floor).double().mean()),
                }
            )
        report.total_kl = sum(r["kl_per_parameter"] * r["numel"] for r in report.rows)
        if float((sigma <= floor).double().mean()) > 0.9:
            report.warnings.append(
                "collapse to a point: over 90% of the posterior standard deviations are at the "
                f"floor ({floor:.3g}); the posterior is (nearly) deterministic. Check kl_weight "
                "(it should be 1 for the ELBO) and the prior scale."
            )
        if report.total_kl / max(1, self.n_bayesian) < 1e-3 and x is not None:
            pred = self.predict(x, n_samples)
            mean = pred.probs if pred.task == "classification" else pred.mean
            if float(mean.std(0).max()) < 1e-3 * (1.0 + float(mean.abs().mean())):
                report.warnings.append(
                    "collapse to the prior: the posterior is (nearly) the prior and the "
                    "predictions no longer depend on the input. Use more data, a smaller "
                    "kl_weight or kl_annealing_epochs, or a tighter prior."
                )
        for message in report.warnings:
            warnings.warn(message, stacklevel=2)
        return report

    def _prior_draw(self, mu: Tensor, sigma: Tensor) -> Tensor | None:
        if self.prior.closed_form:
            return None
        g = torch.Generator(device=mu.device).manual_seed(0)
        return mu + sigma * torch.randn(mu.shape, generator=g, dtype=mu.dtype, device=mu.device)


class _VIObjective:
    """Negative ELBO per example; point parameters are trained alongside ``mu`` and ``log_std``."""

    n_orders = 1

    def __init__(self, vi: MeanFieldVI) -> None:
        self.vi = vi
        bayes = set(vi.bayesian_names)
        self.point = [
            p for n, p in vi.network.named_parameters() if n not in bayes and p.requires_grad
        ]

    def parameters(self) -> list[Tensor]:
        return [self.vi.mu, self.vi.log_std, *self.point]

    def state(self) -> list[Tensor]:
        return [
            self.vi.mu,
            self.vi.log_std,
            *self.vi.network.parameters(),
            *self.vi.network.buffers(),
        ]

    def train(self, mode: bool) -> None:
        self.vi.network.train(mode)

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        return self.vi.negative_elbo(x, y, n_data, training_loss=True) / n_data

    def val_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.vi._nll_and_kl(x, y, data_term=self.vi.likelihood.validation_loss)[0]

    def end_epoch(self, epoch: int, optimizer) -> None:
        self.vi._epoch = epoch + 1

    def before_step(self) -> None:
        """In a distributed fit, before each step on every process: draw the step's weight
        noise from the generator all processes share (the loss then runs under each process's
        own, for per-example noise), so every shard sees the same weights. The local
        estimators draw noise per example and take theirs inside the loss."""
        vi = self.vi
        if not vi.estimators:
            vi._queued = [vi._draw_noise() for _ in range(vi.n_train_samples)]

    def checkpoint_state(self) -> tuple[dict, dict[str, Tensor]]:
        """The epoch counter (KL annealing) and the training noise: the current pool or block
        and where the next step's window comes from."""
        vi = self.vi
        plain = {"epoch": vi._epoch, "offsets": list(vi._offsets), "noise_next": vi._noise_next}
        return plain, {} if vi._noise is None else {"noise": vi._noise}

    def load_checkpoint_state(self, json_part: dict, tensors: dict[str, Tensor]) -> None:
        vi = self.vi
        vi._epoch = int(json_part["epoch"])
        vi._offsets = [int(o) for o in json_part["offsets"]]
        vi._noise_next = int(json_part["noise_next"])
        noise = tensors.get("noise")
        vi._noise = None if noise is None else noise.to(device=vi.mu.device, dtype=vi.mu.dtype)
