"""Hand-over under distribution shift on MNIST: does a gate fitted on clean data hand over the
shifted inputs, keep the clean false-alarm rate it promises, and keep its decisions accurate?

Run from the repository root::

    python -m benchmarks.handover [--quick] [--data DIR] [--out DIR] [--threads N]

The protocol (:class:`Config` holds every number):

* data: the MNIST IDX files in ``--data`` (by default the shared copy of the 10,000 test
  images); the images of digits 0-7 are shuffled with a fixed seed and split into training
  (6,000), calibration (1,000) and test (the rest, 1,017); every image of digits 8 and 9 is an
  unseen class (1,983 images). Nothing of 8 and 9 is used for training or calibration;
* one small CNN (:func:`cnn`: conv 1->16 3x3, ReLU, max-pool 2, conv 16->32 3x3, ReLU, max-pool
  2, dropout 0.5, linear to the 8 classes), the same architecture and training for every method:
  the point estimate (``Deterministic``, dropout only in training), MC dropout (100 draws of the
  dropout masks at prediction) and a deep ensemble of 5 networks (stacked, each its own
  initialisation and data order), Adam, cross-entropy, no validation split or early stopping.
  The point estimate and MC dropout start from the same weights with the same data order and
  training seed, so they train the same network: the two rows differ in the predictive only;
* for each method an :class:`bayesdl.decisions.OODGate` fitted on the clean calibration images at
  ``false_alarm = 0.05``: on the mutual information (``"epistemic"``) for the Bayesian methods
  and on ``1 - max probability`` (``"confidence"``) for all three (the point estimate has no
  epistemic score). The gate hands an input over when its conformal p-value among the
  calibration scores is at most 0.05;
* test sets: the clean test images, the same images rotated by 30 and 60 degrees, with Gaussian
  pixel noise of std 0.3 and 0.6 (clamped to [0, 1]), blurred with a Gaussian of sigma 1.5
  pixels, with contrast lowered to 0.3 (toward each image's mean grey), and the unseen digits
  8-9 (see :mod:`bayesdl.data.mnist` for the shifts);
* per method, gate and test set: accuracy on the known classes (none for 8-9), the share handed
  over, the error among the kept (proceeding) cases and among the handed-over ones (for 8-9
  every kept case is an error), and the OOD AUROC of the epistemic and the confidence score
  against the clean test images (:func:`bayesdl.metrics.ood_auroc`, higher score = more OOD);
* the false-alarm rate is the share of clean test images handed over. If the test images are
  exchangeable with the calibration images, it is at most 0.05 in expectation; the report gives
  the central 95% band of ``Binomial(n_test, 0.05) / n_test`` (test draw only) and the wider band
  that also counts the calibration draw: with ``n`` calibration scores the gate's threshold is
  the ``m``-th largest, ``m = floor(0.05 (n + 1))``, so the count handed over is
  ``BetaBinomial(n_test, m, n + 1 - m)`` (no ties).

``--quick`` shrinks the data (300 / 200 / 200 images, 2 epochs, 2 members, 20 draws) so the test
suite runs it in seconds on any IDX files; its numbers say nothing about the method. It writes
``handover_mnist.json`` and ``handover_mnist.md`` (``handover_mnist_quick.*`` with ``--quick``)
into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import bayesdl as bdl
from bayesdl.data.mnist import blur, contrast, gaussian_noise, load_mnist, rotate
from bayesdl.decisions import OODGate, binomial_cdf, uncertainty_score
from bayesdl.metrics import ood_auroc
from benchmarks._results import environment, write_results

__all__ = [
    "QUICK",
    "SHIFTS",
    "Config",
    "beta_binomial_band",
    "binomial_band",
    "cnn",
    "gate_row",
    "main",
    "run",
    "split",
    "write_markdown",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
UNSEEN = "unseen_8_9"
METHODS = ("deterministic", "mc_dropout", "deep_ensemble")
#: Gate scores per method: the point estimate has no epistemic uncertainty.
GATE_SCORES = {
    "deterministic": ("confidence",),
    "mc_dropout": ("epistemic", "confidence"),
    "deep_ensemble": ("epistemic", "confidence"),
}


@dataclass(frozen=True)
class Config:
    """Every setting of one run (written into the JSON)."""

    n_train: int = 6000
    n_cal: int = 1000
    #: Known-class test images; ``None``: every known-class image not in training or calibration.
    n_test: int | None = None
    #: At most this many unseen-class images (``None``: all of them).
    n_unseen: int | None = None
    n_known: int = 8  # digits 0 .. n_known - 1 are learned, the rest are unseen
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    dropout: float = 0.5
    n_members: int = 5
    mc_samples: int = 100
    false_alarm: float = 0.05
    band_level: float = 0.95
    seed: int = 0


QUICK = Config(
    n_train=300, n_cal=200, n_test=200, n_unseen=200, epochs=2, n_members=2, mc_samples=20
)

Shift = Callable[[Tensor, torch.Generator], Tensor]
#: The known-class test sets: name -> (description, function of (images, generator)).
SHIFTS: dict[str, tuple[str, Shift]] = {
    "clean": ("no shift", lambda x, g: x.clone()),
    "rotate_30": ("rotated 30 degrees", lambda x, g: rotate(x, 30.0)),
    "rotate_60": ("rotated 60 degrees", lambda x, g: rotate(x, 60.0)),
    "noise_0.3": ("Gaussian pixel noise, std 0.3", lambda x, g: gaussian_noise(x, 0.3, g)),
    "noise_0.6": ("Gaussian pixel noise, std 0.6", lambda x, g: gaussian_noise(x, 0.6, g)),
    "blur_1.5": ("Gaussian blur, sigma 1.5 px", lambda x, g: blur(x, 1.5)),
    "contrast_0.3": ("contrast x0.3 toward the mean grey", lambda x, g: contrast(x, 0.3)),
}


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    """Known-class training, calibration and test images ``(N, 1, H, W)`` with labels ``(N,)``,
    and the unseen-class images with their true digits."""

    x_train: Tensor
    y_train: Tensor
    x_cal: Tensor
    y_cal: Tensor
    x_test: Tensor
    y_test: Tensor
    x_unseen: Tensor
    y_unseen: Tensor


def split(x: Tensor, y: Tensor, config: Config) -> Split:
    """The fixed seeded split of :class:`Config` (see the module docstring)."""
    known = torch.nonzero(y < config.n_known).flatten()
    unseen = torch.nonzero(y >= config.n_known).flatten()
    g = torch.Generator().manual_seed(config.seed)
    known = known[torch.randperm(len(known), generator=g)]
    unseen = unseen[torch.randperm(len(unseen), generator=g)][: config.n_unseen]
    a, b = config.n_train, config.n_train + config.n_cal
    test = known[b:] if config.n_test is None else known[b : b + config.n_test]
    if len(test) == 0 or len(unseen) == 0:
        raise ValueError(
            f"{len(y)} images with {len(known)} of the known classes 0-{config.n_known - 1} "
            f"and {len(unseen)} unseen leave no test images after {config.n_train} training "
            f"and {config.n_cal} calibration images; lower n_train / n_cal."
        )
    parts = (known[:a], known[a:b], test, unseen)
    (x_train, y_train), (x_cal, y_cal), (x_test, y_test), (x_un, y_un) = (
        (x[i], y[i]) for i in parts
    )
    return Split(x_train, y_train, x_cal, y_cal, x_test, y_test, x_un, y_un)


def evaluation_sets(data: Split, config: Config) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Every test set: name -> (images, known-class labels or ``None`` for the unseen classes)."""
    sets: dict[str, tuple[Tensor, Tensor | None]] = {}
    for i, (name, (_, shift)) in enumerate(SHIFTS.items()):
        g = torch.Generator().manual_seed(config.seed + 1000 + i)
        sets[name] = (shift(data.x_test, g), data.y_test)
    sets[UNSEEN] = (data.x_unseen, None)
    return sets


