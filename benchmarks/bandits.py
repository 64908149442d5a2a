"""Contextual bandits with Thompson sampling over bayesdl's posteriors: mushroom and wheel.

The problems of Riquelme, Tucker and Snoek (2018, "Deep Bayesian Bandits Showdown"), played by
the agents of :mod:`bayesdl.bandits`:

* mushroom (the UCI data at ``../shared/data/mushroom``): eat (+5 edible; +5 or -35 with
  probability 1/2 poisonous) or leave (0);
* the wheel bandit at delta 0.5, 0.7, 0.9, 0.95, 0.99 (synthetic).

Agents: uniform, LinFullPost (exact Bayesian linear regression per action), a greedy network
and an epsilon-greedy one (the deterministic posterior: no uncertainty), and Thompson sampling
with MC dropout, a bootstrapped deep ensemble, mean-field VI (Bayes by Backprop) and a
last-layer Laplace approximation. On mushroom also the bootstrapped ensemble in safe mode
(never eat a mushroom whose 5% lower bound of the expected reward is below 0).

Every agent of a problem faces the same contexts and reward draws per seed; regret is the
realised reward of the oracle minus the agent's, summed over the rounds, reported relative to
the uniform agent's on the same draws (uniform = 100), as in the paper's tables; mean and
standard error over the seeds. The runs are independent, so they are spread over
``--workers`` processes of one torch thread each.

    python benchmarks/bandits.py                       # about 30 minutes on 2 cores
    python benchmarks/bandits.py --quick --out /tmp/b  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mushroom" / "agaricus-lepiota.data"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DELTAS = (0.5, 0.7, 0.9, 0.95, 0.99)

#: The agents, by the name the tables use.
AGENTS = (
    "Uniform",
    "LinFullPost",
    "Greedy",
    "EpsGreedy",
    "TS Dropout",
    "TS BootEnsemble",
    "TS MeanFieldVI",
    "TS Laplace",
)
SAFE = "TS BootEnsemble, safe"

#: The paper's best wheel-bandit agent, NeuralLinear, relative to uniform at n = 80,000 rounds
#: (mean ± standard error), as quoted by Ravi and Beatson (2019, "Amortized Bayesian
#: Meta-Learning", Table 1) from Riquelme et al. (2018). The paper's mushroom table could not be
#: retrieved here, so it is not shown.
PUBLISHED_WHEEL = {
    "source": "Riquelme et al. (2018) NeuralLinear, n = 80,000 (quoted by Ravi & Beatson 2019)",
    "relative_regret": {
        "0.5": [0.95, 0.02],
        "0.7": [1.60, 0.03],
        "0.9": [4.65, 0.18],
        "0.95": [9.56, 0.36],
        "0.99": [49.63, 2.41],
    },
}


def make_agent(name: str, context_dim: int, n_actions: int, config: dict, seed: int):
    """A fresh agent of the table's ``name`` for a problem of this shape."""
    import bayesdl as bdl
    from bayesdl import bandits

    if name == "Uniform":
        return bandits.Uniform(n_actions)
    if name == "LinFullPost":
        return bandits.LinearThompson(n_actions)  # a0 = b0 = 6, lambda 0.25 (the paper's)
    hidden = tuple(config["hidden"])
    torch.manual_seed(seed)
    lik = "homoscedastic_gaussian"

    def net(dropout: float = 0.0):
        return bandits.reward_model(context_dim, n_actions, hidden, dropout=dropout)

    common = {
        "refit_every": config["refit_every"],
        "train_steps": config["train_steps"],
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "seed": seed,
    }
    if name == "Greedy":
        return bandits.PosteriorAgent(
            bdl.Deterministic(net(), lik), n_actions, policy="greedy", **common
        )
    if name == "EpsGreedy":
        return bandits.PosteriorAgent(
            bdl.Deterministic(net(), lik),
            n_actions,
            policy="epsilon_greedy",
            epsilon=0.05,
            **common,
        )
    if name == "TS Dropout":
        return bandits.PosteriorAgent(bdl.MCDropout(net(dropout=0.2), lik), n_actions, **common)
    if name in ("TS BootEnsemble", SAFE):
        ensemble = bdl.DeepEnsemble(net(), lik, n_members=5, bootstrap=True, seed=seed)
        safe = {"floor": 0.0, "floor_level": 0.05, "fallback": 0} if name == SAFE else {}
        return bandits.PosteriorAgent(ensemble, n_actions, **common, **safe)
    if name == "TS MeanFieldVI":
        return bandits.PosteriorAgent(
            bdl.MeanFieldVI(net(), lik, init_std=1e-3), n_actions, **common
        )
    if name == "TS Laplace":
        return bandits.PosteriorAgent(bdl.Laplace(net(), lik), n_actions, **common)
    raise ValueError(f"unknown agent {name!r}")


