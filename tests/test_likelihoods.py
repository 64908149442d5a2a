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


# ----------------------------------------------------------------------------- beta-NLL
def _gaussian_params(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, generator=g, dtype=torch.float64)
    log_var = torch.randn(b, generator=g, dtype=torch.float64)
    y = torch.randn(b, generator=g, dtype=torch.float64)
    return mean, log_var, y


def test_beta_zero_training_loss_is_the_nll():
    mean, log_var, y = _gaussian_params()
    params = torch.stack([mean, log_var], -1)
    for lik in (Gaussian(), Gaussian(beta=0.0), HomoscedasticGaussian()):
        assert torch.equal(lik.training_loss(params, y), lik.nll(params, y))
    assert Categorical(3).training_loss(torch.zeros(2, 3), torch.tensor([0, 2])).shape == (2,)


def test_beta_nll_value_and_gradients_against_closed_forms():
    mean, log_var, y = _gaussian_params()
    for beta in (0.5, 1.0):
        lik = Gaussian(beta=beta, min_variance=0.0)
        m, lv = mean.clone().requires_grad_(), log_var.clone().requires_grad_()
        params = torch.stack([m, lv], -1)
        loss = lik.training_loss(params, y)
        var = log_var.exp()
        nll = 0.5 * ((y - mean) ** 2 / var + log_var + math.log(2 * math.pi))
        torch.testing.assert_close(loss, var**beta * nll)  # the value: weighted NLL
        torch.testing.assert_close(lik.nll(params, y), nll)  # the NLL itself is untouched
        loss.sum().backward()
        # the weight is a constant: d/dmean = var^beta (mean - y) / var,
        # d/dlog_var = var^beta * 0.5 * (1 - (y - mean)^2 / var)
        torch.testing.assert_close(m.grad, var**beta * (mean - y) / var)
        torch.testing.assert_close(lv.grad, var**beta * 0.5 * (1 - (y - mean) ** 2 / var))
    # beta = 1: the mean's gradient is exactly that of half the squared error
    torch.testing.assert_close(var**1.0 * (mean - y) / var, mean - y)


def test_beta_nll_multi_target_and_homoscedastic():
    g = torch.Generator().manual_seed(1)
    params = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # (S, B, 2D), D = 2
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    lik = Gaussian(n_targets=2, beta=1.0, min_variance=0.0)
    var = params[..., 2:].exp()
    per_target = 0.5 * ((y - params[..., :2]) ** 2 / var + var.log() + math.log(2 * math.pi))
    torch.testing.assert_close(lik.training_loss(params, y), (var * per_target).sum(-1))
    homo = HomoscedasticGaussian(beta=1.0, init_variance=0.5)
    out = homo(torch.zeros(4, 1, dtype=torch.float64))
    yy = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(homo.training_loss(out, yy), (0.5 + 1e-6) * homo.nll(out, yy))


def test_bad_beta():
    for bad in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
            Gaussian(beta=bad)
    with pytest.raises(ValueError, match="beta"):
        HomoscedasticGaussian(beta=2.0)
    assert "beta=1.0" in repr(Gaussian(beta=1.0))


