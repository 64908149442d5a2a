"""Contextual-bandit agents: Thompson sampling and UCB over any posterior, and baselines.

An agent decides a batch of contexts with :meth:`Agent.act` and learns from the rewards with
:meth:`Agent.update`. Between two refits its model does not change, so the rounds up to the
next refit (:meth:`Agent.steps_until_update`) can be decided in one batched call without
changing what any single round would have done; :func:`~bayesdl.bandits.run` does so.

:class:`PosteriorAgent` models the reward of action ``a`` in context ``x`` with a network on the
row ``[x, one_hot(a)]`` (one output: the expected reward) under any posterior of this library,
and keeps a replay buffer that it refits on every ``refit_every`` rounds, warm-starting from
the current weights. Its policies (:class:`Policy`):

* ``"thompson"``: one posterior draw per decision (an ensemble member, a weight draw, a dropout
  mask, a Laplace or SWAG sample); the action best under that draw. It explores exactly as much
  as the posterior is unsure (Thompson, 1933; Riquelme et al., 2018).
* ``"ucb"``: the posterior mean plus ``ucb_scale`` epistemic standard deviations.
* ``"greedy"`` and ``"epsilon_greedy"``: the posterior mean (a random action with probability
  ``epsilon``), the baselines.

With a ``floor`` the agent is safe: it never takes an action whose lower bound (the
``floor_level`` quantile of the posterior draws of its expected reward) falls below the floor;
when no action clears it, it takes ``fallback`` (or the action of highest lower bound).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn

from bayesdl._options import resolve
from bayesdl.data import as_inputs
from bayesdl.models import mlp
from bayesdl.posteriors.base import Posterior
from bayesdl.posteriors.deep_ensemble import DeepEnsemble
from bayesdl.posteriors.stacked import joint_draws

__all__ = [
    "Agent",
    "LinearThompson",
    "Policy",
    "PosteriorAgent",
    "Uniform",
    "action_rows",
    "reward_model",
]

#: Contexts decided per posterior call when each needs its own draw (keeps ``chunk^2 * A`` rows).
_CHUNK = 64


def action_rows(contexts: Tensor, n_actions: int) -> Tensor:
    """The network inputs of every (context, action) pair: ``[x, one_hot(a)]``.

    ``contexts`` ``(B, d)`` gives ``(B * A, d + A)`` rows, context-major (row ``b * A + a``).
    """
    b, d = contexts.shape
    eye = torch.eye(n_actions, dtype=contexts.dtype, device=contexts.device)
    return torch.cat(
        [contexts[:, None, :].expand(b, n_actions, d), eye.expand(b, n_actions, n_actions)], dim=2
    ).reshape(b * n_actions, d + n_actions)


def reward_model(
    context_dim: int,
    n_actions: int,
    hidden: tuple[int, ...] = (100, 100),
    *,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A network for :class:`PosteriorAgent`: an MLP (:func:`bayesdl.models.mlp`) from the row
    ``[x, one_hot(a)]`` ``(B, d + A)`` to the expected reward ``(B, 1)``; ``dropout > 0`` for
    MC dropout. It is saved by name in model and agent files."""
    return mlp(context_dim + n_actions, 1, hidden, dropout=dropout, dtype=dtype)


