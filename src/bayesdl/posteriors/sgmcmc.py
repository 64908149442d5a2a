"""Stochastic-gradient MCMC: samples of the weights from a Markov chain driven by mini-batches.

One chain runs on the user's network. Each step follows the gradient of the mini-batch loss
``L = mean NLL + (lambda / 2) ||theta||^2 / N`` (the negative log posterior divided by the data
size ``N``) and adds Gaussian noise scaled to sample the posterior
``p(theta | D)^(1 / T)`` at temperature ``T``:

* SGLD (Welling and Teh, 2011): ``theta += -lr * grad L + sqrt(2 lr T / N) * xi``;
* SGHMC (Chen, Fox and Guestrin, 2014), with momentum ``v`` and friction ``a``:
  ``v = (1 - a) v - lr * grad L + sqrt(2 a lr T / N) * xi``, ``theta += v`` (SGLD is ``a = 1``);

with ``lr`` the step on the mean loss (``epsilon = 2 lr / N`` in the papers' potential-energy
form). The cyclical schedule (Zhang et al., 2020) restarts a cosine step size ``M`` times; in each
cycle the first ``exploration`` share of the steps runs without noise (optimisation) and the rest
samples. The samples kept after the burn-in, one every ``thin`` steps (the last ``n_kept`` of
them), are stacked like an ensemble's members, so prediction is one vectorised call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from bayesdl import training
from bayesdl._options import is_number, require, resolve
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import NetworkObjective, Posterior, refuse_options, register
from bayesdl.posteriors.deep_ensemble import StackedMembers

__all__ = ["SGMCMC", "Sampler", "StepSchedule"]


class Sampler(str, Enum):
    """The chain's update rule."""

    #: Stochastic-gradient Langevin dynamics (no momentum).
    SGLD = "sgld"
    #: Stochastic-gradient Hamiltonian Monte Carlo (momentum with friction).
    SGHMC = "sghmc"


class StepSchedule(str, Enum):
    """How the step size changes along the chain."""

    #: ``lr`` throughout; samples are kept after the burn-in.
    CONSTANT = "constant"
    #: Cyclical SG-MCMC: ``cycles`` cosine cycles from ``lr`` to 0; noise and kept samples only
    #: in the last ``1 - exploration`` of each cycle.
    CYCLICAL = "cyclical"


class _Langevin(torch.optim.Optimizer):
    """SGHMC on the mean loss (SGLD with ``friction=1``); noise from the global generator."""

    def __init__(self, params, lr: float, friction: float, temperature: float) -> None:
        defaults = {"lr": lr, "friction": friction, "temperature": temperature, "noise": True}
        super().__init__(params, defaults)
        self.n_data = 1

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, a, t = group["lr"], group["friction"], group["temperature"]
            noise = math.sqrt(2 * a * lr * t / self.n_data) if group["noise"] else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if a == 1.0:  # SGLD: no velocity to keep
                    p.add_(p.grad, alpha=-lr)
                    if noise:
                        p.add_(torch.randn_like(p), alpha=noise)
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(1 - a).add_(p.grad, alpha=-lr)
                if noise:
                    v.add_(torch.randn_like(p), alpha=noise)
                p.add_(v)


