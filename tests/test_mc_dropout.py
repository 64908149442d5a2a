"""MC dropout: only the dropout layers are stochastic, all draws in one pass, masks at rate p."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bayesdl as bdl


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_model_without_dropout_is_rejected():
    with pytest.raises(ValueError, match="needs a model with dropout layers.*Sequential"):
        bdl.MCDropout(nn.Sequential(nn.Linear(2, 3)))
    with pytest.raises(ValueError, match="needs a model with dropout"):
        bdl.MCDropout(nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.0)))
    with pytest.raises(ValueError, match="alpha dropout"):
        bdl.MCDropout(nn.Sequential(nn.Linear(2, 3), nn.AlphaDropout(0.1)))
    with pytest.raises(ValueError, match="unknown expand 'early'"):
        bdl.MCDropout(nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1)), expand="early")


def _identity_probe(p: float, width: int = 2000) -> nn.Module:
    first = nn.Linear(1, width, bias=False)
    nn.init.ones_(first.weight)
    return nn.Sequential(first, nn.Dropout(p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_rate_p_and_keep_the_mean(p):
    post = bdl.MCDropout(_identity_probe(p))
    x = torch.tensor([[1.0], [2.0]])
    out = post.sample_outputs(x, 50, generator=_gen())  # (50, 2, 2000), likelihood is identity
    dropped = (out == 0).double().mean().item()
    n = out.numel()
    assert dropped == pytest.approx(p, abs=4 * (p * (1 - p) / n) ** 0.5 + 1e-4)
    kept = out[out != 0]
    # kept units are scaled so the expected activation equals the deterministic one
    assert out[:, 0].mean().item() == pytest.approx(1.0, rel=0.01)
    assert out[:, 1].mean().item() == pytest.approx(2.0, rel=0.01)
    assert torch.unique(kept).numel() == 2


def test_batchnorm_stays_in_eval_mode_and_the_draw_mean_is_the_eval_output():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2)
    )
    net.train()
    net(torch.randn(64, 3) * 3 + 1)  # give BatchNorm non-trivial running statistics
    post = bdl.MCDropout(net, "gaussian")
    running = net[1].running_mean.clone()
    x = torch.randn(5, 3)
    out = post.sample_outputs(x, 20000, generator=_gen())
    torch.testing.assert_close(net[1].running_mean, running)  # untouched
    net.eval()
    with torch.no_grad():
        want = net(x)
    # the last layer is linear, so E[output] over masks equals the eval-mode output
    torch.testing.assert_close(out.mean(0), want, atol=0.03, rtol=0.02)
    # sensitivity: BatchNorm on batch statistics (train mode) would give other outputs
    probe = copy.deepcopy(net).train()
    with torch.no_grad():
        assert not torch.allclose(probe[:3](x), net[:3](x), atol=0.1)


def test_one_forward_pass_for_all_draws():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    post = bdl.MCDropout(net)
    out = post.sample_outputs(torch.randn(7, 4), 300, generator=_gen())
    assert out.shape == (300, 7, 3)
    # the layer before the first dropout ran once, on the batch itself (lazy expansion)
    assert calls == [torch.Size([7, 4])]


def test_draws_are_independent_across_samples_and_inputs():
    post = bdl.MCDropout(_identity_probe(0.5, width=64))
    out = post.sample_outputs(torch.ones(3, 1), 200, generator=_gen())
    masks = (out != 0).double()
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[:, 0], masks[:, 1])
    corr = torch.corrcoef(torch.stack([masks[:, 0, 0], masks[:, 1, 0]]))[0, 1]
    assert abs(corr.item()) < 0.3


def test_chunking_and_seeds():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    post = bdl.MCDropout(net, chunk_size=7)
    a = post.sample_outputs(x, 20, generator=_gen(1))
    b = post.sample_outputs(x, 20, generator=_gen(1))
    c = post.sample_outputs(x, 20, generator=_gen(2))
    assert a.shape == (20, 5, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # draws differ from one chunk to the next
    assert not torch.equal(a[0], a[7])


class Residual(nn.Module):
    """A skip connection around a dropout layer: the lazy expansion cannot serve it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.drop(h))


def test_skip_connection_falls_back_to_repeating_the_input():
    torch.manual_seed(0)
    net = Residual()
    post = bdl.MCDropout(net, "gaussian")
    x = torch.randn(6, 4)
    out = post.sample_outputs(x, 4000, generator=_gen())
    assert out.shape == (4000, 6, 2)
    assert post.expand is bdl.posteriors.mc_dropout.Expand.INPUT
    net.eval()
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(out.mean(0), want, atol=0.05, rtol=0.05)
    forced = bdl.MCDropout(Residual(), "gaussian", expand="input")
    assert forced.sample_outputs(x, 3).shape == (3, 6, 2)


def test_channel_dropout_masks_whole_channels():
    conv = nn.Conv2d(1, 6, kernel_size=1, bias=False)
    nn.init.ones_(conv.weight)
    net = nn.Sequential(conv, nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(6 * 9, 2))
    captured = []
    net[2].register_forward_hook(lambda m, i, o: captured.append(i[0]))
    post = bdl.MCDropout(net, "gaussian")
    post.sample_outputs(torch.ones(2, 1, 3, 3), 10, generator=_gen())
    per_channel = captured[0].flatten(2)  # (S * B, 6, 9): the masked activations
    assert per_channel.shape == (20, 6, 9)
    assert ((per_channel == 0).all(-1) | (per_channel != 0).all(-1)).all()
    assert (per_channel == 0).all(-1).any() and (per_channel != 0).all(-1).any()


def test_fit_trains_the_users_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    post = bdl.MCDropout(
        nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    )
    post.fit((x, y), epochs=30, batch_size=32, lr=1e-2, seed=0)
    pred = post.predict(x, 30, generator=_gen())
    assert (pred.label == y).double().mean().item() > 0.9
