"""What the application benchmarks (hand-over, referral, command line, service) share: the
environment they record, how they run a command and how they write their results."""

from __future__ import annotations

import contextlib
import io
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch


def run_bayesdl(*argv: str) -> str:
    """Run one ``bayesdl`` command in this process, as a user types it; its standard output
    (a failure raises ``RuntimeError`` with the command's one-line error)."""
    from bayesdl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(list(argv))
    if status != 0:
        raise RuntimeError(f"bayesdl {' '.join(argv)} failed: {err.getvalue().strip()}")
    return out.getvalue()


def environment() -> dict:
    """The software a run used: torch and Python versions, torch's thread count."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def write_results(
    results: dict,
    out: Path,
    stem: str,
    write_markdown: Callable[[dict, Path], None],
    log: Callable[[str], None],
) -> None:
    """``out/stem.json`` and ``out/stem.md`` (the folder is created); ``results["seconds"]
    ["total"]`` is logged."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / f"{stem}.md")
    log(f"wrote {out / stem}.json and .md ({results['seconds']['total']:.0f} s)")
