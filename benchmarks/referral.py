"""Medical referral on real biopsies: does a referral rule fitted for a target error rate keep
its promise on new cases, and which uncertainty score lets the model decide more of them?

Run from the repository root::

    python -m benchmarks.referral [--quick] [--splits 50] [--out DIR] [--threads 1]

The protocol (:class:`Config` holds every number):

* data: scikit-learn's Wisconsin breast-cancer diagnosis set (``load_breast_cancer``: 569
  biopsies, 30 features of the cell nuclei, 212 malignant and 357 benign), shipped with
  scikit-learn;
* splits: ``n_splits`` random stratified splits with the fixed seeds ``0 .. n_splits - 1``
  (:func:`stratified_split`), a third each for training, calibration and test (190 / 190 / 189
  cases). Why thirds: a small network learns this easy task from 190 cases (a linear model
  already reaches about 97% accuracy); the calibration part decides how low a risk can be
  certified at all (``min_cases_to_certify``: 45 decided cases for 5% at ``delta = 0.1``, 114
  for 2%, 230 for 1%), so it gets as many cases as training; the test part needs enough decided
  cases to measure a 2% error rate (about 2 errors in 100). With 190 calibration cases a 1%
  target cannot be certified, so that rule refers every case in every split: this is what the
  guarantee costs on 569 cases, and it is reported as it is;
* inputs standardised with the mean and standard deviation of the training part only;
* models, one architecture (:func:`bayesdl.models.mlp` ``(30, 2, hidden=(32,))``, ReLU) and one
  training (Adam, ``lr`` 1e-3, batch 32, 100 epochs, cross-entropy, no early stopping) for all:
  a deep ensemble of 5 networks (``deep_ensemble``), MC dropout (dropout 0.2 after the hidden
  layer, 100 masks at prediction, ``mc_dropout``) and the point estimate (``deterministic``),
  each initialised and shuffled with the split's seed (the point estimate and MC dropout start
  from the same weights and data order; the ensemble's members from their own);
* rules: :meth:`bayesdl.decisions.Referral.fit` on the calibration part at target risks 1%, 2%
  and 5% with ``delta = 0.1``. Scores (:data:`SCORES`): the Bayesian models' predictive entropy
  (``total``), mutual information (``epistemic``), their sum (``total+epistemic``) and the
  softmax score ``1 - max probability`` (``confidence``) of their own predictive, which
  separates the effect of the score from that of the model; the point estimate has only
  ``confidence``. With two classes the entropy is a decreasing function of the largest
  probability, so ``total`` and ``confidence`` rank the cases alike and give the same rule (up
  to rounding);
* per model, score and target, over the splits: the error rate among the decided test cases
  (mean and standard deviation over the splits that decide any, and pooled: all errors over all
  decided cases), the share of test cases referred, the violation rate (share of splits whose
  test error among decided cases exceeds the target; a split that refers every case has no
  error and does not violate), the accuracy of the model without referral, and the coverage on
  the calibration part. The guarantee says each split's rule has a population error rate among
  decided cases above the target with probability at most ``delta``; with independent splits
  the violation count would be ``Binomial(n_splits, p)`` with ``p <= delta``, whose one-sided
  95% upper quantile at ``p = delta`` (:func:`violation_tolerance`) is the tolerance reported.
  Two caveats, both stated in the results: the splits share cases, so they are not independent;
  and a test error is a noisy estimate of the population error (a rule whose risk is just
  below the target exceeds it on a finite test set almost half the time);
* comparisons (:func:`comparisons`): per target, paired over splits, the share referred by one
  rule minus that of another (mean, standard deviation, standard error, and how many splits it
  is lower, higher, equal), for Bayesian model with its score against the softmax point
  estimate, the model alone (softmax on both), and the score alone (same predictive).

It runs on one torch thread unless ``--threads`` says otherwise: the networks are tiny, and on
a shared two-core machine more threads mostly wait on each other. ``--quick`` (3 splits, 5
epochs, 2 members, 10 dropout masks) runs in seconds for the test suite; its numbers say nothing
about the method. It writes ``referral_breast_cancer.json`` and ``.md``
(``referral_breast_cancer_quick.*`` with ``--quick``) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import bayesdl as bdl
from bayesdl.data import Standardizer
from bayesdl.decisions import Referral, binomial_cdf, min_cases_to_certify
from benchmarks._results import environment, write_results

__all__ = [
    "METHODS",
    "QUICK",
    "SCORES",
    "Config",
    "Split",
    "comparisons",
    "load_data",
    "main",
    "run",
    "stratified_split",
    "summarize",
    "violation_tolerance",
    "write_markdown",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
METHODS = ("deep_ensemble", "mc_dropout", "deterministic")
BAYESIAN = ("deep_ensemble", "mc_dropout")
#: Scores per method, by label; a label maps to what ``Referral.fit(score=...)`` takes.
SCORE_OPTIONS: dict[str, str | dict[str, float]] = {
    "total": "total",
    "epistemic": "epistemic",
    "total+epistemic": {"total": 1.0, "epistemic": 1.0},
    "confidence": "confidence",
}
SCORES: dict[str, tuple[str, ...]] = {
    "deep_ensemble": ("total", "epistemic", "total+epistemic", "confidence"),
    "mc_dropout": ("total", "epistemic", "total+epistemic", "confidence"),
    "deterministic": ("confidence",),
}


@dataclass(frozen=True)
class Config:
    """Every setting of one run (written into the JSON)."""

    n_splits: int = 50
    train_fraction: float = 1 / 3
    calibration_fraction: float = 1 / 3  # the test part is the rest
    hidden: tuple[int, ...] = (32,)
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    n_members: int = 5
    dropout: float = 0.2
    mc_samples: int = 100
    targets: tuple[float, ...] = (0.01, 0.02, 0.05)
    delta: float = 0.1
    tolerance_level: float = 0.95


QUICK = Config(n_splits=3, epochs=5, n_members=2, mc_samples=10)


# ----------------------------------------------------------------------------- data
def load_data() -> tuple[Tensor, Tensor, dict]:
    """The breast-cancer inputs ``(569, 30)`` float32, labels ``(569,)`` int64 (0 = malignant,
    1 = benign) and a description."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    info = {
        "name": "sklearn.datasets.load_breast_cancer (Wisconsin diagnostic breast cancer)",
        "n_cases": len(y),
        "n_features": x.shape[1],
        "classes": [str(c) for c in bunch.target_names],
        "class_counts": torch.bincount(y).tolist(),
    }
    return x, y, info


