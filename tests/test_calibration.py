"""Temperature and variance scaling: what they fit, that they help, and that the calibrated
predictive stays a consistent mixture, for every method in the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesdl as bdl
from bayesdl import calibration, metrics
from conftest import make_posterior, mlp

F64 = torch.float64


def overconfident_classifier(factor: float = 4.0, n: int = 4000, seed: int = 0):
    """Labels drawn from softmax(x W); the model's logits are ``factor`` times too large."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, generator=g, dtype=F64)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    y = torch.multinomial(torch.softmax(x @ weight, -1), 1, generator=g)[:, 0]
    net = nn.Linear(6, 5, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(factor * weight.T)
    return bdl.Deterministic(net, "categorical"), x, y


def test_temperature_scaling_fixes_an_overconfident_model():
    post, x, y = overconfident_classifier()
    x_val, y_val, x_test, y_test = x[:2000], y[:2000], x[2000:], y[2000:]
    calibrated = calibration.temperature_scale(post, x_val, y_val)
    # the logits are 4x too large, so the fitted temperature should be near 4
    assert 3.4 < calibrated.scale < 4.6
    for xs, ys in ((x_val, y_val), (x_test, y_test)):
        before, after = post.predict(xs).probs, calibrated.predict(xs).probs
        assert metrics.nll(after, ys) < metrics.nll(before, ys) - 0.3
        assert metrics.ece(after, ys) < 0.5 * metrics.ece(before, ys)
        assert torch.equal(after.argmax(-1), before.argmax(-1))
        assert metrics.accuracy(after, ys) == metrics.accuracy(before, ys)


def test_fitted_temperature_is_a_stationary_point_of_the_mixture_nll():
    post, x, y = overconfident_classifier(seed=1, n=1000)
    calibrated = calibration.temperature_scale(post, x, y)
    outputs = post.sample_outputs(x)
    log_t = torch.tensor(math.log(calibrated.scale), dtype=F64, requires_grad=True)
    loss = calibration.mixture_nll(
        calibration.scale_outputs(outputs, log_t, post.likelihood), y, post.likelihood
    )
    (grad,) = torch.autograd.grad(loss, log_t)
    assert abs(grad.item()) < 1e-6
    for step in (-0.05, 0.05):  # and a minimum
        near = torch.tensor(math.log(calibrated.scale) + step, dtype=F64)
        other = calibration.mixture_nll(
            calibration.scale_outputs(outputs, near, post.likelihood), y, post.likelihood
        )
        assert other > loss


def test_variance_scale_of_one_gaussian_is_the_mean_squared_z():
    # For one Gaussian with no variance floor, argmin_s NLL = mean((y - mu)^2 / var): closed form.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=F64)
    net = nn.Linear(3, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.0, 0.0, 0.3]]))
        net.bias.copy_(torch.tensor([0.0, math.log(0.2)]))
    post = bdl.Deterministic(net, bdl.Gaussian(min_variance=0.0))
    mean, log_var = net(x).detach().unbind(-1)
    y = mean + 1.5 * (0.5 + x[:, 0].abs()) * torch.randn(500, generator=g, dtype=F64)
    calibrated = calibration.variance_scale(post, x, y)
    closed_form = ((y - mean) ** 2 / log_var.exp()).mean().item()
    assert calibrated.scale == pytest.approx(closed_form, rel=1e-8)
    before = metrics.gaussian_mixture_nll(*_components(post.predict(x)), y)
    after = metrics.gaussian_mixture_nll(*_components(calibrated.predict(x)), y)
    assert after < before


def _components(pred):
    return pred.means, pred.variances


