"""Device placement and dtype on CUDA for every registered posterior (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import bayesdl as bdl
from bayesdl import metrics
from bayesdl.posteriors.mc_dropout import keep_mask, keep_probability
from conftest import make_posterior, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _n(post):
    return None if post.name == "deep_ensemble" else 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_and_predict_on_cuda(method, dtype, classification_data):
    x, y = classification_data
    post = make_posterior(method, mlp().to(CUDA, dtype))
    # CPU tensors are moved to the model's device at the boundary
    history = post.fit((x, y), epochs=2, batch_size=16, seed=0, val_fraction=0.25)
    assert len(history.val_loss) == 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = post.sample_outputs(x.to(CUDA), _n(post), generator=gen)
    assert out.device.type == "cuda" and out.dtype == dtype
    again = post.sample_outputs(x, _n(post), generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    pred = post.predict(x, _n(post))
    assert pred.probs.device.type == "cuda"
    assert metrics.accuracy(pred.probs, y.to(CUDA)).device.type == "cuda"
    assert metrics.ood_auroc(pred.epistemic, pred.epistemic + 1).device.type == "cuda"
    with pytest.raises(ValueError, match="generator lives on cpu"):
        post.sample_outputs(x, _n(post), generator=torch.Generator().manual_seed(0))


def test_regression_and_state_round_trip_on_cuda(method, regression_data):
    x, y = regression_data
    post = make_posterior(method, mlp(n_out=2).to(CUDA), "gaussian")
    post.fit((x.to(CUDA), y.to(CUDA)), epochs=2, batch_size=16, seed=0)
    pred = post.predict(x, _n(post), generator=torch.Generator("cuda").manual_seed(1))
    lo, hi = pred.interval(0.9)
    assert lo.device.type == hi.device.type == "cuda"
    assert torch.isfinite(pred.log_prob(y.to(CUDA))).all()
    fresh = make_posterior(method, mlp(n_out=2).to(CUDA), "gaussian")
    fresh.load_state_dict(post.state_dict())
    a = fresh.sample_outputs(x, _n(post), generator=torch.Generator("cuda").manual_seed(2))
    b = post.sample_outputs(x, _n(post), generator=torch.Generator("cuda").manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_masks_on_cuda_keep_rate():
    mask = keep_mask((2000, 500), 0.3, torch.Generator("cuda").manual_seed(0), CUDA)
    assert mask.device.type == "cuda"
    assert mask.double().mean().item() == pytest.approx(keep_probability(0.3, CUDA), abs=3e-3)


def test_homoscedastic_likelihood_moves_with_the_model():
    post = bdl.MCDropout(mlp(n_out=1).to(CUDA), "homoscedastic_gaussian")
    assert post.likelihood.log_variance.device.type == "cuda"
    assert post.predict(torch.randn(3, 4), 5).aleatoric.device.type == "cuda"


def test_vi_training_buffers_and_pooled_noise_on_cuda():
    """The allocation-free training step and the noise pool (P above the pooling size) on the
    GPU: the pool, the buffers and the gradients live there, and the same seed repeats a fit."""
    from bayesdl.posteriors import mean_field_vi as mfv

    net = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.ReLU(), torch.nn.Linear(100, 3))
    net = net.to(CUDA)
    x, y = torch.randn(256, 100, device=CUDA), torch.randint(0, 3, (256,), device=CUDA)
    runs = []
    for _ in range(2):
        post = bdl.MeanFieldVI(copy.deepcopy(net), "categorical")  # fit writes the means back
        assert post.n_bayesian * mfv.POOL_STEPS > mfv.POOL_FRESH_BELOW
        post.fit((x, y), epochs=2, batch_size=64, seed=0)
        assert post._noise.device.type == "cuda" and post.mu.grad.device.type == "cuda"
        runs.append(post.mu.detach().clone())
    torch.testing.assert_close(runs[0], runs[1])


def test_per_member_weight_decay_on_cuda():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ens = bdl.DeepEnsemble(net.to(CUDA), "gaussian", n_members=3, seed=0)
    x, y = torch.randn(64, 4, device=CUDA), torch.randn(64, device=CUDA)
    history = ens.fit(
        (x, y), epochs=3, batch_size=16, weight_decay=[0.0, 0.1, 1.0], val_fraction=0.25, seed=0
    )
    assert len(history.member_best_epochs) == 3
    model, _ = ens.member(2)
    assert next(model.parameters()).device.type == "cuda"


def test_member_epochs_on_cuda():
    """Per-member epoch counts on CUDA, with and without validation data: member 0 stops after
    one epoch, as a one-epoch fit of the same ensemble does."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(64, 4, device=CUDA), torch.randn(64, device=CUDA)
    options = dict(batch_size=16, seed=0)

    def ensemble():
        return bdl.DeepEnsemble(copy.deepcopy(net).to(CUDA), "gaussian", n_members=2, seed=0)

    both, one = ensemble(), ensemble()
    both.fit((x, y), epochs=3, member_epochs=[1, 3], **options)
    one.fit((x, y), epochs=1, **options)
    torch.testing.assert_close(both.sample_outputs(x)[0], one.sample_outputs(x)[0])
    history = ensemble().fit(
        (x, y), val_data=(x[:16], y[:16]), epochs=3, member_epochs=[1, 3], **options
    )
    assert history.member_best_epochs[0] == 1


def test_per_member_dropout_rates_on_cuda():
    from bayesdl.posteriors.stacked import _StackedMode

    x = torch.ones(3, 2000, 50, device=CUDA)
    rates = torch.tensor([0.0, 0.1, 0.5])
    with _StackedMode(slice(0, 3), 3):
        out = torch.nn.functional.dropout(x, rates, True)
    assert out.device.type == "cuda"
    for m, p in enumerate(rates.tolist()):
        assert abs((out[m] == 0).float().mean().item() - p) < 0.01
        kept = out[m][out[m] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