@dataclass(frozen=True)
class Split:
    """Row indices of the three parts, each sorted."""

    train: Tensor
    calibration: Tensor
    test: Tensor


def stratified_split(y: Tensor, train: float, calibration: float, seed: int) -> Split:
    """Split the rows of labels ``y`` ``(N,)`` at random, class by class, into training,
    calibration and test parts.

    Each class's rows are shuffled with ``torch.Generator().manual_seed(seed)``; the first
    ``round(n_c * train)`` go to training, the next ``round(n_c * calibration)`` to calibration
    and the rest to test, so every part keeps the class proportions (up to rounding).
    """
    if not (0 < train < 1 and 0 < calibration < 1 and train + calibration < 1):
        raise ValueError(
            f"train and calibration must be fractions in (0, 1) summing to less than 1 (the "
            f"test part is the rest), got {train!r} and {calibration!r}."
        )
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        a = round(len(rows) * train)
        b = a + round(len(rows) * calibration)
        for part, chunk in zip(parts, (rows[:a], rows[a:b], rows[b:]), strict=True):
            part.append(chunk)
    train_rows, cal_rows, test_rows = (torch.sort(torch.cat(p)).values for p in parts)
    if min(len(train_rows), len(cal_rows), len(test_rows)) == 0:
        raise ValueError(
            f"{len(y)} cases leave an empty part with fractions {train} / {calibration}."
        )
    return Split(train_rows, cal_rows, test_rows)


# ----------------------------------------------------------------------------- models
def build(method: str, config: Config, n_features: int, n_classes: int, seed: int):
    """The posterior of ``method`` on a freshly initialised MLP (seeded with ``seed``)."""
    dropout = config.dropout if method == "mc_dropout" else 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = bdl.models.mlp(n_features, n_classes, hidden=config.hidden, dropout=dropout)
    if method == "deterministic":
        return bdl.Deterministic(net, "categorical")
    if method == "mc_dropout":
        return bdl.MCDropout(net, "categorical")
    if method == "deep_ensemble":
        return bdl.DeepEnsemble(net, "categorical", n_members=config.n_members, seed=seed)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def n_samples_for(method: str, config: Config) -> int | None:
    return config.mc_samples if method == "mc_dropout" else None


