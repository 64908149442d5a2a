"""Shared fixtures: tiny models and data for every posterior in the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesdl as bdl

# Constructor options per registered method for fast tests. A method missing here is built with
# its defaults, so a new method gets the contract test for free.
FAST_OPTIONS: dict[str, dict] = {
    "deep_ensemble": {"n_members": 3, "seed": 0},
    "swag": {"rank": 5, "swa_start": 0},  # the contract fits 1-2 epochs: collect from epoch 1
    "sgmcmc": {"n_kept": 4, "burn_in": 0.0},  # a few steps: keep samples from the start
}


def make_posterior(name: str, model: nn.Module, likelihood="categorical", **extra):
    cls = bdl.get_posterior(name)
    return cls(model, likelihood, **{**FAST_OPTIONS.get(name, {}), **extra})


def mlp(n_in: int = 4, n_out: int = 3, hidden: int = 16, p: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, n_out)
    )


@pytest.fixture(params=bdl.available_posteriors())
def method(request) -> str:
    return request.param


@pytest.fixture
def classification_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


@pytest.fixture
def regression_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(64, generator=g)
    return x, y
