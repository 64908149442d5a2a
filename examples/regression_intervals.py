"""Heteroscedastic 1-D regression: prediction intervals, and epistemic uncertainty that grows
away from the data.

    python examples/regression_intervals.py [--epochs 300] [--members 5] [--samples 200]

The noise grows with |x| (aleatoric), and the training inputs cover only [-3, 3] (epistemic
uncertainty should be larger at |x| = 5). Prints the coverage of 90% intervals on fresh data
and the mean epistemic variance inside and outside the training range, for MC dropout and a deep
ensemble.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import bayesdl as bdl
from bayesdl import metrics


def make_data(n: int, generator: torch.Generator, low: float = -3.0, high: float = 3.0):
    x = torch.rand(n, 1, generator=generator) * (high - low) + low
    noise = 0.1 + 0.1 * x[:, 0].abs()
    y = torch.sin(x[:, 0]) + noise * torch.randn(n, generator=generator)
    return x, y


def network(dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 64),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(64, 2),  # mean and log-variance
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--n-train", type=int, default=1000)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    x, y = make_data(args.n_train, g)
    x_test, y_test = make_data(1000, g)
    far = torch.tensor([[-5.0], [-4.5], [4.5], [5.0]])
    torch.manual_seed(0)
    posteriors = {
        "mc_dropout": (bdl.MCDropout(network(0.1), "gaussian"), args.samples),
        "deep_ensemble": (
            bdl.DeepEnsemble(network(0.0), "gaussian", n_members=args.members, seed=0),
            None,
        ),
    }
    results = {}
    for name, (post, n_samples) in posteriors.items():
        post.fit((x, y), epochs=args.epochs, batch_size=128, lr=3e-3, seed=0)
        gen = torch.Generator().manual_seed(1)
        pred = post.predict(x_test, n_samples, generator=gen)
        lower, upper = pred.interval(0.9)
        results[name] = {
            "picp_90": float(metrics.picp(lower, upper, y_test)),
            "mpiw_90": float(metrics.mpiw(lower, upper)),
            "rmse": float(metrics.rmse(pred.mean, y_test)),
            "nll": float(-pred.log_prob(y_test).mean()),
            "epistemic_inside": float(pred.epistemic.mean()),
            "epistemic_outside": float(
                post.predict(far, n_samples, generator=gen).epistemic.mean()
            ),
        }
    for name, r in results.items():
        print(f"{name:>14}: " + ", ".join(f"{k}={v:.4f}" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
