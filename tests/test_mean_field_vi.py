"""Mean-field VI: exact on conjugate linear regression, the KL and the ELBO scaling by hand,
estimators, priors, diagnostics and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import bayesdl as bdl
from bayesdl.posteriors.mean_field_vi import Estimator
from bayesdl.priors import GaussianPrior, ScaleMixturePrior, gaussian_kl

f64 = torch.float64


def test_recovers_the_exact_mean_field_optimum_of_bayesian_linear_regression():
    """With known noise and a Gaussian prior the optimum is known: means = exact posterior mean,
    variances = 1 / diagonal of the posterior precision."""
    n, d, noise, scale = 50, 3, 0.5, 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=f64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=f64) + noise * torch.randn(
        n, generator=g, dtype=f64
    )
    precision = x.T @ x / noise**2 + torch.eye(d, dtype=f64) / scale**2
    exact_mean = torch.linalg.solve(precision, x.T @ y / noise**2)
    exact_var = 1 / torch.diagonal(precision)

    likelihood = bdl.HomoscedasticGaussian(init_variance=noise**2, min_variance=0.0).double()
    likelihood.log_variance.requires_grad_(False)  # known noise
    post = bdl.MeanFieldVI(
        nn.Linear(d, 1, bias=False).double(),
        likelihood,
        prior=GaussianPrior(scale),
        init_std=0.1,
        min_std=0.0,
        n_train_samples=256,
    )
    post.fit((x, y), epochs=1500, batch_size=n, lr=0.02, lr_schedule="cosine", seed=0)
    mean_err = ((post.mu.detach() - exact_mean).abs() / exact_mean.abs()).max().item()
    var_err = ((post.sigma.detach() ** 2 - exact_var).abs() / exact_var).max().item()
    assert mean_err < 0.02, mean_err
    assert var_err < 0.02, var_err
    # after fit, the user's module holds the posterior mean
    torch.testing.assert_close(post.model.weight.detach()[0], post.mu.detach())


def test_gaussian_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(40, generator=g, dtype=f64)
    sigma = torch.rand(40, generator=g, dtype=f64) + 0.05
    for scale in (0.3, 1.0, 2.5):
        want = kl_divergence(
            Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.tensor(scale, dtype=f64))
        ).sum()
        torch.testing.assert_close(gaussian_kl(mu, sigma, scale), want)
        torch.testing.assert_close(GaussianPrior(scale).kl(mu, sigma), want)
        torch.testing.assert_close(
            GaussianPrior(scale).log_prob(mu),
            Normal(0.0, torch.tensor(scale, dtype=f64)).log_prob(mu).sum(),
        )


def test_scale_mixture_prior_log_prob_and_monte_carlo_kl():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, generator=g, dtype=f64)
    prior = ScaleMixturePrior(pi=0.3, sigma1=1.5, sigma2=0.1)
    zero = torch.zeros((), dtype=f64)  # float64 parameters: 0.1 is not exact in float32

    def normal(scale):
        return Normal(zero, torch.tensor(scale, dtype=f64))

    direct = torch.log(
        0.3 * normal(1.5).log_prob(w).exp() + 0.7 * normal(0.1).log_prob(w).exp()
    ).sum()
    torch.testing.assert_close(prior.log_prob(w), direct)
    mu, sigma = torch.zeros(30, dtype=f64), torch.full((30,), 0.5, dtype=f64)
    torch.testing.assert_close(prior.kl(mu, sigma, w), Normal(mu, sigma).log_prob(w).sum() - direct)
    # the one-sample estimate is unbiased: its mean over many draws nears the true KL
    many = mu + sigma * torch.randn(20000, 30, generator=g, dtype=f64)
    estimates = torch.stack([prior.kl(mu, sigma, row) for row in many[:2000]])
    # reference by a larger independent sample
    ref = (
        Normal(mu, sigma).log_prob(many).sum(1) - torch.stack([prior.log_prob(row) for row in many])
    ).mean()
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - ref) < 4 * se
    with pytest.raises(ValueError, match="sampled weights"):
        prior.kl(mu, sigma)


def test_training_loss_is_the_negative_elbo_divided_by_n():
    """N * loss == (N / b) * sum of the batch NLLs + KL summed over all parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    post = bdl.MeanFieldVI(net, "gaussian", prior=GaussianPrior(0.7), init_std=0.2)
    x = torch.randn(5, 2, dtype=f64)
    y = torch.randn(5, dtype=f64)
    n_data = 40
    objective = post._objective()
    loss = objective.loss(x, y, n_data)
    # the weights of that step, redrawn by hand from the noise it used
    eps = post._last_noise
    w = post.mu.detach() + post.sigma.detach() * eps
    # the flat vector holds the parameters in named_parameters() order, each flattened
    pieces = torch.split(w, [p.numel() for p in net.parameters()])
    params = {
        name: piece.reshape(p.shape)
        for (name, p), piece in zip(net.named_parameters(), pieces, strict=True)
    }
    out = torch.func.functional_call(net, params, (x,))
    nll = -Normal(out[:, 0], (out[:, 1].exp() + 1e-6).sqrt()).log_prob(y)
    kl = kl_divergence(
        Normal(post.mu.detach(), post.sigma.detach()), Normal(0.0, torch.tensor(0.7, dtype=f64))
    ).sum()
    want = (n_data / len(x)) * nll.sum() + kl
    torch.testing.assert_close(loss.detach() * n_data, want)


