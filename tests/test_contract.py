"""One contract test for every posterior in the registry: a new method gets it for free."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bayesdl as bdl
from conftest import make_posterior, mlp

S = 4


def _n(post) -> int | None:
    """Draws to ask for: None where the method fixes its own count (ensembles, kept samples)."""
    return None if post.name in ("deep_ensemble", "sgmcmc") else S


def _expected_s(post) -> int:
    return post.default_n_samples if _n(post) is None else S


def _unfitted_outputs(post, x, seed: int):
    """What a posterior that has not been fitted gives: its draws; or, for a method with no
    posterior before ``fit`` (``requires_fit``: Laplace builds it from the trained network in
    ``fit``, and predicting earlier must raise), its network's outputs, repeated over draws."""
    if not getattr(post, "requires_fit", False):
        return post.sample_outputs(x, _n(post), generator=torch.Generator().manual_seed(seed))
    with pytest.raises(ValueError, match="fit"):
        post.sample_outputs(x, _n(post))
    with torch.no_grad():
        out = post.network.eval()(torch.as_tensor(x, dtype=post.dtype))
    return out.expand(_expected_s(post), *out.shape)


def test_registry_names():
    names = bdl.available_posteriors()
    assert {"mc_dropout", "deep_ensemble", "deterministic"} <= set(names)
    assert bdl.get_posterior("mc_dropout") is bdl.MCDropout
    assert bdl.get_posterior("deep_ensemble") is bdl.DeepEnsemble
    with pytest.raises(ValueError, match="unknown posterior 'laplce'.*mc_dropout"):
        bdl.get_posterior("laplce")


@pytest.mark.parametrize(
    ("likelihood", "n_out", "k"),
    [("categorical", 3, 3), ("gaussian", 2, 2), ("homoscedastic_gaussian", 1, 2)],
)
def test_shapes(method, likelihood, n_out, k, classification_data, regression_data):
    x, y = classification_data if likelihood == "categorical" else regression_data
    post = make_posterior(method, mlp(n_out=n_out), likelihood)
    history = post.fit((x, y), epochs=2, batch_size=16, seed=0)
    assert len(history.train_loss) == 2 and all(math.isfinite(v) for v in history.train_loss)
    out = post.sample_outputs(x[:5], _n(post), generator=torch.Generator().manual_seed(0))
    assert out.shape == (_expected_s(post), 5, k)
    pred = post.predict(x[:5], _n(post), generator=torch.Generator().manual_seed(0))
    if likelihood == "categorical":
        assert isinstance(pred, bdl.ClassificationPrediction)
        assert pred.probs.shape == (5, 3)
        torch.testing.assert_close(pred.probs.sum(-1), torch.ones(5))
        assert pred.label.shape == pred.epistemic.shape == pred.total.shape == (5,)
        assert pred.log_prob(y[:5]).shape == (5,)
    else:
        assert isinstance(pred, bdl.RegressionPrediction)
        assert pred.mean.shape == pred.aleatoric.shape == pred.epistemic.shape == (5,)
        lo, hi = pred.interval(0.9)
        assert (lo < pred.mean).all() and (pred.mean < hi).all()
        assert pred.log_prob(y[:5]).shape == (5,)