def test_objectives_train_on_beta_nll_and_validate_on_the_nll():
    """Every objective minimises the training loss but validates (early stopping, History) on
    the NLL."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, generator=g), torch.randn(16, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    point = bdl.Deterministic(net, Gaussian(beta=1.0))
    ensemble = bdl.DeepEnsemble(
        net, Gaussian(beta=1.0), n_members=2, seed=0, independent_data_order=False
    )
    for post, params in ((point, point.network(x)), (ensemble, ensemble.sample_outputs(x))):
        objective = post._objective()
        want_train = post.likelihood.training_loss(params, y).mean(-1)
        want_val = post.likelihood.nll(params, y).mean(-1)
        assert not torch.allclose(want_train, want_val)
        torch.testing.assert_close(objective.loss(x, y, len(x)).detach(), want_train)
        torch.testing.assert_close(objective.val_loss(x, y).detach(), want_val)

    # VI: the same draw scored by the training loss (objective) and by the NLL (validation)
    vi = bdl.MeanFieldVI(net, Gaussian(beta=1.0), training_noise="fresh")
    objective = vi._objective()

    def seeded(fn):
        vi._noise = None  # a fresh block of training noise, drawn under the seed below
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return fn().detach()

    train = seeded(lambda: objective.loss(x, y, len(x)))
    val = seeded(lambda: objective.val_loss(x, y))
    elbo = seeded(lambda: vi.negative_elbo(x, y, len(x)) / len(x))
    elbo_train = seeded(lambda: vi.negative_elbo(x, y, len(x), training_loss=True) / len(x))
    nll_train = seeded(lambda: vi._nll_and_kl(x, y)[0])
    vi.likelihood.beta = 0.0
    plain = seeded(lambda: objective.loss(x, y, len(x)))
    torch.testing.assert_close(elbo_train, train)
    torch.testing.assert_close(elbo, plain)  # negative_elbo scores the NLL by default
    torch.testing.assert_close(seeded(lambda: vi._nll_and_kl(x, y)[0]), val)
    assert not torch.allclose(nll_train, val)


class _StopOnTrainingLoss(Gaussian):
    """beta-NLL that validates on its own training loss."""

    def validation_loss(self, params, y):
        return self.training_loss(params, y)


def test_objectives_validate_on_an_overridden_validation_loss():
    """validation_loss is the hook that validation and early stopping monitor: overridden, every
    objective reports it, and the reported scores (nll) stay the NLL."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, generator=g), torch.randn(16, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    likelihood = _StopOnTrainingLoss(beta=1.0)
    point = bdl.Deterministic(net, likelihood)
    ensemble = bdl.DeepEnsemble(net, likelihood, n_members=2, seed=0)
    for post, params in ((point, point.network(x)), (ensemble, ensemble.sample_outputs(x))):
        want = post.likelihood.training_loss(params, y).mean(-1)
        assert not torch.allclose(want, post.likelihood.nll(params, y).mean(-1))
        torch.testing.assert_close(post._objective().val_loss(x, y).detach(), want)

    vi = bdl.MeanFieldVI(net, _StopOnTrainingLoss(beta=1.0), training_noise="fresh")
    objective = vi._objective()

    def seeded(fn):
        vi._noise = None
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return fn().detach()

    val = seeded(lambda: objective.val_loss(x, y))
    torch.testing.assert_close(val, seeded(lambda: vi._nll_and_kl(x, y)[0]))  # training loss
    assert not torch.allclose(val, seeded(lambda: vi._nll_and_kl(x, y, train=False)[0]))


def test_early_stopping_follows_the_validation_loss():
    """A validation loss that never improves after the first epoch stops the fit there (the
    NLL of the same fit keeps improving), for every member of an ensemble."""

    class NeverBetter(Gaussian):
        calls = 0

        def validation_loss(self, params, y):
            NeverBetter.calls += 1
            return torch.zeros_like(self.nll(params, y)) + NeverBetter.calls

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g)
    y = x @ torch.tensor([1.0, -2.0]) + 0.1 * torch.randn(64, generator=g)
    options = dict(epochs=30, batch_size=16, lr=1e-2, seed=0, patience=3, progress=False)
    for likelihood, stops in ((Gaussian(), False), (NeverBetter(), True)):
        torch.manual_seed(0)
        post = bdl.DeepEnsemble(torch.nn.Linear(2, 2), likelihood, n_members=2, seed=0)
        history = post.fit((x, y), val_data=(x, y), **options)
        assert history.stopped_early == stops
        if stops:
            assert history.epochs_run == 4 and history.member_best_epochs == [1, 1]
        else:
            assert min(history.member_best_epochs) > 20


def test_beta_nll_fit_learns_mean_and_input_dependent_noise():
    """beta = 1 trains the mean like the squared error, yet the variance still finds the noise
    level: on y = 2x + (0.1 + 0.4 |x|) eps the predicted noise grows with |x| as it should."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 1, generator=g) * 2 - 1
    sd = 0.1 + 0.4 * x[:, 0].abs()
    y = 2 * x[:, 0] + sd * torch.randn(2000, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    post = bdl.Deterministic(net, Gaussian(beta=1.0))
    post.fit((x, y), epochs=60, batch_size=100, lr=1e-2, seed=0, lr_schedule="cosine")
    pred = post.predict(torch.tensor([[-0.8], [0.0], [0.8]]))
    torch.testing.assert_close(pred.mean, torch.tensor([-1.6, 0.0, 1.6]), atol=0.04, rtol=0)
    sd = pred.aleatoric.sqrt()
    # 0.42 at |x| = 0.8; at 0 the smooth network rounds the V-shaped noise level off (0.1 -> ~0.2)
    torch.testing.assert_close(sd[[0, 2]], torch.tensor([0.42, 0.42]), atol=0.06, rtol=0)
    assert sd[1] < 0.6 * sd[[0, 2]].min()  # true ratio 0.24
