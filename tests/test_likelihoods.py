"""Likelihoods against torch.distributions, in float64, and their boundary checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bayesdl as bdl
from bayesdl.likelihoods import Categorical, Gaussian, HomoscedasticGaussian, get_likelihood

f64 = torch.float64


def test_categorical_nll_is_cross_entropy_and_broadcasts_over_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, dtype=f64)
    y = torch.tensor([0, 3, 1, 2, 2])
    lik = Categorical(4)
    for s in range(3):
        torch.testing.assert_close(
            lik.nll(logits[s], y), F.cross_entropy(logits[s], y, reduction="none")
        )
    torch.testing.assert_close(
        lik.nll(logits, y), torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
    )


def test_gaussian_nll_is_normal_log_prob():
    g = torch.Generator().manual_seed(1)
    params = torch.randn(6, 2, generator=g, dtype=f64)
    y = torch.randn(6, generator=g, dtype=f64)
    lik = Gaussian(min_variance=0.0)
    want = -torch.distributions.Normal(params[:, 0], params[:, 1].exp().sqrt()).log_prob(y)
    torch.testing.assert_close(lik.nll(params, y), want)


def test_gaussian_variance_floor():
    lik = Gaussian(min_variance=1e-3)
    _, var = lik.mean_variance(torch.tensor([[0.0, -100.0]], dtype=f64))
    assert var.item() == pytest.approx(1e-3, rel=1e-9)
    assert math.isfinite(lik.nll(torch.tensor([[0.0, -100.0]]), torch.tensor([0.0])).item())


def test_multi_target_gaussian_sums_over_targets():
    g = torch.Generator().manual_seed(2)
    params = torch.randn(5, 6, generator=g, dtype=f64)  # 3 targets
    y = torch.randn(5, 3, generator=g, dtype=f64)
    lik = Gaussian(n_targets=3, min_variance=0.0)
    normal = torch.distributions.Normal(params[:, :3], params[:, 3:].exp().sqrt())
    torch.testing.assert_close(lik.nll(params, y), -normal.log_prob(y).sum(-1))
    pred = lik.predictive(params[None])
    assert pred.mean.shape == (5, 3)


def test_homoscedastic_gaussian_appends_its_learned_log_variance():
    lik = HomoscedasticGaussian(init_variance=0.25).double()
    out = lik(torch.tensor([[1.0], [2.0]], dtype=f64))
    torch.testing.assert_close(out[:, 1], torch.full((2,), math.log(0.25), dtype=f64))
    assert [n for n, _ in lik.named_parameters()] == ["log_variance"]
    with pytest.raises(ValueError, match=r"\(B, 1\).*one mean per target"):
        lik(torch.zeros(2, 2))


def test_homoscedastic_noise_is_learned():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 1, generator=g)
    y = 2 * x[:, 0] + 0.5 * torch.randn(400, generator=g)
    post = bdl.Deterministic(torch.nn.Linear(1, 1), "homoscedastic_gaussian")
    post.fit((x, y), epochs=150, batch_size=100, lr=0.05, seed=0)
    noise = post.likelihood.log_variance.exp().item()
    assert noise == pytest.approx(0.25, rel=0.2)
    assert post.predict(x[:3]).aleatoric[0].item() == pytest.approx(noise, rel=1e-4)


def test_targets_are_checked():
    with pytest.raises(ValueError, match="one-hot"):
        Categorical(3).check_targets(torch.eye(3))
    with pytest.raises(TypeError, match="integer class labels"):
        Categorical(3).check_targets(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Categorical(3).check_targets(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        Categorical().check_targets(torch.tensor([0, -1]))
    assert Categorical().check_targets(torch.tensor([0.0, 2.0])).dtype == torch.long
    assert Gaussian().check_targets(torch.zeros(4, 1)).shape == (4,)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\)"):
        Gaussian().check_targets(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        Gaussian(n_targets=2).check_targets(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        Gaussian().check_targets(torch.tensor([0.0, float("inf")]))


def test_bad_likelihood_options():
    with pytest.raises(ValueError, match="unknown likelihood 'gausian'.*'gaussian'"):
        get_likelihood("gausian")
    with pytest.raises(ValueError, match="n_classes"):
        Categorical(1)
    with pytest.raises(ValueError, match="n_targets"):
        Gaussian(n_targets=0)
    with pytest.raises(ValueError, match="init_variance"):
        HomoscedasticGaussian(init_variance=0.0)
    assert isinstance(get_likelihood("homoscedastic_gaussian"), HomoscedasticGaussian)