def test_kl_annealing_ramps_the_weight():
    post = bdl.MeanFieldVI(nn.Linear(2, 2), kl_annealing_epochs=4, kl_weight=2.0)
    seen = []
    objective = post._objective()
    for epoch in range(1, 7):
        seen.append(post._kl_factor())
        objective.end_epoch(epoch, None)
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def _toy(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    return x, y


def test_epistemic_variance_is_larger_outside_the_training_range():
    x, y = _toy()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    post = bdl.MeanFieldVI(net, "gaussian", init_std=1e-2)
    post.fit((x, y), epochs=150, batch_size=64, lr=1e-2, seed=0)
    gen = torch.Generator().manual_seed(0)
    inside = post.predict(torch.linspace(-1.5, 1.5, 31)[:, None], 200, generator=gen).epistemic
    outside = post.predict(torch.tensor([[-5.0], [-4.0], [4.0], [5.0]]), 200, generator=gen)
    assert outside.epistemic.mean() > 3 * inside.mean(), (inside.mean(), outside.epistemic)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_output_noise_estimators_match_weight_sampling_moments(estimator):
    """For one Linear layer, local reparameterisation and Flipout give pre-activations with the
    mean x mu^T + b and the variance x^2 sigma^2^T + sigma_b^2 of weight sampling."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 2).double()
    post = bdl.MeanFieldVI(layer, "gaussian", init_std=0.3, estimator=estimator)
    with torch.no_grad():
        post.log_std.uniform_(-2, 0)
    x = torch.randn(1, 4, dtype=f64).expand(2, 4).contiguous()
    outs = []

    def capture(module, inputs, output):
        outs.append(output.detach())

    handle = layer.register_forward_hook(capture)
    torch.manual_seed(1)
    for _ in range(3000):  # Flipout shares one perturbation per call: many calls
        post.negative_elbo(x, torch.zeros(2, dtype=f64), 2)
    handle.remove()
    out = torch.cat(outs)
    views = post._views(post.mu.detach())
    sig = post._views(post.sigma.detach())
    want_mean = x[0] @ views["model.weight"].T + views["model.bias"]
    want_var = (x[0] ** 2) @ (sig["model.weight"] ** 2).T + sig["model.bias"] ** 2
    n = len(out)
    torch.testing.assert_close(
        out.mean(0), want_mean, atol=4 * (want_var / n).sqrt().max().item(), rtol=0
    )
    torch.testing.assert_close(out.var(0), want_var, rtol=0.1, atol=0)


def test_estimators_train_a_conv_net_with_a_custom_layer():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.g

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, generator=g)
    y = (x.mean((1, 2)) > 0).long()
    for estimator in ("reparameterization", "local", "flipout"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), Gain(), nn.Linear(24, 2))
        post = bdl.MeanFieldVI(net, estimator=estimator, init_std=1e-2)
        assert set(post.estimators) == (
            set() if estimator == "reparameterization" else {"model.0", "model.4"}
        )
        history = post.fit((x, y), epochs=30, batch_size=16, lr=1e-2, seed=0)
        assert history.train_loss[-1] < history.train_loss[0], estimator
        pred = post.predict(x, 20)
        assert (pred.label == y).double().mean() > 0.7, estimator


def test_last_layer_only():
    x, y = _toy(100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))
    first = net[0].weight.detach().clone()
    post = bdl.MeanFieldVI(net, "gaussian", bayesian=["2"])
    assert post.bayesian_names == ("model.2.weight", "model.2.bias")
    assert post.n_bayesian == 16 * 2 + 2
    post.fit((x, y), epochs=5, batch_size=32, lr=1e-2, seed=0)
    assert not torch.equal(net[0].weight.detach(), first)  # point estimates train too
    out = post.sample_outputs(x[:3], 5)
    assert out.shape == (5, 3, 2)


def test_diagnostics_report_and_collapse_warnings():
    x, y = _toy(200)
    torch.manual_seed(0)
    post = bdl.MeanFieldVI(nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2)), "gaussian")
    post.fit((x, y), epochs=5, batch_size=50, lr=1e-2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = post.diagnostics(x)
    assert [r["name"] for r in report.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(r["snr"] > 0 and r["kl_per_parameter"] >= 0 for r in report.rows)
    assert report.total_kl == pytest.approx(float(post.kl().detach()), rel=1e-5)
    # a posterior whose stds sit at the floor
    with torch.no_grad():
        post.log_std.fill_(-60.0)
    with pytest.warns(UserWarning, match="collapse to a point"):
        post.diagnostics()
    # a posterior equal to the prior, with a network whose output ignores the input
    flat = nn.Sequential(nn.Linear(1, 2))
    prior_post = bdl.MeanFieldVI(flat, "gaussian", prior=GaussianPrior(1e-4), init_std=1e-4)
    with torch.no_grad():
        prior_post.mu.zero_()
        prior_post.log_std.fill_(math.log(1e-4))
    with pytest.warns(UserWarning, match="collapse to the prior"):
        prior_post.diagnostics(x)


def test_bad_input():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="scale must be a positive number, got -1"):
        GaussianPrior(-1.0)
    with pytest.raises(ValueError, match="sigma2 must be a positive number"):
        ScaleMixturePrior(sigma2=0.0)
    with pytest.raises(ValueError, match="pi must lie strictly between 0 and 1"):
        ScaleMixturePrior(pi=1.0)
    with pytest.raises(ValueError, match=r"'3\.weight'.*parameters are: 0\.weight"):
        bdl.MeanFieldVI(net, bayesian=["3.weight"])
    with pytest.raises(
        ValueError, match=r"cannot serve '1' \(ReLU\).*such layers here: \['0', '2'\]"
    ):
        bdl.MeanFieldVI(net, estimator={"1": "local"})
    with pytest.raises(ValueError, match="unknown estimator 'lrt'.*'local'"):
        bdl.MeanFieldVI(net, estimator="lrt")
    with pytest.raises(TypeError, match="Prior"):
        bdl.MeanFieldVI(net, prior=1.0)
    with pytest.raises(ValueError, match="init_std"):
        bdl.MeanFieldVI(net, init_std=0.0)
    with pytest.raises(ValueError, match="n_train_samples"):
        bdl.MeanFieldVI(net, n_train_samples=0)
    assert bdl.MeanFieldVI(net, estimator={"0": Estimator.FLIPOUT}).estimators == {
        "model.0": Estimator.FLIPOUT
    }


def test_fused_sampling_and_kl_gradients_equal_autograd():
    from bayesdl.posteriors.vi_estimators import SampleWithGaussianKL

    g = torch.Generator().manual_seed(3)
    mu = torch.randn(50, generator=g, dtype=f64, requires_grad=True)
    log_std = (torch.randn(50, generator=g, dtype=f64) - 1).requires_grad_(True)
    eps = torch.randn(50, generator=g, dtype=f64)
    upstream = torch.randn(50, generator=g, dtype=f64)
    w, kl = SampleWithGaussianKL.apply(mu, log_std, eps, 0.8)
    ((w * upstream).sum() + 0.3 * kl).backward()
    fused = (mu.grad.clone(), log_std.grad.clone())
    mu.grad = log_std.grad = None
    sigma = log_std.exp()
    w2 = mu + sigma * eps
    kl2 = kl_divergence(Normal(mu, sigma), Normal(0.0, torch.tensor(0.8, dtype=f64))).sum()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(kl, kl2)
    ((w2 * upstream).sum() + 0.3 * kl2).backward()
    torch.testing.assert_close(fused[0], mu.grad)
    torch.testing.assert_close(fused[1], log_std.grad)


def test_local_reparameterisation_moments_for_a_convolution():
    """Output channels equal to the output length (3 and 3), so a bias broadcast on the wrong
    axis would show."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, kernel_size=3).double()
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(9, 2).double())
    post = bdl.MeanFieldVI(net, "gaussian", init_std=0.3, estimator={"0": "local"})
    with torch.no_grad():
        post.log_std.uniform_(-2, 0)
    x = torch.randn(1, 2, 5, dtype=f64).expand(20000, 2, 5).contiguous()
    outs = []
    handle = conv.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    post.negative_elbo(x, torch.zeros(20000, dtype=f64), 20000)
    handle.remove()
    out = outs[0]
    mean, sig = post._views(post.mu.detach()), post._views(post.sigma.detach())
    f = torch.nn.functional.conv1d
    want_mean = f(x[:1], mean["model.0.weight"], mean["model.0.bias"])[0]
    want_var = f(x[:1] ** 2, sig["model.0.weight"] ** 2, sig["model.0.bias"] ** 2)[0]
    se = (want_var / len(out)).sqrt()
    assert ((out.mean(0) - want_mean).abs() < 5 * se).all()
    torch.testing.assert_close(out.var(0), want_var, rtol=0.05, atol=0)


