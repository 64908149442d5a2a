"""The ``bayesdl`` commands for a data file: ``fit``, ``predict``, ``evaluate``, ``calibrate``,
``info``.

Each command reads a table (CSV, Parquet, NPZ or a UCI folder; :mod:`bayesdl.tabular`), encodes it
with the :class:`~bayesdl.tabular.TabularPipeline` saved in the model file, and talks to the
posterior only through the :class:`~bayesdl.posteriors.base.Posterior` contract and its wrappers
(calibration, conformal threshold, referral, OOD gate), so every registered method works the same
way::

    bayesdl fit train.csv --target price --out model.safetensors
    bayesdl calibrate model.safetensors held_out.csv --target price --out calibrated.safetensors
    bayesdl predict calibrated.safetensors new.csv --out predictions.csv
    bayesdl evaluate calibrated.safetensors test.csv --target price --report report.html
    bayesdl info calibrated.safetensors

Regression models work in standardised target units inside (``(y - y_mean) / y_std``, the
pipeline's statistics); everything a user reads or writes (predictions, intervals, metrics,
``--tolerance``) is in the target's own units.

Errors a user can fix (a missing file or column, a bad value in a row, a damaged model file, a bad
option) end the command with one line ``bayesdl: error: ...`` on stderr naming the file, row and
column where they apply, and exit status 2; no output file is written, and one that existed is
left as it was (every file is written to a temporary file in its folder and renamed at the end).

``cli.py`` wires this in with :func:`add_subcommands` (on its subparsers) and :func:`run` (for a
parsed command in :data:`COMMANDS`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bayesdl import distributed, metrics
from bayesdl._version import __version__
from bayesdl.calibration import calibrate
from bayesdl.conformal import ConformalPredictor, aps_sets, conformalize
from bayesdl.decisions import OODGate, Referral, min_cases_to_certify, uncertainty_score
from bayesdl.files import ModelFileError, write_atomic
from bayesdl.io import inspect, load, save
from bayesdl.models import mlp
from bayesdl.posteriors import SWAG, DeepEnsemble, available_posteriors, get_posterior
from bayesdl.posteriors.wrapper import PosteriorWrapper
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction
from bayesdl.tabular import DataError, Table, TabularPipeline, iter_table, read_table
from bayesdl.training import TrainingDivergedError

__all__ = ["COMMANDS", "CommandError", "add_subcommands", "run"]

#: The commands :func:`add_subcommands` adds and :func:`run` dispatches.
COMMANDS = ("split", "fit", "predict", "evaluate", "calibrate", "info", "serve")

#: Defaults of ``fit``.
DEFAULT_EPOCHS = 100
DEFAULT_PATIENCE = 10
DEFAULT_MEMBERS = 5
MC_DROPOUT_RATE = 0.1


class CommandError(ValueError):
    """A usage error found by a command (an option that does not fit the model or the data)."""


#: What the commands report as one line and exit status 2 instead of a traceback.
_USER_ERRORS = (
    CommandError,
    DataError,
    ModelFileError,
    TrainingDivergedError,
    OSError,
    ValueError,
    TypeError,
)


# ---------------------------------------------------------------------------- option types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value:g}")
    return value


def _rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value:g}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    """``"50,50"`` -> ``(50, 50)``; ``""`` or ``"0"`` -> ``()`` (a linear model)."""
    if text.strip() in ("", "0"):
        return ()
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer widths such as 50 or 100,50, got {text!r}"
        ) from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"every layer width must be positive, got {text!r}")
    return widths


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected shares such as 0.6,0.2,0.2, got {text!r}"
        ) from None
    if not all(math.isfinite(v) and v > 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"expected positive shares that sum to 1, such as 0.6,0.2,0.2, got {text!r}"
        )
    return values


def _column_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected column names such as zip,store, got {text!r}")
    return names


# ---------------------------------------------------------------------------- the parsers
def add_subcommands(subparsers) -> None:
    """Add ``split``, ``fit``, ``predict``, ``evaluate``, ``calibrate`` and ``info`` to
    ``subparsers`` (what ``ArgumentParser.add_subparsers(dest="command")`` returned)."""
    methods = available_posteriors()

    split = _parser(
        subparsers,
        "split",
        "shuffle the rows of a data file (seeded) into training, calibration and test files",
        "Writes one CSV file per --out, in the order given, with the shares of --fractions "
        "(default 0.6,0.2,0.2 for three files, 0.8,0.2 for two). Every row lands in exactly one "
        "file; numbers are written so that they read back to the same value.",
    )
    split.add_argument("data", metavar="DATA", help="data: .csv, .parquet, .npz or a UCI folder")
    split.add_argument(
        "--out",
        required=True,
        nargs="+",
        metavar="FILE",
        help="the files to write (.csv, or .tsv for tabs), e.g. train.csv held_out.csv test.csv",
    )
    split.add_argument(
        "--fractions",
        type=_fractions,
        default=None,
        metavar="F,F,...",
        help="share of the rows for each file, summing to 1",
    )
    split.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed of the shuffle (default 0)"
    )

    fit = _parser(
        subparsers,
        "fit",
        "train a Bayesian network on a data file and save it with its encoding of the columns",
        "Reads DATA, holds out --val-fraction of the rows (seeded) for early stopping, fits the "
        "column encoding on the training rows (numeric columns standardised, text columns "
        "one-hot), trains an MLP under the chosen posterior and writes one model file that "
        "predicts from raw tables. Under torchrun (torchrun --nproc-per-node 2 -m bayesdl fit "
        "...) the processes train together over torch.distributed (gloo) and rank 0 writes the "
        "file.",
    )
    fit.add_argument(
        "data", metavar="DATA", help="training data: .csv, .parquet, .npz or a UCI folder"
    )
    fit.add_argument("--target", required=True, metavar="COL", help="the column to predict")
    fit.add_argument(
        "--out", required=True, metavar="MODEL", help="model file to write (.safetensors)"
    )
    fit.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="default: inferred from the target (text or at most 20 distinct integers: classes)",
    )
    fit.add_argument(
        "--method",
        choices=methods,
        default="deep_ensemble",
        metavar="NAME",
        help=f"the posterior: {', '.join(methods)} (default deep_ensemble)",
    )
    fit.add_argument(
        "--hidden",
        type=_widths,
        default=(50,),
        metavar="W[,W...]",
        help="hidden layer widths, e.g. 100,50 (default 50; 0 for a linear model)",
    )
    fit.add_argument(
        "--dropout",
        type=_rate,
        default=None,
        metavar="P",
        help=f"dropout rate after each hidden layer (default 0; {MC_DROPOUT_RATE} for mc_dropout)",
    )
    fit.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        metavar="N",
        help=f"most passes over the training rows (default {DEFAULT_EPOCHS})",
    )
    fit.add_argument(
        "--patience",
        type=_positive_int,
        default=DEFAULT_PATIENCE,
        metavar="N",
        help="stop after N epochs without a better validation loss, keeping the best epoch "
        f"(default {DEFAULT_PATIENCE}; swag always runs every epoch)",
    )
    fit.add_argument(
        "--members",
        type=_positive_int,
        default=None,
        metavar="M",
        help=f"deep_ensemble: number of networks (default {DEFAULT_MEMBERS})",
    )
    fit.add_argument(
        "--parallel",
        choices=("data", "members"),
        default="data",
        help="under torchrun: shard every batch over the processes (data, default) or give "
        "each process its share of the deep_ensemble's members (members)",
    )
    fit.add_argument(
        "--val-fraction",
        type=_rate,
        default=0.1,
        metavar="F",
        help="share of the rows held out for early stopping and the validation metric "
        "(default 0.1; 0: none)",
    )
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="B",
        help="rows per step (default 32)",
    )
    fit.add_argument(
        "--lr",
        type=_positive_number,
        default=None,
        help="learning rate (default 0.001; 0.1 for ivon, whose step is divided by its "
        "Hessian estimate)",
    )
    fit.add_argument(
        "--categorical",
        type=_column_names,
        default=(),
        metavar="COL[,COL...]",
        help="numeric columns to one-hot encode anyway (codes, zip codes)",
    )
    fit.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="seed of the split, the initial weights and training (default 0)",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    predict = _parser(
        subparsers,
        "predict",
        "predict every row of a data file, with its uncertainty, into a CSV file",
        "Writes one row per row of DATA, in order. Classification: predicted (the class), "
        "p_<class> per class, confidence, total, aleatoric, epistemic (entropies in nats), set "
        "(the conformal prediction set, if the model is calibrated). Regression, in the target's "
        "units: mean, lower, upper (the central interval at --level of the predictive mixture, "
        "or the conformal interval at the model's own 1 - alpha once calibrated), aleatoric_std, "
        "epistemic_std. Models with a referral rule add refer, with an OOD gate hand_over "
        "(true/false).",
    )
    predict.add_argument("model", metavar="MODEL", help="model file written by fit or calibrate")
    predict.add_argument(
        "data", metavar="DATA", help="rows to predict (the target column may be absent)"
    )
    predict.add_argument(
        "--out", required=True, metavar="PRED.csv", help="CSV file to write (.csv or .tsv)"
    )
    _add_level(predict)
    _add_samples(predict)
    predict.add_argument(
        "--batch-rows",
        type=_positive_int,
        default=65_536,
        metavar="N",
        help="rows read and predicted at a time (default 65536): memory stays bounded",
    )
    _add_seed(predict)

    evaluate = _parser(
        subparsers,
        "evaluate",
        "score a model on labelled data: accuracy and calibration, or errors and intervals",
        "Classification: accuracy, NLL, Brier score, ECE (15 bins). Regression, in the target's "
        "units: RMSE, NLL, CRPS, and coverage and mean width of the intervals (the predictive "
        "mixture's at --level, or the conformal ones of a calibrated model). With --ood: how "
        "well the epistemic uncertainty, and the softmax confidence or the total std, tell "
        "the rows of OTHER from those of DATA (AUROC).",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model file")
    evaluate.add_argument("data", metavar="DATA", help="labelled rows not used in training")
    _add_target(evaluate)
    evaluate.add_argument(
        "--report",
        metavar="REPORT.html",
        help="also write a self-contained HTML report with figures",
    )
    evaluate.add_argument(
        "--ood",
        metavar="OTHER",
        help="a data file of other inputs (e.g. another population); target optional",
    )
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_level(evaluate)
    _add_samples(evaluate)
    _add_seed(evaluate)

    cal = _parser(
        subparsers,
        "calibrate",
        "recalibrate a model on held-out rows, add conformal intervals or sets, a referral "
        "rule and an OOD gate",
        "Splits DATA (labelled rows not used in training) in two halves, seeded. The first "
        "fits temperature scaling (classification) or variance scaling (regression); the second "
        "the split-conformal threshold (intervals, or non-randomised prediction sets, that hold "
        "the truth with probability >= 1 - alpha) and, when asked, a referral rule (error rate "
        "<= --target-risk among the cases the model decides, with probability >= 1 - --delta) "
        "and an OOD gate (hands over on inputs unlike the calibration inputs; false alarms at "
        "rate --ood-false-alarm). Wrappers already in MODEL are replaced.",
    )
    cal.add_argument("model", metavar="MODEL", help="model file")
    cal.add_argument("data", metavar="DATA", help="labelled rows not used in training")
    _add_target(cal)
    cal.add_argument("--out", required=True, metavar="MODEL2", help="model file to write")
    cal.add_argument(
        "--alpha",
        type=_open_fraction,
        default=0.1,
        help="allowed miscoverage of the conformal regions (default 0.1)",
    )
    cal.add_argument(
        "--target-risk",
        type=_open_fraction,
        default=None,
        metavar="R",
        help="fit a referral rule: error rate allowed among the cases the model decides",
    )
    cal.add_argument(
        "--delta",
        type=_open_fraction,
        default=0.1,
        help="referral: allowed probability that the guarantee fails (default 0.1)",
    )
    cal.add_argument(
        "--tolerance",
        type=_positive_number,
        default=None,
        metavar="T",
        help="regression referral: a case is an error when |y - mean| > T (target units)",
    )
    cal.add_argument(
        "--ood-false-alarm",
        type=_open_fraction,
        default=None,
        metavar="A",
        help="fit an OOD gate on the epistemic uncertainty that hands over a share A of "
        "in-distribution inputs",
    )
    _add_samples(cal)
    _add_seed(cal)

    info = _parser(
        subparsers,
        "info",
        "describe a model file: method, columns, classes or target, calibration and rules",
        "Reads the file's header only (checked, as loading would); builds no posterior.",
    )
    info.add_argument("model", metavar="MODEL", help="model file")
    info.add_argument("--json", action="store_true", help="print as JSON")

    from bayesdl import serve  # the module imports FastAPI only when a server is made

    serve.add_parser(subparsers, _parser)


def _parser(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}"
    )

    # argparse reports a bad option with a usage block and a second line; the commands promise
    # one line "bayesdl: error: ..." and exit status 2 for every error a user can fix.
    def error(message: str):
        _fail(f"{name}: {message} (see '{parser.prog} --help')")
        sys.exit(2)

    parser.error = error
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        metavar="COL",
        default=None,
        help="the column of true values (default: the model's target column; another name is an "
        "error)",
    )


def _add_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        type=_open_fraction,
        default=None,
        help="regression: level of the central intervals (default 0.9; a calibrated model's "
        "conformal intervals keep their own 1 - alpha)",
    )


def _add_samples(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="S",
        help="posterior draws per prediction (default: the method's own; a deep ensemble "
        "draws exactly one per member)",
    )


def _add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed of the posterior draws (default 0)"
    )


# ---------------------------------------------------------------------------- dispatch
def run(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.command`` (one of :data:`COMMANDS`); the exit status.

    Errors a user can fix are printed as one line ``bayesdl: error: ...`` on stderr (exit
    status 2); an interrupted command exits with 130. Neither leaves a partial output file.
    """
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "split": _split,
        "fit": _fit,
        "predict": _predict,
        "evaluate": _evaluate,
        "calibrate": _calibrate,
        "info": _info,
        "serve": _serve,
    }
    if args.command not in handlers:
        raise ValueError(f"unknown command {args.command!r}; the commands are {COMMANDS}.")
    try:
        return handlers[args.command](args)
    except _USER_ERRORS as err:
        _fail(str(err) or type(err).__name__)
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130


