"""How much faster does a data-parallel fit run on two processes than on one, on this CPU?

Run from the repository root::

    python benchmarks/distributed.py                       # about a minute on 2 cores
    python benchmarks/distributed.py --quick --out /tmp/d  # tiny sizes, seconds

What it does:

* data: a seeded synthetic regression table (``--rows`` x ``--features`` standard-normal
  inputs, float32; the target is a smooth nonlinear function of them plus noise);
* model: an MLP ``features -> hidden -> hidden -> 2`` built with ``torch.nn`` (tanh), gaussian
  likelihood (mean and scale), Adam at lr 1e-3, ``--batch-size`` rows per global mini-batch,
  no validation split;
* configurations: ``bdl.MeanFieldVI``, ``bdl.Deterministic``, ``bdl.DeepEnsemble(n_members=4)``
  with ``parallel="data"`` (every process trains all members on its rows of each batch) and with
  ``parallel="members"`` (each process trains two members on all rows);
* runs: each configuration on 1 process and on 2, every run launched as
  ``python -m torch.distributed.run --standalone --nproc-per-node P benchmarks/distributed.py
  --worker ...`` (gloo), with ``torch.set_num_threads(cores // P)``; as a reference, also on 1
  process with the thread count of one of the two processes. Every worker joins the group with
  ``bayesdl.distributed.init("gloo")``, fits one epoch to warm up, then calls ``fit`` for
  ``--epochs`` epochs ``--repeats`` times (each call goes on from the weights the last one left),
  timed with ``time.perf_counter`` around the call; the fit synchronises the processes at every
  step, the slower process's time is taken, and the median call gives the seconds per epoch;
* equality: rank 0 saves ``posterior.state_dict()`` (safetensors) after the warm-up epoch and
  after the timed fits; the largest absolute difference of every 2-process state from the
  1-process state of the same configuration is reported (a data-parallel step is the
  single-process step up to the order of float additions; member-parallel training gives each
  member what it has in one process), next to that of the 1-process run at the other thread
  count;
* communication: rank 0 times the gradient sums of every data-parallel step
  (``bayesdl.distributed.Group.sum_``, wrapped: the all-reduce and the wait for the other
  process), and each 2-process worker times 50 back-to-back ``all_reduce`` calls of a float32
  tensor the size of each configuration's state, to put the cost of the collective itself next
  to the per-step time.

``--quick`` (1,024 rows, hidden 32, batches of 128, 1 timed epoch) runs in seconds for the
test suite; its numbers say nothing about speed, and it writes only into the ``--out`` folder it
must be given (``distributed_cpu_quick.json`` and ``.md``). The full run writes
``distributed_cpu.json`` and ``.md`` into ``--out`` (default ``benchmarks/results``).

"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"

#: name -> (posterior class, parallel mode)
CONFIGS = {
    "mean_field_vi": ("MeanFieldVI", "data"),
    "deterministic": ("Deterministic", "data"),
    "deep_ensemble_data": ("DeepEnsemble", "data"),
    "deep_ensemble_members": ("DeepEnsemble", "members"),
}
N_MEMBERS = 4
LR = 1e-3
ALL_REDUCE_REPEATS = 50
#: (label, processes, threads per process or None for cores // processes)
RUNS = (("p1", 1, None), ("p2", 2, None), ("p1_thin", 1, "per_process_of_2"))
QUICK = {"rows": 1024, "features": 32, "hidden": 32, "epochs": 1, "repeats": 1, "batch_size": 128}
FULL = {"rows": 16_384, "features": 32, "hidden": 256, "epochs": 3, "repeats": 5, "batch_size": 512}


# --------------------------------------------------------------------------- the worker
def make_data(rows: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal inputs and a smooth nonlinear target with noise (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    w = torch.randn(features, generator=g) / math.sqrt(features)
    v = torch.randn(features, generator=g) / math.sqrt(features)
    y = torch.sin(2 * (x @ w)) + 0.5 * (x @ v) ** 2 + 0.1 * torch.randn(rows, generator=g)
    return x, y


def make_network(features: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 2),
    )


def make_posterior(name: str, features: int, hidden: int, seed: int):
    import bayesdl as bdl

    cls_name, _ = CONFIGS[name]
    net = make_network(features, hidden, seed)
    if cls_name == "DeepEnsemble":
        return bdl.DeepEnsemble(net, "gaussian", n_members=N_MEMBERS, seed=seed)
    return getattr(bdl, cls_name)(net, "gaussian")


def _slowest(seconds: float) -> float:
    """The largest of every process's ``seconds`` (this process's alone without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _all_reduce_seconds(numel: int) -> float:
    """Median seconds of one ``all_reduce`` of ``numel`` float32 values over the group."""
    import torch.distributed as dist

    buf = torch.ones(numel)
    for _ in range(5):
        dist.all_reduce(buf)
    times = []
    for _ in range(ALL_REDUCE_REPEATS):
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    return _slowest(sorted(times)[len(times) // 2])


def _state(post) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in post.state_dict().items()}


class _GradientSumClock:
    """Seconds spent in :meth:`bayesdl.distributed.Group.sum_` (the data-parallel gradient sum of
    every step, waiting for the other processes included): the method is wrapped, not changed."""

    def __init__(self) -> None:
        from bayesdl.distributed import Group

        self.seconds, self.calls = 0.0, 0
        inner = Group.sum_

        def sum_(group, tensors):
            start = time.perf_counter()
            try:
                return inner(group, tensors)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        Group.sum_ = sum_

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def worker(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from bayesdl import distributed

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    torch.set_num_threads(threads)
    group = distributed.init("gloo")
    rank = distributed.rank()
    clock = _GradientSumClock()
    x, y = make_data(args.rows, args.features, args.seed)
    result = {
        "processes": processes,
        "threads_per_process": torch.get_num_threads(),
        "group": repr(group),
        "configs": {},
    }
    state_dir = Path(args.state_dir)
    for name in args.configs.split(","):
        post = make_posterior(name, args.features, args.hidden, args.seed)
        options = {
            "batch_size": args.batch_size,
            "lr": LR,
            "seed": args.seed,
            "parallel": CONFIGS[name][1],
            "progress": False,
        }
        post.fit((x, y), epochs=1, **options)  # warm-up
        if rank == 0:  # the state after one epoch, before round-off has had long to grow
            save_file(_state(post), str(state_dir / f"{name}.warm-up.safetensors"))
        clock.reset()
        seconds, losses = [], []
        for _ in range(args.repeats):  # each fit goes on from the weights the last one left
            start = time.perf_counter()
            history = post.fit((x, y), epochs=args.epochs, **options)
            seconds.append(_slowest(time.perf_counter() - start))
            losses += [float(v) for v in history.train_loss]
        state = _state(post)
        numel = sum(v.numel() for v in state.values() if v.is_floating_point())
        row = {
            "seconds": seconds,
            "epochs_per_fit": args.epochs,
            "seconds_per_epoch": sorted(seconds)[len(seconds) // 2] / args.epochs,
            "gradient_sum_seconds_per_epoch": clock.seconds / (args.epochs * args.repeats),
            "gradient_sum_calls_per_epoch": clock.calls / (args.epochs * args.repeats),
            "train_loss": losses,
            "state_numel": numel,
        }
        if group is not None:
            row["all_reduce_seconds"] = _all_reduce_seconds(numel)
        if rank == 0:
            save_file(state, str(state_dir / f"{name}.safetensors"))
        result["configs"][name] = row
    if rank == 0:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    distributed.shutdown()
    return 0


# --------------------------------------------------------------------------- the parent
def launch(
    processes: int,
    threads: int | None,
    config: dict,
    work: Path,
    *,
    seed: int,
    repeats: int,
    timeout_s: float,
) -> tuple[dict, Path]:
    """Run every configuration on ``processes`` processes; rank 0's JSON and its state folder."""
    label = f"p{processes}" + (f"_t{threads}" if threads else "")
    state_dir = work / label
    state_dir.mkdir(parents=True, exist_ok=True)
    result_path = work / f"{label}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        str(Path(__file__).resolve()),
        "--worker",
        "--result",
        str(result_path),
        "--state-dir",
        str(state_dir),
        "--configs",
        ",".join(CONFIGS),
        "--seed",
        str(seed),
        f"--repeats={repeats}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in config.items()),
    ]
    if threads:
        command.append(f"--threads={threads}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, _cores() // processes)))
    start = time.perf_counter()
    # A process group of its own (setsid), so that a timeout ends torchrun and its workers.
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise RuntimeError(
            f"the {processes}-process run did not finish in {timeout_s:.0f} s:\n{stderr[-4000:]}"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"the {processes}-process run failed (exit {proc.returncode}):\n{stderr[-4000:]}"
        )
    result = json.loads(result_path.read_text())
    result["launch_seconds"] = time.perf_counter() - start
    return result, state_dir


def _cores() -> int:
    return os.cpu_count() or 1


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two saved states (same keys and shapes)."""
    return _compare(a, b)[0]


def _compare(a: Path, b: Path, above: float = 1e-5) -> tuple[float, int, int]:
    """The largest absolute difference between two saved states (same keys and shapes), the
    number of values that differ by more than ``above``, and the number of values."""
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    if set(left) != set(right):
        raise ValueError(f"the states differ in their keys: {sorted(set(left) ^ set(right))}")
    diff, count, total = 0.0, 0, 0
    for k, v in left.items():
        if v.shape != right[k].shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} against {tuple(right[k].shape)}")
        if v.numel() and v.is_floating_point():
            d = (v.double() - right[k].double()).abs()
            diff = max(diff, float(d.max()))
            count += int((d > above).sum())
            total += v.numel()
        elif not torch.equal(v, right[k]):
            raise ValueError(f"{k}: {v.tolist()} against {right[k].tolist()}")
    return diff, count, total


def summarize(runs: dict[str, dict], states: dict[str, Path], config: dict) -> dict:
    steps = math.ceil(config["rows"] / config["batch_size"])
    table = {}
    for name, (cls_name, parallel) in CONFIGS.items():
        one, two = runs["p1"]["configs"][name], runs["p2"]["configs"][name]
        thin = runs["p1_thin"]["configs"][name]
        t1, t2 = one["seconds_per_epoch"], two["seconds_per_epoch"]
        comm = two["all_reduce_seconds"]
        state = {label: states[label] / f"{name}.safetensors" for label in states}
        diff, above, values = _compare(state["p1"], state["p2"])
        table[name] = {
            "posterior": cls_name,
            "parallel": parallel,
            "seconds_per_epoch_1": t1,
            "seconds_per_epoch_2": t2,
            "seconds_per_epoch_1_thin": thin["seconds_per_epoch"],
            "speedup": t1 / t2,
            "speedup_vs_thin": thin["seconds_per_epoch"] / t2,
            "max_abs_difference": diff,
            "values_differing_above_1e-5": above,
            "values": values,
            "max_abs_difference_warm_up": max_difference(
                *(states[label] / f"{name}.warm-up.safetensors" for label in ("p1", "p2"))
            ),
            # the same single process at another thread count: round-off of another kind
            "max_abs_difference_threads": max_difference(state["p1"], state["p1_thin"]),
            "steps_per_epoch": steps,
            "state_numel": one["state_numel"],
            "all_reduce_ms": 1e3 * comm,
            # what one all-reduce per step would cost in an epoch, against its measured time
            "all_reduce_share_of_epoch_2": comm * steps / t2 if parallel == "data" else None,
            # rank 0's time in the gradient sums of its fits (the all-reduce and the wait for
            # the other process), per epoch, against its measured time
            "gradient_sum_seconds_per_epoch_2": two["gradient_sum_seconds_per_epoch"],
            "gradient_sum_share_of_epoch_2": two["gradient_sum_seconds_per_epoch"] / t2,
            "final_train_loss_1": one["train_loss"][-1],
            "final_train_loss_2": two["train_loss"][-1],
        }
    return table


def write_markdown(results: dict, path: Path) -> None:
    cfg = results["config"]
    env = results["environment"]
    threads = results["threads"]
    thin = threads["p1_thin"]
    total_epochs = 1 + cfg["epochs"] * cfg["repeats"]
    lines = [
        "# Data-parallel fit on torch.distributed (gloo), 1 against 2 processes",
        "",
        f"{results['date']}; {results['machine']}; torch {env['torch']}, Python {env['python']}."
        f" Command: `python benchmarks/distributed.py{' --quick' if results['quick'] else ''}`"
        f"; the whole run took {results['seconds']['total']:.0f} s."
        + (" Quick sizes: the times say nothing about speed." if results["quick"] else ""),
        "",
        f"Data: {cfg['rows']:,} synthetic regression rows x {cfg['features']} features (float32,"
        f" seed {cfg['seed']}). Network: MLP {cfg['features']}-{cfg['hidden']}-{cfg['hidden']}-2"
        f" (tanh), gaussian likelihood, Adam lr {LR}, batch {cfg['batch_size']}"
        f" ({results['steps_per_epoch']} steps per epoch), deep ensembles of {N_MEMBERS} members."
        f" Each configuration: one warm-up epoch, then {cfg['repeats']} call(s) of `fit` for"
        f" {cfg['epochs']} epoch(s) each (each going on from the last one's weights); seconds per"
        " epoch of the median call, timed around `fit` on every process and the slower process's"
        " time taken. Every run launched with `python -m torch.distributed.run --standalone`"
        " (gloo); threads per process (`torch.set_num_threads`): 1 process"
        f" {threads['p1']}, 2 processes {threads['p2']} each; the reference column is 1 process"
        f" at {thin} thread(s).",
        "",
        "| configuration | s / epoch, 1 process | s / epoch, 2 processes | speed-up (1 / 2) |"
        f" s / epoch, 1 process x {thin} thread | max abs difference, 2 vs 1 process, after 1"
        f" epoch | after {total_epochs} epochs (values > 1e-5 apart) | the same, 1 process at"
        f" {threads['p1']} vs {thin} thread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["summary"].values():
        lines.append(
            f"| {row['posterior']}, parallel={row['parallel']} | {row['seconds_per_epoch_1']:.3f}"
            f" | {row['seconds_per_epoch_2']:.3f} | {row['speedup']:.2f} |"
            f" {row['seconds_per_epoch_1_thin']:.3f} | {row['max_abs_difference_warm_up']:.1e} |"
            f" {row['max_abs_difference']:.1e} ({row['values_differing_above_1e-5']} of"
            f" {row['values']:,}) | {row['max_abs_difference_threads']:.1e} |"
        )
    lines += [
        "",
        "Differences: the largest absolute difference over every tensor of"
        " `posterior.state_dict()` (float32), after the warm-up epoch"
        f" ({results['steps_per_epoch']} Adam steps) and after all {total_epochs} epochs; the"
        " last column compares one process with itself at another thread count. Every `fit`"
        " starts a new Adam optimiser, whose first steps move each weight by about the learning"
        " rate whatever the size of its gradient, so a weight whose gradient is near zero and"
        " rounds differently on 1 and 2 processes can move apart by up to that much; such"
        " weights are few, as the count of values more than 1e-5 apart shows.",
        "",
        "Communication on 2 processes: the gradient sum that every data-parallel step makes"
        " (`bayesdl.distributed.Group.sum_`, timed on rank 0 around the call: the all-reduce and"
        " the wait for the other process), and, for scale, the median of"
        f" {ALL_REDUCE_REPEATS} back-to-back `all_reduce` calls of a tensor of the state's size:",
        "",
        "| configuration | values | gradient sum, s / epoch (share of the epoch) |"
        " back-to-back all-reduce, ms | x steps per epoch, s |",
        "| --- | --- | --- | --- | --- |",
    ]
    steps = results["steps_per_epoch"]
    for row in results["summary"].values():
        lines.append(
            f"| {row['posterior']}, parallel={row['parallel']} | {row['state_numel']:,} |"
            f" {row['gradient_sum_seconds_per_epoch_2']:.3f}"
            f" ({100 * row['gradient_sum_share_of_epoch_2']:.0f}%) | {row['all_reduce_ms']:.2f} |"
            + (
                f" {row['all_reduce_ms'] * steps / 1e3:.3f} |"
                if row["parallel"] == "data"
                else " none per step: the members are gathered once, at the end |"
            )
        )
    lines += ["", results["verdict"], ""]
    path.write_text("\n".join(lines) + "\n")


def verdict(summary: dict, threads: dict) -> str:
    """One sentence on what limits the speed-up, from the measured numbers."""
    data = [r for r in summary.values() if r["parallel"] == "data"]
    members = [r for r in summary.values() if r["parallel"] == "members"]

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    thread_gain = mean(r["seconds_per_epoch_1_thin"] / r["seconds_per_epoch_1"] for r in data)
    sum_share = mean(r["gradient_sum_share_of_epoch_2"] for r in data)
    bare_share = mean(r["all_reduce_share_of_epoch_2"] for r in data)
    # what is left of a 2-process epoch without its gradient sums, against half a 1-thread epoch
    compute = mean(
        r["seconds_per_epoch_2"]
        * (1 - r["gradient_sum_share_of_epoch_2"])
        / (r["seconds_per_epoch_1_thin"] / 2)
        for r in data
    )
    if thread_gain >= 1.2:
        cores = (
            f"one process already uses both cores through torch's {threads['p1']} threads"
            f" ({thread_gain:.2f} times the speed of 1 thread, on average over the data-parallel"
            f" rows), so two processes of {threads['p2']} thread compete for the same two cores"
        )
    else:
        cores = (
            f"one process gains little from torch's {threads['p1']} threads ({thread_gain:.2f}"
            f" times the speed of 1 thread, on average over the data-parallel rows), so the"
            f" second process's core is the gain to be had"
        )
    text = (
        f"What limits the speed-up on this {_cores()}-core machine: {cores}, and each"
        f" data-parallel step spends {100 * sum_share:.0f}% of a 2-process epoch in its gradient"
        f" all-reduce (waiting for the other process included; {100 * bare_share:.0f}% for"
        f" back-to-back all-reduces alone), while the rest of the step takes {compute:.2f} times"
        f" half a 1-thread step"
    )
    if members:
        m = members[0]
        text += (
            f"; spreading the ensemble's members needs no per-step exchange and runs at"
            f" {m['speedup']:.2f} times the 1-process speed"
        )
    return text + "."


def _machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{_cores()} CPU cores (os.cpu_count(); {model}), {platform.platform()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help=f"results folder (default {DEFAULT_OUT}; needed with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 timed epoch")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--features", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--epochs", type=int, help="epochs per timed fit")
    parser.add_argument("--repeats", type=int, help="timed fits per configuration (median)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    # what torchrun's processes are given
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    for key in config:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
        setattr(args, key, config[key])
    if args.worker:
        return worker(args)
    if args.out is None:
        if args.quick:
            parser.error("--quick writes only where --out says: pass --out DIR")
        args.out = DEFAULT_OUT

    from benchmarks._results import environment, write_results

    start = time.perf_counter()
    runs, states = {}, {}
    with tempfile.TemporaryDirectory(prefix="bayesdl-distributed-bench-") as tmp:
        for label, processes, threads in RUNS:
            n_threads = max(1, _cores() // 2) if threads == "per_process_of_2" else None
            print(f"running {label}: {processes} process(es) ...", flush=True)
            runs[label], states[label] = launch(
                processes,
                n_threads,
                config,
                Path(tmp),
                seed=args.seed,
                repeats=args.repeats,
                timeout_s=args.timeout,
            )
        summary = summarize(runs, states, config)
    threads = {label: runs[label]["threads_per_process"] for label in runs}
    print(
        f"{'configuration':<24}{'s/epoch 1p':>11}{'s/epoch 2p':>11}{'ratio':>7}"
        f"{'diff 1 ep':>11}{'diff end':>10}"
    )
    for name, row in summary.items():
        print(
            f"{name:<24}{row['seconds_per_epoch_1']:>11.3f}{row['seconds_per_epoch_2']:>11.3f}"
            f"{row['speedup']:>7.2f}{row['max_abs_difference_warm_up']:>11.1e}"
            f"{row['max_abs_difference']:>10.1e}"
        )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "machine": _machine(),
        "environment": environment() | {"threads": threads},
        "threads": threads,
        "config": config | {"seed": args.seed, "lr": LR, "n_members": N_MEMBERS},
        "steps_per_epoch": math.ceil(config["rows"] / config["batch_size"]),
        "summary": summary,
        "runs": runs,
        "seconds": {"total": time.perf_counter() - start},
    }
    results["verdict"] = verdict(summary, threads)
    print(results["verdict"])
    stem = "distributed_cpu_quick" if args.quick else "distributed_cpu"
    write_results(results, args.out, stem, write_markdown, print)
    return 0


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path[0] = str(ROOT)  # import benchmarks as a package; no shadowing by this folder
    elif str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