def _multi_output_blr(n=200, d=100, k=100, noise=0.5, scale=1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=f64)
    y = x @ torch.randn(d, k, generator=g, dtype=f64) + noise * torch.randn(
        n, k, generator=g, dtype=f64
    )
    precision = x.T @ x / noise**2 + torch.eye(d, dtype=f64) / scale**2
    exact_mean = torch.linalg.solve(precision, x.T @ y / noise**2).T  # (k, d), as Linear.weight
    exact_var = (1 / torch.diagonal(precision)).expand(k, d)
    return x, y, exact_mean, exact_var


def test_pooled_training_noise_reaches_the_optimum_as_well_as_fresh_noise():
    """Multi-output Bayesian linear regression with P = 10,000 weights (above the size where
    pooling starts): the same training with pooled and with fresh noise lands as close to the
    closed-form mean-field optimum (errors in posterior std units, and relative variance)."""
    from bayesdl.posteriors import mean_field_vi as mfv

    x, y, exact_mean, exact_var = _multi_output_blr()
    k, d = exact_mean.shape
    errors = {}
    for mode in ("pooled", "fresh"):
        likelihood = bdl.HomoscedasticGaussian(
            n_targets=k, init_variance=0.25, min_variance=0.0
        ).double()
        likelihood.log_variance.requires_grad_(False)  # known noise
        torch.manual_seed(1)
        post = bdl.MeanFieldVI(
            nn.Linear(d, k, bias=False).double(),
            likelihood,
            init_std=0.1,
            n_train_samples=2,
            training_noise=mode,
        )
        assert post.n_bayesian * mfv.POOL_STEPS > mfv.POOL_FRESH_BELOW  # really pooled
        post.fit((x, y), epochs=2000, batch_size=len(x), lr=0.02, lr_schedule="cosine", seed=0)
        mu, var = post.mu.detach().view(k, d), post.sigma.detach().view(k, d) ** 2
        errors[mode] = (
            ((mu - exact_mean).abs() / exact_var.sqrt()).max().item(),
            ((var - exact_var).abs() / exact_var).mean().item(),
        )
    (z_pool, v_pool), (z_fresh, v_fresh) = errors["pooled"], errors["fresh"]
    assert z_pool < 0.3 and v_pool < 0.08, errors  # measured 0.22 and 0.059
    assert z_pool < 1.3 * z_fresh and v_pool < 1.1 * v_fresh + 0.005, errors