class Agent(ABC):
    """A contextual-bandit agent over ``n_actions`` actions."""

    #: A short name for tables.
    name: str = "agent"

    def __init__(self, n_actions: int) -> None:
        if isinstance(n_actions, bool) or not isinstance(n_actions, int) or n_actions < 2:
            raise ValueError(f"n_actions must be an integer >= 2, got {n_actions!r}.")
        self.n_actions = n_actions
        self.context_dim: int | None = None

    @abstractmethod
    def act(self, contexts, *, generator: torch.Generator | None = None) -> Tensor:
        """Actions ``(B,)`` (int64) for contexts ``(B, d)``, each decided as a round of its own."""

    @abstractmethod
    def update(self, contexts, actions, rewards) -> None:
        """Learn from rounds played: contexts ``(B, d)``, actions ``(B,)``, rewards ``(B,)``."""

    def steps_until_update(self) -> int:
        """Rounds that can be decided before the agent's model next changes (at least 1)."""
        return 1

    # ----------------------------------------------------------------- files
    def _agent_state(self) -> tuple[dict, dict, dict[str, Tensor]]:
        """Constructor options, JSON state and tensors, for :func:`~bayesdl.bandits.save_agent`."""
        return {"n_actions": self.n_actions}, {"context_dim": self.context_dim}, {}

    def _load_agent_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.context_dim = state["context_dim"]

    # ----------------------------------------------------------------- boundary helpers
    def _contexts(self, contexts) -> Tensor:
        x = torch.as_tensor(contexts) if isinstance(contexts, np.ndarray) else contexts
        float_input = isinstance(x, Tensor) and x.is_floating_point()
        dtype = x.dtype if float_input else torch.get_default_dtype()
        x = as_inputs(x, dtype=dtype, device=torch.device("cpu"), name="contexts")
        if x.ndim != 2:
            raise ValueError(f"contexts must be a (B, d) array, got shape {tuple(x.shape)}.")
        if self.context_dim is None:
            self.context_dim = x.shape[1]
        elif x.shape[1] != self.context_dim:
            raise ValueError(
                f"contexts have {x.shape[1]} features, but this agent has seen contexts of "
                f"{self.context_dim}; pass (B, {self.context_dim}) arrays."
            )
        return x

    def _observations(self, contexts, actions, rewards) -> tuple[Tensor, Tensor, Tensor]:
        x = self._contexts(contexts)
        a = torch.as_tensor(actions)
        r = torch.as_tensor(rewards)
        if a.shape != (len(x),) or r.shape != (len(x),):
            raise ValueError(
                f"update needs one action and one reward per context: contexts {tuple(x.shape)}, "
                f"actions {tuple(a.shape)}, rewards {tuple(r.shape)}."
            )
        if a.is_floating_point() or (
            len(a) and (int(a.min()) < 0 or int(a.max()) >= self.n_actions)
        ):
            raise ValueError(f"actions must be integers in [0, {self.n_actions}).")
        r = r.to(torch.float64)
        if not torch.isfinite(r).all():
            raise ValueError("rewards contain NaN or inf.")
        return x, a.long(), r


class Uniform(Agent):
    """Every action with probability ``1 / A``: the reference that regrets are divided by."""

    name = "uniform"

    def act(self, contexts, *, generator=None) -> Tensor:
        x = self._contexts(contexts)
        return torch.randint(self.n_actions, (len(x),), generator=generator)

    def update(self, contexts, actions, rewards) -> None:
        self._observations(contexts, actions, rewards)

    def steps_until_update(self) -> int:
        return 2**31  # it never learns


class Policy(str, Enum):
    """How a :class:`PosteriorAgent` turns its posterior into an action."""

    #: One posterior draw per decision; the best action under that draw.
    THOMPSON = "thompson"
    #: Posterior mean plus ``ucb_scale`` epistemic standard deviations.
    UCB = "ucb"
    #: The posterior mean's best action.
    GREEDY = "greedy"
    #: Greedy, but a uniformly random action with probability ``epsilon``.
    EPSILON_GREEDY = "epsilon_greedy"


