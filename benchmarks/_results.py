"""What the application benchmarks (hand-over, referral) share: the environment they record and
how they write their results."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch


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