def test_pooled_noise_windows_are_standard_normal_and_reproducible():
    from bayesdl.posteriors import mean_field_vi as mfv

    net = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    post = bdl.MeanFieldVI(net, "categorical")
    p = post.n_bayesian
    assert p * mfv.POOL_STEPS > mfv.POOL_FRESH_BELOW

    def windows():
        torch.manual_seed(5)
        post._objective()
        return torch.stack([post._next_noise().clone() for _ in range(mfv.POOL_STEPS)])

    first = windows()
    torch.testing.assert_close(first, windows())  # the seed fixes the sequence
    pool = post._noise
    assert len(pool) >= mfv.POOL_FACTOR * p
    # every window is a slice of the pool, and each is a standard normal vector
    for w in first[:5]:
        starts = (pool[: len(pool) - p + 1] == w[0]).nonzero().flatten().tolist()
        assert any(torch.equal(pool[i : i + p], w) for i in starts)
    se = 1 / math.sqrt(p)
    assert first.mean(1).abs().max() < 5 * se
    assert (first.var(1) - 1).abs().max() < 5 * math.sqrt(2) * se
    # after POOL_STEPS windows a new pool is drawn
    post._next_noise()
    assert post._noise is not pool
    with pytest.raises(ValueError, match="training_noise"):
        bdl.MeanFieldVI(net, training_noise="recycled")


