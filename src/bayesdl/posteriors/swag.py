"""SWAG (Maddox et al., 2019) and MultiSWAG (Wilson & Izmailov, 2020): a Gaussian posterior read
off the SGD trajectory.

Training is the shared fit loop (:mod:`bayesdl.training`). After ``swa_start`` the objective's
``end_epoch`` hook collects the weights ``theta_1 .. theta_n`` once per epoch (or at the end of
each learning-rate cycle) and sets the learning rate of the SWA phase. From the iterates it keeps

* the SWA mean ``theta_swa = (1/n) sum_i theta_i`` and the diagonal variance
  ``Sigma_diag = (1/n) sum_i (theta_i - theta_swa)^2``, by Welford's running update (no
  cancellation in float32 as with ``E[theta^2] - E[theta]^2``);
* the last ``K = min(n, rank)`` iterates. Their deviations from their own mean are the columns of
  ``D (P x K)``, so ``D D^T / (K - 1)`` is exactly their sample covariance (Maddox et al. centre
  each column on the running mean at the time it was collected instead, which needs no storage
  of iterates but reproduces no covariance exactly). While ``n <= rank`` this is the sample
  covariance of the whole trajectory around ``theta_swa``.

A draw is

    theta = theta_swa + sqrt(scale) * (Sigma_diag^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K - 1))),

with ``z1 ~ N(0, I_P)`` and ``z2 ~ N(0, I_K)``, i.e. a sample of
``N(theta_swa, scale / 2 * (Sigma_diag + D D^T / (K - 1)))``; ``scale = 0.5`` is the usual choice
(the low-rank term is left out while ``K < 2``). ``P`` counts every trainable parameter of the
network, the likelihood's own (a learned noise) included, flattened in the order of
``network.named_parameters()``.

MultiSWAG is ``n_members`` independently initialised SWAG runs trained together as one vectorised
program with the machinery of deep ensembles (:class:`~bayesdl.posteriors.deep_ensemble.
StackedMembers`): every moment carries a leading member axis ``(M, ...)`` and the posterior is the
uniform mixture of the members' Gaussians, ``S / M`` draws from each.

Prediction draws the ``S`` weight sets at once (in chunks that bound memory) and applies them in
one vectorised call of :class:`~bayesdl.posteriors.stacked.StackedModule`. A model with BatchNorm
needs statistics that fit each draw's weights: they are recomputed on the training inputs kept
from ``fit``, vectorised over the draws of a chunk (a loop over input batches, and over chunks of
draws when ``S`` times the activations do not fit), which costs about ``S`` forward passes over
the training inputs per prediction. Without BatchNorm nothing of the sort happens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from bayesdl import training
from bayesdl._options import is_positive, resolve
from bayesdl._random import randn
from bayesdl.data import as_inputs
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import prediction_offset, register
from bayesdl.posteriors.deep_ensemble import StackedMembers, _EnsembleObjective
from bayesdl.posteriors.stacked import (
    LocalLinear,
    PredictionNoise,
    local_plan,
)

__all__ = ["SWAG", "SWAGMoments", "SWASchedule"]

# Elements of drawn parameters held at once (M * draws * P); more draws are taken in chunks.
_DRAW_BUDGET = 2**25
_BN_INPUTS = "swag.bn_inputs"


class SWASchedule(str, Enum):
    """Learning rate of the SWA phase (the epochs after ``swa_start``)."""

    #: Every SWA epoch runs at ``swa_lr``; an iterate is collected after each.
    CONSTANT = "constant"
    #: Cycles of ``cycle_length`` epochs whose rate falls linearly from the fit's ``lr`` to
    #: ``swa_lr``; an iterate is collected at the end of each cycle (at its lowest rate).
    CYCLIC = "cyclic"


class SWAGMoments(NamedTuple):
    """What SWAG has collected, per member (``M`` members, ``P`` parameters, flat)."""

    #: The SWA mean ``theta_swa``, ``(M, P)``.
    mean: Tensor
    #: The diagonal variance ``Sigma_diag`` (population form, divisor ``n``), ``(M, P)``.
    variance: Tensor
    #: ``D^T``: the last ``K`` iterates minus their mean, ``(M, K, P)``; their sample covariance
    #: is ``D D^T / (K - 1)``.
    deviations: Tensor
    #: Iterates collected, ``n``.
    n_collected: int


@dataclass(frozen=True)
class _Plan:
    """When one fit collects iterates and at which rate each epoch runs."""

    epochs: int
    start: int  # epochs trained before the SWA phase
    schedule: SWASchedule
    cycle: int
    lr: float
    swa_lr: float

    def collects(self, epoch: int) -> bool:
        if epoch <= self.start:
            return False
        return self.schedule is SWASchedule.CONSTANT or (epoch - self.start) % self.cycle == 0

    def lr_for(self, epoch: int) -> float:
        """The rate epoch ``epoch`` (1-based) runs at."""
        if epoch <= self.start:
            return self.lr
        if self.schedule is SWASchedule.CONSTANT:
            return self.swa_lr
        step = (epoch - self.start - 1) % self.cycle
        return self.lr + step / (self.cycle - 1) * (self.swa_lr - self.lr)


class _SWAGObjective(_EnsembleObjective):
    """The members' losses (as for an ensemble), plus the SWA hook after every epoch."""

    def __init__(self, swag: SWAG, plan: _Plan) -> None:
        super().__init__(swag)
        self.plan = plan

    def end_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if self.plan.collects(epoch):
            self.ensemble._collect()
        if epoch < self.plan.epochs:
            for group in optimizer.param_groups:
                group["lr"] = self.plan.lr_for(epoch + 1)

    def checkpoint_state(self) -> tuple[dict, dict[str, Tensor]]:
        """The moments collected so far (the SWA rate is in the optimiser's state)."""
        swag = self.ensemble
        return {}, {
            "swag.mean": swag._mean,
            "swag.sum_sq_dev": swag._sum_sq_dev,
            "swag.iterates": swag._iterates,
            "swag.n_collected": swag._n,
        }

    def load_checkpoint_state(self, json_part: dict, tensors: dict[str, Tensor]) -> None:
        _, own = self.checkpoint_state()
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])