def target_key(target: float) -> str:
    """The JSON key of a target risk, e.g. ``"0.02"``."""
    return f"{target:g}"


# ----------------------------------------------------------------------------- statistics
def violation_tolerance(n_splits: int, delta: float, level: float = 0.95) -> int:
    """The smallest ``k`` with ``P(Binomial(n_splits, delta) <= k) >= level``: more violations
    than ``k`` in ``n_splits`` independent splits would be unlikely (below ``1 - level``) if each
    split violated with probability ``delta``."""
    return next(k for k in range(n_splits + 1) if binomial_cdf(k, n_splits, delta) >= level)


def _spread(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for one value; ``None`` for none)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(per_split: Mapping[str, list], n_test: int, target: float) -> dict:
    """Aggregate one rule's per-split counts over splits.

    ``per_split`` holds equal-length lists ``n_decided`` and ``n_errors`` (test cases the rule
    decided, and wrong among them) and ``calibration_coverage``. Returns the mean and spread
    of the error among decided cases (over splits deciding any), the pooled error, the share
    referred (over all splits, and over the splits deciding any), the violations (error above
    ``target``) and the splits that refer everything.
    """
    decided, errors = per_split["n_decided"], per_split["n_errors"]
    if len(decided) != len(errors) or not decided:
        raise ValueError("n_decided and n_errors must be non-empty lists of one length.")
    rates = [e / d for e, d in zip(errors, decided, strict=True) if d]
    violations = sum(1 for e, d in zip(errors, decided, strict=True) if d and e / d > target)
    total_decided = sum(decided)
    return {
        "decided_error": _spread(rates),
        "pooled_decided_error": sum(errors) / total_decided if total_decided else None,
        "referred": _spread([1 - d / n_test for d in decided]),
        "referred_when_deciding": _spread([1 - d / n_test for d in decided if d]),
        "n_violations": violations,
        "violation_rate": violations / len(decided),
        "n_all_referred": sum(1 for d in decided if d == 0),
        "calibration_coverage": _spread(per_split["calibration_coverage"]),
    }


def _pairs() -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    """The paired comparisons: (method, score) against (method, score), and what they isolate."""
    out = []
    for m in BAYESIAN:
        out.append(((m, "total"), ("deterministic", "confidence"), "model and score"))
        out.append(((m, "confidence"), ("deterministic", "confidence"), "model (softmax on both)"))
        for s in ("total", "epistemic", "total+epistemic"):
            out.append(((m, s), (m, "confidence"), "score (same predictive)"))
    return out


def comparisons(results: Mapping, n_test: int) -> list[dict]:
    """Per target and pair of rules, the share referred by rule ``a`` minus that of rule ``b``,
    paired over splits: mean, standard deviation, standard error, and in how many splits ``a``
    refers fewer, more or as many cases as ``b``."""
    rows = []
    for target in results["config"]["targets"]:
        key = target_key(target)
        for (ma, sa), (mb, sb), isolates in _pairs():
            a = results["methods"][ma]["scores"][sa][key]["per_split"]["n_decided"]
            b = results["methods"][mb]["scores"][sb][key]["per_split"]["n_decided"]
            diff = [(db - da) / n_test for da, db in zip(a, b, strict=True)]  # referred a - b
            spread = _spread(diff)
            rows.append(
                {
                    "target": target,
                    "a": [ma, sa],
                    "b": [mb, sb],
                    "isolates": isolates,
                    "referred_a": statistics.fmean(1 - d / n_test for d in a),
                    "referred_b": statistics.fmean(1 - d / n_test for d in b),
                    "referred_difference": {
                        "mean": spread["mean"],
                        "std": spread["std"],
                        "se": spread["std"] / math.sqrt(len(diff)),
                    },
                    "n_a_refers_fewer": sum(1 for d in diff if d < 0),
                    "n_a_refers_more": sum(1 for d in diff if d > 0),
                    "n_same": sum(1 for d in diff if d == 0),
                }
            )
    return rows