def test_fit_workspace_gives_the_gradients_of_the_plain_path():
    """The allocation-free training function: same loss and gradients as the plain fused one,
    accumulation when gradients are not zeroed, and an error when its buffers are reused while
    an older graph still needs them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    post = bdl.MeanFieldVI(net, "gaussian", init_std=0.3)
    x, y = torch.randn(6, 3, dtype=f64), torch.randn(6, dtype=f64)
    objective = post._objective()
    assert post._workspace is not None
    eps = torch.randn(post.n_bayesian, dtype=f64)
    post._next_noise = lambda: eps
    loss = objective.loss(x, y, 30)
    loss.backward()
    got = (post.mu.grad.clone(), post.log_std.grad.clone())
    loss_again = objective.loss(x, y, 30)
    loss_again.backward()  # not zeroed: accumulates
    torch.testing.assert_close(post.mu.grad, 2 * got[0])
    torch.testing.assert_close(post.log_std.grad, 2 * got[1])

    post.mu.grad = post.log_std.grad = None
    workspace, post._workspace = post._workspace, None  # the plain fused path
    plain = objective.loss(x, y, 30)
    plain.backward()
    torch.testing.assert_close(plain, loss)
    torch.testing.assert_close(post.mu.grad, got[0])
    torch.testing.assert_close(post.log_std.grad, got[1])

    post._workspace = workspace
    older = objective.loss(x, y, 30)
    objective.loss(x, y, 30)  # overwrites the buffers the older graph saved
    with pytest.raises(RuntimeError, match="modified inplace|modified by an inplace"):
        older.backward()


def test_output_noise_layers_draw_no_weight_noise_with_a_closed_form_kl():
    """With local reparameterisation and a Gaussian prior, the Linear layers get output noise and
    only the other Bayesian layers (here a LayerNorm) draw weight noise; both kinds still get
    gradients for their standard deviations from the likelihood term."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))
    post = bdl.MeanFieldVI(net, "gaussian", estimator="local", kl_weight=0.0, init_std=0.1)

    def no_full_draw():
        raise AssertionError("a full weight draw was made")

    post._next_noise = no_full_draw
    x, y = torch.randn(16, 3), torch.randn(16)
    objective = post._objective()
    objective.loss(x, y, 16).backward()
    grads = post._views(post.log_std.grad)
    for name in ("0.weight", "1.weight", "1.bias", "3.weight"):
        assert grads[f"model.{name}"].abs().sum() > 0, name
    # with a Monte Carlo KL (scale-mixture prior) every parameter needs a weight sample
    mixture = bdl.MeanFieldVI(net, "gaussian", estimator="local", prior=ScaleMixturePrior())
    mixture._objective().loss(x, y, 16)
    assert mixture._last_noise is not None and len(mixture._last_noise) == mixture.n_bayesian