def _fail(message: str) -> None:
    print(f"bayesdl: error: {' '.join(message.split())}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"bayesdl: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- shared steps
def _check_output(path: str, what: str) -> Path:
    """The path of an output file, whose folder must exist (checked before any work)."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(
            f"cannot write {what} {path!r}: the folder {str(folder)!r} does not exist; create it "
            "first."
        )
    if out.is_dir():
        raise CommandError(f"cannot write {what} {path!r}: it is a folder; name a file.")
    return out


def _load(path: str):
    """``(posterior, info, pipeline)`` of a model file the commands can use."""
    info = inspect(path)
    if info.pipeline is None:
        raise CommandError(
            f"{path!r} has no column encoding (it was saved from Python without pipeline=), so "
            "it cannot read a data file; predict with bayesdl.load in Python, or fit it with "
            "'bayesdl fit'."
        )
    return load(path), info, info.pipeline


def _base(posterior):
    return posterior.base if isinstance(posterior, PosteriorWrapper) else posterior


def _wrapper(posterior, kind: type):
    """The outermost wrapper of type ``kind`` in the chain, or ``None``."""
    inner = posterior
    while isinstance(inner, PosteriorWrapper):
        if isinstance(inner, kind):
            return inner
        inner = inner.posterior
    return None


def _check_samples(posterior, samples: int | None) -> None:
    """``--samples`` must be a count the method can draw (one meaning for every method)."""
    if samples is None:
        return
    base = _base(posterior)
    if isinstance(base, DeepEnsemble) and samples != base.n_members:
        raise CommandError(
            f"--samples {samples}: this deep ensemble gives exactly one draw per member and has "
            f"{base.n_members} members; pass --samples {base.n_members} or leave it out."
        )
    if isinstance(base, SWAG) and samples % base.n_members:
        raise CommandError(
            f"--samples {samples}: this MultiSWAG draws the same number from each of its "
            f"{base.n_members} members; pass a multiple of {base.n_members}."
        )


def _check_target(pipeline: TabularPipeline, target: str | None) -> None:
    if target is not None and target != pipeline.target:
        raise CommandError(
            f"--target {target!r}: the model predicts the column {pipeline.target!r}, which the "
            f"data must hold under that name; pass --target {pipeline.target} or leave it out."
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _in_units(pred: RegressionPrediction, pipeline: TabularPipeline) -> RegressionPrediction:
    """A standardised regression prediction in the target's units (float64)."""
    return RegressionPrediction(
        pred.means.double() * pipeline.y_std + pipeline.y_mean,
        pred.variances.double() * pipeline.y_std**2,
    )


def _intervals(pred_units: RegressionPrediction, conformal, level: float | None):
    """``(lower, upper, level, kind)`` in the target's units: the conformal intervals of a
    calibrated model (``mean +- threshold * std``), else the mixture's central ones."""
    if conformal is not None:
        half = conformal.threshold * pred_units.std
        return pred_units.mean - half, pred_units.mean + half, 1.0 - conformal.alpha, "conformal"
    level = 0.9 if level is None else level
    lower, upper = pred_units.interval(level)
    return lower, upper, level, "predictive mixture"


def _interval_note(conformal, level: float | None) -> None:
    if conformal is None:
        return
    note = f"intervals are conformal at the model's 1 - alpha = {1 - conformal.alpha:g}"
    if level is not None and not math.isclose(level, 1 - conformal.alpha):
        note += f"; --level {level:g} is not used (calibrate with --alpha to change it)"
    _note(note)


def _sets(pred: ClassificationPrediction, conformal, generator) -> Tensor:
    """Conformal APS sets ``(B, C)`` of a calibrated classification model."""
    probs = pred.probs
    u = None
    if conformal.randomized:
        u = torch.rand(len(probs), generator=generator, dtype=probs.dtype, device=probs.device)
    return aps_sets(probs, torch.tensor(conformal.threshold, dtype=probs.dtype), u)


def _fmt(values: Tensor) -> list[str]:
    return [f"{v:.8g}" for v in values.tolist()]


def _flags(values: Tensor) -> list[str]:
    return ["true" if v else "false" for v in values.tolist()]


# ---------------------------------------------------------------------------- split
#: ``bayesdl split``'s shares when --fractions is not given, by the number of files.
DEFAULT_FRACTIONS = {1: (1.0,), 2: (0.8, 0.2), 3: (0.6, 0.2, 0.2)}


def _split(args: argparse.Namespace) -> int:
    outs = [_check_output(path, "a part") for path in args.out]
    for path in outs:
        if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise CommandError(
                f"--out {str(path)!r}: split writes CSV; name the files *.csv (or *.tsv for tabs)."
            )
    if len({p.resolve() for p in outs}) != len(outs):
        raise CommandError("--out names the same file twice; give each part its own file.")
    fractions = args.fractions or DEFAULT_FRACTIONS.get(len(outs))
    if fractions is None or len(fractions) != len(outs):
        raise CommandError(
            f"--out names {len(outs)} files but --fractions gives "
            f"{'no shares' if fractions is None else f'{len(fractions)} shares'}; give one "
            "share per file, e.g. --fractions "
            + ",".join(f"{1 / len(outs):.2g}" for _ in outs)
            + "."
        )
    table = read_table(args.data)
    n = table.n_rows
    # Round the cumulative shares, so the sizes add up to n exactly.
    bounds = [0, *(round(n * sum(fractions[: i + 1])) for i in range(len(fractions)))]
    bounds[-1] = n
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    if min(sizes) < 1:
        raise DataError(
            f"{table.source}: {n} rows cannot give every part a row with shares "
            f"{','.join(f'{f:g}' for f in fractions)}."
        )
    order = torch.randperm(n, generator=_generator(args.seed)).numpy()
    lines = [f"data: {args.data}, {n} rows, shuffled with seed {args.seed}"]
    for path, a, b in zip(outs, bounds, bounds[1:], strict=False):
        part = table.take(np.sort(order[a:b]))  # each part keeps the file's row order
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","

        def write(tmp: str, part=part, delimiter=delimiter) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, delimiter=delimiter)
                writer.writerow(part.names)
                writer.writerows(zip(*(_cells(v) for v in part.columns.values()), strict=True))

        write_atomic(path, write)
        lines.append(f"{path}: {b - a} rows ({(b - a) / n:.1%})")
    print("\n".join(lines))
    return 0