def _fit_predict(method, model, data, seed):
    post = make_posterior(method, copy.deepcopy(model))
    post.fit(data, epochs=2, batch_size=16, seed=seed)
    return post.sample_outputs(data[0], _n(post), generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_numbers(method, classification_data):
    model = mlp()
    a = _fit_predict(method, model, classification_data, seed=3)
    b = _fit_predict(method, model, classification_data, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = _fit_predict(method, model, classification_data, seed=4)
    assert not torch.equal(a, c)


def test_float64(method, regression_data):
    x, y = (t.double() for t in regression_data)
    post = make_posterior(method, mlp(n_out=2).double(), "gaussian")
    post.fit((x, y), epochs=1, batch_size=32, seed=0)
    out = post.sample_outputs(x[:3], _n(post))
    assert out.dtype == torch.float64
    pred = post.predict(x[:3].float(), _n(post))  # inputs are cast to the model's dtype
    assert pred.mean.dtype == torch.float64


def test_state_dict_round_trip(method, classification_data):
    x, y = classification_data
    post = make_posterior(method, mlp())
    post.fit((x, y), epochs=2, batch_size=16, seed=0)
    state = post.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = make_posterior(method, mlp(), seed=99) if method == "deep_ensemble" else None
    fresh = fresh or make_posterior(method, mlp())
    before = _unfitted_outputs(fresh, x, 1)
    fresh.load_state_dict(state)
    want = post.sample_outputs(x, _n(post), generator=torch.Generator().manual_seed(1))
    got = fresh.sample_outputs(x, _n(post), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(before, want)
    assert fresh.input_shape == (4,)
    with pytest.raises(ValueError, match="does not fit"):
        make_posterior(method, mlp(hidden=8)).load_state_dict(state)


def test_numpy_inputs(method, classification_data):
    x, y = classification_data
    post = make_posterior(method, mlp())
    post.fit((x.numpy(), y.numpy()), epochs=1, batch_size=16, seed=0)
    pred = post.predict(x.numpy()[:3], _n(post))
    assert pred.probs.shape == (3, 3)


def test_dataloader_input(method, classification_data):
    x, y = classification_data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    post = make_posterior(method, mlp())
    history = post.fit(loader, epochs=2, val_data=(x[:8], y[:8]))
    assert len(history.train_loss) == 2 and len(history.val_loss) == 2


def test_bad_input(method, classification_data, regression_data):
    x, y = classification_data
    post = make_posterior(method, mlp())
    post.fit((x, y), epochs=1, seed=0)
    with pytest.raises(ValueError, match=r"wrong number of features.*\(4,\).*\(5,\)"):
        post.predict(torch.randn(3, 5), _n(post))
    with pytest.raises(ValueError, match="NaN or inf"):
        post.predict(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), _n(post))
    with pytest.raises(ValueError, match="batch axis"):
        post.predict(torch.zeros(4), _n(post))
    with pytest.raises(ValueError, match="empty"):
        post.predict(torch.zeros(0, 4), _n(post))
    with pytest.raises(ValueError, match="n_samples"):
        post.predict(x[:2], 0)
    with pytest.raises(TypeError, match="Tensor or numpy"):
        post.predict("not data")
    with pytest.raises(ValueError, match="NaN or inf"):
        make_posterior(method, mlp()).fit(
            (x, y.float().index_fill(0, torch.tensor([3]), float("nan")))
        )
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        make_posterior(method, mlp(), bdl.Categorical(3)).fit((x, y + 1), epochs=1)
    with pytest.raises(ValueError, match="same number of rows"):
        make_posterior(method, mlp()).fit((x, y[:-1]), epochs=1)
    with pytest.raises(ValueError, match="empty"):
        make_posterior(method, mlp()).fit((x[:0], y[:0]), epochs=1)
    with pytest.raises(TypeError, match=r"pair \(x, y\)"):
        make_posterior(method, mlp()).fit(x, epochs=1)
    with pytest.raises(TypeError, match="epoch"):
        make_posterior(method, mlp()).fit((x, y), epoch=1)
    xr, yr = regression_data
    with pytest.raises(ValueError, match=r"\(B, 2\).*returned \(2, 3\)"):
        make_posterior(method, mlp(n_out=3), "gaussian").fit((xr, yr), epochs=1)
    with pytest.raises(ValueError, match=r"\(B, 1\).*returned"):
        make_posterior(method, mlp(n_out=2), "homoscedastic_gaussian").fit((xr, yr), epochs=1)


def test_diverging_fit_keeps_last_good_weights(method, regression_data):
    x, y = regression_data
    post = make_posterior(method, mlp(n_out=2), "gaussian")
    before = _unfitted_outputs(post, x[:4], 0)
    huge = torch.full_like(x, 3e38)  # finite, but overflows float32 in the first layer
    with pytest.raises(bdl.TrainingDivergedError, match="epoch 1") as err:
        post.fit((huge, y), epochs=3, batch_size=16, seed=0)
    assert err.value.last_good_epoch == 0
    after = _unfitted_outputs(post, x[:4], 0)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_module_without_parameters_is_rejected(method):
    with pytest.raises(ValueError, match="no parameters"):
        make_posterior(method, nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        make_posterior(method, np.zeros(3))