# ----------------------------------------------------------------- prediction noise
def _spread_vi(model: nn.Module, **options) -> bdl.MeanFieldVI:
    """A mean-field posterior with standard deviations spread over [0.05, 0.6]."""
    post = bdl.MeanFieldVI(model, "categorical", **options)
    with torch.no_grad():
        post.log_std.uniform_(
            math.log(0.05), math.log(0.6), generator=torch.Generator().manual_seed(3)
        )
    return post


def test_local_prediction_noise_has_the_closed_form_distribution_of_a_linear_layer():
    """One Linear layer: every row's outputs are N(x mu^T + mu_b, x^2 (sigma^2)^T + sigma_b^2),
    units independent (Kolmogorov-Smirnov against the closed form, and the moments)."""
    from scipy import stats

    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    post = _spread_vi(layer)
    assert post._local_layers(torch.zeros(2, 5, dtype=f64)) == (("model.weight", "model.bias"),)
    x = torch.randn(4, 5, dtype=f64)
    n = 20_000
    out = post.sample_outputs(x, n, generator=torch.Generator().manual_seed(1))
    mu, sig = post._views(post.mu.detach()), post._views(post.sigma.detach())
    mean = x @ mu["model.weight"].T + mu["model.bias"]
    var = x.square() @ sig["model.weight"].square().T + sig["model.bias"].square()
    z = (out - mean) / var.sqrt()
    assert z.mean(0).abs().max() < 4 / math.sqrt(n)
    torch.testing.assert_close(z.var(0), torch.ones_like(var), rtol=0, atol=0.05)
    p_values = [stats.kstest(z[:, b, k].numpy(), "norm").pvalue for b in range(4) for k in range(3)]
    assert min(p_values) > 1e-3 / 12  # Bonferroni over the 12 outputs
    corr = torch.corrcoef(z.reshape(n, -1).T)
    off = corr - torch.eye(12, dtype=f64)
    assert off.abs().max() < 5 / math.sqrt(n)  # units and rows independent