# ----------------------------------------------------------------------------- the run
def run(x: Tensor, y: Tensor, config: Config, log: Callable[[str], None] = lambda m: None) -> dict:
    """Train, fit the referral rules and score them on every split of inputs ``x`` ``(N, F)``
    and labels ``y`` ``(N,)``; returns the results dict that :func:`main` writes."""
    if config.n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {config.n_splits}.")
    start = time.perf_counter()
    n_classes = int(y.max()) + 1
    record: dict = {
        m: {
            "accuracy": [],
            "scores": {
                s: {
                    target_key(t): {
                        "n_decided": [],
                        "n_errors": [],
                        "calibration_coverage": [],
                        "calibration_risk": [],
                        "threshold": [],
                    }
                    for t in config.targets
                }
                for s in SCORES[m]
            },
        }
        for m in METHODS
    }
    seconds = {m: {"fit": 0.0, "refer": 0.0} for m in METHODS}
    sizes = (0, 0, 0)
    for seed in range(config.n_splits):
        split = stratified_split(y, config.train_fraction, config.calibration_fraction, seed)
        sizes = (len(split.train), len(split.calibration), len(split.test))
        x_train, y_train = x[split.train], y[split.train]
        scaler = Standardizer.fit(x_train, y_train.to(x.dtype))
        x_train = scaler.transform_x(x_train)
        x_cal, y_cal = scaler.transform_x(x[split.calibration]), y[split.calibration]
        x_test, y_test = scaler.transform_x(x[split.test]), y[split.test]
        for index, method in enumerate(METHODS):
            t0 = time.perf_counter()
            post = build(method, config, x.shape[1], n_classes, seed)
            post.fit(
                (x_train, y_train),
                epochs=config.epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=seed,
                progress=False,
            )
            t1 = time.perf_counter()
            n_samples = n_samples_for(method, config)
            base = 1000 * seed + 10 * index
            test_pred = post.predict(
                x_test, n_samples, generator=torch.Generator().manual_seed(base)
            )
            wrong = test_pred.label != y_test
            record[method]["accuracy"].append(1 - int(wrong.sum()) / len(y_test))
            for score in SCORES[method]:
                for target in config.targets:
                    referral = Referral.fit(
                        post,
                        x_cal,
                        y_cal,
                        target_risk=target,
                        delta=config.delta,
                        score=SCORE_OPTIONS[score],
                        n_samples=n_samples,
                        generator=torch.Generator().manual_seed(base + 1),
                    )
                    accept = referral.decide(test_pred).accept
                    entry = record[method]["scores"][score][target_key(target)]
                    entry["n_decided"].append(int(accept.sum()))
                    entry["n_errors"].append(int((wrong & accept).sum()))
                    entry["calibration_coverage"].append(referral.calibration_coverage)
                    entry["calibration_risk"].append(referral.calibration_risk)
                    entry["threshold"].append(referral.threshold if referral.certified else None)
            seconds[method]["fit"] += t1 - t0
            seconds[method]["refer"] += time.perf_counter() - t1
        log(
            f"split {seed}: accuracy "
            + ", ".join(f"{m} {record[m]['accuracy'][-1]:.3f}" for m in METHODS)
            + f" ({time.perf_counter() - start:.0f} s)"
        )
    n_test = sizes[2]
    tolerance = violation_tolerance(config.n_splits, config.delta, config.tolerance_level)
    methods: dict = {}
    for m in METHODS:
        methods[m] = {
            "accuracy": {**_spread(record[m]["accuracy"]), "per_split": record[m]["accuracy"]}
        }
        methods[m]["scores"] = {
            s: {
                key: {
                    **summarize(per, n_test, float(key)),
                    "within_tolerance": None,
                    "per_split": per,
                }
                for key, per in by_target.items()
            }
            for s, by_target in record[m]["scores"].items()
        }
        for by_target in methods[m]["scores"].values():
            for entry in by_target.values():
                entry["within_tolerance"] = entry["n_violations"] <= tolerance
    results: dict = {
        "split_sizes": {"train": sizes[0], "calibration": sizes[1], "test": sizes[2]},
        "min_cases_to_certify": {
            target_key(t): min_cases_to_certify(t, config.delta) for t in config.targets
        },
        "violation_tolerance": {
            "delta": config.delta,
            "n_splits": config.n_splits,
            "level": config.tolerance_level,
            "max_violations": tolerance,
            "max_rate": tolerance / config.n_splits,
        },
        "methods": methods,
    }
    results["comparisons"] = comparisons({"config": asdict(config), **results}, n_test)
    results["seconds"] = {**seconds, "total": time.perf_counter() - start}
    return results


