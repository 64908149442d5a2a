"""Regression metrics against scikit-learn, scipy and hand-computed intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.metrics import mean_squared_error

from bayesdl.metrics import gaussian_mixture_nll, mpiw, picp, rmse

F64 = torch.float64


def t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x)


def scipy_mixture_nll(means: np.ndarray, variances: np.ndarray, y: np.ndarray) -> float:
    log_density = norm.logpdf(y, loc=means, scale=np.sqrt(variances))  # (S, B) or (S, B, D)
    if log_density.ndim == 3:
        log_density = log_density.sum(-1)
    return float(-(logsumexp(log_density, axis=0) - np.log(means.shape[0])).mean())


# ---------------------------------------------------------------- rmse


@pytest.mark.parametrize("shape", [(1,), (9,), (300,), (40, 1), (40, 3)])
def test_rmse_matches_sklearn(shape):
    rng = np.random.default_rng(sum(shape))
    mean, y = rng.normal(size=shape), rng.normal(size=shape)
    expected = math.sqrt(mean_squared_error(y, mean))
    assert rmse(t(mean), t(y)).item() == pytest.approx(expected, rel=1e-12)


def test_rmse_hand_computed_and_dtype():
    # errors 3, -4 -> sqrt((9 + 16) / 2) = sqrt(12.5)
    out = rmse(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
    assert out.dtype == torch.float32 and out.shape == ()
    assert out.item() == pytest.approx(math.sqrt(12.5))
    ints = rmse(torch.tensor([3, 0]), torch.tensor([0, 4]))
    assert ints.dtype == torch.get_default_dtype()
    assert rmse(np.array([3.0, 0.0]), np.array([0.0, 4.0])).dtype == F64


# ---------------------------------------------------------------- gaussian mixture nll


@pytest.mark.parametrize("shape", [(1, 1), (1, 20), (5, 1), (8, 50), (3, 10, 4), (16, 7, 1)])
def test_mixture_nll_matches_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    means = rng.normal(size=shape)
    variances = rng.uniform(0.05, 3.0, size=shape)
    y = rng.normal(size=shape[1:]) * 2
    got = gaussian_mixture_nll(t(means), t(variances), t(y))
    assert got.item() == pytest.approx(scipy_mixture_nll(means, variances, y), rel=1e-12)


def test_single_component_is_gaussian_nll():
    rng = np.random.default_rng(0)
    means, y = t(rng.normal(size=(1, 30))), t(rng.normal(size=30))
    variances = t(rng.uniform(0.1, 2.0, size=(1, 30)))
    expected = -torch.distributions.Normal(means[0], variances[0].sqrt()).log_prob(y).mean()
    torch.testing.assert_close(gaussian_mixture_nll(means, variances, y), expected)


def test_identical_components_equal_one_component():
    means = torch.tensor([[0.0, 1.0]], dtype=F64).expand(4, 2)
    variances = torch.tensor([[1.0, 0.5]], dtype=F64).expand(4, 2)
    y = torch.tensor([0.3, -0.2], dtype=F64)
    torch.testing.assert_close(
        gaussian_mixture_nll(means, variances, y), gaussian_mixture_nll(means[:1], variances[:1], y)
    )


def test_mixture_nll_is_stable_far_from_every_component():
    # Each log density is about -5e5; a naive log(mean(exp(.))) would give inf.
    means = torch.tensor([[0.0], [1.0]], dtype=F64)
    variances = torch.ones(2, 1, dtype=F64)
    y = torch.tensor([1000.0], dtype=F64)
    got = gaussian_mixture_nll(means, variances, y).item()
    expected = scipy_mixture_nll(means.numpy(), variances.numpy(), y.numpy())
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-12)


def test_mixture_nll_dtype():
    out = gaussian_mixture_nll(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3))
    assert out.dtype == torch.float32 and out.shape == ()
    assert out.item() == pytest.approx(0.5 * math.log(2 * math.pi))


# ---------------------------------------------------------------- intervals


def test_picp_mpiw_hand_computed():
    lower = torch.tensor([0.0, 0.0, 1.0, 2.0])
    upper = torch.tensor([1.0, 2.0, 1.0, 3.0])
    y = torch.tensor([1.0, 3.0, 1.0, 2.5])
    # y=1 in [0, 1] (upper bound inclusive); 3 not in [0, 2]; 1 in [1, 1]; 2.5 in [2, 3] -> 3/4.
    assert picp(lower, upper, y).item() == 0.75
    # widths 1, 2, 0, 1 -> 1.
    assert mpiw(lower, upper).item() == 1.0
    assert picp(lower, upper, lower).item() == 1.0  # lower bound inclusive too


def test_picp_mpiw_two_dimensional():
    lower = torch.zeros(3, 2)
    upper = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    y = torch.tensor([[0.5, 2.5], [-1.0, 1.0], [5.0, 7.0]])
    assert picp(lower, upper, y).item() == pytest.approx(3 / 6)
    assert mpiw(lower, upper).item() == pytest.approx(3.5)


def test_interval_dtypes_and_numpy():
    lower, upper, y = np.zeros(3), np.ones(3), np.array([0.5, 2.0, -1.0])
    assert picp(lower, upper, y).dtype == F64
    assert picp(lower, upper, y).item() == pytest.approx(1 / 3)
    assert mpiw(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)).item() == 1.0
    assert mpiw(torch.zeros(3, dtype=torch.int32), torch.ones(3)).dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-100, 100), st.floats(0, 50), st.floats(-200, 200)),
        min_size=1,
        max_size=30,
    )
)
def test_interval_properties(data):
    lower = torch.tensor([d[0] for d in data], dtype=F64)
    upper = lower + torch.tensor([d[1] for d in data], dtype=F64)
    y = torch.tensor([d[2] for d in data], dtype=F64)
    assert 0.0 <= picp(lower, upper, y).item() <= 1.0
    assert mpiw(lower, upper).item() >= 0.0
    # Widening every interval can only cover more.
    assert picp(lower - 1, upper + 1, y).item() >= picp(lower, upper, y).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_result_on_input_device():
    mean, y = torch.randn(10, device="cuda"), torch.randn(10, device="cuda")
    assert rmse(mean, y).device.type == "cuda"
    assert gaussian_mixture_nll(mean[None], torch.ones(1, 10, device="cuda"), y).is_cuda
    assert picp(mean - 1, mean + 1, y).is_cuda
    assert mpiw(mean - 1, mean + 1).is_cuda


# ---------------------------------------------------------------- bad input

V = torch.tensor([0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("mean", "y", "error", "match"),
    [
        ([0.1, 0.2, 0.3], V, TypeError, "mean must be a torch.Tensor or a numpy.ndarray"),
        (V, V[:2], ValueError, r"same shape, got mean \(3,\), y \(2,\)"),
        (V, V[:, None], ValueError, "same shape"),
        (V.reshape(1, 1, 3), V.reshape(1, 1, 3), ValueError, r"\(B,\) or \(B, D\)"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "0-d tensor"),
        (torch.tensor([]), torch.tensor([]), ValueError, "empty"),
        (V, torch.tensor([0.0, float("nan"), 0.0]), ValueError, "y must be finite"),
        (V.to(torch.complex64), V, TypeError, "real numbers"),
    ],
)
def test_bad_rmse_input(mean, y, error, match):
    with pytest.raises(error, match=match):
        rmse(mean, y)


MEANS = torch.zeros(4, 3)
VARS = torch.ones(4, 3)


@pytest.mark.parametrize(
    ("means", "variances", "y", "error", "match"),
    [
        (MEANS[0], VARS[0], V, ValueError, r"means must have shape \(S, B\) or \(S, B, D\)"),
        (MEANS, VARS[:, :2], V, ValueError, "same shape"),
        (MEANS, VARS, V[:2], ValueError, r"y must have shape means.shape\[1:\] = \(3,\)"),
        (MEANS, VARS, MEANS, ValueError, r"y must have shape means.shape\[1:\]"),
        (MEANS, VARS, V[None, None], ValueError, r"\(B,\) or \(B, D\)"),
        (MEANS, VARS.clone().fill_(0.0), V, ValueError, "variances must be positive.*square"),
        (MEANS, -VARS, V, ValueError, "variances must be positive"),
        (MEANS, VARS.clone().fill_(float("inf")), V, ValueError, "variances must be finite"),
        (torch.zeros(0, 3), torch.zeros(0, 3), V, ValueError, "means is empty"),
        (MEANS, VARS, "y", TypeError, "y must be a torch.Tensor"),
    ],
)
def test_bad_mixture_input(means, variances, y, error, match):
    with pytest.raises(error, match=match):
        gaussian_mixture_nll(means, variances, y)


def test_inverted_interval_is_rejected():
    lower = torch.tensor([0.0, 2.0, 1.0])
    upper = torch.tensor([1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"1 of 3 intervals are inverted.*index \(1,\)"):
        picp(lower, upper, V)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        mpiw(lower, upper)


@pytest.mark.parametrize(
    ("lower", "upper", "y", "error", "match"),
    [
        (V, V + 1, V[:2], ValueError, "same shape"),
        (V, (V + 1)[None], V, ValueError, "same shape"),
        (V, torch.tensor([1.0, float("inf"), 1.0]), V, ValueError, "upper must be finite"),
        (V.numpy().tolist(), V + 1, V, TypeError, "lower must be a torch.Tensor"),
    ],
)
def test_bad_interval_input(lower, upper, y, error, match):
    with pytest.raises(error, match=match):
        picp(lower, upper, y)
