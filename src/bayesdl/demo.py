"""The main job: can a network say "I don't know", and does Bayesian uncertainty help it?

Train a deterministic network, MC dropout and a deep ensemble on the handwritten digits 0-4
(scikit-learn's embedded 8x8 digits, no download). For each method: accuracy, NLL and ECE on the
held-out 0-4 images; the accuracy when the 20% most uncertain cases (highest predictive entropy)
are referred to a human; how well the max-softmax confidence and the epistemic score (mutual
information between the label and the weights) flag inputs unlike the training data (OOD
AUROC); and a referral rule with a guarantee (:class:`bayesdl.decisions.Referral`).

Why several out-of-distribution sets, not only the unseen digits 5-9: digits 5-9 are *near*
OOD, new classes drawn like the old ones, and on them each method's softmax confidence flags
them slightly better than its mutual information, for every seed tried (0-4). An unseen digit
that looks partly like known ones makes every draw spread its probability over those classes,
and the softmax shows that. Mutual information measures something else: how much the posterior
draws (dropout masks, ensemble members) disagree. They tend to agree near the training data and
can part ways away from it, where a ReLU net's softmax stays confident (Hein, Andriushchenko and
Bitterwolf 2019, "Why ReLU networks yield high-confidence predictions far away from the training
data and how to mitigate the problem"). So the demo also shows the nets inputs moved away from
the training data, built from the held-out 0-4 images or from random numbers with a fixed seed:

* ``noisy``: the held-out 0-4 images plus Gaussian pixel noise (sd 0.5, not clipped, so pixels
  leave the [0, 1] range of the training images);
* ``inverted``: the held-out 0-4 images with intensities inverted, ``1 - x``;
* ``uniform_noise``: random images, each pixel uniform in [0, 1];
* ``scaled_x3``: the held-out 0-4 images with intensities times 3. Far out along a ray every
  ReLU net becomes *more* confident, each ensemble member and dropout mask alike, so neither
  score flags these images (AUROC far below 0.5: they look more familiar than real digits);
  that is Hein et al.'s result, shown as it is, and a reason to put a range check on the inputs
  in front of any model.

The output reports every set for every method and says, from the numbers, where mutual
information beats confidence and where it does not. The in-distribution metrics and AUROCs use
all held-out 0-4 images (nothing is fitted to them). The referral rule is fitted per method on
a calibration half of them (a fixed random split) at ``target_risk`` and ``delta``: the error
rate among accepted cases is at most ``target_risk`` with probability at least ``1 - delta``
over the calibration draw; the other half measures the share accepted (coverage) and the error
among them. At the defaults (2% at ``delta = 0.1``) at least 114 accepted calibration cases are
needed to certify anything, so with 135 of them the rule tends to accept nearly all or nothing;
and on about 135 test cases one error moves the error rate by about 0.0075, so a rule that keeps
its promise can miss the target on one test half now and then.

With ``plots_dir`` the demo also writes its figures there (reliability diagrams, risk-coverage
curves, histograms of the epistemic score on held-out 0-4 and on digits 5-9) and, to show the
regression side, fits a small deep ensemble to a 1-D heteroscedastic problem and draws its
intervals (mixture and split-conformal) and its calibration curve before and after variance
scaling.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bayesdl import metrics
from bayesdl.data import DigitsOOD, load_digits_ood
from bayesdl.decisions import Referral, min_cases_to_certify
from bayesdl.posteriors import DeepEnsemble, Deterministic, MCDropout, Posterior
from bayesdl.predictions import ClassificationPrediction

__all__ = ["OOD_SETS", "DemoConfig", "format_table", "ood_inputs", "run_demo"]

METRIC_KEYS = (
    "accuracy",
    "nll",
    "ece",
    "ood_auroc_confidence",
    "ood_auroc_epistemic",
    "accuracy_at_80_coverage",
)

#: The out-of-distribution sets, ``key: (short name, description)``, near OOD first.
OOD_SETS: dict[str, tuple[str, str]] = {
    "digits_5_9": ("digits 5-9", "unseen classes, drawn like the training digits (near OOD)"),
    "noisy": ("noisy 0-4", "held-out 0-4 + Gaussian pixel noise, sd 0.5, not clipped"),
    "inverted": ("inverted 0-4", "held-out 0-4 with intensities inverted, 1 - x"),
    "uniform_noise": ("uniform noise", "random images, pixels uniform in [0, 1]"),
    "scaled_x3": ("scaled 0-4 x3", "held-out 0-4 with intensities times 3 (far along a ray)"),
}

#: The deterministic net has no posterior draws: it refers by softmax confidence.
_REFERRAL_SCORE = {"deterministic": "confidence", "mc_dropout": "total", "deep_ensemble": "total"}


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in well under a minute on 2 cores.

    ``target_risk`` and ``delta`` set the referral rule's guarantee: error rate among accepted
    cases at most ``target_risk`` with probability at least ``1 - delta``.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    hidden: int = 128
    dropout: float = 0.2
    n_members: int = 5
    n_samples: int = 100
    seed: int = 0
    target_risk: float = 0.02
    delta: float = 0.1


def _network(n_features: int, n_classes: int, config: DemoConfig) -> nn.Module:
    h = config.hidden
    return nn.Sequential(
        nn.Linear(n_features, h),
        nn.ReLU(),
        nn.Dropout(config.dropout),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Dropout(config.dropout),
        nn.Linear(h, n_classes),
    )


def ood_inputs(data: DigitsOOD, seed: int = 0) -> dict[str, Tensor]:
    """The inputs of every set in :data:`OOD_SETS`, each ``(N, 64)`` float32.

    ``digits_5_9`` is ``data.x_ood``; the shifted sets transform ``data.x_test`` (the same
    held-out 0-4 images the in-distribution scores come from, so only the shift differs);
    ``uniform_noise`` has as many images as ``data.x_test``. Noise comes from a generator seeded
    with ``seed``: the same seed gives the same sets.
    """
    g = torch.Generator().manual_seed(seed)
    x = data.x_test
    return {
        "digits_5_9": data.x_ood,
        "noisy": x + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype),
        "inverted": 1.0 - x,
        "uniform_noise": torch.rand(x.shape, generator=g, dtype=x.dtype),
        "scaled_x3": 3.0 * x,
    }


def _evaluate(
    pred_in: ClassificationPrediction,
    preds_out: dict[str, ClassificationPrediction],
    y: torch.Tensor,
    bayesian: bool,
) -> dict:
    """In-distribution metrics and, per OOD set, the AUROC of both scores and the mean
    confidence on the set (OOD is the positive class; a higher score means "more likely OOD")."""
    correct = (pred_in.label == y).to(pred_in.probs.dtype)
    ood = {
        key: {
            "auroc_confidence": float(metrics.ood_auroc(-pred_in.confidence, -p.confidence)),
            "auroc_epistemic": (
                float(metrics.ood_auroc(pred_in.epistemic, p.epistemic)) if bayesian else None
            ),
            "mean_confidence": float(p.confidence.mean()),
        }
        for key, p in preds_out.items()
    }
    return {
        "accuracy": float(metrics.accuracy(pred_in.probs, y)),
        "nll": float(metrics.nll(pred_in.probs, y)),
        "ece": float(metrics.ece(pred_in.probs, y, n_bins=15)),
        # The digits 5-9 columns of the main table.
        "ood_auroc_confidence": ood["digits_5_9"]["auroc_confidence"],
        "ood_auroc_epistemic": ood["digits_5_9"]["auroc_epistemic"],
        "accuracy_at_80_coverage": float(metrics.accuracy_at_coverage(pred_in.total, correct, 0.8)),
        "mean_confidence": float(pred_in.confidence.mean()),
        "ood": ood,
    }


def _calibration_split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random half of ``range(n)`` for calibration, the rest for testing."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


def _referral(
    posterior: Posterior,
    score: str,
    data: DigitsOOD,
    split: tuple[Tensor, Tensor],
    n_samples: int | None,
    generator: torch.Generator,
    config: DemoConfig,
) -> dict:
    """Fit a :class:`Referral` on the calibration part, measure it on the test part."""
    cal, test = split
    referral = Referral.fit(
        posterior,
        data.x_test[cal],
        data.y_test[cal],
        target_risk=config.target_risk,
        delta=config.delta,
        score=score,
        n_samples=n_samples,
        generator=generator,
    )
    decision = referral.decide(data.x_test[test], n_samples, generator=generator)
    wrong = decision.prediction.label != data.y_test[test]
    n_accepted = int(decision.accept.sum())
    error = float(wrong[decision.accept].float().mean()) if n_accepted else None
    return {
        "score": score,
        "threshold": referral.threshold if referral.certified else None,
        "calibration_coverage": referral.calibration_coverage,
        "coverage": decision.coverage,
        "n_accepted": n_accepted,
        "error": error,
        # Nothing accepted, nothing wrong: the rule keeps its promise by referring everything.
        "met_target": error is None or error <= config.target_risk,
    }


def run_demo(
    config: DemoConfig | None = None,
    data: DigitsOOD | None = None,
    *,
    plots_dir: str | os.PathLike | None = None,
) -> dict:
    """Train the three methods and evaluate them; returns the JSON-ready result dict.

    Per method (``result["methods"][name]``): the in-distribution metrics of
    :data:`METRIC_KEYS` (the two OOD AUROCs there are those of digits 5-9),
    ``"mean_confidence"`` on held-out 0-4, ``"seconds"``, ``"ood"`` (per set of
    :data:`OOD_SETS`: ``auroc_confidence``, ``auroc_epistemic``, ``None`` for the deterministic
    net, and ``mean_confidence``) and ``"referral"`` (``score``, ``threshold``, ``None`` when
    nothing could be certified, ``calibration_coverage``, and on the test half ``coverage``,
    ``n_accepted``, ``error`` among the accepted, ``None`` when none is, and ``met_target``).
    ``result["ood_sets"]`` names and describes the sets and counts their images;
    ``result["referral"]`` holds the target, ``delta``, ``min_cases`` (fewest accepted
    calibration cases that can certify the target) and the sizes of the two halves.

    With ``plots_dir`` the figures are written there as PNG files (the folder is created) and
    the result gets a ``"plots"`` entry listing their paths.
    """
    config = config or DemoConfig()
    data = data or load_digits_ood(seed=config.seed)
    n_features = data.x_train.shape[1]
    train = (data.x_train, data.y_train)
    fit_options = dict(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    ood = ood_inputs(data, seed=config.seed)
    split = _calibration_split(len(data.x_test), seed=config.seed)
    posteriors: dict[str, tuple[Posterior, int | None]] = {}
    torch.manual_seed(config.seed)
    posteriors["deterministic"] = (
        Deterministic(_network(n_features, data.n_classes, config), "categorical"),
        None,
    )
    posteriors["mc_dropout"] = (
        MCDropout(_network(n_features, data.n_classes, config), "categorical"),
        config.n_samples,
    )
    posteriors["deep_ensemble"] = (
        DeepEnsemble(
            _network(n_features, data.n_classes, config),
            "categorical",
            n_members=config.n_members,
            seed=config.seed,
        ),
        None,
    )
    results: dict[str, dict] = {}
    predictions: dict[str, tuple[ClassificationPrediction, ClassificationPrediction]] = {}
    for name, (posterior, n_samples) in posteriors.items():
        start = time.perf_counter()
        posterior.fit(train, **fit_options)
        generator = torch.Generator().manual_seed(config.seed)
        pred_in = posterior.predict(data.x_test, n_samples, generator=generator)
        preds_out = {
            k: posterior.predict(x, n_samples, generator=generator) for k, x in ood.items()
        }
        results[name] = _evaluate(pred_in, preds_out, data.y_test, bayesian=name != "deterministic")
        results[name]["referral"] = _referral(
            posterior, _REFERRAL_SCORE[name], data, split, n_samples, generator, config
        )
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
        predictions[name] = (pred_in, preds_out["digits_5_9"])
    result = {
        "dataset": "sklearn-digits: train on 0-4; out of distribution: digits 5-9, and shifted "
        "or random images",
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "n_ood": len(data.x_ood),
        "ood_sets": {
            key: {"name": name, "description": text, "n": len(ood[key])}
            for key, (name, text) in OOD_SETS.items()
        },
        "referral": {
            "target_risk": config.target_risk,
            "delta": config.delta,
            "min_cases": min_cases_to_certify(config.target_risk, config.delta),
            "n_calibration": len(split[0]),
            "n_test": len(split[1]),
        },
        "config": asdict(config),
        "methods": results,
    }
    if plots_dir is not None:
        result["plots"] = write_plots(plots_dir, predictions, data.y_test, config)
    return result


def _regression_task(n: int, generator: torch.Generator, low: float = -3.0, high: float = 3.0):
    """1-D heteroscedastic data: ``y = sin(x) + (0.1 + 0.1 |x|) noise``, ``x`` uniform."""
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    y = torch.sin(x[:, 0]) + (0.1 + 0.1 * x[:, 0].abs()) * torch.randn(n, generator=generator)
    return x, y


def _regression_figures(config: DemoConfig, folder: Path) -> list[str]:
    """Fit a small 1-D ensemble; draw its intervals and its calibration before/after scaling."""
    from bayesdl import calibration, conformal, report

    g = torch.Generator().manual_seed(config.seed)
    (x, y), (x_cal, y_cal), (x_test, y_test) = (_regression_task(n, g) for n in (400, 300, 600))
    torch.manual_seed(config.seed)
    net = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    ensemble = DeepEnsemble(net, "gaussian", n_members=config.n_members, seed=config.seed)
    ensemble.fit((x, y), epochs=3 * config.epochs, batch_size=64, lr=3e-3, seed=config.seed)
    scaled = calibration.variance_scale(ensemble, x_cal, y_cal)
    grid = torch.linspace(-5.0, 5.0, 300)[:, None]
    bands = conformal.conformal_intervals(ensemble, x_cal, y_cal, grid, alpha=0.1)
    paths = [folder / "regression_intervals.png", folder / "regression_calibration.png"]
    report.plot_regression_intervals(
        grid,
        {"deep_ensemble": ensemble.predict(grid)},
        level=0.9,
        observed=(x, y),
        intervals={"deep_ensemble": (bands.lower, bands.upper)},
        path=paths[0],
    )
    report.plot_regression_calibration(
        {
            "deep_ensemble": (ensemble.predict(x_test), y_test),
            f"variance-scaled (s={scaled.scale:.2f})": (scaled.predict(x_test), y_test),
        },
        path=paths[1],
    )
    return [str(p) for p in paths]


def write_plots(
    plots_dir: str | os.PathLike,
    predictions: dict[str, tuple[ClassificationPrediction, ClassificationPrediction]],
    y_test: torch.Tensor,
    config: DemoConfig,
) -> list[str]:
    """Write the demo's figures (PNG) into ``plots_dir`` and return their paths."""
    from bayesdl import report  # matplotlib is needed only here

    folder = Path(plots_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "reliability": folder / "reliability.png",
        "risk_coverage": folder / "risk_coverage.png",
        "epistemic": folder / "epistemic_ood.png",
    }
    report.plot_reliability_diagram(
        {name: (p_in.probs, y_test) for name, (p_in, _) in predictions.items()},
        path=paths["reliability"],
    )
    report.plot_risk_coverage(
        {
            name: (p_in.total, (p_in.label != y_test).to(p_in.probs.dtype))
            for name, (p_in, _) in predictions.items()
        },
        path=paths["risk_coverage"],
    )
    report.plot_epistemic_histograms(
        {
            name: (p_in.epistemic, p_out.epistemic)
            for name, (p_in, p_out) in predictions.items()
            if name != "deterministic"
        },
        path=paths["epistemic"],
    )
    return [str(p) for p in paths.values()] + _regression_figures(config, folder)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(headers: tuple[str, ...], rows: list[list[str]], n_left: int = 1) -> list[str]:
    """Fixed-width lines: the first ``n_left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < n_left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _gain(row: dict) -> float | None:
    """AUROC of mutual information minus AUROC of confidence (``None`` without draws)."""
    if row["auroc_epistemic"] is None:
        return None
    return row["auroc_epistemic"] - row["auroc_confidence"]


def _epistemic_verdict(result: dict) -> list[str]:
    """Per OOD set: do the Bayesian methods' mutual information AUROCs beat their own softmax
    confidence AUROCs, for every method, some or none, and by how much."""
    methods = result["methods"]
    bayesian = [n for n, m in methods.items() if m["ood_auroc_epistemic"] is not None]
    if not bayesian:
        return []
    groups: dict[str, list[str]] = {"every": [], "some": [], "no": []}
    for key, ood_set in result["ood_sets"].items():
        gains = {n: _gain(methods[n]["ood"][key]) for n in bayesian}
        wins = [n for n, g in gains.items() if g > 0]
        span = f"{min(gains.values()):+.3f} to {max(gains.values()):+.3f}"
        if len(wins) == len(bayesian):
            groups["every"].append(f"{ood_set['name']} ({span})")
        elif wins:
            groups["some"].append(f"{ood_set['name']} ({span}; higher for {', '.join(wins)})")
        else:
            groups["no"].append(f"{ood_set['name']} ({span})")
    return [
        "Does mutual information flag the set better than the method's own softmax confidence? "
        "(AUROC MI - conf, lowest to highest)",
        *(
            f"  {label}: {'; '.join(groups[who])}"
            for who, label in (
                ("every", f"yes, for {' and '.join(bayesian)}"),
                ("some", "for some methods"),
                ("no", "no, confidence is as good or better"),
            )
            if groups[who]
        ),
    ]


def format_table(result: dict) -> str:
    """The demo's result as fixed-width text: the main table (one row per method), the OOD
    AUROCs per set and method with a verdict on mutual information against confidence, and
    the referral table."""
    methods = result["methods"]
    main = _table(
        ("method", "acc", "NLL", "ECE", "AUROC conf", "AUROC epist", "acc@80%cov", "sec"),
        [
            [name] + [_fmt(v) for v in [m[k] for k in METRIC_KEYS] + [m["seconds"]]]
            for name, m in methods.items()
        ],
    )
    ood_rows = []
    for key, ood_set in result["ood_sets"].items():
        for i, (name, m) in enumerate(methods.items()):
            row, gain = m["ood"][key], _gain(m["ood"][key])
            ood_rows.append(
                [
                    f"{ood_set['name']} ({ood_set['n']})" if i == 0 else "",
                    name,
                    _fmt(row["auroc_confidence"]),
                    _fmt(row["auroc_epistemic"]),
                    "-" if gain is None else f"{gain:+.3f}",
                    _fmt(row["mean_confidence"]),
                ]
            )
    ood = _table(
        ("OOD set (n)", "method", "AUROC conf", "AUROC MI", "MI - conf", "mean conf"),
        ood_rows,
        n_left=2,
    )
    ref = result["referral"]
    referral = _table(
        ("method", "score", "cal coverage", "coverage", "accepted", "error", "target met"),
        [
            [
                name,
                m["referral"]["score"],
                _fmt(m["referral"]["calibration_coverage"]),
                _fmt(m["referral"]["coverage"]),
                str(m["referral"]["n_accepted"]),
                _fmt(m["referral"]["error"]),
                "yes" if m["referral"]["met_target"] else "no",
            ]
            for name, m in methods.items()
        ],
        n_left=2,
    )
    in_confidence = ", ".join(f"{name} {m['mean_confidence']:.3f}" for name, m in methods.items())
    return "\n".join(
        [
            result["dataset"],
            f"({result['n_train']} train, {result['n_test']} held-out 0-4, "
            f"{result['n_ood']} digits 5-9)",
            "AUROC conf / epist: separating unseen digits 5-9 from held-out 0-4 by low "
            "confidence / high mutual information. acc@80%cov: accuracy after referring the 20% "
            "most uncertain.",
            "",
            *main,
            "",
            "Out-of-distribution sets:",
            *(f"  {s['name']}: {s['description']}" for s in result["ood_sets"].values()),
            "Digits 5-9 look like the training digits, and the softmax already spreads its "
            "probability over them. The other sets move inputs away from the training data, "
            "where a ReLU net can stay confident (Hein et al. 2019); posterior draws (dropout "
            "masks, ensemble members) can still disagree there, and that disagreement is the "
            "mutual information (MI).",
            "AUROC: held-out 0-4 against the set (0.5 = chance; below 0.5 the set looks more "
            "familiar to the net than real digits). mean conf: average max probability on the "
            f"set (on held-out 0-4: {in_confidence}).",
            "",
            *ood,
            "",
            *_epistemic_verdict(result),
            "",
            f"Referral (Learn-then-Test): error among accepted <= {ref['target_risk']:g} with "
            f"probability >= {1 - ref['delta']:g} over the calibration draw; fitted on "
            f"{ref['n_calibration']} held-out 0-4 images (at least {ref['min_cases']} accepted "
            f"ones are needed to certify anything), measured on the other {ref['n_test']}.",
            "score: what is compared with the threshold (confidence: 1 - max probability; total: "
            "predictive entropy); coverage: share accepted; error: among the accepted test "
            "cases, where one error is worth about "
            f"{1 / max(1, ref['n_test']):.3f}, so one test half is a noisy check of the "
            "guarantee; nothing accepted means nothing could be certified.",
            "",
            *referral,
        ]
    )


def result_json(result: dict) -> str:
    """The result as indented JSON."""
    return json.dumps(result, indent=2)