@dataclass
class _Plan:
    """Where the chain is: the step size and noise of each step, and which steps are kept."""

    steps: int  # in the whole run
    burn_in: int  # steps
    thin: int
    lr: float
    schedule: StepSchedule
    cycles: int
    exploration: float

    @property
    def cycle_length(self) -> int:
        return math.ceil(self.steps / self.cycles)

    def position(self, step: int) -> float:
        """Share of the current cycle done before ``step`` (0-based)."""
        return (step % self.cycle_length) / self.cycle_length

    def rate(self, step: int) -> float:
        if self.schedule is StepSchedule.CONSTANT:
            return self.lr
        return 0.5 * self.lr * (math.cos(math.pi * self.position(step)) + 1)

    def noisy(self, step: int) -> bool:
        return self.schedule is StepSchedule.CONSTANT or self.position(step) >= self.exploration

    def keeps(self, step: int) -> bool:
        """Whether the weights after ``step`` (0-based) are kept."""
        if step < self.burn_in or not self.noisy(step):
            return False
        if self.schedule is StepSchedule.CONSTANT:
            return (step - self.burn_in + 1) % self.thin == 0
        start = self.cycle_length * (step // self.cycle_length)
        first = start + math.ceil(self.exploration * self.cycle_length)
        return (step - max(first, self.burn_in) + 1) % self.thin == 0


class _ChainObjective(NetworkObjective):
    """The chain on the network's own parameters: mean NLL + Gaussian prior / N."""

    def __init__(self, post: SGMCMC, plan: _Plan) -> None:
        super().__init__(post.network)
        self.post, self.plan = post, plan
        self.step = 0
        self.optimizer: _Langevin | None = None
        #: The ring of samples and its count after each of the last epochs (0: the start), so
        #: that a divergence restores the samples of the epoch whose weights the loop restores
        #: (a sample is kept every few steps: a diverging epoch may have kept bad ones).
        self.kept: dict[int, tuple[list[Tensor], int]] = {0: self._ring()}

    def _ring_tensors(self) -> tuple[Tensor, ...]:
        return (*self.post._params.values(), *self.post._buffers.values())

    def _ring(self) -> tuple[list[Tensor], int]:
        return [t.detach().clone() for t in self._ring_tensors()], int(self.post._n)

    def end_epoch(self, epoch: int, optimizer) -> None:
        """After an epoch whose weights the loop found finite: its samples are good."""
        self.kept[epoch] = self._ring()
        for old in [e for e in self.kept if e < epoch - 2]:
            del self.kept[old]

    def restored(self, epoch: int) -> None:
        """The loop put back the weights of the end of ``epoch``: put back the samples kept up
        to then, where there are any (a resumed fit has none before its first epoch)."""
        if epoch not in self.kept:
            return
        tensors, n = self.kept[epoch]
        with torch.no_grad():
            for t, saved in zip(self._ring_tensors(), tensors, strict=True):
                t.copy_(saved)
        self.post._n.fill_(n)

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        if self.optimizer is not None:
            self.optimizer.n_data = n_data
        prior = sum(p.square().sum() for p in self.parameters())
        return super().loss(x, y, n_data) + 0.5 * self.post.prior_precision * prior / n_data

    def make_optimizer(self, params: list[Tensor], config: training.TrainConfig) -> _Langevin:
        post = self.post
        friction = 1.0 if post.sampler is Sampler.SGLD else post.friction
        self.optimizer = _Langevin(params, config.lr, friction, post.temperature)
        self._set_rate()
        return self.optimizer

    def _set_rate(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.plan.rate(self.step)
            group["noise"] = self.plan.noisy(self.step)

    def after_step(self) -> None:
        if self.plan.keeps(self.step):
            self.post._keep()
        self.step += 1
        self._set_rate()

    def checkpoint_state(self) -> tuple[dict, dict[str, Tensor]]:
        post = self.post
        samples = {f"samples.{k}": v.detach() for k, v in post._params.items()}
        samples.update({f"samples.{k}": v for k, v in post._buffers.items()})
        return {"step": self.step, "n_collected": post.n_collected}, samples

    def load_checkpoint_state(self, json_part: dict, tensors: dict[str, Tensor]) -> None:
        post = self.post
        self.step = int(json_part["step"])
        post._n.fill_(int(json_part["n_collected"]))
        with torch.no_grad():
            for k, v in (*post._params.items(), *post._buffers.items()):
                v.copy_(tensors[f"samples.{k}"])
        if self.optimizer is not None:
            self._set_rate()


@register
class SGMCMC(StackedMembers):
    """Stochastic-gradient MCMC over all weights of ``model``: SGLD, SGHMC or cyclical SG-MCMC.

    Parameters
    ----------
    model, likelihood:
        The network and what its outputs mean (as for every posterior).
    sampler:
        ``"sghmc"`` (default) or ``"sgld"``; see :class:`Sampler`.
    n_kept:
        How many samples are kept (the last ones, a ring of this size); ``predict`` uses them
        all, one draw each, so ``sample_outputs(x)`` is ``(n_kept, B, K)`` once the chain has
        kept that many.
    burn_in:
        Steps before the first kept sample: a fraction of the run (default ``0.5``; ``0`` for the
        cyclical schedule, whose exploration stages do the burning in) or a number of epochs.
    thin:
        Keep one sample every ``thin`` steps (``None``: spread ``n_kept`` samples evenly over
        the sampling steps of the run).
    temperature:
        ``T`` of the tempered posterior ``p(theta | D)^(1/T)``; ``1`` (default) is the Bayes
        posterior, ``T < 1`` a cold one (Wenzel et al., 2020), ``0`` noise-free SGD.
    prior_precision:
        ``lambda`` of the Gaussian prior ``N(0, 1/lambda)`` on every weight (default 1).
    friction:
        SGHMC's ``a`` in ``(0, 1]``: the momentum keeps ``1 - a`` of itself per step (default
        ``0.1``).
    schedule, cycles, exploration:
        ``"constant"`` (default) or ``"cyclical"`` (see :class:`StepSchedule`) with ``cycles``
        cycles (default 4) whose first ``exploration`` share (default 0.8) runs without noise.
    seed:
        Unused for the chain (``fit``'s ``seed`` seeds it); kept for the stacked samples' API.

    ``fit``'s ``lr`` is the step on the mean loss (small: e.g. ``1e-3`` to ``1e-2`` with
    standardised data); its ``optimizer``, ``weight_decay`` (use ``prior_precision``),
    ``lr_schedule`` and ``patience`` do not apply.
    """

    name = "sgmcmc"
    #: There are no samples before ``fit``: predicting earlier raises.
    requires_fit = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        sampler: Sampler | str = Sampler.SGHMC,
        n_kept: int = 20,
        burn_in: float | int | None = None,
        thin: int | None = None,
        temperature: float = 1.0,
        prior_precision: float = 1.0,
        friction: float = 0.1,
        schedule: StepSchedule | str = StepSchedule.CONSTANT,
        cycles: int = 4,
        exploration: float = 0.8,
        seed: int | None = 0,
    ) -> None:
        self.sampler = resolve(Sampler, sampler, "sampler")
        self.schedule = resolve(StepSchedule, schedule, "schedule")
        require(isinstance(n_kept, int) and not isinstance(n_kept, bool) and n_kept >= 1,
               "n_kept", n_kept, "a positive integer")  # fmt: skip
        if burn_in is None:
            burn_in = 0.0 if self.schedule is StepSchedule.CYCLICAL else 0.5
        require(
            (isinstance(burn_in, float) and 0 <= burn_in < 1)
            or (isinstance(burn_in, int) and not isinstance(burn_in, bool) and burn_in >= 0),
            "burn_in",
            burn_in,
            "a fraction in [0, 1) of the run or a whole number of epochs",
        )
        require(thin is None or (isinstance(thin, int) and thin >= 1), "thin", thin,
               "None or a positive integer")  # fmt: skip
        require(is_number(temperature) and temperature >= 0, "temperature", temperature, ">= 0")
        require(is_number(prior_precision) and prior_precision > 0, "prior_precision",
               prior_precision, "> 0")  # fmt: skip
        require(is_number(friction) and 0 < friction <= 1, "friction", friction, "in (0, 1]")
        require(isinstance(cycles, int) and cycles >= 1, "cycles", cycles, "a positive integer")
        require(is_number(exploration) and 0 <= exploration < 1, "exploration", exploration,
               "in [0, 1)")  # fmt: skip
        self.n_kept, self.burn_in, self.thin = n_kept, burn_in, thin
        self.temperature, self.prior_precision = float(temperature), float(prior_precision)
        self.friction, self.cycles, self.exploration = float(friction), cycles, float(exploration)
        super().__init__(
            model,
            likelihood,
            n_members=n_kept,
            independent_data_order=False,
            reinitialize=False,
            seed=seed,
        )
        self._n = torch.zeros((), dtype=torch.long, device=self.device)
        self._next = None

    def options(self) -> dict:
        return {
            "sampler": self.sampler.value,
            "n_kept": self.n_kept,
            "burn_in": self.burn_in,
            "thin": self.thin,
            "temperature": self.temperature,
            "prior_precision": self.prior_precision,
            "friction": self.friction,
            "schedule": self.schedule.value,
            "cycles": self.cycles,
            "exploration": self.exploration,
            "seed": self.seed,
        }

    @property
    def n_collected(self) -> int:
        """Samples kept so far (at most ``n_kept``)."""
        return min(int(self._n), self.n_kept)

    @property
    def default_n_samples(self) -> int:  # type: ignore[override]
        return max(1, self.n_collected)

    def _resolve_n_samples(self, n_samples: int | None) -> int:
        have = self.n_collected
        if have == 0:
            raise ValueError(
                "the chain has kept no sample yet: call fit first (with enough epochs to pass "
                "the burn-in)."
            )
        if n_samples is not None and n_samples != have:
            raise ValueError(
                f"SGMCMC returns exactly one draw per kept sample ({have}); got "
                f"n_samples={n_samples!r}. Pass n_samples=None or {have}."
            )
        return have

    def _probe_n_samples(self) -> int:
        return 1

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        if self.n_collected == 0:  # the output-width probe before fit: the chain's weights
            with self._evaluating(), torch.no_grad():
                was = self.network.training
                self.network.eval()
                try:
                    return self.network(x).unsqueeze(0)
                finally:
                    self.network.train(was)
        tensors = tuple(t[:n_samples] for t in self._stack.tensors())
        with self._evaluating():
            return self._stack(x, tensors=tensors)

    # ----------------------------------------------------------------- training
    def fit(self, data, *, val_data=None, **training_options) -> training.History:
        """Run the chain (see :class:`Posterior.fit`) and keep its samples."""
        refuse_options(
            "SGMCMC",
            training_options,
            {
                "weight_decay": (0, 0.0),
                "lr_schedule": ("constant",),
                "patience": (None,),
                "optimizer": ("adam",),
            },
            "the prior is prior_precision, the step size follows the schedule option, the "
            "update is the sampler and the chain is not cut short",
        )
        config = training.TrainConfig(**training_options)
        n = training.training_size(data, config, val_data)
        if not n:  # no rows, or not data: the fit loop says what is wrong
            return super().fit(data, val_data=val_data, **training_options)
        loader = isinstance(data, torch.utils.data.DataLoader)
        per_epoch = len(data) if loader else -(-n // config.batch_size)  # steps
        steps = per_epoch * config.epochs
        burn = self.burn_in
        burn_steps = round(burn * steps) if isinstance(burn, float) else burn * per_epoch
        if burn_steps >= steps:
            raise ValueError(
                f"burn_in={burn!r} leaves no step to sample in {config.epochs} epochs of "
                f"{per_epoch} steps; train longer or shorten the burn-in."
            )
        plan = _Plan(steps, burn_steps, 1, config.lr, self.schedule, self.cycles, self.exploration)
        sampling = sum(1 for s in range(burn_steps, steps) if plan.noisy(s))
        plan.thin = self.thin or max(1, sampling // self.n_kept)
        self._next = plan
        self._n.zero_()
        try:
            return super().fit(data, val_data=val_data, **training_options)
        finally:
            self._next = None

    def _objective(self) -> _ChainObjective:
        return _ChainObjective(self, self._next)

    def _member_shard(self, group):
        return Posterior._member_shard(self, group)  # one chain: nothing to spread

    def _keep(self) -> None:
        """Write the chain's current weights into the next slot of the ring of samples."""
        slot = int(self._n) % self.n_kept
        own = {**dict(self.network.named_parameters()), **dict(self.network.named_buffers())}
        with torch.no_grad():
            for name, stacked in (*self._params.items(), *self._buffers.items()):
                stacked[slot].copy_(own[name])
        self._n.add_(1)

    # ----------------------------------------------------------------- state
    def _loaded_in_place(self) -> dict[str, Tensor]:
        return {k: v for k, v in self._extra_state().items() if not k.startswith("network.")}

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        chain = {k: state.pop(k) for k in list(state) if k.startswith("network.")}
        super()._load_extra_state(state)
        Posterior._load_extra_state(self, chain)  # the chain's weights, copied into the module

    def _extra_state(self) -> dict[str, Tensor]:
        """The kept samples, the count and the chain's current weights."""
        return {
            **super()._extra_state(),
            **{f"network.{k}": v for k, v in self.network.state_dict().items()},
            "sgmcmc.n_collected": self._n,
        }
