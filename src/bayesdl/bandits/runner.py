"""Play an agent through a bandit problem and keep score."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from bayesdl.bandits.agents import Agent
from bayesdl.bandits.problems import BanditProblem

__all__ = ["BanditRun", "run"]


@dataclass(frozen=True)
class BanditRun:
    """What an agent did on a :class:`~bayesdl.bandits.problems.BanditProblem`.

    Attributes
    ----------
    problem, agent: names.
    actions: ``(T,)`` the agent's actions.
    rewards: ``(T,)`` the realised rewards it received.
    regret: ``(T,)`` per-round regret against the oracle on the realised rewards.
    expected_regret: ``(T,)`` per-round regret on the expected rewards.
    seconds: wall time of the run.
    """

    problem: str
    agent: str
    actions: Tensor
    rewards: Tensor
    regret: Tensor
    expected_regret: Tensor
    seconds: float

    @property
    def cumulative_regret(self) -> Tensor:
        """``(T,)`` regret summed up to each round."""
        return self.regret.cumsum(0)

    @property
    def total_regret(self) -> float:
        """Regret over all ``T`` rounds."""
        return float(self.regret.sum())


def run(
    agent: Agent,
    problem: BanditProblem,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> BanditRun:
    """Play ``agent`` through every round of ``problem``; return the :class:`BanditRun`.

    The rounds up to the agent's next model update are decided in one batched call (the agent's
    model does not change in between, so each round is decided as it would be alone); then the
    agent sees their rewards. ``seed`` seeds the agent's random choices (posterior draws,
    exploration) unless a ``generator`` is given.
    """
    if not isinstance(agent, Agent):
        raise TypeError(f"agent must be a bayesdl.bandits.Agent, got {type(agent).__name__}.")
    if not isinstance(problem, BanditProblem):
        raise TypeError(f"problem must be a BanditProblem, got {type(problem).__name__}.")
    if agent.n_actions != problem.n_actions:
        raise ValueError(
            f"the agent has {agent.n_actions} actions but the problem {problem.n_actions}."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    actions = torch.empty(problem.horizon, dtype=torch.long)
    t = 0
    while t < problem.horizon:
        block = min(agent.steps_until_update(), problem.horizon - t)
        x = problem.contexts[t : t + block]
        a = torch.as_tensor(agent.act(x, generator=generator)).long().cpu()
        if a.shape != (block,) or int(a.min()) < 0 or int(a.max()) >= problem.n_actions:
            raise ValueError(f"the agent returned invalid actions {a.tolist()[:8]} for {block}.")
        agent.update(x, a, problem.rewards[t : t + block].gather(1, a[:, None])[:, 0])
        actions[t : t + block] = a
        t += block
    return BanditRun(
        problem=problem.name,
        agent=getattr(agent, "name", type(agent).__name__),
        actions=actions,
        rewards=problem.rewards.gather(1, actions[:, None])[:, 0],
        regret=problem.regret(actions),
        expected_regret=problem.expected_regret(actions),
        seconds=time.perf_counter() - start,
    )
