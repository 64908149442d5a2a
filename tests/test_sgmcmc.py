"""SG-MCMC against the closed-form posterior of Bayesian linear regression (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesdl as bdl
from bayesdl.posteriors.sgmcmc import StepSchedule, _Plan

N, D, NOISE_VAR, PRIOR_PRECISION = 50, 2, 0.25, 2.0


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64)
    y = y + math.sqrt(NOISE_VAR) * torch.randn(N, generator=g, dtype=torch.float64)
    return x, y


def _closed_form(x, y, temperature: float = 1.0):
    """Mean and covariance of p(w | D)^(1/T) for y = x w + N(0, s2), w ~ N(0, 1/lambda)."""
    precision = x.T @ x / NOISE_VAR + PRIOR_PRECISION * torch.eye(D, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    return cov @ x.T @ y / NOISE_VAR, temperature * cov


def _linear_model():
    torch.manual_seed(0)
    likelihood = bdl.HomoscedasticGaussian(init_variance=NOISE_VAR).double()
    likelihood.log_variance.requires_grad_(False)  # the noise is known: w alone is sampled
    return nn.Linear(D, 1, bias=False).double(), likelihood


def _samples(**options) -> torch.Tensor:
    x, y = _problem()
    model, likelihood = _linear_model()
    fit = {k: options.pop(k) for k in ("epochs", "lr") if k in options}
    post = bdl.SGMCMC(model, likelihood, prior_precision=PRIOR_PRECISION, **options)
    post.fit((x, y), batch_size=N, seed=0, **fit)  # full batches: no gradient noise
    return post._params["model.weight"][: post.n_collected].detach().reshape(-1, D)


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "sgld", "epochs": 3000, "lr": 0.04},
        {"sampler": "sghmc", "epochs": 3000, "lr": 0.01, "friction": 0.1},
    ],
    ids=["sgld", "sghmc"],
)
def test_samples_match_the_closed_form_posterior(options):
    samples = _samples(n_kept=1000, burn_in=0.2, **options)
    mean, cov = _closed_form(*_problem())
    sd = cov.diagonal().sqrt()
    assert len(samples) == 1000
    # Monte Carlo error of correlated draws: a quarter of a posterior sd for the mean, and the
    # variances within 30% (a sampler stuck at the mode, or twice as wide, fails).
    assert ((samples.mean(0) - mean).abs() < 0.25 * sd).all(), (samples.mean(0), mean)
    ratio = samples.var(0) / cov.diagonal()
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio
    corr = torch.corrcoef(samples.T)[0, 1]
    want = cov[0, 1] / (sd[0] * sd[1])
    assert abs(float(corr - want)) < 0.2


def test_a_cold_posterior_shrinks_the_spread_by_the_temperature():
    samples = _samples(sampler="sghmc", epochs=3000, lr=0.01, n_kept=1000, temperature=0.25)
    mean, cov = _closed_form(*_problem(), temperature=0.25)
    ratio = samples.var(0) / cov.diagonal()
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio
    assert ((samples.mean(0) - mean).abs() < 0.25 * cov.diagonal().sqrt()).all()


def test_temperature_zero_is_noise_free_descent_to_the_map():
    samples = _samples(sampler="sgld", epochs=400, lr=0.05, n_kept=5, temperature=0.0)
    mean, _ = _closed_form(*_problem())  # the MAP of a Gaussian posterior is its mean
    torch.testing.assert_close(samples, mean.expand(5, D), rtol=1e-6, atol=1e-6)


def test_the_cyclical_schedule_samples_only_at_the_end_of_each_cycle():
    plan = _Plan(
        steps=100, burn_in=0, thin=2, lr=0.1, schedule=StepSchedule.CYCLICAL, cycles=4,
        exploration=0.8,
    )  # fmt: skip
    kept = [s for s in range(100) if plan.keeps(s)]
    assert kept == [21, 23, 46, 48, 71, 73, 96, 98]  # steps 20-24 of each 25-step cycle
    assert all(plan.noisy(s) == (s % 25 >= 20) for s in range(100))
    assert plan.rate(0) == plan.rate(25) == 0.1 and plan.rate(24) < 0.001
    assert all(plan.rate(s) > plan.rate(s + 1) for s in range(24))


def test_cyclical_chain_keeps_its_samples_and_predicts_from_them():
    x, y = _problem()
    model, likelihood = _linear_model()
    post = bdl.SGMCMC(model, likelihood, schedule="cyclical", cycles=2, n_kept=6)
    post.fit((x, y), epochs=40, batch_size=10, lr=0.01, seed=0)
    assert post.n_collected == 6
    outputs = post.sample_outputs(x[:3])
    assert outputs.shape == (6, 3, 2)
    pred = post.predict(x[:3])
    assert (pred.epistemic > 0).all()
    weights = post._params["model.weight"].reshape(6, D)
    assert len({tuple(w.tolist()) for w in weights}) == 6  # six different samples


def test_the_ring_keeps_the_last_samples():
    x, y = _problem()
    model, likelihood = _linear_model()
    post = bdl.SGMCMC(model, likelihood, sampler="sgld", n_kept=3, thin=1, burn_in=0.0)
    post.fit((x, y), epochs=10, batch_size=N, lr=0.01, seed=0)
    assert int(post._n) == 10 and post.n_collected == 3
    # the chain's current weights are the last sample, in slot (10 - 1) % 3 = 0
    torch.testing.assert_close(post._params["model.weight"][0], post.model.weight)


def test_a_diverging_chain_keeps_the_samples_of_its_last_good_epoch(monkeypatch):
    """Samples are kept every step; when a step size blows the chain up in epoch 4, the fit
    restores the weights, the ring and the count of the end of epoch 3, so the posterior
    predicts from finite samples only."""
    x, y = _problem()
    model, likelihood = _linear_model()
    post = bdl.SGMCMC(model, likelihood, sampler="sgld", n_kept=5, thin=1, burn_in=0.0)
    rate = _Plan.rate
    steps_per_epoch = 2  # batch 25 of 50 rows
    monkeypatch.setattr(
        _Plan, "rate", lambda self, step: 1e200 if step >= 3 * steps_per_epoch else rate(self, step)
    )
    with pytest.raises(bdl.TrainingDivergedError) as err:
        post.fit((x, y), epochs=6, batch_size=25, lr=0.01, seed=0)
    assert err.value.last_good_epoch == 3
    assert int(post._n) == 3 * steps_per_epoch and post.n_collected == 5
    ring = post._params["model.weight"].detach()
    assert torch.isfinite(ring).all()
    torch.testing.assert_close(ring[(int(post._n) - 1) % 5], post.model.weight.detach())
    assert torch.isfinite(post.sample_outputs(x)).all()


def test_options_and_errors():
    x, y = _problem()
    model, likelihood = _linear_model()
    with pytest.raises(ValueError, match="no sample yet.*fit"):
        bdl.SGMCMC(model, likelihood).predict(x)
    with pytest.raises(ValueError, match="prior_precision"):
        bdl.SGMCMC(model, likelihood).fit((x, y), weight_decay=0.1)
    with pytest.raises(ValueError, match="patience"):
        bdl.SGMCMC(model, likelihood).fit((x, y), val_fraction=0.2, patience=3)
    with pytest.raises(ValueError, match="burn_in"):
        bdl.SGMCMC(model, likelihood, burn_in=5).fit((x, y), epochs=3)
    for bad in ({"n_kept": 0}, {"friction": 0.0}, {"temperature": -1.0}, {"burn_in": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            bdl.SGMCMC(model, likelihood, **bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        bdl.SGMCMC(model, likelihood, sampler="hmc")
    post = bdl.SGMCMC(model, likelihood, n_kept=4, burn_in=0.0)
    post.fit((x, y), epochs=2, batch_size=25, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="n_samples=None or 4"):
        post.predict(x, n_samples=10)