def _cells(values: np.ndarray) -> list[str]:
    """A column as CSV text that reads back to the same values (missing ones as empty)."""
    if values.dtype == object:
        return ["" if v is None else str(v) for v in values]
    out = []
    for v in values.tolist():
        if math.isnan(v):
            out.append("")
        elif v.is_integer() and abs(v) < 2**53:
            out.append(str(int(v)))
        else:
            out.append(repr(v))
    return out


# ---------------------------------------------------------------------------- fit
def _fit(args: argparse.Namespace) -> int:
    out = _check_output(args.out, "the model")
    if args.parallel == "members" and args.method != "deep_ensemble":
        raise CommandError(
            f"--parallel members spreads a deep_ensemble's members; {args.method} has none to "
            "spread: use --parallel data."
        )
    group = distributed.init("gloo")  # under torchrun: join the other processes
    try:
        return _fit_here(args, out, group)
    finally:
        distributed.shutdown()


def _fit_here(args: argparse.Namespace, out: Path, group: distributed.Group | None) -> int:
    """``fit`` in this process; with a process ``group``, trained with the others and written
    and reported by rank 0 alone."""
    cls = get_posterior(args.method)
    notes = []
    dropout = args.dropout
    if args.method == "mc_dropout":
        if dropout is None:
            dropout = MC_DROPOUT_RATE
            notes.append(f"mc_dropout needs dropout: using --dropout {MC_DROPOUT_RATE} (default)")
        elif dropout == 0:
            raise CommandError("--dropout 0: mc_dropout samples dropout masks; pass a rate > 0.")
        if not args.hidden:
            raise CommandError(
                "--hidden 0: mc_dropout needs a hidden layer to drop units from; pass e.g. 50."
            )
    if args.members is not None and args.method != "deep_ensemble":
        raise CommandError(f"--members is for deep_ensemble; {args.method} has no members to set.")

    table = read_table(args.data)
    pipeline, train, val = _fit_pipeline(table, args)
    x = pipeline.transform(table)
    y = pipeline.transform_target(table)
    classification = pipeline.task == "classification"
    n_out = len(pipeline.classes) if classification else 2  # logits, or mean and log-variance
    likelihood = "categorical" if classification else "gaussian"
    options: dict = {}
    if args.method == "deep_ensemble":
        options = {"n_members": args.members or DEFAULT_MEMBERS, "seed": args.seed}
    elif args.method == "swag":
        options = {"seed": args.seed}
    patience = args.patience
    if args.method == "swag":
        patience = None  # the SWA phase (the second half of the epochs) must run to collect
        notes.append("swag runs every epoch (it averages the weights of the last half)")
    elif args.method == "sgmcmc":
        patience = None  # the chain keeps its samples in the second half of the epochs
        notes.append("sgmcmc runs every epoch (it keeps samples of the chain's second half)")
    val_data = (x[val], y[val]) if len(val) else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        net = mlp(pipeline.n_features, n_out, hidden=args.hidden, dropout=dropout or 0.0)
        posterior = cls(net, likelihood, **options)
        history = posterior.fit(
            (x[train], y[train]),
            val_data=val_data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else _DEFAULT_LRS.get(args.method, 1e-3),
            patience=patience if val_data is not None else None,
            seed=args.seed,
            progress=False if args.quiet else None,
            parallel=args.parallel,
        )
    if group is not None and group.rank != 0:
        return 0
    validation = None
    if val_data is not None:
        pred = posterior.predict(val_data[0], generator=_generator(args.seed))
        validation = _scores(pred, table.take(val.numpy()), pipeline, val_data[1])
    save(posterior, out, pipeline=pipeline)

    features = pipeline.input_columns
    shown = ", ".join(features[:8]) + (
        f", ... ({len(features)} in all)" if len(features) > 8 else ""
    )
    lines = [
        f"data: {args.data}, {table.n_rows} rows ({len(train)} for training, {len(val)} for "
        "validation)",
        f"features: {len(features)} columns ({shown}) -> {pipeline.n_features} inputs",
        *(pipeline.notes or [f"task: {pipeline.task} (given by --task)"]),
    ]
    if classification:
        lines.append(f"classes: {', '.join(pipeline.classes)}")
    else:
        lines.append(
            f"target: {pipeline.target}, mean {pipeline.y_mean:.6g}, std {pipeline.y_std:.6g}"
        )
    member_note = f" ({options['n_members']} members)" if "n_members" in options else ""
    lines.append(
        f"method: {args.method}{member_note}, network "
        f"{' -> '.join(map(str, [pipeline.n_features, *args.hidden, n_out]))}"
        + (f", dropout {dropout:g}" if dropout else "")
    )
    lines += notes
    if group is not None:
        lines.append(
            f"processes: {group.world} (torch.distributed, gloo; parallel {args.parallel})"
        )
    if history.epochs_run:
        lines.append(
            f"training: {history.epochs_run} epochs"
            + (
                f" (stopped early; best epoch {history.best_epoch})"
                if history.stopped_early
                else ""
            )
        )
    if validation is None:
        lines.append("validation: none (--val-fraction 0, or too few rows)")
    elif classification:
        lines.append(
            f"validation: accuracy {validation['accuracy']:.4f}, NLL {validation['nll']:.4f} "
            f"({len(val)} rows)"
        )
    else:
        lines.append(
            f"validation: RMSE {validation['rmse']:.6g}, NLL {validation['nll']:.4f} in the "
            f"target's units ({len(val)} rows)"
        )
    lines.append(f"model written to {args.out}")
    print("\n".join(lines))
    return 0


