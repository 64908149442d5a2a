"""Contextual bandits: explore where knowledge is thin, with any posterior.

A robot, a recommender or a trial has to choose between trying something new and staying with
what is known to work. Thompson sampling answers with posterior draws: each decision takes the
action that is best under one draw, so the agent explores exactly as much as the model is
unsure, and stops as the posterior concentrates.

* Problems (:mod:`~bayesdl.bandits.problems`): :func:`mushroom_bandit`, :func:`wheel_bandit`,
  :func:`linear_bandit`, each a :class:`BanditProblem` with all rewards drawn in advance.
* Agents (:mod:`~bayesdl.bandits.agents`): :class:`PosteriorAgent` (Thompson sampling, UCB,
  greedy or epsilon-greedy over any posterior, with a replay buffer, warm-started refits and a
  safe mode), :class:`LinearThompson` (exact Bayesian linear regression per action) and
  :class:`Uniform`.
* :func:`run` plays an agent through a problem and returns a :class:`BanditRun` with the regret;
  :func:`save_agent` and :func:`load_agent` keep an agent, its posterior and its buffer in one
  file.

Example::

    from bayesdl import bandits
    problem = bandits.wheel_bandit(delta=0.9, horizon=2000, seed=0)
    net = bandits.reward_model(problem.context_dim, problem.n_actions, hidden=(50,))
    agent = bandits.PosteriorAgent(
        bdl.DeepEnsemble(net, "homoscedastic_gaussian", n_members=5, bootstrap=True),
        problem.n_actions,
        policy="thompson",
    )
    result = bandits.run(agent, problem, seed=0)
    result.total_regret
"""

from bayesdl.bandits.agents import (
    Agent,
    LinearThompson,
    Policy,
    PosteriorAgent,
    Uniform,
    action_rows,
    reward_model,
)
from bayesdl.bandits.files import load_agent, save_agent
from bayesdl.bandits.problems import (
    MUSHROOM_ACTIONS,
    BanditProblem,
    linear_bandit,
    load_mushroom,
    mushroom_bandit,
    wheel_bandit,
)
from bayesdl.bandits.runner import BanditRun, run

__all__ = [
    "MUSHROOM_ACTIONS",
    "Agent",
    "BanditProblem",
    "BanditRun",
    "LinearThompson",
    "Policy",
    "PosteriorAgent",
    "Uniform",
    "action_rows",
    "linear_bandit",
    "load_agent",
    "load_mushroom",
    "mushroom_bandit",
    "reward_model",
    "run",
    "save_agent",
    "wheel_bandit",
]