# ----------------------------------------------------------------------------- models
def cnn(n_classes: int, image_shape: Sequence[int], dropout: float) -> nn.Module:
    """``conv(1->16, 3x3) ReLU maxpool(2) conv(16->32, 3x3) ReLU maxpool(2) dropout linear``.

    ``image_shape`` ``(C, H, W)`` sets the input channels and the flattened size.
    """
    c, h, w = image_shape
    features = nn.Sequential(
        nn.Conv2d(c, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    hh, ww = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
    if hh < 1 or ww < 1:
        raise ValueError(f"images of {h}x{w} pixels are too small for the CNN (at least 10x10).")
    return nn.Sequential(
        *features, nn.Dropout(dropout), nn.Flatten(), nn.Linear(32 * hh * ww, n_classes)
    )


def build(method: str, config: Config, image_shape: Sequence[int]):
    """The posterior of ``method`` on a freshly initialised :func:`cnn` (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = cnn(config.n_known, image_shape, config.dropout)
    if method == "deterministic":
        return bdl.Deterministic(net, "categorical")
    if method == "mc_dropout":
        return bdl.MCDropout(net, "categorical")
    if method == "deep_ensemble":
        return bdl.DeepEnsemble(net, "categorical", n_members=config.n_members, seed=config.seed)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def n_samples_for(method: str, config: Config) -> int | None:
    return config.mc_samples if method == "mc_dropout" else None


# ----------------------------------------------------------------------------- statistics
def binomial_band(n: int, rate: float, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` band of ``Binomial(n, rate) / n``: the smallest ``k_lo`` with
    ``P(K <= k_lo) >= (1 - level) / 2`` and ``k_hi`` with ``P(K <= k_hi) >= (1 + level) / 2``,
    divided by ``n``."""
    return _quantile_band(lambda k: binomial_cdf(k, n, rate), n, level)


def beta_binomial_band(
    n: int, n_calibration: int, false_alarm: float, level: float = 0.95
) -> tuple[float, float]:
    """Central ``level`` band of the share of ``n`` exchangeable inputs a conformal gate hands
    over, counting the draw of its ``n_calibration`` scores too: the count is
    ``BetaBinomial(n, m, n_calibration + 1 - m)`` with ``m = floor(false_alarm (n_cal + 1))``
    (the threshold is the ``m``-th largest calibration score; scores without ties)."""
    m = math.floor(false_alarm * (n_calibration + 1) + 1e-9)
    a, b = m, n_calibration + 1 - m
    if a < 1:
        raise ValueError(f"{n_calibration} calibration scores are too few for {false_alarm}.")

    def log_pmf(k: int) -> float:
        return (
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + math.lgamma(k + a)
            + math.lgamma(n - k + b)
            - math.lgamma(n + a + b)
            + math.lgamma(a + b)
            - math.lgamma(a)
            - math.lgamma(b)
        )

    cdf, total = [], 0.0
    for k in range(n + 1):
        total += math.exp(log_pmf(k))
        cdf.append(total)
    return _quantile_band(lambda k: cdf[k], n, level)


def _quantile_band(cdf: Callable[[int], float], n: int, level: float) -> tuple[float, float]:
    lo_p, hi_p = (1 - level) / 2, (1 + level) / 2
    lo = next(k for k in range(n + 1) if cdf(k) >= lo_p)
    hi = next((k for k in range(lo, n + 1) if cdf(k) >= hi_p), n)
    return lo / n, hi / n


def gate_row(refer: Tensor, correct: Tensor | None) -> dict:
    """Hand-over numbers of one gate on one test set.

    ``refer`` ``(B,)`` bool (True = handed over); ``correct`` ``(B,)`` bool, or ``None`` for the
    unseen classes, where every kept case is an error. Errors are ``None`` where no case falls
    in the group.
    """
    n = len(refer)
    wrong = torch.ones(n, dtype=torch.bool) if correct is None else ~correct
    kept = ~refer
    n_kept = int(kept.sum())

    def rate(mask: Tensor) -> float | None:  # exact ratio of the integer counts
        n_mask = int(mask.sum())
        return int(wrong[mask].sum()) / n_mask if n_mask else None

    return {
        "handover_rate": (n - n_kept) / n,
        "n_handed_over": n - n_kept,
        "n_kept": n_kept,
        "kept_error": rate(kept),
        "handed_over_error": rate(refer),
    }


# ----------------------------------------------------------------------------- the run
def run(x: Tensor, y: Tensor, config: Config, log: Callable[[str], None] = lambda m: None):
    """Train, gate and score every method on images ``x`` ``(N, 1, H, W)`` and digits ``y``
    ``(N,)``; returns the results dict that :func:`main` writes."""
    start = time.perf_counter()
    data = split(x, y, config)
    sets = evaluation_sets(data, config)
    image_shape = tuple(x.shape[1:])
    results: dict = {"methods": {}, "false_alarm": {}, "seconds": {}}
    n_test = len(data.y_test)
    for index, method in enumerate(METHODS):
        t0 = time.perf_counter()
        post = build(method, config, image_shape)
        post.fit(
            (data.x_train, data.y_train),
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            progress=False,
        )
        fit_seconds = time.perf_counter() - t0
        n_samples = n_samples_for(method, config)

        def generator(offset: int, index=index) -> torch.Generator:
            return torch.Generator().manual_seed(config.seed + 100 * index + offset)

        gates = {
            score: OODGate.fit(
                post,
                data.x_cal,
                false_alarm=config.false_alarm,
                score=score,
                n_samples=n_samples,
                generator=generator(0),
            )
            for score in GATE_SCORES[method]
        }
        predictions = {
            name: post.predict(images, n_samples, generator=generator(1 + i))
            for i, (name, (images, _)) in enumerate(sets.items())
        }
        clean = {s: uncertainty_score(predictions["clean"], s) for s in ("epistemic", "confidence")}
        rows = {}
        for name, (_, labels) in sets.items():
            pred = predictions[name]
            correct = None if labels is None else pred.probs.argmax(-1) == labels
            row: dict = {
                "n": len(pred.probs),
                "accuracy": None if correct is None else int(correct.sum()) / len(correct),
            }
            for s in ("epistemic", "confidence"):
                usable = name != "clean" and (s == "confidence" or method != "deterministic")
                row[f"auroc_{s}"] = (
                    float(ood_auroc(clean[s], uncertainty_score(pred, s))) if usable else None
                )
            row["gates"] = {s: gate_row(g.decide(pred).refer, correct) for s, g in gates.items()}
            rows[name] = row
        results["methods"][method] = rows
        results["false_alarm"][method] = {
            s: {
                "rate": rows["clean"]["gates"][s]["handover_rate"],
                "threshold": g.threshold,
                "n_calibration": len(g.calibration_scores),
            }
            for s, g in gates.items()
        }
        results["seconds"][method] = {
            "fit": fit_seconds,
            "gate_and_predict": time.perf_counter() - t0 - fit_seconds,
        }
        clean_row = rows["clean"]
        log(
            f"{method}: fit {fit_seconds:.1f} s, clean accuracy {clean_row['accuracy']:.4f}, "
            + ", ".join(
                f"{s} gate hands over {clean_row['gates'][s]['handover_rate']:.3f} clean / "
                f"{rows[UNSEEN]['gates'][s]['handover_rate']:.3f} unseen"
                for s in gates
            )
        )
    band = binomial_band(n_test, config.false_alarm, config.band_level)
    wide = beta_binomial_band(n_test, len(data.y_cal), config.false_alarm, config.band_level)
    for per in results["false_alarm"].values():
        for entry in per.values():
            entry["binomial_band"] = list(band)
            entry["band_with_calibration"] = list(wide)
            entry["inside_binomial_band"] = band[0] <= entry["rate"] <= band[1]
    results["data"] = {
        "n_images": len(y),
        "image_shape": list(image_shape),
        "class_counts": torch.bincount(y).tolist(),
        "known_classes": list(range(config.n_known)),
        "unseen_classes": sorted(set(data.y_unseen.tolist())),
        "n_train": len(data.y_train),
        "n_calibration": len(data.y_cal),
        "n_test": n_test,
        "n_unseen": len(data.y_unseen),
        "test_sets": {name: desc for name, (desc, _) in SHIFTS.items()}
        | {UNSEEN: f"digits {config.n_known}-9, never trained on"},
    }
    results["seconds"]["total"] = time.perf_counter() - start
    return results


# ----------------------------------------------------------------------------- output
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    """The tables of one run: accuracy, hand-over rate, error of the kept decisions and OOD
    AUROC, methods (and gate scores) as rows, test sets as columns; then the false alarms."""
    methods = results["methods"]
    sets = list(next(iter(methods.values())))
    config, data = results["config"], results["data"]
    quick = " (quick: tiny data, numbers say nothing)" if results["quick"] else ""
    lines = [
        f"# Hand-over under shift on MNIST{quick}",
        "",
        f"CNN trained on digits 0-{config['n_known'] - 1} ({data['n_train']} images, "
        f"{config['epochs']} epochs); gates fitted on {data['n_calibration']} clean calibration "
        f"images at false_alarm = {config['false_alarm']}; {data['n_test']} known-class test "
        f"images per shift and {data['n_unseen']} images of the unseen digits. Data: "
        f"`{results['data_source']}`. {results['seconds']['total']:.0f} s in all on "
        f"{results['threads']} CPU thread(s). Protocol: `benchmarks/handover.py`.",
        "",
    ]

    def table(title: str, header: str, rows: list[tuple[str, list[str]]]) -> None:
        nonlocal lines
        lines += [f"## {title}", "", f"| {header} | " + " | ".join(sets) + " |"]
        lines.append("|---" * (len(sets) + 1) + "|")
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
        lines.append("")

    table(
        "Accuracy on the known classes (all cases, no gate)",
        "method",
        [(m, [_f(methods[m][s]["accuracy"]) for s in sets]) for m in methods],
    )
    gated = [(m, g) for m in methods for g in next(iter(methods[m].values()))["gates"]]
    table(
        "Share handed over by the gate",
        "method, gate score",
        [
            (f"{m}, {g}", [_f(methods[m][s]["gates"][g]["handover_rate"]) for s in sets])
            for m, g in gated
        ],
    )
    table(
        "Error of the kept decisions (cases kept); for the unseen digits every kept case is wrong",
        "method, gate score",
        [
            (
                f"{m}, {g}",
                [
                    f"{_f(methods[m][s]['gates'][g]['kept_error'])} "
                    f"({methods[m][s]['gates'][g]['n_kept']})"
                    for s in sets
                ],
            )
            for m, g in gated
        ],
    )
    table(
        "OOD AUROC against the clean test images (higher score = more OOD)",
        "method, score",
        [
            (f"{m}, {score}", [_f(methods[m][s][f"auroc_{score}"]) for s in sets])
            for m in methods
            for score in ("epistemic", "confidence")
            if m != "deterministic" or score == "confidence"
        ],
    )
    shifted = [s for s in sets if s not in ("clean", UNSEEN)]
    lines += [
        "## Summary per gate",
        "",
        "False-alarm rate on clean test images; mean share handed over on the "
        f"{len(shifted)} shifted known-class sets and on the unseen digits; error of the kept "
        "decisions on clean images and the worst over the shifted sets.",
        "",
        "| method, gate score | false alarm | handed over, shifted (mean) | handed over, "
        "unseen | kept error, clean | kept error, worst shift |",
        "|---|---|---|---|---|---|",
    ]
    for m, g in gated:
        gates = {s: methods[m][s]["gates"][g] for s in sets}
        mean_shifted = sum(gates[s]["handover_rate"] for s in shifted) / len(shifted)
        kept = {s: gates[s]["kept_error"] for s in shifted if gates[s]["kept_error"] is not None}
        worst = max(kept, key=kept.__getitem__) if kept else None
        lines.append(
            f"| {m}, {g} | {_f(gates['clean']['handover_rate'])} | {_f(mean_shifted)} | "
            f"{_f(gates[UNSEEN]['handover_rate'])} | {_f(gates['clean']['kept_error'])} | "
            + (f"{_f(kept[worst])} ({worst})" if worst else "-")
            + " |"
        )
    lines.append("")
    level = round(100 * config["band_level"])
    lines += [
        "## False alarms on clean test images",
        "",
        f"Share of the {data['n_test']} clean known-class test images handed over; the "
        f"{level}% band of Binomial(n, {config['false_alarm']}) / n (test draw only) and the "
        f"{level}% band that also counts the draw of the calibration set (beta-binomial).",
        "",
        "| method, gate score | false-alarm rate | binomial band | band with calibration |",
        "|---|---|---|---|",
    ]
    for m, per in results["false_alarm"].items():
        for g, e in per.items():
            b, w = e["binomial_band"], e["band_with_calibration"]
            lines.append(
                f"| {m}, {g} | {_f(e['rate'])} | [{_f(b[0])}, {_f(b[1])}] | "
                f"[{_f(w[0])}, {_f(w[1])}] |"
            )
    lines.append("")
    seconds = results["seconds"]
    lines += [
        "Seconds: "
        + ", ".join(
            f"{m} fit {seconds[m]['fit']:.0f} + predict {seconds[m]['gate_and_predict']:.0f}"
            for m in methods
        )
        + f"; total {seconds['total']:.0f}.",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.handover", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of MNIST IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON and .md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = replace(QUICK if args.quick else Config(), seed=args.seed)
    try:
        x, y = load_mnist(args.data)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    results = {
        "benchmark": "handover_mnist",
        "quick": args.quick,
        "config": asdict(config),
        "data_source": str(args.data),
        **environment(),
        **run(x, y, config, log),
    }
    stem = "handover_mnist_quick" if args.quick else "handover_mnist"
    write_results(results, args.out, stem, write_markdown, log)
    return results


if __name__ == "__main__":
    main()
