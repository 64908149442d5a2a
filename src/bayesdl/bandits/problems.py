"""Contextual-bandit problems: a sequence of contexts and what every action would have paid.

A :class:`BanditProblem` holds, for each of ``T`` rounds, the context ``(d,)``, the realised
reward of each of the ``A`` actions and their expected rewards. An agent sees the context,
picks an action and is shown only that action's reward; the oracle picks the action of highest
expected reward. Drawing all rewards up front (as Riquelme et al., 2018 do) lets every agent
face the same draws, so regrets are compared on identical sequences.

* :func:`mushroom_bandit`: eat or leave a mushroom of the UCI mushroom data;
* :func:`wheel_bandit`: the synthetic wheel bandit of Riquelme et al. (2018), whose rewarding
  region shrinks as ``delta`` grows, so exploration is ever harder;
* :func:`linear_bandit`: rewards linear in the context, for tests and examples.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MUSHROOM_ACTIONS",
    "BanditProblem",
    "linear_bandit",
    "load_mushroom",
    "mushroom_bandit",
    "wheel_bandit",
]

#: Action names of :func:`mushroom_bandit`, by index.
MUSHROOM_ACTIONS = ("leave", "eat")


@dataclass(frozen=True)
class BanditProblem:
    """``T`` rounds of a contextual bandit with ``A`` actions, all rewards drawn in advance.

    Attributes
    ----------
    name: what the problem is (e.g. ``"wheel(delta=0.9)"``).
    contexts: ``(T, d)`` float tensor, one context per round.
    rewards: ``(T, A)`` realised reward each action would pay in that round.
    expected: ``(T, A)`` expected reward of each action in that round (the oracle's view).
    """

    name: str
    contexts: Tensor
    rewards: Tensor
    expected: Tensor

    def __post_init__(self) -> None:
        c, r, e = self.contexts, self.rewards, self.expected
        if c.ndim != 2 or r.ndim != 2 or e.shape != r.shape or len(c) != len(r):
            raise ValueError(
                "a bandit problem needs contexts (T, d) and rewards and expected rewards (T, A) "
                f"with the same T; got {tuple(c.shape)}, {tuple(r.shape)}, {tuple(e.shape)}."
            )
        if r.shape[1] < 2:
            raise ValueError(f"a bandit needs at least 2 actions, got {r.shape[1]}.")

    @property
    def horizon(self) -> int:
        """Number of rounds ``T``."""
        return len(self.contexts)

    @property
    def n_actions(self) -> int:
        """Number of actions ``A``."""
        return self.rewards.shape[1]

    @property
    def context_dim(self) -> int:
        """Context width ``d``."""
        return self.contexts.shape[1]

    def optimal_actions(self) -> Tensor:
        """The oracle's action in each round, ``(T,)``: the highest expected reward."""
        return self.expected.argmax(dim=1)

    def regret(self, actions: Tensor) -> Tensor:
        """Per-round regret of ``actions`` ``(T,)`` against the oracle, on the realised rewards
        (the oracle's realised reward minus the agent's), ``(T,)``."""
        a = self._check_actions(actions)
        best = self.optimal_actions()[:, None]
        return (self.rewards.gather(1, best) - self.rewards.gather(1, a[:, None]))[:, 0]

    def expected_regret(self, actions: Tensor) -> Tensor:
        """Per-round regret on the expected rewards (no reward noise), ``(T,)``."""
        a = self._check_actions(actions)
        return self.expected.max(dim=1).values - self.expected.gather(1, a[:, None])[:, 0]

    def _check_actions(self, actions: Tensor) -> Tensor:
        a = torch.as_tensor(actions)
        if a.shape != (self.horizon,) or a.is_floating_point():
            raise ValueError(
                f"actions must be integers of shape ({self.horizon},), got {a.dtype} "
                f"{tuple(a.shape)}."
            )
        if len(a) and (int(a.min()) < 0 or int(a.max()) >= self.n_actions):
            raise ValueError(f"actions must lie in [0, {self.n_actions}).")
        return a.long()


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def load_mushroom(path: str | os.PathLike) -> tuple[Tensor, Tensor, list[str]]:
    """The UCI mushroom data (``agaricus-lepiota.data``) one-hot encoded.

    Every one of the 22 attributes becomes one column per value seen in the file (a missing
    ``?`` is a value of its own).

    Returns
    -------
    features: ``(N, F)`` float32 one-hot rows (``N = 8124``, ``F = 117`` for the UCI file).
    edible: ``(N,)`` bool.
    names: the ``F`` column names, ``"attribute{i}={value}"``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no mushroom data at {path!r}: pass the path of the UCI file agaricus-lepiota.data."
        )
    with open(path) as fh:
        rows = [line.strip().split(",") for line in fh if line.strip()]
    widths = {len(r) for r in rows}
    if widths != {23} or any(r[0] not in ("e", "p") for r in rows):
        raise ValueError(
            f"{path!r} is not the UCI mushroom file: expected rows of 23 comma-separated codes "
            "(the class e or p, then 22 attributes)."
        )
    table = np.array(rows)
    columns, names = [], []
    for j in range(1, 23):
        values = sorted(set(table[:, j]))
        for v in values:
            columns.append(table[:, j] == v)
            names.append(f"attribute{j}={v}")
    features = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))
    edible = torch.from_numpy(table[:, 0] == "e")
    return features, edible, names


def mushroom_bandit(
    path: str | os.PathLike,
    horizon: int = 50_000,
    *,
    seed: int = 0,
    data: tuple[Tensor, Tensor] | None = None,
) -> BanditProblem:
    """Eat or leave a mushroom (Riquelme et al., 2018; the data from :func:`load_mushroom`).

    Each round shows a mushroom drawn with replacement from the data. Actions
    (:data:`MUSHROOM_ACTIONS`): 0 leaves it (reward 0); 1 eats it: +5 if it is edible, and if
    it is poisonous +5 or -35 with probability 1/2 each (expected -15). The oracle eats exactly
    the edible ones.

    Parameters
    ----------
    path: the UCI file ``agaricus-lepiota.data`` (ignored when ``data`` is given).
    horizon: rounds ``T`` (the paper's 50,000 by default).
    seed: draws the mushrooms and the poisonous rewards.
    data: ``(features, edible)`` already loaded, to skip reading the file.
    """
    _positive_int("horizon", horizon)
    features, edible = load_mushroom(path)[:2] if data is None else data
    g = _generator(seed)
    rows = torch.randint(len(features), (horizon,), generator=g)
    eats_edible = edible[rows]
    lucky = torch.rand(horizon, generator=g) < 0.5
    eat = torch.where(eats_edible | lucky, 5.0, -35.0)
    rewards = torch.stack([torch.zeros(horizon), eat], dim=1)
    expected = torch.stack([torch.zeros(horizon), torch.where(eats_edible, 5.0, -15.0)], dim=1)
    return BanditProblem("mushroom", features[rows].float(), rewards, expected)


def wheel_bandit(
    delta: float,
    horizon: int = 2000,
    *,
    seed: int = 0,
    means: tuple[float, float, float] = (1.2, 1.0, 50.0),
    noise_std: float = 0.01,
) -> BanditProblem:
    """The wheel bandit (Riquelme et al., 2018): contexts uniform on the unit disc, 5 actions.

    Action 0 always pays ``means[0]`` (1.2). Inside the radius ``delta`` the four others pay
    ``means[1]`` (1.0), so action 0 is best; outside it, the action of the context's quadrant
    (1: ``x, y > 0``; 2: ``x > 0 > y``; 3: ``x, y < 0``; 4: ``x < 0 < y``) pays ``means[2]``
    (50) and is best, the other three pay ``means[1]``. Rewards carry Gaussian noise of standard
    deviation ``noise_std``. The rewarding ring holds a fraction ``1 - delta^2`` of the
    contexts: at ``delta = 0.99`` one context in fifty, so an agent that stops exploring
    early settles for action 0.
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}.")
    _positive_int("horizon", horizon)
    g = _generator(seed)
    radius = torch.rand(horizon, generator=g).sqrt()  # uniform on the disc
    angle = torch.rand(horizon, generator=g) * (2 * math.pi)
    x, y = radius * angle.cos(), radius * angle.sin()
    contexts = torch.stack([x, y], dim=1)
    quadrant = torch.where(x > 0, torch.where(y > 0, 1, 2), torch.where(y < 0, 3, 4))
    expected = torch.full((horizon, 5), float(means[1]))
    expected[:, 0] = float(means[0])
    outside = radius > delta
    expected[outside, quadrant[outside]] = float(means[2])
    rewards = expected + noise_std * torch.randn(horizon, 5, generator=g)
    return BanditProblem(f"wheel(delta={delta})", contexts, rewards, expected)


def linear_bandit(
    horizon: int = 1000,
    *,
    n_actions: int = 3,
    context_dim: int = 4,
    noise_std: float = 1.0,
    seed: int = 0,
) -> BanditProblem:
    """Rewards linear in the context: ``r_a = x . theta_a + noise``, ``x ~ N(0, I)``.

    The action parameters ``theta_a ~ N(0, I)`` are drawn from ``seed`` too.
    """
    _positive_int("horizon", horizon)
    _positive_int("context_dim", context_dim)
    if _positive_int("n_actions", n_actions) < 2:
        raise ValueError(f"n_actions must be at least 2, got {n_actions}.")
    g = _generator(seed)
    theta = torch.randn(context_dim, n_actions, generator=g)
    contexts = torch.randn(horizon, context_dim, generator=g)
    expected = contexts @ theta
    rewards = expected + noise_std * torch.randn(horizon, n_actions, generator=g)
    return BanditProblem("linear", contexts, rewards, expected)