class _Buffer:
    """Every round played: contexts ``(N, d)``, actions ``(N,)``, rewards ``(N,)`` (float64)."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self._joined: tuple[Tensor, Tensor, Tensor] | None = None
        self.size = 0

    def add(self, x: Tensor, a: Tensor, r: Tensor) -> None:
        self.parts.append((x, a, r))
        self._joined = None
        self.size += len(x)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._joined is None:
            if not self.parts:
                raise ValueError("the replay buffer is empty.")
            x, a, r = (torch.cat(t) for t in zip(*self.parts, strict=True))
            self.parts = [(x, a, r)]
            self._joined = (x, a, r)
        return self._joined


class PosteriorAgent(Agent):
    """A contextual-bandit agent that models rewards with any posterior of this library.

    Parameters
    ----------
    posterior:
        A :class:`~bayesdl.posteriors.base.Posterior` with a Gaussian likelihood and one target,
        over a network that takes ``d + A`` inputs (the context and a one-hot action, see
        :func:`action_rows`) and outputs the expected reward; :func:`reward_model` builds one.
        Unfitted: the agent fits it.
    n_actions:
        ``A``.
    policy:
        A :class:`Policy` (default ``"thompson"``).
    refit_every:
        Rounds between refits (default 20). Each refit warm-starts from the current weights.
    train_steps:
        Optimiser steps per refit, about (default 100): one epoch over the whole buffer with
        batches of at least ``batch_size`` rows, grown so that an epoch is at most this many
        steps, and more epochs while the buffer is small.
    batch_size, lr, weight_decay:
        Of the refits (see :class:`~bayesdl.training.TrainConfig`).
    initial_pulls:
        Each action is played this many times in turn before the first fit (default 2).
    epsilon:
        Exploration rate of ``"epsilon_greedy"`` (default 0.05).
    ucb_scale:
        Standard deviations added by ``"ucb"`` (default 1).
    n_samples:
        Posterior draws for the mean, the UCB spread and the safety bound (``None``: the
        method's default; an ensemble always uses its members).
    floor, floor_level, fallback:
        Safe mode: never take an action whose ``floor_level`` quantile (default 0.05) of the
        drawn expected rewards is below ``floor`` (``None``, the default: off); when none
        clears it, take ``fallback`` (an action index; ``None``: the highest lower bound).
    standardize_rewards:
        Fit the network to rewards standardised by the buffer's mean and standard deviation
        (default ``True``); decisions use the original scale.
    seed:
        Seeds the refits (data order, dropout, bootstrap); refit ``k`` uses ``seed + k``.
    """

    def __init__(
        self,
        posterior: Posterior,
        n_actions: int,
        *,
        policy: Policy | str = Policy.THOMPSON,
        refit_every: int = 20,
        train_steps: int = 100,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        initial_pulls: int = 2,
        epsilon: float = 0.05,
        ucb_scale: float = 1.0,
        n_samples: int | None = None,
        floor: float | None = None,
        floor_level: float = 0.05,
        fallback: int | None = None,
        standardize_rewards: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(n_actions)
        if not isinstance(posterior, Posterior):
            raise TypeError(
                f"posterior must be a bayesdl Posterior, got {type(posterior).__name__}."
            )
        if posterior.task != "regression" or posterior.likelihood.n_targets != 1:
            raise ValueError(
                "the agent models each action's reward: give the posterior a Gaussian likelihood "
                "with one target (likelihood='homoscedastic_gaussian' or 'gaussian'), got "
                f"{type(posterior.likelihood).__name__}."
            )
        self.posterior = posterior
        self.policy = resolve(Policy, policy, "policy")
        for label, value in (
            ("refit_every", refit_every),
            ("train_steps", train_steps),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}.")
        if isinstance(initial_pulls, bool) or not isinstance(initial_pulls, int):
            raise ValueError(f"initial_pulls must be an integer >= 1, got {initial_pulls!r}.")
        if initial_pulls < 1:
            raise ValueError(f"initial_pulls must be an integer >= 1, got {initial_pulls!r}.")
        if not (isinstance(epsilon, (int, float)) and 0 <= epsilon <= 1):
            raise ValueError(f"epsilon must be a probability in [0, 1], got {epsilon!r}.")
        if not (isinstance(ucb_scale, (int, float)) and ucb_scale >= 0):
            raise ValueError(f"ucb_scale must be a number >= 0, got {ucb_scale!r}.")
        if not (isinstance(floor_level, (int, float)) and 0 < floor_level < 1):
            raise ValueError(f"floor_level must lie in (0, 1), got {floor_level!r}.")
        if floor is not None and not (isinstance(floor, (int, float)) and math.isfinite(floor)):
            raise ValueError(f"floor must be None or a finite number, got {floor!r}.")
        if fallback is not None and (
            isinstance(fallback, bool)
            or not isinstance(fallback, int)
            or not 0 <= fallback < n_actions
        ):
            raise ValueError(f"fallback must be None or an action in [0, {n_actions}).")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        self.refit_every = refit_every
        self.train_steps = train_steps
        self.batch_size = batch_size
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.initial_pulls = initial_pulls
        self.epsilon = float(epsilon)
        self.ucb_scale = float(ucb_scale)
        self.n_samples = n_samples
        self.floor = None if floor is None else float(floor)
        self.floor_level = float(floor_level)
        self.fallback = fallback
        self.standardize_rewards = bool(standardize_rewards)
        self.seed = seed
        self.name = f"{self.policy.value}:{posterior.name}"
        self.buffer = _Buffer()
        #: Rounds decided so far, refits done, and the buffer size at the last refit.
        self.n_decided = 0
        self.n_refits = 0
        self.fitted_at = 0
        #: The reward standardisation of the last refit: ``(mean, std)``.
        self.reward_scale = (0.0, 1.0)

    # ----------------------------------------------------------------- deciding
    @property
    def is_fitted(self) -> bool:
        return self.n_refits > 0

    def steps_until_update(self) -> int:
        if not self.is_fitted:
            return max(1, self.initial_pulls * self.n_actions - self.buffer.size)
        return max(1, self.refit_every - (self.buffer.size - self.fitted_at))

    def act(self, contexts, *, generator: torch.Generator | None = None) -> Tensor:
        """Actions ``(B,)`` for contexts ``(B, d)``; before the first fit, each action in turn."""
        x = self._contexts(contexts)
        b = len(x)
        if not self.is_fitted:
            actions = (self.n_decided + torch.arange(b)) % self.n_actions
        else:
            x = x.to(dtype=self.posterior.dtype, device=self.posterior.device)
            actions = torch.cat(
                [self._choose(x[i : i + _CHUNK], generator) for i in range(0, b, _CHUNK)]
            ).cpu()
        self.n_decided += b
        return actions

    def expected_rewards(self, contexts, n_samples: int | None = None, *, generator=None):
        """Posterior draws of every action's expected reward, ``(S, B, A)``, on the original
        reward scale (``S``: ``n_samples``, the agent's, or the method's default)."""
        if not self.is_fitted:
            raise ValueError("the agent has not been fitted yet: play and update it first.")
        x = self._contexts(contexts).to(dtype=self.posterior.dtype, device=self.posterior.device)
        return self._draws(x, self._n(n_samples), generator)

    def _n(self, n_samples: int | None) -> int | None:
        if isinstance(self.posterior, DeepEnsemble):
            return None
        return self.n_samples if n_samples is None else n_samples

    def _draws(self, x: Tensor, n_samples: int | None, generator) -> Tensor:
        # A draw scores every action of a context: its rows must share the draw's weights.
        with joint_draws(self.posterior):
            out = self.posterior.sample_outputs(
                action_rows(x, self.n_actions), n_samples, generator=generator
            )
        mean = self.posterior.likelihood.mean_variance(out)[0]  # (S, B * A)
        center, scale = self.reward_scale
        return (mean * scale + center).reshape(len(mean), len(x), self.n_actions)

    def _one_draw_each(self, x: Tensor, generator) -> Tensor:
        """Each context's values under a posterior draw of its own, ``(B, A)``."""
        b = len(x)
        if isinstance(self.posterior, DeepEnsemble):  # the members are the draws: pick one
            draws = self._draws(x, None, generator)
            member = torch.randint(len(draws), (b,), generator=_cpu(generator))
            return draws[member.to(draws.device), torch.arange(b, device=draws.device)]
        draws = self._draws(x, b, generator)  # (B, B, A): draw i for context i
        index = torch.arange(b, device=draws.device)
        return draws[index, index]

    def _choose(self, x: Tensor, generator) -> Tensor:
        b, device = len(x), x.device
        draws = None
        if self.policy is Policy.THOMPSON:
            values = self._one_draw_each(x, generator)
        else:
            draws = self._draws(x, self._n(None), generator)
            values = draws.mean(dim=0)
            if self.policy is Policy.UCB:
                values = values + self.ucb_scale * draws.std(dim=0, unbiased=False)
        safe = torch.ones(b, self.n_actions, dtype=torch.bool, device=device)
        fallback = None
        if self.floor is not None:
            if draws is None:
                draws = self._draws(x, self._n(None), generator)
            lower = torch.quantile(draws, self.floor_level, dim=0)
            safe = lower >= self.floor
            fallback = (
                lower.argmax(dim=1)
                if self.fallback is None
                else torch.full((b,), self.fallback, device=device)
            )
        actions = values.masked_fill(~safe, -math.inf).argmax(dim=1)
        if self.policy is Policy.EPSILON_GREEDY and self.epsilon > 0:
            g = _cpu(generator)
            explore = (torch.rand(b, generator=g) < self.epsilon).to(device)
            # A random action among the safe ones.
            noise = torch.rand(b, self.n_actions, generator=g).to(device)
            random = noise.masked_fill(~safe, -1.0).argmax(dim=1)
            actions = torch.where(explore, random, actions)
        if fallback is not None:
            actions = torch.where(safe.any(dim=1), actions, fallback)
        return actions

    # ----------------------------------------------------------------- files
    def _agent_state(self) -> tuple[dict, dict, dict[str, Tensor]]:
        options = {
            "n_actions": self.n_actions,
            "policy": self.policy.value,
            "refit_every": self.refit_every,
            "train_steps": self.train_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "initial_pulls": self.initial_pulls,
            "epsilon": self.epsilon,
            "ucb_scale": self.ucb_scale,
            "n_samples": self.n_samples,
            "floor": self.floor,
            "floor_level": self.floor_level,
            "fallback": self.fallback,
            "standardize_rewards": self.standardize_rewards,
            "seed": self.seed,
        }
        state = {
            "context_dim": self.context_dim,
            "n_decided": self.n_decided,
            "n_refits": self.n_refits,
            "fitted_at": self.fitted_at,
            "reward_scale": list(self.reward_scale),
        }
        tensors = {}
        if self.buffer.size:
            x, a, r = self.buffer.tensors()
            tensors = {"buffer.contexts": x, "buffer.actions": a, "buffer.rewards": r}
        return options, state, tensors

    def _load_agent_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.context_dim = state["context_dim"]
        self.n_decided = int(state["n_decided"])
        self.n_refits = int(state["n_refits"])
        self.fitted_at = int(state["fitted_at"])
        center, scale = state["reward_scale"]
        self.reward_scale = (float(center), float(scale))
        if tensors:
            x, a, r = (tensors[f"buffer.{k}"] for k in ("contexts", "actions", "rewards"))
            self.buffer.add(x, a, r)
        if self.fitted_at > self.buffer.size or set(tensors) - {
            "buffer.contexts",
            "buffer.actions",
            "buffer.rewards",
        }:
            raise ValueError("the agent's buffer does not match its counters.")

    # ----------------------------------------------------------------- learning
    def update(self, contexts, actions, rewards) -> None:
        """Add the rounds to the replay buffer; refit when ``refit_every`` new rounds (or, the
        first time, the initial pulls) have arrived."""
        x, a, r = self._observations(contexts, actions, rewards)
        self.buffer.add(x, a, r)
        if self.is_fitted:
            due = self.buffer.size - self.fitted_at >= self.refit_every
        else:
            due = self.buffer.size >= self.initial_pulls * self.n_actions
        if due:
            self.refit()

    def refit(self) -> None:
        """Train the posterior on the whole buffer, from its current weights."""
        x, a, r = self.buffer.tensors()
        post = self.posterior
        inputs = action_rows(x, self.n_actions).reshape(len(x), self.n_actions, -1)
        inputs = inputs[torch.arange(len(x)), a].to(dtype=post.dtype, device=post.device)
        center, scale = 0.0, 1.0
        if self.standardize_rewards:
            center = float(r.mean())
            scale = float(r.std()) if len(r) > 1 else 1.0
            scale = scale if scale > 1e-12 else 1.0
        y = ((r - center) / scale).to(dtype=post.dtype, device=post.device)
        n = len(inputs)
        batch = max(self.batch_size, math.ceil(n / self.train_steps))
        epochs = max(1, round(self.train_steps / math.ceil(n / batch)))
        if not self.is_fitted:
            self._check_width(inputs)
        post.fit(
            (inputs, y),
            epochs=epochs,
            batch_size=batch,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=self.seed + self.n_refits,
            progress=False,
        )
        self.reward_scale = (center, scale)
        self.n_refits += 1
        self.fitted_at = self.buffer.size

    def _check_width(self, inputs: Tensor) -> None:
        try:
            with torch.no_grad():
                out = self.posterior.model(inputs[:1])
        except RuntimeError as err:
            raise ValueError(
                f"the posterior's network must take d + A = {inputs.shape[1]} inputs (the "
                f"context and a one-hot action) and output the reward; it failed on such a "
                f"row: {str(err).splitlines()[0]}. Build it with "
                f"bayesdl.bandits.reward_model({inputs.shape[1] - self.n_actions}, "
                f"{self.n_actions})."
            ) from None
        if out.shape[-1] != self.posterior.likelihood.n_outputs_raw:
            raise ValueError(
                f"the network outputs {out.shape[-1]} numbers per row; the posterior's "
                f"likelihood needs {self.posterior.likelihood.n_outputs_raw}."
            )


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` where it is a CPU generator, else ``None`` (torch's global one)."""
    return generator if generator is None or generator.device.type == "cpu" else None


class LinearThompson(Agent):
    """Thompson sampling with an exact Bayesian linear regression per action ("LinFullPost").

    For action ``a`` the reward is ``[x, 1] . beta_a + noise`` with the conjugate prior
    ``sigma_a^2 ~ InvGamma(a0, b0)``, ``beta_a | sigma_a^2 ~ N(0, sigma_a^2 / lambda_prior
    I)``; the posterior is updated exactly after every round and a draw of
    ``(sigma_a^2, beta_a)`` per action and decision picks the action. The defaults are those
    of Riquelme et al. (2018). Computed in float64.

    Parameters
    ----------
    n_actions: ``A``.
    a0, b0: the inverse-gamma prior of the noise variance.
    lambda_prior: prior precision (relative to the noise) of the coefficients.
    initial_pulls: each action is played this many times in turn first.
    """

    name = "linear_thompson"

    def __init__(
        self,
        n_actions: int,
        *,
        a0: float = 6.0,
        b0: float = 6.0,
        lambda_prior: float = 0.25,
        initial_pulls: int = 2,
    ) -> None:
        super().__init__(n_actions)
        for label, value in (("a0", a0), ("b0", b0), ("lambda_prior", lambda_prior)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{label} must be a number > 0, got {value!r}.")
        if isinstance(initial_pulls, bool) or not isinstance(initial_pulls, int):
            raise ValueError(f"initial_pulls must be an integer >= 0, got {initial_pulls!r}.")
        if initial_pulls < 0:
            raise ValueError(f"initial_pulls must be an integer >= 0, got {initial_pulls!r}.")
        self.a0, self.b0, self.lambda_prior = float(a0), float(b0), float(lambda_prior)
        self.initial_pulls = initial_pulls
        self.n_decided = 0
        self._xtx: Tensor | None = None  # (A, p, p)
        self._xty: Tensor | None = None  # (A, p)
        self._yty = torch.zeros(n_actions, dtype=torch.float64)
        self._count = torch.zeros(n_actions, dtype=torch.float64)

    def _features(self, x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)

    def _ensure(self, p: int) -> None:
        if self._xtx is None:
            self._xtx = torch.zeros(self.n_actions, p, p, dtype=torch.float64)
            self._xty = torch.zeros(self.n_actions, p, dtype=torch.float64)

    def posterior_parameters(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each action's posterior: mean ``(A, p)``, precision ``(A, p, p)`` (of ``beta`` in
        units of ``sigma^2``: ``Cov = sigma^2 Lambda^-1``), and the inverse-gamma ``a, b``
        ``(A,)``; ``p = d + 1`` (the last coefficient is the intercept)."""
        mean, precision, _, a, b = self._posterior()
        return mean, precision, a, b

    def _posterior(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`posterior_parameters` and the precision's Cholesky factor (after the
        precision)."""
        if self._xtx is None:
            raise ValueError("the agent has seen no context yet.")
        p = self._xtx.shape[1]
        precision = self._xtx + self.lambda_prior * torch.eye(p, dtype=torch.float64)
        chol = torch.linalg.cholesky(precision)
        mean = torch.cholesky_solve(self._xty[..., None], chol)[..., 0]
        a = self.a0 + self._count / 2
        quad = (mean * (precision @ mean[..., None])[..., 0]).sum(-1)
        b = self.b0 + 0.5 * (self._yty - quad).clamp_min(0.0)
        return mean, precision, chol, a, b

    def act(self, contexts, *, generator=None) -> Tensor:
        x = self._contexts(contexts)
        n = len(x)
        phi = self._features(x)
        self._ensure(phi.shape[1])
        forced = max(0, min(n, self.initial_pulls * self.n_actions - self.n_decided))
        actions = (self.n_decided + torch.arange(n)) % self.n_actions
        if forced < n:
            mean, _, chol, a, b = self._posterior()
            g = _cpu(generator)
            m = n - forced
            # sigma^2 ~ InvGamma(a, b) per decision and action: b / Gamma(a, 1).
            gamma = torch._standard_gamma(a.expand(m, -1).contiguous(), generator=g)
            sigma2 = b / gamma  # (m, A)
            # beta = mean + sigma * L^-T z, with precision = L L^T: covariance sigma^2 Lambda^-1.
            z = torch.randn(m, *mean.shape, generator=g, dtype=torch.float64)  # (m, A, p)
            offset = torch.linalg.solve_triangular(
                chol.mT.expand(m, -1, -1, -1), z[..., None], upper=True
            )[..., 0]
            beta = mean + sigma2.sqrt()[..., None] * offset  # (m, A, p)
            values = (beta * phi[forced:, None, :]).sum(-1)
            actions[forced:] = values.argmax(dim=1)
        self.n_decided += n
        return actions

    def update(self, contexts, actions, rewards) -> None:
        x, a, r = self._observations(contexts, actions, rewards)
        phi = self._features(x)
        self._ensure(phi.shape[1])
        one_hot = torch.nn.functional.one_hot(a, self.n_actions).to(torch.float64)  # (B, A)
        self._xtx += torch.einsum("ba,bi,bj->aij", one_hot, phi, phi)
        self._xty += torch.einsum("ba,bi,b->ai", one_hot, phi, r)
        self._yty += one_hot.T @ (r * r)
        self._count += one_hot.sum(0)

    def steps_until_update(self) -> int:
        return 1

    def _agent_state(self) -> tuple[dict, dict, dict[str, Tensor]]:
        options = {
            "n_actions": self.n_actions,
            "a0": self.a0,
            "b0": self.b0,
            "lambda_prior": self.lambda_prior,
            "initial_pulls": self.initial_pulls,
        }
        state = {"context_dim": self.context_dim, "n_decided": self.n_decided}
        tensors = {"yty": self._yty, "count": self._count}
        if self._xtx is not None:
            tensors |= {"xtx": self._xtx, "xty": self._xty}
        return options, state, tensors

    def _load_agent_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.context_dim = state["context_dim"]
        self.n_decided = int(state["n_decided"])
        self._yty, self._count = tensors["yty"], tensors["count"]
        self._xtx, self._xty = tensors.get("xtx"), tensors.get("xty")