def make_problem(problem: str, horizon: int, seed: int, data_path: str):
    from bayesdl import bandits

    if problem == "mushroom":
        return bandits.mushroom_bandit(data_path, horizon, seed=seed)
    delta = float(problem.removeprefix("wheel_"))
    return bandits.wheel_bandit(delta, horizon, seed=seed)


def one_run(task: tuple) -> dict:
    """Play one agent on one problem and seed (in a worker process)."""
    problem_name, agent_name, seed, horizon, config, data_path = task
    torch.set_num_threads(1)
    from bayesdl import bandits

    problem = make_problem(problem_name, horizon, seed, data_path)
    agent = make_agent(agent_name, problem.context_dim, problem.n_actions, config, seed)
    result = bandits.run(agent, problem, seed=seed)
    out = {
        "problem": problem_name,
        "agent": agent_name,
        "seed": seed,
        "horizon": horizon,
        "regret": result.total_regret,
        "expected_regret": float(result.expected_regret.sum()),
        "seconds": round(result.seconds, 2),
        # The cumulative regret at 10 points, for curves.
        "curve": [float(result.cumulative_regret[int(q * horizon) - 1]) for q in _QUANTILES],
    }
    if problem_name == "mushroom":
        poisonous = problem.expected[:, 1] < 0
        eaten = result.actions == 1
        out["poisonous_eaten"] = int((poisonous & eaten).sum())
        out["edible_left"] = int((~poisonous & ~eaten).sum())
    return out


_QUANTILES = tuple(q / 10 for q in range(1, 11))


def summarize(runs: list[dict]) -> dict:
    """Per problem and agent: regret relative to uniform on the same seed, mean and std error."""
    table: dict[str, dict] = {}
    uniform = {(r["problem"], r["seed"]): r["regret"] for r in runs if r["agent"] == "Uniform"}
    for r in runs:
        table.setdefault(r["problem"], {}).setdefault(r["agent"], []).append(r)
    summary = {}
    for problem, agents in table.items():
        summary[problem] = {}
        for agent, rs in agents.items():
            rel = [100 * r["regret"] / uniform[(problem, r["seed"])] for r in rs]
            mean = sum(rel) / len(rel)
            se = (
                math.sqrt(sum((v - mean) ** 2 for v in rel) / (len(rel) - 1) / len(rel))
                if len(rel) > 1
                else float("nan")
            )
            row = {
                "relative_regret": mean,
                "stderr": se,
                "regret": sum(r["regret"] for r in rs) / len(rs),
                "seconds": sum(r["seconds"] for r in rs) / len(rs),
                "seeds": len(rs),
            }
            if "poisonous_eaten" in rs[0]:
                row["poisonous_eaten"] = sum(r["poisonous_eaten"] for r in rs) / len(rs)
                row["edible_left"] = sum(r["edible_left"] for r in rs) / len(rs)
            summary[problem][agent] = row
    return summary


def _cell(row: dict) -> str:
    se = row["stderr"]
    return f"{row['relative_regret']:.2f}" + ("" if math.isnan(se) else f" ± {se:.2f}")