#: Learning rates of the methods whose step is not Adam's (``--lr`` unset).
_DEFAULT_LRS = {"ivon": 0.1}


def _fit_pipeline(table: Table, args: argparse.Namespace):
    """``(pipeline, train_rows, val_rows)``: the split (seeded) and the column encoding.

    Every value of the file is checked first, so an error names its row in the file. The
    numeric statistics (inputs and target) come from the training rows only; the categories and
    classes are those of the whole file, so a rare one that falls only into the validation rows
    is still known.
    """
    full = TabularPipeline.fit(table, args.target, task=args.task, categorical=args.categorical)
    n = table.n_rows
    n_val = round(n * args.val_fraction)
    if n_val and n - n_val < 2:
        n_val = 0  # too few rows to hold any out
    if n < 2:
        raise DataError(f"{table.source}: {n} data row(s); fitting needs at least two.")
    order = torch.randperm(n, generator=_generator(args.seed))
    train, val = order[n_val:].sort().values, order[:n_val].sort().values
    if not n_val:
        return full, train, val
    stats = TabularPipeline.fit(
        table.take(train.numpy()), args.target, task=full.task, categorical=args.categorical
    )
    columns = tuple(
        s if f.kind == "numeric" else f for f, s in zip(full.columns, stats.columns, strict=True)
    )
    pipeline = dataclasses.replace(full, columns=columns, y_mean=stats.y_mean, y_std=stats.y_std)
    return pipeline, train, val