def test_local_and_weight_draws_give_each_row_the_same_predictive_distribution():
    """A tanh MLP: the local reparameterisation trick in its first layer leaves every row's
    output distribution that of whole weight draws (means and standard deviations of the
    outputs within Monte Carlo error, two-sample Kolmogorov-Smirnov)."""
    from scipy import stats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    local = _spread_vi(net)
    weights = _spread_vi(net, prediction_noise="weights")
    torch.testing.assert_close(local.log_std, weights.log_std)
    x = torch.randn(4, 3, dtype=f64)
    n = 30_000
    a = local.sample_outputs(x, n, generator=torch.Generator().manual_seed(1))
    b = weights.sample_outputs(x, n, generator=torch.Generator().manual_seed(2))
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() / se).max() < 4.5
    torch.testing.assert_close(a.std(0) / b.std(0), torch.ones(4, 2, dtype=f64), rtol=0, atol=0.04)
    p_values = [
        stats.ks_2samp(a[:, i, k].numpy(), b[:, i, k].numpy()).pvalue
        for i in range(4)
        for k in range(2)
    ]
    assert min(p_values) > 1e-3 / 8


def test_local_draws_are_reproducible_and_independent_across_rows():
    """Same generator state, same draws; two copies of one row share a whole weight draw but
    get independent first-layer noise under the local trick."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    local = _spread_vi(net)
    weights = _spread_vi(net, prediction_noise="weights")
    x = torch.randn(1, 3, dtype=f64).expand(2, 3)

    def draw(post, seed):
        return post.sample_outputs(x, 50, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(local, 0), draw(local, 0), rtol=0, atol=0)
    assert not torch.equal(draw(local, 0), draw(local, 1))
    same = draw(weights, 0)
    torch.testing.assert_close(same[:, 0], same[:, 1])  # up to rounding
    apart = draw(local, 0)
    assert (apart[:, 0] - apart[:, 1]).abs().min() > 0


class _TwoHeads(nn.Module):
    """Two linear layers on the input and a sum (a tensor method): the stacked fast path is
    left, so prediction keeps whole weight draws."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + torch.relu(self.b(x)))


class _Reused(nn.Module):
    """One Linear applied to the input and again to its own output: not local."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Squashed(nn.Module):
    """The input goes through tanh first: no layer sees the shared input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(torch.tanh(x))


@pytest.mark.parametrize(
    ("make", "want"),
    [
        (_TwoHeads, ()),
        (_Reused, ()),
        (_Squashed, ()),
        (
            lambda: nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh()),
            (("model.0.weight", None),),
        ),
    ],
)
def test_local_layers_are_the_linear_layers_that_take_the_input_alone(make, want):
    """Which layers the trick serves, and that predictions keep every row's distribution
    (output means and spreads against whole weight draws)."""
    torch.manual_seed(0)
    net = make().double()
    local = _spread_vi(net)
    x = torch.randn(3, 3, dtype=f64)
    assert local._local_layers(x) == want
    weights = _spread_vi(net, prediction_noise="weights")
    n = 20_000
    a = local.sample_outputs(x, n, generator=torch.Generator().manual_seed(1))
    b = weights.sample_outputs(x, n, generator=torch.Generator().manual_seed(2))
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() / se).max() < 4.5
    torch.testing.assert_close(a.std(0), b.std(0), rtol=0.05, atol=1e-12)