@register
class SWAG(StackedMembers):
    """SWA-Gaussian over all weights of ``model``; MultiSWAG with ``n_members > 1``.

    Parameters
    ----------
    model:
        The user's module. It is the template and is not modified; a single SWAG run starts from
        its weights (so a pretrained network can be given), MultiSWAG members are re-initialised.
    likelihood:
        See :class:`~bayesdl.posteriors.base.Posterior`.
    rank:
        ``K``, the number of last iterates whose deviations form the low-rank part (default 20).
    scale:
        Multiplies the covariance (default 0.5).
    swa_start:
        When collecting begins: a ``float`` in ``[0, 1)`` is the fraction of ``fit``'s epochs
        trained first (``floor(swa_start * epochs)`` epochs, so any run collects at least once;
        default 0.5); an ``int`` is a number of epochs, which must be smaller than ``epochs``.
    swa_lr:
        Learning rate of the SWA phase (``None``: the fit's ``lr``; required for ``"cyclic"``).
        The epochs before it run at the fit's ``lr``.
    swa_schedule:
        ``"constant"`` (default) or ``"cyclic"``: see :class:`SWASchedule`. (Not called
        ``lr_schedule``, which is the fit loop's own option; SWAG needs that one constant.)
    cycle_length:
        Epochs per cycle of the cyclic schedule (default 4, at least 2).
    n_members:
        ``M``, independent SWAG runs (MultiSWAG; default 1).
    independent_data_order, seed:
        As for :class:`~bayesdl.posteriors.deep_ensemble.DeepEnsemble`.
    reinitialize:
        Re-draw each member's initial weights (``None``: only when ``n_members > 1``).
    bn_batch_size:
        Rows per batch when BatchNorm statistics are recomputed on tensor training inputs
        (default 512; a DataLoader's own batches are used as they come). The running mean is
        the exact mean over the inputs for any batch size; the variance is the batch-size-
        weighted average of the batches' variances.

    Notes
    -----
    ``sample_outputs(x, n_samples)`` returns ``(S, B, K)``; ``S`` must be a multiple of ``M``
    and the draws come member by member (``S / M`` from member 0 first). ``n_samples=None``
    draws 100 (rounded up to a multiple of ``M``). Each ``fit`` collects a new trajectory.
    Predicting before an iterate was collected (before ``fit``, or after a ``fit`` that stopped
    early, before the SWA phase) raises a ``ValueError``. A model with BatchNorm keeps a
    reference to the training inputs (``state_dict`` includes them when they were tensors; after
    loading the state of a fit on a DataLoader, give them with :meth:`set_batchnorm_inputs`).
    """

    name = "swag"
    #: There is no posterior before ``fit`` has collected an iterate: predicting raises.
    requires_fit: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        rank: int = 20,
        scale: float = 0.5,
        swa_start: float | int = 0.5,
        swa_lr: float | None = None,
        swa_schedule: SWASchedule | str = SWASchedule.CONSTANT,
        cycle_length: int = 4,
        n_members: int = 1,
        independent_data_order: bool = True,
        reinitialize: bool | None = None,
        seed: int | None = None,
        bn_batch_size: int = 512,
        prediction_noise: PredictionNoise | str = PredictionNoise.LOCAL,
    ) -> None:
        _check_int("rank", rank, 1)
        self.prediction_noise = resolve(PredictionNoise, prediction_noise, "prediction_noise")
        if not is_positive(scale):
            raise ValueError(
                f"scale must be a positive finite number (usually 0.5), got {scale!r}."
            )
        self.swa_start = _check_swa_start(swa_start)
        if swa_lr is not None and not is_positive(swa_lr):
            raise ValueError(f"swa_lr must be None or a positive finite number, got {swa_lr!r}.")
        self.swa_schedule = resolve(SWASchedule, swa_schedule, "swa_schedule")
        if self.swa_schedule is SWASchedule.CYCLIC and swa_lr is None:
            raise ValueError(
                "swa_schedule='cyclic' needs swa_lr, the lowest rate of each cycle (the fit's "
                "lr is the highest); pass e.g. swa_lr=lr / 10."
            )
        _check_int("cycle_length", cycle_length, 2)
        _check_int("bn_batch_size", bn_batch_size, 2)
        super().__init__(
            model,
            likelihood,
            n_members=n_members,
            independent_data_order=independent_data_order,
            reinitialize=n_members > 1 if reinitialize is None else reinitialize,
            seed=seed,
        )
        self.rank, self.scale, self.swa_lr = rank, float(scale), swa_lr
        self.cycle_length, self.bn_batch_size = cycle_length, bn_batch_size
        #: (name, first, last, shape) of each parameter in the flat vector.
        self._layout: list[tuple[str, int, int, torch.Size]] = []
        offset = 0
        for name, p in self._params.items():
            self._layout.append((name, offset, offset + p[0].numel(), p.shape[1:]))
            offset += p[0].numel()
        like = {"dtype": self.dtype, "device": self.device}
        m = self.n_members
        self._mean = self._member_tensor((m, offset), **like)
        self._sum_sq_dev = self._member_tensor((m, offset), **like)
        self._iterates = self._member_tensor((m, rank, offset), **like)
        self._n = torch.zeros((), dtype=torch.long, device=self.device)
        self._fitted = torch.zeros((), dtype=torch.bool, device=self.device)
        # BatchNorm layers with running statistics: their buffers are recomputed per draw.
        self._bn_buffers = {
            f"{path}.{key}"
            for path, module in self.network.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
            for key in ("running_mean", "running_var", "num_batches_tracked")
        }
        self._bn_inputs: Tensor | DataLoader | None = None
        self._next_run: tuple[_Plan, object] | None = None

    def options(self) -> dict:
        return {
            **super().options(),
            "rank": self.rank,
            "scale": self.scale,
            "swa_start": self.swa_start,
            "swa_lr": self.swa_lr,
            "swa_schedule": self.swa_schedule.value,
            "cycle_length": self.cycle_length,
            "bn_batch_size": self.bn_batch_size,
            "prediction_noise": self.prediction_noise.value,
        }

    # ----------------------------------------------------------------- properties
    @property
    def default_n_samples(self) -> int:  # type: ignore[override]
        return self.n_members * math.ceil(100 / self.n_members)

    @property
    def has_batchnorm(self) -> bool:
        """Whether the model has BatchNorm layers whose statistics are recomputed per draw."""
        return bool(self._bn_buffers)

    @property
    def n_collected(self) -> int:
        """Iterates collected by the last ``fit``."""
        return int(self._n)

    @property
    def moments(self) -> SWAGMoments:
        """The SWA mean, diagonal variance and low-rank deviations (see :class:`SWAGMoments`)."""
        n = self.n_collected
        if n == 0:
            raise ValueError(self._nothing_collected())
        window = self._iterates[:, : min(n, self.rank)]
        return SWAGMoments(
            mean=self._mean.clone(),
            variance=(self._sum_sq_dev / n).clamp_min(0),
            deviations=window - window.mean(1, keepdim=True),
            n_collected=n,
        )

    # ----------------------------------------------------------------- training
    def fit(self, data, *, val_data=None, **training_options) -> training.History:
        """Train the members and collect the SWA moments (see :class:`Posterior.fit`).

        ``lr`` is the rate before the SWA phase (and the top of each cycle of the cyclic
        schedule); the fit loop's ``lr_schedule`` must stay ``"constant"``, since SWAG sets the
        rate itself. Raises ``ValueError`` when ``swa_start`` leaves no epoch to collect.
        """
        plan = self._plan(training_options)
        if plan is not None and plan.lr_for(1) != plan.lr:
            # The SWA phase starts with the first epoch: the loop builds its optimiser at swa_lr.
            training_options = {**training_options, "lr": plan.lr_for(1)}
        self._next_run = (plan, data)
        try:
            history = super().fit(data, val_data=val_data, **training_options)
        finally:
            self._next_run = None
        self._fitted.fill_(True)
        if self.n_collected == 0:
            warnings.warn(
                f"fit stopped after {history.epochs_run} epochs, before the SWA phase (epochs "
                f"{plan.start + 1}-{plan.epochs}), and collected no iterate; predicting will "
                "fail. Lower swa_start, or raise patience.",
                stacklevel=2,
            )
        return history

    def _plan(self, options: dict) -> _Plan | None:
        try:
            config = training.TrainConfig(**options)
        except (TypeError, ValueError):
            return None  # the fit loop reports the bad option with its own message
        if options.get("lr_schedule", "constant") != "constant":
            raise ValueError(
                f"SWAG sets the learning rate itself (swa_lr, swa_schedule); fit's lr_schedule "
                f"must be 'constant', got {options['lr_schedule']!r}."
            )
        epochs = config.epochs
        if isinstance(self.swa_start, float):
            start = math.floor(self.swa_start * epochs)
        elif self.swa_start >= epochs:
            raise ValueError(
                f"swa_start={self.swa_start} epochs is outside the training run of {epochs} "
                "epochs, so no iterate would be collected. Pass swa_start < epochs, or a "
                "fraction of the run such as swa_start=0.5."
            )
        else:
            start = self.swa_start
        if self.swa_schedule is SWASchedule.CYCLIC and epochs - start < self.cycle_length:
            raise ValueError(
                f"the cyclic schedule collects at the end of each {self.cycle_length}-epoch "
                f"cycle, but the SWA phase has only {epochs - start} epochs ({epochs} epochs, "
                f"swa_start={self.swa_start}). Train longer, start earlier or shorten the cycle."
            )
        swa_lr = config.lr if self.swa_lr is None else self.swa_lr
        return _Plan(epochs, start, self.swa_schedule, self.cycle_length, config.lr, swa_lr)

    _MEMBER_TENSORS = ("_mean", "_sum_sq_dev", "_iterates")

    def _objective(self) -> _SWAGObjective:
        # Called by ``fit`` once the data are checked, just before training: a new trajectory.
        plan, data = self._next_run
        for t in (self._mean, self._sum_sq_dev, self._iterates, self._n, self._fitted):
            t.zero_()
        if self.has_batchnorm:  # the inputs are checked by now; a reference, not a copy
            self._bn_inputs = (
                data
                if isinstance(data, DataLoader)
                else as_inputs(data[0], dtype=self.dtype, device=self.device)
            )
        return _SWAGObjective(self, plan)

    def _collect(self) -> None:
        """Add the members' current weights to the moments (Welford's update)."""
        with torch.no_grad():
            theta = torch.cat([p.reshape(self.n_members, -1) for p in self._params.values()], 1)
            n = self.n_collected + 1
            delta = theta - self._mean
            self._mean.add_(delta, alpha=1.0 / n)
            self._sum_sq_dev.addcmul_(delta, theta - self._mean)
            self._iterates[:, (n - 1) % self.rank] = theta
            self._n.fill_(n)

    # ----------------------------------------------------------------- prediction
    def _resolve_n_samples(self, n_samples: int | None) -> int:
        n = super()._resolve_n_samples(n_samples)
        if n % self.n_members:
            raise ValueError(
                f"MultiSWAG draws the same number of samples from each of its {self.n_members} "
                f"members, so n_samples must be a multiple of {self.n_members}; got {n}."
            )
        return n

    def _probe_n_samples(self) -> int:
        return self.n_members

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        m, per = self.n_members, n_samples // self.n_members
        if self._next_run is not None:  # fit probes the output width on the current weights
            with self._evaluating():
                out = self._member_outputs(x, None)
            return (
                out.unsqueeze(1).expand(m, per, *out.shape[1:]).reshape(n_samples, *out.shape[1:])
            )
        if self.n_collected == 0:
            raise ValueError(self._nothing_collected())
        outs = []
        with self._evaluating():
            local = self._local_layers(x)
            if local:
                return self._sample_local(x, per, generator, local)
            for params in self._parameter_draws(per, generator):
                count = params[0].shape[0] // m
                buffers = self._draw_buffers(params, count)
                out = self._stack(x, tensors=(*params, *buffers))
                outs.append(out.reshape(m, count, *out.shape[1:]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return out.reshape(n_samples, *out.shape[2:])

    def _draw_factors(self) -> tuple[SWAGMoments, Tensor, Tensor | None]:
        """The moments, and the factors of a draw ``mean + std * z1 + z2 @ dev``: ``std``
        ``(M, P)`` and ``dev`` ``(M, K, P)`` (``None`` for ``K = 1``), scaled by ``scale``."""
        moments = self.moments
        k = moments.deviations.shape[1]
        std = moments.variance.sqrt_().mul_(math.sqrt(self.scale / 2))
        dev = moments.deviations.mul_(math.sqrt(self.scale / (2 * (k - 1)))) if k > 1 else None
        return moments, std, dev

    def _parameter_draws(
        self, per_member: int, generator: torch.Generator | None
    ) -> Iterator[tuple[Tensor, ...]]:
        """Weight draws in chunks: per parameter, ``(M * c, ...)``, member-major."""
        moments, std, dev = self._draw_factors()
        m, k, p = moments.deviations.shape
        chunk = max(1, _DRAW_BUDGET // (m * p))
        like = {"dtype": self.dtype, "device": self.device, "generator": generator}
        for first in range(0, per_member, chunk):
            c = min(chunk, per_member - first)
            z1 = randn(m, c, p, **like)
            z2 = None if dev is None else randn(m, c, k, **like)
            params = []
            for _, lo, hi, shape in self._layout:
                block = torch.addcmul(
                    moments.mean[:, None, lo:hi], std[:, None, lo:hi], z1[..., lo:hi]
                )
                if dev is not None:
                    block.baddbmm_(z2, dev[..., lo:hi])
                params.append(block.view(m * c, *shape))
            yield tuple(params)

    def _local_layers(self, x: Tensor) -> tuple[tuple[str, str | None], ...]:
        """``(weight, bias)`` names of the linear layers computed locally at ``x``
        (:func:`~bayesdl.posteriors.stacked.local_plan`; none with BatchNorm, whose statistics
        are recomputed per whole draw)."""
        if self.has_batchnorm:
            return ()
        return local_plan(self, self._stack, x, members=self.n_members)

    def _sample_local(
        self,
        x: Tensor,
        per_member: int,
        generator: torch.Generator | None,
        local: tuple[tuple[str, str | None], ...],
    ) -> Tensor:
        """Draws with the local reparameterisation trick in the ``local`` layers.

        A layer's pre-activations under a draw of member ``j`` with low-rank coefficients
        ``z2`` are ``x mean_j^T + sum_k z2_k (x D_jk^T) + N(0, x^2 (std_j^2)^T)`` per row: the
        products with the mean, each deviation and the variance are taken once for all
        draws; per draw only ``K`` coefficients and ``rows x out`` normals are new."""
        moments, std, dev = self._draw_factors()
        m, k, _ = moments.deviations.shape
        where = {name: (lo, hi, shape) for name, lo, hi, shape in self._layout}
        served = {n for pair in local for n in pair if n is not None}
        rest = [(name, lo, hi, shape) for name, lo, hi, shape in self._layout if name not in served]
        index = torch.cat(
            [torch.arange(lo, hi, device=self.device) for _, lo, hi, _ in rest]
            or [torch.zeros(0, dtype=torch.long, device=self.device)]
        )
        mean_rest, std_rest = moments.mean[:, index], std[:, index]
        dev_rest = None if dev is None else dev[..., index]
        n_rest = index.numel()
        # Per row of the input: the units of every local layer, times any middle dimensions.
        units = [where[w][2][0] * math.prod(x.shape[1:-1]) for w, _ in local]
        lo_row, total = prediction_offset(x.shape[0])
        per_draw = n_rest + total * sum(units)
        chunk = max(1, _DRAW_BUDGET // (m * per_draw))
        state: dict = {}
        layers = {
            w: self._local_layer(where, moments.mean, std, dev, w, b, state, i)
            for i, (w, b) in enumerate(local)
        }
        like = {"dtype": self.dtype, "device": self.device, "generator": generator}
        outs = []
        for first in range(0, per_member, chunk):
            c = min(chunk, per_member - first)
            z1 = randn(m, c, per_draw, **like)
            z2 = None if dev is None else randn(m, c, k, **like)
            rows = z1[..., n_rest:].view(m, c, total, sum(units)).narrow(2, lo_row, x.shape[0])
            state.update(noise=rows.split(units, dim=-1), z2=z2, outputs={})
            block = torch.addcmul(mean_rest[:, None], std_rest[:, None], z1[..., :n_rest])
            if dev_rest is not None:
                block.baddbmm_(z2, dev_rest)
            pieces = iter(block.split([hi - lo for _, lo, hi, _ in rest], dim=-1))
            params = []
            for name, lo, hi, shape in self._layout:
                if name in served:  # not read: the layer is computed from its moments
                    params.append(moments.mean[:1, lo:hi].view(1, *shape).expand(m * c, *shape))
                else:
                    params.append(next(pieces).reshape(m * c, *shape))
            buffers = self._draw_buffers(tuple(params), c)
            out = self._stack(x, tensors=(*params, *buffers), local=layers)
            outs.append(out.reshape(m, c, *out.shape[1:]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return out.reshape(m * per_member, *out.shape[2:])

    @staticmethod
    def _local_layer(
        where: dict,
        mean: Tensor,
        std: Tensor,
        dev: Tensor | None,
        weight: str,
        bias: str | None,
        state: dict,
        index: int,
    ) -> LocalLinear:
        """Layer ``weight``'s outputs for the current chunk (``state``: its row noise, low-rank
        coefficients and computed outputs), ``(M * c, rows, ..., out)`` sliced to ``members``."""
        moments: list[Tensor] = []

        def part(flat: Tensor, name: str | None) -> Tensor | None:
            if name is None:
                return None
            lo, hi, shape = where[name]
            return flat[..., lo:hi].reshape(*flat.shape[:-1], *shape)

        def layer(x: Tensor, members: slice) -> Tensor:
            if index not in state["outputs"]:
                if not moments:  # the model's input: the same for every chunk of the call
                    m, flat = mean.shape[0], x.reshape(-1, x.shape[-1])  # (N, in)
                    w_mean, w_std = part(mean, weight), part(std, weight)  # (M, out, in)
                    out_mean = torch.matmul(flat, w_mean.transpose(1, 2))  # (M, N, out)
                    var = torch.matmul(flat.square(), w_std.square().transpose(1, 2))
                    if bias is not None:
                        out_mean += part(mean, bias)[:, None]
                        var += part(std, bias).square()[:, None]
                    moments[:] = [out_mean.view(m, 1, -1), var.sqrt_().view(m, 1, -1)]
                    if dev is not None:  # (M, K, N * out)
                        k, (n_out, n_in) = dev.shape[1], w_mean.shape[1:]
                        w_dev = part(dev, weight).reshape(m * k, n_out, n_in)
                        lowrank = torch.matmul(flat, w_dev.transpose(1, 2))
                        if bias is not None:
                            lowrank += part(dev, bias).reshape(m * k, 1, n_out)
                        moments.append(lowrank.view(m, k, -1))
                noise = state["noise"][index]  # (M, c, rows, ...)
                m, c = noise.shape[:2]
                out = torch.addcmul(moments[0], moments[1], noise.reshape(m, c, -1))
                if len(moments) == 3:
                    out.baddbmm_(state["z2"], moments[2])
                state["outputs"][index] = out.view(m * c, *x.shape[:-1], -1)
            return state["outputs"][index][members]

        return layer

    def _draw_buffers(self, params: tuple[Tensor, ...], count: int) -> list[Tensor]:
        """Buffers for ``M * count`` draws: the member's, BatchNorm statistics recomputed."""
        m = self.n_members
        buffers = []
        for name, b in self._buffers.items():
            rest = b.shape[1:]
            if name in self._bn_buffers:
                fill = 1 if name.endswith("running_var") else 0
                buffers.append(torch.full((m * count, *rest), fill, dtype=b.dtype, device=b.device))
            else:
                buffers.append(b.unsqueeze(1).expand(m, count, *rest).reshape(m * count, *rest))
        if self.has_batchnorm:
            self._recompute_batchnorm(params, buffers)
        return buffers

    def _recompute_batchnorm(self, params: tuple[Tensor, ...], buffers: list[Tensor]) -> None:
        """Fill the BatchNorm statistics of every draw from the training inputs, in place.

        Only the BatchNorm layers run in training mode (dropout stays off); batch ``j`` of ``b_j``
        rows enters with momentum ``b_j / (b_1 + ... + b_j)``, so the running mean ends as the
        mean over all inputs and the running variance as the size-weighted mean of the batches'
        unbiased variances.
        """
        layers = [
            mod
            for mod in self._stack.base.modules()
            if isinstance(mod, _BatchNorm) and mod.track_running_stats
        ]
        saved = [(mod.momentum, mod.training) for mod in layers]
        seen = 0
        try:
            for mod in layers:
                mod.train(True)
            for xb in self._bn_batches():
                for mod in layers:
                    mod.momentum = len(xb) / (seen + len(xb))
                self._stack(xb, tensors=(*params, *buffers))
                seen += len(xb)
        finally:
            for mod, (momentum, mode) in zip(layers, saved, strict=True):
                mod.momentum = momentum
                mod.train(mode)

    def _bn_batches(self) -> Iterator[Tensor]:
        source = self._bn_inputs
        if source is None:
            raise ValueError(
                "this model has BatchNorm, whose statistics SWAG recomputes for each weight draw "
                "on the training inputs, but none are known here (the state was saved from a fit "
                "on a DataLoader). Give them with post.set_batchnorm_inputs(x_train)."
            )
        if isinstance(source, DataLoader):
            for batch in source:
                yield as_inputs(batch[0], dtype=self.dtype, device=self.device)
            return
        yield from torch.tensor_split(source, math.ceil(len(source) / self.bn_batch_size))

    def set_batchnorm_inputs(self, x) -> None:
        """The training inputs ``(N, ...)`` (tensor, array or DataLoader of ``(x, y)``) on which
        BatchNorm statistics are recomputed for each draw; ``fit`` sets them itself."""
        if not self.has_batchnorm:
            raise ValueError("this model has no BatchNorm layer with running statistics.")
        if not isinstance(x, DataLoader):
            x = as_inputs(x, dtype=self.dtype, device=self.device)
            self._check_input_shape(x)
        self._bn_inputs = x

    def _nothing_collected(self) -> str:
        if not bool(self._fitted):
            return "SWAG has collected no iterate yet; call fit first."
        return (
            "SWAG has collected no iterate: its last fit stopped (early stopping) before the SWA "
            f"phase began (swa_start={self.swa_start}). Fit again with a smaller swa_start or a "
            "larger patience."
        )

    # ----------------------------------------------------------------- saving
    def _extra_state(self) -> dict[str, Tensor]:
        state = {
            **super()._extra_state(),
            "swag.mean": self._mean,
            "swag.sum_sq_dev": self._sum_sq_dev,
            "swag.iterates": self._iterates,
            "swag.n_collected": self._n,
            "swag.fitted": self._fitted,
        }
        if isinstance(self._bn_inputs, Tensor):  # a DataLoader is not saved
            state[_BN_INPUTS] = self._bn_inputs
        return state

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        inputs = state.pop(_BN_INPUTS, None)
        if inputs is not None and not self.has_batchnorm:
            raise RuntimeError(f"unexpected key {_BN_INPUTS!r}: this model has no BatchNorm")
        kept, self._bn_inputs = self._bn_inputs, None  # only the fixed-shape tensors below
        try:
            super()._load_extra_state(state)
        except RuntimeError:
            self._bn_inputs = kept
            raise
        self._bn_inputs = None if inputs is None else inputs.to(self.device, self.dtype)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_swa_start(value) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif isinstance(value, int):
        ok = value >= 0
    else:
        ok = 0 <= value < 1
    if not ok:
        raise ValueError(
            "swa_start must be a fraction of the epochs in [0, 1) (a float, e.g. 0.5) or a "
            f"number of epochs >= 0 (an int, e.g. 10), got {value!r}."
        )
    return value
