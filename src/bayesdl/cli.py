"""The ``bayesdl`` command (also ``python -m bayesdl``)."""

from __future__ import annotations

import argparse
import os
import sys

from bayesdl.commands import COMMANDS, _open_fraction, _positive_int, add_subcommands, run
from bayesdl.posteriors import available_posteriors

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesdl",
        description="Bayesian deep learning for any PyTorch module: uncertainty you can act on.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_subcommands(sub)

    demo = sub.add_parser(
        "demo",
        help="train deterministic, MC dropout and deep ensemble nets on digits 0-4, show them "
        "unseen digits 5-9 and shifted or random images, and fit a referral rule",
    )
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--epochs", type=_positive_int, default=60)
    demo.add_argument("--members", type=_positive_int, default=5, help="ensemble size")
    demo.add_argument("--samples", type=_positive_int, default=100, help="MC dropout draws")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--target-risk",
        type=_open_fraction,
        default=0.02,
        help="referral: error rate allowed among accepted cases (default 0.02)",
    )
    demo.add_argument(
        "--delta",
        type=_open_fraction,
        default=0.1,
        help="referral: allowed probability that the guarantee fails (default 0.1)",
    )
    demo.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="also write the demo's figures (PNG) into DIR, created if needed",
    )

    sub.add_parser("methods", help="list the registered posteriors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``bayesdl`` command with ``argv`` (``None``: the process's arguments).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a bad file, column, value or option (after one
        line on stderr that names it).
    """
    args = _build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return run(args)
    if args.command == "methods":
        print("\n".join(available_posteriors()))
        return 0
    from bayesdl.demo import DemoConfig, format_table, result_json, run_demo

    config = DemoConfig(
        epochs=args.epochs,
        n_members=args.members,
        n_samples=args.samples,
        seed=args.seed,
        target_risk=args.target_risk,
        delta=args.delta,
    )
    result = run_demo(config, plots_dir=args.plots)
    print(result_json(result) if args.json else format_table(result))
    if args.plots is not None and not args.json:
        print(
            f"\nfigures written to {args.plots}: "
            + ", ".join(os.path.basename(p) for p in result["plots"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
