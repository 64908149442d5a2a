"""The ``bayesdl`` command (also ``python -m bayesdl``)."""

from __future__ import annotations

import argparse
import os
import sys

from bayesdl.posteriors import available_posteriors

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesdl",
        description="Bayesian deep learning for any PyTorch module: uncertainty you can act on.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train deterministic, MC dropout and deep ensemble nets on digits 0-4 and show "
        "them unseen digits 5-9",
    )
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--epochs", type=_positive_int, default=60)
    demo.add_argument("--members", type=_positive_int, default=5, help="ensemble size")
    demo.add_argument("--samples", type=_positive_int, default=100, help="MC dropout draws")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="also write the demo's figures (PNG) into DIR, created if needed",
    )

    sub.add_parser("methods", help="list the registered posteriors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "methods":
        print("\n".join(available_posteriors()))
        return 0
    from bayesdl.demo import DemoConfig, format_table, result_json, run_demo

    config = DemoConfig(
        epochs=args.epochs, n_members=args.members, n_samples=args.samples, seed=args.seed
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
