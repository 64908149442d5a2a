"""Where an IVON training epoch spends its time, beside a plain (Adam) epoch of the same net.

Run from the repository root::

    python -m benchmarks.epoch_parts [--epochs N] [--quick] [--json]

The data and net are those of ``speed.py``'s ``ivon_train_epoch_mlp`` (10,000 synthetic 784-d
inputs of 10 random classes, a 784-400-400-10 MLP, batch 128). One epoch of each is timed
``--epochs`` times, alternating; the first pair is a warm-up. Within an epoch the backward
passes (``Tensor.backward``) and the optimiser steps are timed by wrapping them; the rest is the
forward pass and the loop (for IVON also the weight draw and its views). Medians over epochs, in
milliseconds. Wrapping costs a few microseconds per call, so the totals run slightly above
``speed.py``'s.

``--quick`` shrinks the data and net so the test suite can run it in seconds; its timings say
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

import bayesdl as bdl
from bayesdl.posteriors.ivon import _IVONStep

__all__ = ["main", "measure"]

SEED = 0


@contextlib.contextmanager
def _timed(owner, name: str, into: dict[str, float], key: str) -> Iterator[None]:
    """``owner.name`` wrapped so that its seconds add up in ``into[key]``; restored after."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _net(hidden: int) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def measure(epochs: int = 4, quick: bool = False) -> dict:
    """Median milliseconds per epoch of each part, ``{"plain": {...}, "ivon": {...}}``: keys
    ``total``, ``backward``, ``step`` and ``forward_and_loop`` (the rest)."""
    n, hidden = (256, 32) if quick else (10_000, 400)
    g = torch.Generator().manual_seed(SEED)
    data = (torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
    settings = {"epochs": 1, "batch_size": 128, "seed": SEED, "progress": False}
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "ivon": []}
    for epoch in range(epochs + 1):
        for kind in runs:
            parts: dict[str, float] = {}
            if kind == "plain":
                post, lr, optimiser = (
                    bdl.Deterministic(_net(hidden), "categorical"),
                    1e-3,
                    torch.optim.Adam,
                )
            else:
                post, lr, optimiser = bdl.IVON(_net(hidden), "categorical"), 0.1, _IVONStep
            with (
                _timed(torch.Tensor, "backward", parts, "backward"),
                _timed(optimiser, "step", parts, "step"),
            ):
                start = time.perf_counter()
                post.fit(data, lr=lr, **settings)
                parts["total"] = time.perf_counter() - start
            parts["forward_and_loop"] = parts["total"] - parts["backward"] - parts["step"]
            if epoch:  # the first pair warms up
                runs[kind].append(parts)
    return {
        kind: {k: round(1000 * statistics.median(r[k] for r in rows), 2) for k in rows[0]}
        for kind, rows in runs.items()
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.epoch_parts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs of each (default 4)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    result = {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "ms_per_epoch": measure(args.epochs, args.quick),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        ms = result["ms_per_epoch"]
        print(f"{'part':<18}{'plain (Adam)':>14}{'IVON':>10}")
        for key in ("forward_and_loop", "backward", "step", "total"):
            print(f"{key:<18}{ms['plain'][key]:>14.1f}{ms['ivon'][key]:>10.1f}")
        if args.quick:
            print("(--quick: tiny sizes, the timings say nothing)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