def write_markdown(results: dict, path: Path) -> None:
    s = results["summary"]
    cfg = results["config"]
    lines = [
        "# Contextual bandits: Thompson sampling over bayesdl's posteriors",
        "",
        f"Measured {results['date']} with `python benchmarks/bandits.py"
        f"{' --quick' if results['quick'] else ''}` (torch {results['environment']['torch']}, "
        f"{results['workers']} worker processes of one thread, {results['machine']}); "
        f"{results['seconds']['total'] / 60:.0f} minutes.",
        "",
        "Cumulative regret against the oracle (realised rewards), relative to the uniform agent "
        "on the same draws (uniform = 100; lower is better), mean ± standard error over "
        f"{cfg['seeds']} seeds. Networks: MLP {tuple(cfg['network']['hidden'])} on "
        "`[context, one-hot action]`, refit every "
        f"{cfg['network']['refit_every']} rounds for about {cfg['network']['train_steps']} Adam "
        f"steps (lr {cfg['network']['lr']}), warm-started; 2 initial pulls per action.",
        "",
    ]
    if "mushroom" in s:
        lines += [
            f"## Mushroom ({cfg['mushroom_horizon']} rounds)",
            "",
            "| agent | regret vs uniform | regret | poisonous eaten | edible left | s / run |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for agent, row in sorted(s["mushroom"].items(), key=lambda kv: kv[1]["relative_regret"]):
            lines.append(
                f"| {agent} | {_cell(row)} | "
                f"{row['regret']:.0f} | {row['poisonous_eaten']:.0f} | {row['edible_left']:.0f} | "
                f"{row['seconds']:.0f} |"
            )
        lines.append("")
    wheels = [f"wheel_{d}" for d in DELTAS if f"wheel_{d}" in s]
    if wheels:
        lines += [
            f"## Wheel bandit ({cfg['wheel_horizon']} rounds)",
            "",
            "| agent | " + " | ".join(f"delta {w.removeprefix('wheel_')}" for w in wheels) + " |",
            "| --- |" + " --- |" * len(wheels),
        ]
        agents = sorted(s[wheels[0]], key=lambda a: AGENTS.index(a) if a in AGENTS else 99)
        for agent in agents:
            cells = [_cell(s[w][agent]) for w in wheels]
            lines.append(f"| {agent} | " + " | ".join(cells) + " |")
        published = PUBLISHED_WHEEL["relative_regret"]
        cells = ["{:.2f} ± {:.2f}".format(*published[w.removeprefix("wheel_")]) for w in wheels]
        lines.append(f"| *{PUBLISHED_WHEEL['source']}* | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mushroom-horizon", type=int, default=10_000)
    parser.add_argument("--wheel-horizon", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--problems", default="mushroom,wheel")
    parser.add_argument("--quick", action="store_true", help="short horizons, 1 seed")
    args = parser.parse_args(argv)
    network = {"hidden": [50], "refit_every": 20, "train_steps": 50, "batch_size": 64, "lr": 3e-3}
    if args.quick:
        args.seeds, args.mushroom_horizon, args.wheel_horizon = 1, 200, 200
        network |= {"hidden": [16], "train_steps": 10}
    problems = []
    if "mushroom" in args.problems:
        if not args.data.exists():
            print(f"no mushroom data at {args.data}: pass --data", file=sys.stderr)
            return 2
        problems.append(("mushroom", args.mushroom_horizon, (*AGENTS, SAFE)))
    if "wheel" in args.problems:
        problems += [(f"wheel_{d}", args.wheel_horizon, AGENTS) for d in DELTAS]
    tasks = [
        (name, agent, seed, horizon, network, str(args.data))
        for seed in range(args.seeds)
        for name, horizon, agents in problems
        for agent in agents
    ]
    start = time.perf_counter()
    runs = []
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=args.workers))
            results_iter = pool.map(one_run, tasks)
        else:  # in this process (tests, debugging)
            results_iter = map(one_run, tasks)
        for r in results_iter:
            runs.append(r)
            print(
                f"{r['problem']:>10} seed {r['seed']} {r['agent']:<26} regret {r['regret']:9.1f}"
                f"  {r['seconds']:6.1f} s",
                flush=True,
            )
    from benchmarks._results import environment, write_results

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "workers": args.workers,
        "machine": f"{os.cpu_count()}-core CPU",
        "environment": environment(),
        "config": {
            "seeds": args.seeds,
            "mushroom_horizon": args.mushroom_horizon,
            "wheel_horizon": args.wheel_horizon,
            "network": network,
        },
        "summary": summarize(runs),
        "published": {"wheel": PUBLISHED_WHEEL},
        "runs": runs,
        "seconds": {"total": time.perf_counter() - start},
    }
    stem = "bandits" if not args.quick else "bandits_quick"
    write_results(results, args.out, stem, write_markdown, print)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