# ----------------------------------------------------------------------------- output
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(spread: Mapping, digits: int = 3) -> str:
    if spread["mean"] is None:
        return "-"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def write_markdown(results: dict, path: Path) -> None:
    """Per target, one table of the rules (method, score as rows); then the paired
    comparisons and what they say."""
    config, sizes, tol = results["config"], results["split_sizes"], results["violation_tolerance"]
    quick = " (quick: tiny training, numbers say nothing)" if results["quick"] else ""
    n = config["n_splits"]
    lines = [
        f"# Medical referral on the breast-cancer biopsies{quick}",
        "",
        f"{results['data']['n_cases']} biopsies ({results['data']['n_features']} features), "
        f"{n} stratified random splits (seeds 0-{n - 1}) into {sizes['train']} training, "
        f"{sizes['calibration']} calibration and {sizes['test']} test cases. MLP "
        f"{results['data']['n_features']}-{'-'.join(map(str, config['hidden']))}-2, "
        f"{config['epochs']} epochs; deep ensemble of {config['n_members']}, MC dropout "
        f"{config['dropout']} with {config['mc_samples']} masks, and the point estimate. "
        f"Referral.fit at delta = {config['delta']}. {results['seconds']['total']:.0f} s in all "
        f"on {results['threads']} CPU thread(s). Protocol: `benchmarks/referral.py`.",
        "",
        "Cells are mean ± standard deviation over splits. *Error* is the test error among the "
        "decided cases (over the splits that decide any; *pooled*: all errors over all decided "
        "cases); *referred* the share of test cases referred (and over the splits that decide "
        "any); *violations* the splits whose "
        f"error among decided cases exceeds the target (tolerance: at most "
        f"{tol['max_violations']} of {n}, the {round(100 * tol['level'])}% upper quantile of "
        f"Binomial({n}, {tol['delta']})); *all referred* the splits where no case is decided.",
        "",
    ]
    for target in config["targets"]:
        key = target_key(target)
        need = results["min_cases_to_certify"][key]
        lines += [
            f"## Target risk {100 * target:g}%",
            "",
            f"Certifying {100 * target:g}% needs at least {need} decided calibration cases "
            f"(there are {sizes['calibration']})"
            + (
                ": nothing can be certified, every case is referred."
                if need > sizes["calibration"]
                else "."
            ),
            "",
            "| method | score | accuracy (no referral) | error | pooled error | referred | "
            "referred, splits deciding | calibration coverage | violations | all referred |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, entry in results["methods"].items():
            for s, by_target in entry["scores"].items():
                e = by_target[key]
                flag = "" if e["within_tolerance"] else " (above tolerance)"
                lines.append(
                    f"| {m} | {s} | {_pm(entry['accuracy'])} | {_pm(e['decided_error'])} | "
                    f"{_f(e['pooled_decided_error'])} | {_pm(e['referred'])} | "
                    f"{_pm(e['referred_when_deciding'])} | {_pm(e['calibration_coverage'])} | "
                    f"{e['n_violations']}/{n} "
                    f"({_f(e['violation_rate'], 2)}){flag} | {e['n_all_referred']} |"
                )
        lines.append("")
    lines += [
        "## Paired comparisons of the share referred",
        "",
        "Share referred by rule a minus that of rule b, paired over splits (mean ± standard "
        "deviation, standard error); negative: a refers fewer cases. Targets where both rules "
        "refer every case in every split are left out.",
        "",
        "| target | a | b | isolates | referred a | referred b | a - b | se | "
        "a fewer / more / same |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["comparisons"]:
        if c["referred_a"] == 1.0 and c["referred_b"] == 1.0:
            continue
        d = c["referred_difference"]
        lines.append(
            f"| {100 * c['target']:g}% | {', '.join(c['a'])} | {', '.join(c['b'])} | "
            f"{c['isolates']} | {_f(c['referred_a'])} | {_f(c['referred_b'])} | "
            f"{d['mean']:+.3f} ± {d['std']:.3f} | {d['se']:.3f} | "
            f"{c['n_a_refers_fewer']} / {c['n_a_refers_more']} / {c['n_same']} |"
        )
    lines += ["", "## Reading the numbers", ""]
    lines += _findings(results)
    seconds = results["seconds"]
    lines += [
        "",
        "Seconds: "
        + ", ".join(
            f"{m} fit {seconds[m]['fit']:.0f} + referral {seconds[m]['refer']:.0f}" for m in METHODS
        )
        + f"; total {seconds['total']:.0f}.",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")


def _findings(results: dict) -> list[str]:
    """Plain statements read off the numbers (no judgement beyond the comparisons)."""
    config, tol = results["config"], results["violation_tolerance"]
    n, n_cal = config["n_splits"], results["split_sizes"]["calibration"]
    out = []
    entries = [
        (m, s, float(k), e)
        for m, entry in results["methods"].items()
        for s, by_target in entry["scores"].items()
        for k, e in by_target.items()
    ]
    above = [
        f"{m}, {s} at {100 * t:g}% ({e['n_violations']}/{n})"
        for m, s, t, e in entries
        if not e["within_tolerance"]
    ]
    worst = max(e["violation_rate"] for *_, e in entries)
    out.append(
        f"- Guarantee: the largest violation rate of any rule is {worst:.2f} against delta = "
        f"{config['delta']} (tolerance {tol['max_violations']}/{n} = {tol['max_rate']:.2f} "
        "for independent splits). "
        + (
            "Every rule is within the tolerance."
            if not above
            else "Above the tolerance: " + "; ".join(above) + "."
        )
        + " The splits share cases and a test error is a noisy estimate of the population "
        "error, so the count is indicative, not an exact binomial test."
    )
    for target in config["targets"]:
        key = target_key(target)
        need = results["min_cases_to_certify"][key]
        if need > n_cal:
            out.append(
                f"- At {100 * target:g}% nothing is decided in any split: certifying it needs "
                f"{need} decided calibration cases even without a single error, and there are "
                f"{n_cal}. A {100 * target:g}% target needs a larger calibration set, not "
                "another model."
            )
            continue
        all_referred = [e["n_all_referred"] for m, s, t, e in entries if t == target]
        if max(all_referred) == 0:
            continue
        out.append(
            f"- At {100 * target:g}% a rule decides either most cases or none: between "
            f"{min(all_referred)} and {max(all_referred)} of {n} splits refer everything. The "
            f"first threshold that can be tested keeps at least {need} calibration cases, and "
            f"one error among them already gives a p-value of "
            f"{binomial_cdf(1, need, target):.2f} > {config['delta']}, which ends the "
            "fixed-sequence test: one confident mistake in the calibration part refers every "
            "case."
        )
    for c in results["comparisons"]:
        if c["isolates"] != "model and score" or c["referred_a"] == c["referred_b"] == 1.0:
            continue
        d = c["referred_difference"]
        way = "fewer" if d["mean"] < 0 else "more" if d["mean"] > 0 else "as many"
        clear = (
            "a clear difference"
            if abs(d["mean"]) > 2 * d["se"]
            else "within two standard errors of no difference"
        )
        out.append(
            f"- At {100 * c['target']:g}%, {c['a'][0]} with its {c['a'][1]} score refers "
            f"{way} cases than the point estimate's softmax score: {c['referred_a']:.3f} against "
            f"{c['referred_b']:.3f} (difference {d['mean']:+.3f}, se {d['se']:.3f}, {clear}; "
            f"fewer in {c['n_a_refers_fewer']}, more in {c['n_a_refers_more']} of {n} splits)."
        )
    out.append(
        "- With two classes the predictive entropy (`total`) is a decreasing function of the "
        "largest probability, so `total` and `confidence` on one predictive give the same rule "
        "(up to rounding); any difference between a Bayesian model's `total` row and the point "
        "estimate's row comes from the model's predictive, not from the score. Only "
        "`epistemic` (and the sum) ranks the cases differently."
    )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.referral", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for JSON and .md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--splits", type=int, default=None, help="number of splits (seeds 0..)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: the networks are tiny, more threads only wait)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    if args.splits is not None and args.splits < 1:
        parser.error(f"--splits must be at least 1, got {args.splits}.")
    config = QUICK if args.quick else Config()
    if args.splits is not None:
        config = replace(config, n_splits=args.splits)
    torch.set_num_threads(args.threads)
    x, y, data = load_data()
    results = {
        "benchmark": "referral_breast_cancer",
        "quick": args.quick,
        "config": asdict(config),
        "data": data,
        **environment(),
        **run(x, y, config, log),
    }
    stem = "referral_breast_cancer_quick" if args.quick else "referral_breast_cancer"
    write_results(results, args.out, stem, write_markdown, log)
    return results


if __name__ == "__main__":
    main()