def _scores(pred, table: Table, pipeline: TabularPipeline, y: Tensor) -> dict[str, float]:
    """Accuracy and NLL, or RMSE and NLL in the target's units."""
    if isinstance(pred, ClassificationPrediction):
        return {
            "accuracy": float(metrics.accuracy(pred.probs.double(), y)),
            "nll": float(metrics.nll(pred.probs.double(), y)),
        }
    units = _in_units(pred, pipeline)
    y_units = torch.from_numpy(pipeline.target_values(table))
    return {
        "rmse": float(metrics.rmse(units.mean, y_units)),
        "nll": float(metrics.gaussian_mixture_nll(units.means, units.variances, y_units)),
    }


# ---------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace) -> int:
    out = _check_output(args.out, "the predictions")
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".tsv", ".txt"):
        raise CommandError(
            f"--out {args.out!r}: predict writes CSV; name the file *.csv (or *.tsv for tabs)."
        )
    posterior, _, pipeline = _load(args.model)
    _check_samples(posterior, args.samples)
    classification = pipeline.task == "classification"
    conformal = _wrapper(posterior, ConformalPredictor)
    referral, gate = _wrapper(posterior, Referral), _wrapper(posterior, OODGate)
    if classification:
        header = ["predicted", *(f"p_{c}" for c in pipeline.classes)]
        header += ["confidence", "total", "aleatoric", "epistemic"]
        header += ["set"] if conformal is not None else []
    else:
        header = ["mean", "lower", "upper", "aleatoric_std", "epistemic_std"]
        _interval_note(conformal, args.level)
    header += ["refer"] if referral is not None else []
    header += ["hand_over"] if gate is not None else []
    classes = np.asarray(pipeline.classes, dtype=object) if classification else None
    n_rows = 0

    def write(tmp: str) -> None:
        nonlocal n_rows
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writerow(header)
            for batch in iter_table(args.data, args.batch_rows):
                if batch.n_rows == 0:
                    continue
                x = pipeline.transform(batch)
                # Each batch draws from the same seed: weight-space methods (ensembles, VI,
                # SWAG) then give the same numbers for any --batch-rows.
                generator = _generator(args.seed)
                pred = posterior.predict(x, args.samples, generator=generator)
                if classification:
                    cols = [list(classes[pred.label.numpy()])]
                    cols += [_fmt(p) for p in pred.probs.T]
                    cols += [_fmt(pred.confidence), _fmt(pred.total)]
                    cols += [_fmt(pred.aleatoric), _fmt(pred.epistemic)]
                    if conformal is not None:
                        members = _sets(pred, conformal, generator).tolist()
                        cols.append(
                            [
                                "|".join(c for c, m in zip(classes, row, strict=True) if m)
                                for row in members
                            ]
                        )
                else:
                    units = _in_units(pred, pipeline)
                    lower, upper, _, _ = _intervals(units, conformal, args.level)
                    cols = [_fmt(units.mean), _fmt(lower), _fmt(upper)]
                    cols += [_fmt(units.aleatoric.sqrt()), _fmt(units.epistemic.sqrt())]
                if referral is not None:
                    cols.append(_flags(referral.decide(pred).refer))
                if gate is not None:
                    cols.append(_flags(gate.decide(pred).refer))
                writer.writerows(zip(*cols, strict=True))
                n_rows += batch.n_rows

    write_atomic(out, write)
    print(f"predictions for {n_rows} rows written to {args.out}")
    return 0


