"""Laplace: exactness against closed forms in float64, curvature against autograd, predictives
against each other, prior precision, state, and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from torch import nn
from torch.func import functional_call, jacrev

import bayesdl as bdl
from bayesdl.posteriors.laplace import RegressionMoments
from bayesdl.posteriors.laplace.curvature import gram

f64 = torch.float64
STRUCTURES = ["diag", "kron", "full"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(n_in=3, n_out=3, hidden=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()


def _data(likelihood: str, n=40, n_in=3, seed=0):
    g = _gen(seed)
    x = torch.randn(n, n_in, generator=g, dtype=f64)
    if likelihood == "categorical":
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    return x, x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=f64)


N_OUT = {"categorical": 3, "gaussian": 2, "homoscedastic_gaussian": 1}
LIKELIHOODS = list(N_OUT)


def _laplace(likelihood="categorical", model=None, **options) -> bdl.Laplace:
    model = _mlp(n_out=N_OUT[likelihood]) if model is None else model
    options.setdefault("prior_fit", "none")
    return bdl.Laplace(model, likelihood, **options)


def _fitted(likelihood="categorical", model=None, n=40, **options) -> bdl.Laplace:
    post = _laplace(likelihood, model, **options)
    post.fit(_data(likelihood, n))
    return post


def _public_jacobian(post: bdl.Laplace, x: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians of the raw outputs, ``(B, K, P)``, in public parameter order."""
    model = post.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = post.parameter_names

    def f(sub):
        return functional_call(model, {**params, **sub}, (x,))

    jac = jacrev(f)({n: params[n] for n in names})
    return torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in names], dim=-1)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    ("subset", "hessian"),
    [("all", "full"), ("last_layer", "full"), ("last_layer", "kron"), ("all", "kron")],
)
def test_bayesian_linear_regression_is_exact(subset, hessian):
    g = _gen(0)
    n, d, noise, lam = 30, 3, 0.3**2, 2.0
    x = torch.randn(n, d, generator=g, dtype=f64)
    y = (
        x @ torch.tensor([1.0, -2.0, 0.5], dtype=f64)
        + 0.7
        + 0.3 * torch.randn(n, generator=g, dtype=f64)
    )
    xa = torch.cat([x, torch.ones(n, 1, dtype=f64)], dim=1)  # weights then bias: public order
    precision = xa.T @ xa / noise + lam * torch.eye(d + 1, dtype=f64)
    cov = torch.linalg.inv(precision)
    mean = cov @ xa.T @ y / noise
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(mean[:d].view(1, d))
        model.bias.copy_(mean[d:])
    likelihood = bdl.HomoscedasticGaussian(init_variance=noise, min_variance=0.0)
    post = bdl.Laplace(
        model, likelihood, subset=subset, hessian=hessian, prior_precision=lam, prior_fit="none"
    )
    with torch.no_grad():  # the likelihood was built in float32: set the noise in float64
        post.likelihood.log_variance.fill_(math.log(noise))
    assert post.fit((x, y)).epochs_run == 0
    torch.testing.assert_close(post.posterior_mean(), mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(post.posterior_covariance(), cov, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(post.posterior_precision(), precision, rtol=1e-10, atol=1e-10)
    evidence = stats.multivariate_normal.logpdf(
        y.numpy(), np.zeros(n), noise * np.eye(n) + (xa @ xa.T).numpy() / lam
    )
    assert float(post.log_marginal_likelihood()) == pytest.approx(evidence, rel=1e-12)
    # the linearised predictive of a linear model is its exact posterior predictive
    xt = torch.randn(4, d, generator=g, dtype=f64)
    xta = torch.cat([xt, torch.ones(4, 1, dtype=f64)], dim=1)
    moments = post.predictive_moments(xt)
    assert isinstance(moments, RegressionMoments)
    torch.testing.assert_close(moments.mean, xta @ mean)
    torch.testing.assert_close(moments.epistemic, ((xta @ cov) * xta).sum(1))
    torch.testing.assert_close(moments.aleatoric, torch.full((4,), noise, dtype=f64))
    want = stats.norm.logpdf(y[:4].numpy(), (xta @ mean).numpy(), moments.std.numpy())
    np.testing.assert_allclose(moments.log_prob(y[:4]).numpy(), want, rtol=1e-12)


def test_marglik_prior_precision_is_the_maximiser():
    post = _fitted("categorical", hessian="kron", prior_fit="marglik")
    best = post.prior_precision
    res = optimize.minimize_scalar(
        lambda t: -float(post.log_marginal_likelihood(math.exp(t))),
        bounds=(math.log(1e-4), math.log(1e4)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert math.log(best) == pytest.approx(res.x, abs=1e-4)
    # MacKay's fixed point: effective number of parameters = lambda ||theta||^2
    e = torch.linalg.eigvalsh(post.hessian_matrix())
    theta = post.posterior_mean()
    gamma = float((e / (e + best)).sum())
    assert gamma == pytest.approx(best * float(theta @ theta), rel=1e-9)


# ----------------------------------------------------------------------------- curvature
def _logistic(d=3, c=3, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def _autograd_hessian(model: nn.Linear, x, y, likelihood) -> torch.Tensor:
    """Hessian of the summed NLL in (weight, bias), flattened in that order."""
    c, d = model.weight.shape

    def loss(flat):
        w, b = flat[: c * d].view(c, d), flat[c * d :]
        return likelihood.nll(likelihood(x @ w.T + b), y).sum()

    flat = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_ggn_of_logistic_regression_equals_its_hessian(subset):
    x, y = _data("categorical", n=25)
    model = _logistic()
    post = _fitted("categorical", model, n=25, subset=subset, hessian="full")
    want = _autograd_hessian(model, x, y, post.likelihood)
    torch.testing.assert_close(post.hessian_matrix(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kron_equals_the_hessian_for_one_example(subset):
    x, y = _data("categorical", n=1)
    model = _logistic()
    post = _laplace("categorical", model, subset=subset, hessian="kron")
    post.fit((x, y))
    want = _autograd_hessian(model, x, y, post.likelihood)
    torch.testing.assert_close(post.hessian_matrix(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kron_equals_the_full_ggn_blocks_for_one_example(likelihood):
    data = tuple(t[:1] for t in _data(likelihood))
    kron, full = (_laplace(likelihood, subset="all", hessian=h) for h in ("kron", "full"))
    kron.fit(data)
    full.fit(data)
    h_kron, h_full = kron.hessian_matrix(), full.hessian_matrix()
    # parameters are (0.weight, 0.bias, 2.weight, 2.bias): two layer blocks, zero in between
    first = 3 * 5 + 5
    for block in (slice(0, first), slice(first, None)):
        torch.testing.assert_close(
            h_kron[block, block], h_full[block, block], atol=1e-12, rtol=1e-10
        )
    assert (h_kron[:first, first:] == 0).all()
    assert h_full[:first, first:].abs().max() > 1e-6  # KFAC drops the cross-layer terms


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_diag_is_the_diagonal_of_full(likelihood, subset):
    diag, full = (_fitted(likelihood, subset=subset, hessian=h) for h in ("diag", "full"))
    torch.testing.assert_close(diag.hessian_matrix(), torch.diag(full.hessian_matrix().diag()))


def test_last_layer_kron_is_exact_for_a_homoscedastic_gaussian():
    # KFAC of the output layer is exact when Lambda_n is the same for every example
    kron, full = (
        _fitted("homoscedastic_gaussian", subset="last_layer", hessian=h) for h in ("kron", "full")
    )
    torch.testing.assert_close(kron.hessian_matrix(), full.hessian_matrix())


def test_heteroscedastic_ggn_is_the_expected_hessian():
    """For a linear mean/log-variance model the GGN is the Fisher: the Hessian of the NLL in the
    weights averaged over y ~ N(m, v); the NLL's Hessian is quadratic in (y - m), so the two
    points m +- sqrt(v) average it exactly."""
    x = _data("gaussian", n=6)[0]
    model = nn.Linear(3, 2).double()
    post = _fitted("gaussian", model, n=6, subset="all", hessian="full")
    with torch.no_grad():
        mean, var = post.likelihood.mean_variance(model(x))
    want = sum(_autograd_hessian(model, x, mean + s * var.sqrt(), post.likelihood) for s in (-1, 1))
    torch.testing.assert_close(post.hessian_matrix(), want / 2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("hessian", STRUCTURES)
def test_last_layer_closed_forms_equal_the_generic_paths(likelihood, hessian):
    closed = _fitted(likelihood, subset="last_layer", hessian=hessian)
    generic = _fitted(likelihood, subset=["2"], hessian=hessian)  # the same layer, by name
    assert closed.parameter_names == generic.parameter_names == ("2.weight", "2.bias")
    torch.testing.assert_close(closed.hessian_matrix(), generic.hessian_matrix())
    torch.testing.assert_close(closed.log_marginal_likelihood(), generic.log_marginal_likelihood())
    x = _data(likelihood, n=7, seed=5)[0]
    for a, b in zip(
        closed.functional_distribution(x), generic.functional_distribution(x), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("hessian", STRUCTURES)
def test_functional_covariance_is_j_sigma_jt(subset, hessian):
    post = _fitted("gaussian", subset=subset, hessian=hessian, prior_precision=0.7)
    x = _data("gaussian", n=6, seed=3)[0]
    f, cov = post.functional_distribution(x)
    jac = _public_jacobian(post, x)
    torch.testing.assert_close(f, post.model(x).detach())
    want = jac @ post.posterior_covariance() @ jac.transpose(1, 2)
    torch.testing.assert_close(cov, want)


@pytest.mark.parametrize("width", [7, 300, 301])
def test_gram_by_blocks(width):
    a = torch.randn(40, width, generator=_gen(0), dtype=f64)
    torch.testing.assert_close(gram(a), a.T @ a, rtol=1e-12, atol=1e-12)


def test_dataloader_gives_the_same_curvature_as_tensors():
    x, y = _data("categorical", n=50)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    for subset, hessian in [("last_layer", "kron"), ("all", "kron"), ("all", "diag")]:
        a = _laplace(subset=subset, hessian=hessian)
        b = copy.deepcopy(a)
        a.fit((x, y))
        b.fit(loader)
        torch.testing.assert_close(a.hessian_matrix(), b.hessian_matrix())
        torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood())
        assert b.input_shape == (3,)


# ----------------------------------------------------------------------------- predictives
def _empirical(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = draws.mean(0)
    centred = draws - mean
    return mean, torch.einsum("sbk,sbl->bkl", centred, centred) / (len(draws) - 1)


def _assert_within_mc_error(draws, mean, cov, z=5.0):
    """Sample mean and covariance of ``draws (S, B, K)`` match ``mean``/``cov`` within ``z``
    Monte Carlo standard errors (Gaussian draws: Var of s_kl is (c_kk c_ll + c_kl^2) / S)."""
    s = len(draws)
    m, c = _empirical(draws)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    assert ((m - mean).abs() <= z * (var / s).sqrt() + 1e-12).all()
    se = ((var.unsqueeze(2) * var.unsqueeze(1) + cov**2) / s).sqrt()
    assert ((c - cov).abs() <= z * se + 1e-12).all()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("hessian", STRUCTURES)
def test_glm_draws_follow_the_functional_gaussian(subset, hessian):
    post = _fitted("categorical", subset=subset, hessian=hessian, prior_precision=0.5)
    x = _data("categorical", n=4, seed=2)[0]
    draws = post.sample_outputs(x, 4000, generator=_gen(0))
    _assert_within_mc_error(draws, *post.functional_distribution(x))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("hessian", STRUCTURES)
def test_weight_space_draws_of_a_linear_model_match_the_glm(subset, hessian):
    """A model linear in its weights is its own linearisation: weight-space Monte Carlo (run
    through the network by StackedModule, or through the features for the last layer) has the
    GLM's function-space distribution."""
    post = _fitted(
        "categorical",
        _logistic(),
        subset=subset,
        hessian=hessian,
        predictive="mc",
        prior_precision=0.5,
    )
    x = _data("categorical", n=4, seed=2)[0]
    draws = post.sample_outputs(x, 4000, generator=_gen(1))
    _assert_within_mc_error(draws, *post.functional_distribution(x))


def test_mc_predictive_of_all_weights_runs_the_network():
    post = _fitted("categorical", subset="all", hessian="diag", predictive="mc")
    x = _data("categorical", n=5, seed=2)[0]
    draws = post.sample_outputs(x, 3, generator=_gen(0))
    assert draws.shape == (3, 5, 3)
    # each draw is the network under one weight set: a zero-variance posterior gives f(x)
    post.prior_precision = 1e30
    torch.testing.assert_close(post.sample_outputs(x, 2)[0], post.model(x).detach())


def test_probit_agrees_with_monte_carlo():
    """Probit vs the Monte Carlo GLM predictive on a small problem, within Monte Carlo error
    plus the probit approximation's own error (a few 1e-3 at these variances; the draws are
    exact for the linearised model)."""
    post = _fitted("categorical", n=60, subset="last_layer", hessian="full", prior_precision=2.0)
    x = _data("categorical", n=8, seed=4)[0]
    s = 40_000
    mc = post.predict(x, s, generator=_gen(0))
    probs = post.predictive_probs(x)
    draws = torch.softmax(post.sample_outputs(x, s, generator=_gen(0)), -1)
    se = draws.std(0) / math.sqrt(s)
    gap = (probs - mc.probs).abs()
    assert (gap <= 4 * se + 0.01).all(), (gap.max(), se.max())
    # the check has teeth: the plug-in softmax(f(x)), which ignores the variance, fails it
    f, _ = post.functional_distribution(x)
    assert ((torch.softmax(f, -1) - mc.probs).abs() > 4 * se + 0.01).any()
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=f64))
    # and it is not trivially close: the epistemic part is clearly present
    assert (mc.epistemic > 1e-3).all()


@pytest.mark.parametrize("likelihood", ["gaussian", "homoscedastic_gaussian"])
def test_regression_closed_form_matches_the_draws(likelihood):
    post = _fitted(likelihood, subset="all", hessian="kron", prior_precision=1.0)
    x = _data(likelihood, n=6, seed=7)[0]
    moments = post.predictive_moments(x)
    f, cov = post.functional_distribution(x)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    torch.testing.assert_close(moments.epistemic, var[:, 0])
    if likelihood == "gaussian":  # aleatoric: log-normal mean of the predicted variance
        want = (f[:, 1] + var[:, 1] / 2).exp() + post.likelihood.min_variance
        torch.testing.assert_close(moments.aleatoric, want)
    s = 40_000
    pred = post.predict(x, s, generator=_gen(3))
    assert isinstance(pred, bdl.RegressionPrediction)
    mean_se = (moments.epistemic / s).sqrt()
    assert ((pred.mean - moments.mean).abs() <= 5 * mean_se).all()
    torch.testing.assert_close(pred.epistemic, moments.epistemic, rtol=0.05, atol=0)
    torch.testing.assert_close(pred.aleatoric, moments.aleatoric, rtol=0.05, atol=0)
    torch.testing.assert_close(pred.total, moments.total, rtol=0.05, atol=0)


def test_heteroscedastic_parts_come_out_separately():
    """Aleatoric from the predicted log-variance, epistemic from the weight uncertainty: a
    vaguer prior raises only the epistemic part (at fixed outputs)."""
    post = _fitted("gaussian", subset="last_layer", hessian="kron", prior_precision=100.0)
    x = _data("gaussian", n=5, seed=8)[0]
    tight = post.predictive_moments(x)
    post.prior_precision = 0.01
    vague = post.predictive_moments(x)
    torch.testing.assert_close(vague.mean, tight.mean)
    assert (vague.epistemic > 2 * tight.epistemic).all()
    assert (vague.aleatoric >= tight.aleatoric).all()  # E[exp(s)] grows with Var[s] only


# ----------------------------------------------------------------------------- prior, state
def test_validation_grid_picks_the_best_prior():
    x, y = _data("categorical", n=60)
    val = _data("categorical", n=30, seed=9)
    grid = (0.01, 0.1, 1.0, 10.0, 100.0)
    post = _laplace(prior_fit="validation", prior_grid=grid)
    post.fit((x, y), val_data=val)
    nll = post.validation_nll(*val, grid)
    assert post.prior_precision == grid[int(nll.argmin())]
    post.prior_precision = 3.0
    want = -torch.log(post.predictive_probs(val[0]).gather(1, val[1][:, None])).mean()
    assert float(post.validation_nll(*val, [3.0])[0]) == pytest.approx(float(want), rel=1e-12)


def test_fit_is_post_hoc_unless_asked_to_train():
    x, y = _data("categorical", n=40)
    post = _laplace()
    before = [p.clone() for p in post.model.parameters()]
    history = post.fit((x, y))
    assert history.epochs_run == 0
    assert all(torch.equal(a, b) for a, b in zip(before, post.model.parameters(), strict=True))
    history = post.fit((x, y), epochs=2, batch_size=16, seed=0)  # MAP first, then the curvature
    assert history.epochs_run == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, post.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("subset", "hessian"),
    [("last_layer", "kron"), ("all", "full"), ("all", "kron"), ("last_layer", "diag")],
)
def test_state_round_trip(subset, hessian):
    post = _fitted("categorical", subset=subset, hessian=hessian, prior_fit="marglik")
    fresh = _laplace(model=_mlp(seed=1), subset=subset, hessian=hessian)
    fresh.load_state_dict(post.state_dict())
    assert fresh.prior_precision == post.prior_precision
    x = _data("categorical", n=5, seed=1)[0]
    want = post.sample_outputs(x, 7, generator=_gen(2))
    torch.testing.assert_close(fresh.sample_outputs(x, 7, generator=_gen(2)), want, rtol=0, atol=0)
    other = "diag" if hessian != "diag" else "full"
    with pytest.raises(ValueError, match=f"does not fit.*hessian='{other}'"):
        _laplace(subset=subset, hessian=other).load_state_dict(post.state_dict())


# ----------------------------------------------------------------------------- bad input
def test_predicting_or_scoring_before_fit_is_refused():
    post = _laplace()
    x = _data("categorical", n=3)[0]
    for call in (
        lambda: post.predict(x),
        lambda: post.sample_outputs(x, 2),
        lambda: post.predictive_probs(x),
        lambda: post.log_marginal_likelihood(),
        lambda: post.optimize_prior_precision(),
        lambda: post.posterior_covariance(),
    ):
        with pytest.raises(ValueError, match=r"not been fitted.*fit\(\(x_train, y_train\)\)"):
            call()


def test_fit_needs_training_data():
    post = _laplace()
    with pytest.raises(ValueError, match="needs the training data"):
        post.fit(None)
    with pytest.raises(TypeError, match=r"pair \(x, y\)"):
        post.fit(_data("categorical")[0])
    with pytest.raises(ValueError, match="trains only when epochs is given.*'lr'"):
        post.fit(_data("categorical"), lr=0.1)
    with pytest.raises(ValueError, match="val_data=.*to fit"):
        _laplace(prior_fit="validation").fit(_data("categorical"))
    with pytest.raises(ValueError, match="val_data is used only"):
        post.fit(_data("categorical"), val_data=_data("categorical", n=5))
    x, y = _data("categorical")
    with pytest.raises(ValueError, match="empty"):
        post.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0])))


def test_subset_that_names_no_parameter():
    model = _mlp()
    with pytest.raises(ValueError, match=r"'3\.weight' names no parameter.*0\.bias"):
        bdl.Laplace(model, subset=["3.weight"])
    with pytest.raises(ValueError, match="names no parameter"):
        bdl.Laplace(model, subset=[])
    with pytest.raises(ValueError, match="module without trainable parameters"):
        bdl.Laplace(model, subset=["1"])  # the Tanh
    with pytest.raises(ValueError, match=r"unknown subset 'lastlayer'.*'last_layer'"):
        bdl.Laplace(model, subset="lastlayer")
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bdl.Laplace(frozen, subset="all")


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _conv_net(head=True):
    layers = [nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), _Flatten(), nn.Linear(2 * 4, 3)]
    return nn.Sequential(*(layers if head else layers[:2])).double()


def test_hessian_structure_the_model_cannot_use():
    with pytest.raises(ValueError, match=r"kron.*'0' \(Conv1d\), '1' \(BatchNorm1d\)"):
        bdl.Laplace(_conv_net(), subset="all", hessian="kron")
    with pytest.raises(ValueError, match=r"output layer to be an nn.Linear.*'1' \(BatchNorm1d\)"):
        bdl.Laplace(_conv_net(head=False))
    with pytest.raises(ValueError, match=r"only partly in the subset"):
        bdl.Laplace(_mlp(), subset=["2.weight"], hessian="kron")
    wide = nn.Sequential(nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 3))
    with pytest.raises(ValueError, match=r"dense 20403 x 20403.*'kron' or 'diag'"):
        bdl.Laplace(wide, subset="all", hessian="full")
    with pytest.raises(ValueError, match=r"unknown hessian 'kfac'.*'kron'"):
        bdl.Laplace(_mlp(), hessian="kfac")
    # a convolutional network still works with a diagonal over all weights
    x = torch.randn(10, 1, 6, dtype=f64)
    y = torch.randint(0, 3, (10,))
    post = bdl.Laplace(_conv_net(), subset="all", hessian="diag", prior_fit="none")
    post.fit((x, y))
    assert post.predict(x[:2], 4).probs.shape == (2, 3)


def test_output_changed_after_the_last_layer_is_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return 2 * self.fc(x)

    post = bdl.Laplace(Scaled().double(), prior_fit="none")
    with pytest.raises(ValueError, match=r"output of its last nn.Linear layer 'fc'.*subset='all'"):
        post.fit(_data("categorical"))
    post = bdl.Laplace(Scaled().double(), subset="all", hessian="kron", prior_fit="none")
    post.fit(_data("categorical"))  # the general path has no such restriction


def test_bad_options():
    with pytest.raises(ValueError, match="prior_precision must be a positive"):
        bdl.Laplace(_mlp(), prior_precision=0.0)
    with pytest.raises(ValueError, match=r"unknown prior_fit 'ml'.*'marglik'"):
        bdl.Laplace(_mlp(), prior_fit="ml")
    with pytest.raises(ValueError, match=r"unknown predictive 'nn'.*'glm'"):
        bdl.Laplace(_mlp(), predictive="nn")
    post = _fitted()
    with pytest.raises(ValueError, match="prior_precision must be a positive"):
        post.prior_precision = -1.0
    with pytest.raises(ValueError, match="for classification"):
        post.predictive_moments(_data("categorical", n=2)[0])