def test_local_layers_with_a_point_bias_and_middle_dimensions():
    """A Bayesian weight with a point-estimate bias, applied to inputs (B, T, in): the bias
    enters the mean only, and every position gets its own noise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    post = bdl.MeanFieldVI(net.double(), "categorical", bayesian=["0.weight"], init_std=0.4)
    x = torch.randn(2, 5, 3, dtype=f64)
    assert post._local_layers(x) == (("model.0.weight", "model.0.bias"),)
    n = 20_000
    out = post.sample_outputs(x, n, generator=torch.Generator().manual_seed(0))
    assert out.shape == (n, 2, 5, 2)
    mean = net(x).detach()
    var = x.square() @ torch.full((3, 2), 0.16, dtype=f64)
    z = (out - mean) / var.sqrt()
    assert z.mean(0).abs().max() < 4.5 / math.sqrt(n)
    torch.testing.assert_close(z.var(0), torch.ones_like(var), rtol=0, atol=0.06)


def test_prediction_noise_is_an_option_that_round_trips(tmp_path):
    post = bdl.MeanFieldVI(nn.Linear(2, 2), "categorical", prediction_noise="weights")
    assert post.options()["prediction_noise"] == "weights"
    path = tmp_path / "vi.bdl"
    bdl.save(post, path)
    assert bdl.load(path, nn.Linear(2, 2)).prediction_noise.value == "weights"
    with pytest.raises(ValueError, match="prediction_noise"):
        bdl.MeanFieldVI(nn.Linear(2, 2), "categorical", prediction_noise="rows")


def test_local_draws_with_a_likelihood_that_has_tensors_of_its_own():
    """The homoscedastic Gaussian's noise variance does not keep the network off the stacked
    fast path: the first layer is local, and each row's outputs match whole weight draws."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def post(noise):
        likelihood = bdl.HomoscedasticGaussian(init_variance=0.3).double()
        vi = bdl.MeanFieldVI(net, likelihood, init_std=0.3, prediction_noise=noise)
        with torch.no_grad():
            vi.log_std.uniform_(-2.5, -0.5, generator=torch.Generator().manual_seed(3))
        return vi

    local, weights = post("local"), post("weights")
    x = torch.randn(4, 3, dtype=f64)
    assert local._local_layers(x) == (("model.0.weight", "model.0.bias"),)
    n = 20_000
    a = local.sample_outputs(x, n, generator=torch.Generator().manual_seed(1))
    b = weights.sample_outputs(x, n, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a[..., 1], torch.full_like(a[..., 1], math.log(0.3)))
    se = (a[..., 0].var(0) / n + b[..., 0].var(0) / n).sqrt()
    assert ((a[..., 0].mean(0) - b[..., 0].mean(0)).abs() / se).max() < 4.5
    torch.testing.assert_close(
        a[..., 0].std(0) / b[..., 0].std(0), torch.ones(4, dtype=f64), rtol=0, atol=0.04
    )


def test_joint_draws_hold_in_their_block_and_thread_only():
    """``joint_draws`` gives whole weight draws inside its block, in the thread that opened it,
    without changing the posterior's option."""
    import threading

    from bayesdl.posteriors.stacked import joint_draws

    torch.manual_seed(0)
    post = _spread_vi(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double())
    x = torch.randn(1, 3, dtype=f64).expand(2, 3)

    def rows_equal() -> bool:
        out = post.sample_outputs(x, 20)
        return torch.allclose(out[:, 0], out[:, 1])

    seen = []
    with joint_draws(post):
        assert rows_equal() and post.prediction_noise.value == "local"
        worker = threading.Thread(target=lambda: seen.append(rows_equal()))
        worker.start()
        worker.join()
    assert seen == [False]  # the other thread drew locally
    assert not rows_equal()  # and so does this one after the block


def test_calls_with_too_many_rows_for_the_noise_budget_draw_whole_weights(monkeypatch):
    """Per-row noise grows with the rows: above ``LOCAL_NOISE_BUDGET`` normals per draw a call
    draws whole weight sets (rows share them) instead; MultiSWAG counts its members."""
    from bayesdl.posteriors import stacked

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    post = _spread_vi(net)
    monkeypatch.setattr(stacked, "LOCAL_NOISE_BUDGET", 4 * 10)  # 10 rows of 4 units
    assert post._local_layers(torch.zeros(10, 3, dtype=f64))
    x = torch.randn(1, 3, dtype=f64).expand(11, 3)
    assert post._local_layers(x) == ()
    out = post.sample_outputs(x, 5)
    torch.testing.assert_close(out[:, 0], out[:, 10])  # whole draws: equal rows, equal outputs
    swag = bdl.SWAG(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), n_members=2)
    assert swag._local_layers(torch.zeros(5, 3)) and swag._local_layers(torch.zeros(6, 3)) == ()