# ---------------------------------------------------------------------------- evaluate
@dataclasses.dataclass
class _Evaluation:
    """What ``evaluate`` measured: ``(key, label, value)`` rows (keys for JSON, labels for the
    table and the report), and what the report draws, in the target's units."""

    results: list[tuple[str, str, float]]
    prediction: ClassificationPrediction | RegressionPrediction
    y: Tensor
    intervals: tuple[Tensor, Tensor] | None = None
    level: float = 0.9
    details: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # A perfect fit gives NLL -0.0 (the negated mean of log 1); show it as 0.
        self.results = [(key, label, value + 0.0) for key, label, value in self.results]


def _evaluate(args: argparse.Namespace) -> int:
    report = None if args.report is None else _check_output(args.report, "the report")
    posterior, info, pipeline = _load(args.model)
    _check_samples(posterior, args.samples)
    _check_target(pipeline, args.target)
    table = read_table(args.data)
    if table.n_rows == 0:
        raise DataError(f"{table.source} has no data rows to evaluate on.")
    x, y = pipeline.transform(table), pipeline.transform_target(table)
    pred = posterior.predict(x, args.samples, generator=_generator(args.seed))
    if pipeline.task == "classification":
        found = _classification_metrics(pred, y, posterior, args.seed)
    else:
        found = _regression_metrics(pred, table, pipeline, posterior, args.level)
    found.results += _rule_metrics(posterior, pred, y)
    ood_results: list[tuple[str, str, float]] = []
    pred_ood = None
    if args.ood is not None:
        other = read_table(args.ood)
        if other.n_rows == 0:
            raise DataError(f"{other.source} has no data rows.")
        x_ood = pipeline.transform(other)
        pred_ood = posterior.predict(x_ood, args.samples, generator=_generator(args.seed))
        ood_results = _ood_metrics(posterior, pred, pred_ood)
        if pipeline.task == "regression":
            pred_ood = _in_units(pred_ood, pipeline)

    if report is not None:
        from bayesdl.report.html import evaluation_report

        model_info = {
            "method": info.method,
            "task": pipeline.task,
            "target": pipeline.target,
            "features": f"{len(pipeline.input_columns)} columns -> {pipeline.n_features} inputs",
            "wrappers": ", ".join(name for name, _ in info.wrappers) or "none",
            "model file": args.model,
            "data": f"{args.data} ({table.n_rows} rows)",
            "written by": f"bayesdl {info.library_version}",
        }
        page = evaluation_report(
            found.prediction,
            found.y,
            title=f"{Path(args.model).name} on {Path(args.data).name}",
            metrics={label: value for _, label, value in found.results},
            info=model_info,
            level=found.level,
            intervals=found.intervals,
            class_names=list(pipeline.classes) if pipeline.classes is not None else None,
            ood_prediction=pred_ood,
            ood_metrics={label: value for _, label, value in ood_results} or None,
        )
        write_atomic(report, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))

    if args.json:
        doc = {
            "model": args.model,
            "data": args.data,
            "rows": table.n_rows,
            "task": pipeline.task,
            "method": info.method,
            **found.details,
            "metrics": {key: value for key, _, value in found.results},
        }
        if args.ood is not None:
            doc["ood"] = {key: value for key, _, value in ood_results}
        if report is not None:
            doc["report"] = args.report
        print(json.dumps(doc, indent=2))
        return 0
    rows = [(label, value) for _, label, value in found.results + ood_results]
    width = max(len(label) for label, _ in rows)
    print(f"{args.model} ({info.method}, {pipeline.task}) on {args.data}, {table.n_rows} rows")
    print("\n".join(f"  {label:<{width}}  {value:.4f}" for label, value in rows))
    if report is not None:
        print(f"report written to {args.report}")
    return 0


def _classification_metrics(pred, y: Tensor, posterior, seed: int) -> _Evaluation:
    """Accuracy, NLL, Brier, ECE; the conformal sets' coverage and size if calibrated."""
    probs = pred.probs.double()
    results = [
        ("accuracy", "accuracy", float(metrics.accuracy(probs, y))),
        ("nll", "NLL", float(metrics.nll(probs, y))),
        ("brier", "Brier score", float(metrics.brier(probs, y))),
        ("ece", "ECE (15 bins)", float(metrics.ece(probs, y))),
    ]
    conformal = _wrapper(posterior, ConformalPredictor)
    if conformal is not None:
        sets = _sets(pred, conformal, _generator(seed))
        inside = sets.gather(-1, y[:, None]).squeeze(-1).double().mean()
        label = f"conformal set coverage ({1 - conformal.alpha:g})"
        results.append(("set_coverage", label, float(inside)))
        results.append(("mean_set_size", "mean set size", float(sets.sum(-1).double().mean())))
    return _Evaluation(results, pred, y)


