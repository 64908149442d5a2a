"""Refer the biopsies a model is unsure of to a pathologist, with a guaranteed error rate on
the ones it decides.

    python examples/medical_referral.py [--members 5] [--epochs 100] [--target 0.02] [--out DIR]

A deep ensemble of small MLPs learns malignant / benign from scikit-learn's breast-cancer
biopsies (a third of the 569 cases, stratified; inputs standardised on that third). A
:class:`bayesdl.decisions.Referral` is fitted on another third so that the error rate among the
cases the model decides is at most ``--target`` with probability at least 90% (``--delta``),
and it is applied to the last third. The model with its referral rule is saved to
``referral.safetensors`` in ``--out`` (default: a temporary folder), loaded back with
``bayesdl.load``, and its decisions are checked to be the same.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import bayesdl as bdl
from bayesdl.data import Standardizer
from bayesdl.decisions import Referral


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.02, help="error rate allowed")
    parser.add_argument("--delta", type=float, default=0.1, help="chance the target is missed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the model file")
    args = parser.parse_args(argv)

    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target)  # 0 = malignant, 1 = benign
    rows = torch.arange(len(y)).numpy()
    train, rest = train_test_split(rows, train_size=1 / 3, stratify=y, random_state=args.seed)
    cal, test = train_test_split(rest, train_size=0.5, stratify=y[rest], random_state=args.seed)
    scaler = Standardizer.fit(x[train], y[train].float())
    x_train, x_cal, x_test = (scaler.transform_x(x[i]) for i in (train, cal, test))
    y_train, y_cal, y_test = y[train], y[cal], y[test]

    torch.manual_seed(args.seed)
    net = bdl.models.mlp(x.shape[1], 2, hidden=(32,))
    ensemble = bdl.DeepEnsemble(net, "categorical", n_members=args.members, seed=args.seed)
    ensemble.fit((x_train, y_train), epochs=args.epochs, batch_size=32, lr=1e-3, seed=args.seed)

    referral = Referral.fit(
        ensemble, x_cal, y_cal, target_risk=args.target, delta=args.delta, score="total"
    )
    decision = referral.decide(x_test)
    wrong = decision.prediction.label != y_test
    n_decided = int(decision.accept.sum())
    n_errors = int((wrong & decision.accept).sum())
    summary = referral.summary()

    folder = Path(tempfile.mkdtemp()) if args.out is None else args.out
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "referral.safetensors"
    bdl.save(referral, path, feature_names=list(data.feature_names), standardizer=scaler)
    loaded = bdl.load(path)  # the network comes from bayesdl.models: no model argument needed
    again = loaded.decide(x_test)

    results = {
        "n_test": len(y_test),
        "accuracy": 1 - int(wrong.sum()) / len(y_test),
        "n_decided": n_decided,
        "n_referred": len(y_test) - n_decided,
        "n_errors_decided": n_errors,
        "decided_error": n_errors / n_decided if n_decided else None,
        "threshold": referral.threshold,
        "min_cases": summary["min_cases"],
        "calibration_coverage": summary["calibration_coverage"],
        "same_decisions": bool(torch.equal(decision.refer, again.refer)),
        "path": str(path),
    }
    print(f"accuracy without referral: {results['accuracy']:.3f} on {len(y_test)} test cases")
    print(
        f"target error {args.target:g} (delta {args.delta:g}): the model decides {n_decided} "
        f"cases with {n_errors} errors"
        + (f" ({results['decided_error']:.3f})" if n_decided else "")
        + f" and refers {results['n_referred']} to a pathologist"
    )
    if not referral.certified:
        print(
            f"nothing could be certified: it needs at least {summary['min_cases']} decided "
            f"calibration cases without too many errors ({len(y_cal)} calibration cases)"
        )
    print(f"saved to {path}; loaded back, same decisions: {results['same_decisions']}")
    return results


if __name__ == "__main__":
    main()
