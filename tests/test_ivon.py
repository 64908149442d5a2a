"""IVON against the closed form: on Bayesian linear regression (float64) its Gaussian is the
best mean-field one, the exact posterior mean with variances 1 / diag(precision)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesdl as bdl
from test_sgmcmc import NOISE_VAR, PRIOR_PRECISION, D, N, _linear_model, _problem


def _fitted(**options) -> bdl.IVON:
    x, y = _problem()
    model, likelihood = _linear_model()
    post = bdl.IVON(model, likelihood, prior_precision=PRIOR_PRECISION, **options)
    post.fit((x, y), epochs=3000, batch_size=N, lr=0.1, seed=0)
    return post


def test_the_gaussian_is_the_mean_field_optimum():
    post = _fitted(beta2=0.999, hess_init=1.0)
    x, y = _problem()
    precision = x.T @ x / NOISE_VAR + PRIOR_PRECISION * torch.eye(D, dtype=torch.float64)
    mean = torch.linalg.solve(precision, x.T @ y / NOISE_VAR)
    variance = 1 / precision.diagonal()  # the mean-field optimum of a Gaussian posterior
    sd = variance.sqrt()
    # One weight draw per step makes the Hessian estimate h noisy: its average over the last
    # ~1/(1 - beta2) steps sets the variances, to within 15% here.
    assert ((post.mu.detach() - mean).abs() < 0.1 * sd).all(), (post.mu, mean)
    ratio = post.sigma.detach() ** 2 / variance
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    assert post.model.weight.flatten().tolist() == pytest.approx(post.mu.tolist())  # the mean net


def test_it_predicts_like_mean_field_vi_from_its_gaussian():
    post = _fitted(beta2=0.999)
    x, _ = _problem()
    pred = post.predict(x[:5], n_samples=200, generator=torch.Generator().manual_seed(0))
    assert pred.mean.shape == (5,) and (pred.epistemic > 0).all()
    # the epistemic variance of a linear model is x^T diag(sigma^2) x
    want = (x[:5] ** 2) @ post.sigma.detach() ** 2
    torch.testing.assert_close(pred.epistemic, want, rtol=0.3, atol=0)


def test_options_and_errors():
    x, y = _problem()
    model, likelihood = _linear_model()
    for bad in ({"ess": 0}, {"hess_init": -1.0}, {"beta1": 1.0}, {"point_lr": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            bdl.IVON(model, likelihood, **bad)
    with pytest.raises(ValueError, match="prior_precision"):
        bdl.IVON(model, likelihood).fit((x, y), weight_decay=0.1)


def test_a_likelihood_s_own_parameters_are_point_estimates():
    """The homoscedastic noise is learned by Adam beside the IVON update: here it reaches the
    data's noise variance."""
    x, y = _problem()
    torch.manual_seed(0)
    likelihood = bdl.HomoscedasticGaussian().double()
    post = bdl.IVON(nn.Linear(D, 1, bias=False).double(), likelihood, beta2=0.999)
    post.fit((x, y), epochs=1500, batch_size=N, lr=0.1, seed=0)
    noise = float(post.likelihood.log_variance.detach().exp())
    assert 0.5 * NOISE_VAR < noise < 1.5 * NOISE_VAR
    assert post.mu.numel() == D  # the noise got no distribution


def test_the_clip_radius_bounds_every_step():
    x, y = _problem()
    model, likelihood = _linear_model()
    post = bdl.IVON(model, likelihood, clip_radius=1e-3)
    start = post.mu.detach().clone()
    post.fit((x, y), epochs=5, batch_size=N, lr=0.1, seed=0)  # five full-batch steps
    moved = (post.mu.detach() - start).abs()
    assert (moved <= 5 * 0.1 * 1e-3 * (1 + 1e-9)).all() and (moved > 0).all()
    with pytest.raises(ValueError, match="clip_radius"):
        bdl.IVON(model, likelihood, clip_radius=0.0)