def _regression_metrics(
    pred, table: Table, pipeline: TabularPipeline, posterior, level: float | None
) -> _Evaluation:
    """RMSE, NLL, CRPS and the intervals' coverage and mean width, in the target's units."""
    conformal = _wrapper(posterior, ConformalPredictor)
    _interval_note(conformal, level)
    units = _in_units(pred, pipeline)
    y = torch.from_numpy(pipeline.target_values(table))
    lower, upper, level, kind = _intervals(units, conformal, level)
    means, variances = units.means, units.variances
    results = [
        ("rmse", "RMSE", float(metrics.rmse(units.mean, y))),
        ("nll", "NLL", float(metrics.gaussian_mixture_nll(means, variances, y))),
        ("crps", "CRPS", float(metrics.crps_gaussian_mixture(means, variances, y))),
        ("coverage", f"coverage ({level:g}, {kind})", float(metrics.picp(lower, upper, y))),
        ("mean_width", "mean interval width", float(metrics.mpiw(lower, upper))),
    ]
    details = {"interval_level": level, "intervals": kind}
    return _Evaluation(results, units, y, (lower, upper), level, details)


def _rule_metrics(posterior, pred, y: Tensor) -> list[tuple[str, str, float]]:
    """What a referral rule decides (and its error rate there) and an OOD gate hands over."""
    results = []
    referral, gate = _wrapper(posterior, Referral), _wrapper(posterior, OODGate)
    if referral is not None:
        accept = referral.decide(pred).accept
        share = float(accept.double().mean())
        results.append(("referral_coverage", "referral: share decided", share))
        classification = isinstance(pred, ClassificationPrediction)
        # A regression rule built by hand may have no tolerance, hence no notion of an error.
        if bool(accept.any()) and (classification or referral.tolerance is not None):
            if classification:
                wrong = pred.label != y
            else:
                wrong = (pred.mean - y).abs() > referral.tolerance  # standardised units
            risk = float(wrong[accept].double().mean())
            results.append(("referral_risk", "referral: error rate among decided", risk))
    if gate is not None:
        share = float(gate.decide(pred).refer.double().mean())
        results.append(("hand_over_rate", "OOD gate: share handed over", share))
    return results


def _ood_metrics(posterior, pred, pred_ood) -> list[tuple[str, str, float]]:
    """AUROC of the epistemic score, and of the softmax confidence or the total std, for
    telling the OTHER rows (positive) from the evaluation rows."""
    classification = isinstance(pred, ClassificationPrediction)
    second = ("confidence", "confidence") if classification else ("total", "total std")
    results = []
    for name, label in (("epistemic", "epistemic"), second):
        auroc = metrics.ood_auroc(uncertainty_score(pred, name), uncertainty_score(pred_ood, name))
        results.append(
            (f"ood_auroc_{label.replace(' ', '_')}", f"OOD AUROC ({label})", float(auroc))
        )
    gate = _wrapper(posterior, OODGate)
    if gate is not None:
        share = float(gate.decide(pred_ood).refer.double().mean())
        results.append(("ood_hand_over_rate", "OOD gate: share of OTHER handed over", share))
    return results