def test_calibrated_regression_mixture_and_decomposition_stay_consistent():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 4, generator=g)
    y = x[:, 0] + 0.3 * torch.randn(80, generator=g)
    post = bdl.DeepEnsemble(mlp(4, 2, p=0.0), "gaussian", n_members=3, seed=0)
    post.fit((x, y), epochs=3, seed=0)
    calibrated = calibration.variance_scale(post, x, y)
    floor = post.likelihood.min_variance
    before, after = post.predict(x), calibrated.predict(x)
    torch.testing.assert_close(after.means, before.means)
    torch.testing.assert_close(
        after.variances - floor, calibrated.scale * (before.variances - floor)
    )
    torch.testing.assert_close(after.epistemic, before.epistemic)
    torch.testing.assert_close(after.total, after.aleatoric + after.epistemic)
    # the scalar minimises exactly the mixture NLL that the prediction object reports
    nll = calibration.mixture_nll(calibrated.sample_outputs(x), y, post.likelihood)
    torch.testing.assert_close(nll, -after.log_prob(y).mean())


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_registered_method_can_be_calibrated(
    method, task, classification_data, regression_data
):
    x, y = classification_data if task == "classification" else regression_data
    likelihood = "categorical" if task == "classification" else "gaussian"
    torch.manual_seed(0)
    post = make_posterior(method, mlp(4, 3 if task == "classification" else 2), likelihood)
    post.fit((x, y), epochs=2, batch_size=16, seed=0)
    n = None if method in ("deep_ensemble", "sgmcmc") else 8  # draws: members, kept samples
    calibrated = calibration.calibrate(post, x, y, n_samples=n, generator=torch.Generator())
    assert calibrated.kind is (
        calibration.ScaleKind.TEMPERATURE
        if task == "classification"
        else calibration.ScaleKind.VARIANCE
    )
    assert calibrated.scale > 0 and math.isfinite(calibrated.scale)
    # predictions are the wrapped posterior's draws, rescaled, under the same generator
    raw = post.sample_outputs(x, n, generator=torch.Generator().manual_seed(3))
    out = calibrated.sample_outputs(x, n, generator=torch.Generator().manual_seed(3))
    assert out.shape == raw.shape and out.dtype == raw.dtype
    torch.testing.assert_close(out, calibrated.transform(raw))
    pred = calibrated.predict(x, n, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pred.total, pred.aleatoric + pred.epistemic, atol=1e-6, rtol=1e-5)
    # the state round-trips through a fresh wrapper
    again = calibration.CalibratedPosterior(post, 1.0)
    again.load_state_dict(calibrated.state_dict())
    assert again.scale == calibrated.scale


def test_calibrating_twice_composes():
    post, x, y = overconfident_classifier(seed=3, n=1500)
    once = calibration.temperature_scale(post, x, y)
    twice = calibration.temperature_scale(once, x, y)
    assert twice.scale == pytest.approx(1.0, abs=1e-4)
    assert "temperature" in repr(once)


# ---------------------------------------------------------------- bad input


def test_bad_input():
    post, x, y = overconfident_classifier(n=40)
    regression = bdl.Deterministic(nn.Linear(6, 2).double(), "gaussian")
    with pytest.raises(ValueError, match="needs a classification posterior.*variance_scale"):
        calibration.temperature_scale(regression, x, y.double())
    with pytest.raises(ValueError, match="needs a regression posterior.*temperature_scale"):
        calibration.variance_scale(post, x, y)
    with pytest.raises(TypeError, match="expected a fitted bayesdl Posterior"):
        calibration.calibrate(nn.Linear(6, 5), x, y)
    with pytest.raises(ValueError, match="x_val has 40 examples but y_val has 39"):
        calibration.calibrate(post, x, y[:-1])
    with pytest.raises(ValueError, match=r"class labels in \[0, 5\)"):
        calibration.calibrate(post, x, torch.full_like(y, 7))
    post.input_shape = (6,)
    with pytest.raises(ValueError, match="wrong number of features"):
        calibration.calibrate(post, x[:, :4], y)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        calibration.calibrate(post, x, y, max_iter=0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        calibration.CalibratedPosterior(post, -1.0)
    with pytest.raises(TypeError, match="scale must be a positive number"):
        calibration.CalibratedPosterior(post, "2")
    with pytest.raises(ValueError, match="no 'calibration.scale' entry"):
        calibration.CalibratedPosterior(post, 1.0).load_state_dict(post.state_dict())