# ---------------------------------------------------------------------------- calibrate
def _calibrate(args: argparse.Namespace) -> int:
    out = _check_output(args.out, "the model")
    posterior, info, pipeline = _load(args.model)
    _check_samples(posterior, args.samples)
    _check_target(pipeline, args.target)
    classification = pipeline.task == "classification"
    if args.tolerance is not None and (classification or args.target_risk is None):
        raise CommandError(
            "--tolerance is the error margin of a regression referral; it needs --target-risk "
            "and a regression model."
        )
    if args.target_risk is not None and not classification and args.tolerance is None:
        raise CommandError(
            "--target-risk for regression needs --tolerance T: a case counts as an error when "
            "|y - mean| > T, in the target's units."
        )
    table = read_table(args.data)
    x, y = pipeline.transform(table), pipeline.transform_target(table)
    n = table.n_rows
    if n < 4:
        raise DataError(f"{table.source}: {n} data rows; calibrating needs far more (hundreds).")
    order = torch.randperm(n, generator=_generator(args.seed))
    first, second = order[: n // 2], order[n // 2 :]
    x2, y2 = x[second], y[second]
    generator = _generator(args.seed)
    base = _base(posterior)
    lines = [f"calibration rows: {n} ({len(first)} for the scale, {len(second)} for the rest)"]
    if base is not posterior:
        lines.append(
            f"replacing the wrappers of {args.model}: " + ", ".join(n for n, _ in info.wrappers)
        )
    model = calibrate(base, x[first], y[first], n_samples=args.samples, generator=generator)
    kind = "temperature" if classification else "variance scale"
    lines.append(f"{kind}: {model.scale:.4g}")
    model = conformalize(
        model, x2, y2, args.alpha, randomized=False, n_samples=args.samples, generator=generator
    )
    if classification:
        lines.append(
            f"conformal sets: alpha {args.alpha:g}, threshold {model.threshold:.4g} (mass of the "
            "classes ranked above)"
        )
    else:
        lines.append(
            f"conformal intervals: alpha {args.alpha:g}, mean +- {model.threshold:.4g} std"
        )
    if args.target_risk is not None:
        tolerance = None if classification else args.tolerance / pipeline.y_std
        model = Referral.fit(
            model,
            x2,
            y2,
            target_risk=args.target_risk,
            delta=args.delta,
            tolerance=tolerance,
            n_samples=args.samples,
            generator=generator,
        )
        lines.append(_referral_line(model, len(second)))
    if args.ood_false_alarm is not None:
        model = OODGate.fit(
            model, x2, false_alarm=args.ood_false_alarm, n_samples=args.samples, generator=generator
        )
        lines.append(
            f"OOD gate: hands over when the epistemic uncertainty exceeds {model.threshold:.4g} "
            f"(false alarms on in-distribution inputs: {args.ood_false_alarm:g})"
        )
    save(model, out, pipeline=pipeline)
    lines.append(f"model written to {args.out}")
    print("\n".join(lines))
    return 0


def _referral_line(referral: Referral, n: int) -> str:
    goal = f"error rate <= {referral.target_risk:g} with probability >= {1 - referral.delta:g}"
    if not referral.certified:
        need = min_cases_to_certify(referral.target_risk, referral.delta)
        if n < need:
            why = f"{need} cases needed, the calibration half has {n}"
        else:
            why = (
                "no threshold passed the test (it stops at the first coverage it cannot "
                "certify); more calibration rows or a larger --target-risk may help"
            )
        return f"referral: nothing certified for {goal}: {why}; every case will be referred"
    risk = referral.calibration_risk or 0.0
    return (
        f"referral: decides {referral.calibration_coverage:.1%} of the calibration cases "
        f"(refers when the {referral.score} score exceeds {referral.threshold:.4g}), error rate "
        f"{risk:.1%} among them; certified {goal}"
    )


# ---------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    from bayesdl.serve import serve_command

    return serve_command(args)


# ---------------------------------------------------------------------------- info
def _info(args: argparse.Namespace) -> int:
    info = inspect(args.model)
    pipeline = info.pipeline
    wrappers = [_wrapper_summary(name, options) for name, options in info.wrappers]
    doc: dict = {
        "model": args.model,
        "method": info.method,
        "method_options": info.method_options,
        "task": info.task,
        "likelihood": info.likelihood,
        "network": info.network,
        "inputs": None if info.input_shape is None else list(info.input_shape),
        "wrappers": wrappers,
        "library_version": info.library_version,
        "format_version": info.format_version,
        "pipeline": None,
    }
    if pipeline is not None:
        encoding = pipeline.to_json()  # the file's own encoding; the task is listed above
        doc["pipeline"] = {
            "target": encoding["target"],
            "columns": encoding["columns"],
            "encoded_features": pipeline.n_features,
            "classes": encoding["classes"],
            "y_mean": encoding["y_mean"],
            "y_std": encoding["y_std"],
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    options = ", ".join(f"{k}={_short(v)}" for k, v in info.method_options.items())
    lines = [
        f"model: {args.model}",
        f"method: {info.method}" + (f" ({options})" if options else ""),
        f"task: {info.task} (likelihood {info.likelihood})",
    ]
    if info.network is not None and info.network.get("name") == "mlp":
        net = info.network
        widths = [net["in_features"], *net["hidden"], net["out_features"]]
        lines.append(
            f"network: mlp {' -> '.join(map(str, widths))}, {net['activation']}"
            + (f", dropout {net['dropout']:g}" if net.get("dropout") else "")
        )
    else:
        lines.append(f"network: {info.network_class}")
    if pipeline is None:
        lines.append(
            "columns: none recorded (saved without a pipeline; not usable by the commands)"
        )
    else:
        lines.append(f"columns: {len(pipeline.columns)} -> {pipeline.n_features} encoded features")
        width = max(len(c.name) for c in pipeline.columns)
        for c in pipeline.columns:
            if c.kind == "numeric":
                what = f"numeric (mean {c.mean:.6g}, std {c.std:.6g})"
            else:
                cats = ", ".join(c.categories[:10]) + (", ..." if len(c.categories) > 10 else "")
                n_cats = len(c.categories)
                what = f"categorical, {n_cats} categor{'y' if n_cats == 1 else 'ies'} ({cats})"
            lines.append(f"  {c.name:<{width}}  {what}")
        if pipeline.task == "classification":
            lines.append(f"target: {pipeline.target}, classes {', '.join(pipeline.classes)}")
        else:
            lines.append(
                f"target: {pipeline.target}, mean {pipeline.y_mean:.6g}, std {pipeline.y_std:.6g}"
            )
    if wrappers:
        lines.append("wrappers (outside in):")
        lines += [f"  {_wrapper_text(w, pipeline)}" for w in wrappers]
    else:
        lines.append("wrappers: none (not calibrated)")
    lines.append(
        f"written by bayesdl {info.library_version} (file format {info.format_version}); "
        f"this is bayesdl {__version__}"
    )
    print("\n".join(lines))
    return 0


def _short(value) -> str:
    """An option's value for a line of text: numbers to 6 digits, long lists by their size."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]"
    return str(value)


def _wrapper_summary(name: str, options: dict) -> dict:
    """A wrapper's options as plain values, without bulky arrays."""
    summary = {"name": name, **options}
    if name == "ood_gate":
        scores = summary.pop("calibration_scores", [])
        summary["n_calibration"] = len(scores)
    return summary


def _wrapper_text(w: dict, pipeline: TabularPipeline | None) -> str:
    name = w["name"]
    if name == "calibration":
        return f"calibration: scale {w['scale']:.4g}"
    if name == "conformal":
        return (
            f"conformal: alpha {w['alpha']:g}, threshold {w['threshold']:.4g}, "
            f"{w['n_calibration']} calibration rows"
        )
    if name == "referral":
        threshold = (
            "none certified (refers every case)"
            if w.get("threshold") is None
            else f"{w['threshold']:.4g}"
        )
        text = f"referral: score {w['score']}, threshold {threshold}"
        if w.get("target_risk") is not None:
            text += f", target risk {w['target_risk']:g} at delta {w['delta']:g}"
        if w.get("calibration_coverage") is not None:
            text += f", decided {w['calibration_coverage']:.1%} of calibration cases"
        if w.get("tolerance") is not None and pipeline is not None and pipeline.y_std:
            text += f", tolerance {w['tolerance'] * pipeline.y_std:.4g} (target units)"
        return text
    if name == "ood_gate":
        return (
            f"ood_gate: score {w['score']}, false alarm {w['false_alarm']:g}, "
            f"{w['n_calibration']} calibration inputs"
        )
    return f"{name}: {w}"
