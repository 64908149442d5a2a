"""StackedModule: the fast path and the vmap path agree with each member's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import bayesdl as bdl
from bayesdl.posteriors.mc_dropout import keep_probability
from bayesdl.posteriors.stacked import StackedModule

f64 = torch.float64


def _copies(make, m=4, seed=0):
    torch.manual_seed(seed)
    return [make().double() for _ in range(m)]


def _mlp():
    return nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _conv():
    return nn.Sequential(nn.Conv1d(1, 2, 3), Flatten(), nn.Linear(2 * 3, 2))


def _member_outputs(copies, x, batched):
    return torch.stack([c(x[i] if batched else x) for i, c in enumerate(copies)])


def _assert_member_gradients(stack, copies, x, batched, out):
    """The gradients of a summed loss reach each member's slice of the stacked parameters."""
    (out**2).sum().backward()
    for i, c in enumerate(copies):
        c.zero_grad()
        (c(x[i] if batched else x) ** 2).sum().backward()
        for name, p in c.named_parameters():
            torch.testing.assert_close(stack.params[name].grad[i], p.grad, msg=name)


@pytest.mark.parametrize("make", [_mlp, _conv], ids=["mlp-fast-path", "conv-vmap"])
@pytest.mark.parametrize("batched", [False, True])
def test_outputs_and_gradients_equal_each_members_own(make, batched):
    copies = _copies(make)
    stack = StackedModule.from_copies(copies)
    shape = (5, 3) if make is _mlp else (5, 1, 5)
    x = torch.randn(4, *shape, dtype=f64) if batched else torch.randn(*shape, dtype=f64)
    out = stack(x, batched_input=batched)
    assert stack.fast_path is (make is _mlp)
    torch.testing.assert_close(out, _member_outputs(copies, x, batched))
    _assert_member_gradients(stack, copies, x, batched, out)


def _homoscedastic_network():
    likelihood = bdl.HomoscedasticGaussian(init_variance=0.5)
    return bdl.posteriors.Network(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), likelihood
    )


@pytest.mark.parametrize("link", ["stacked_forward", "vmap"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_likelihood_with_tensors_of_its_own_stays_on_the_fast_path(batched, link, monkeypatch):
    """The homoscedastic Gaussian's noise is a tensor per member: the model runs on the fast
    path and the link on all members at once (the likelihood's ``stacked_forward``, or, for a
    likelihood without one, its forward under vmap). Outputs and gradients (the noise's
    included) equal each member's own, and chunked prediction equals one pass."""
    if link == "vmap":
        monkeypatch.delattr(bdl.HomoscedasticGaussian, "stacked_forward")
    copies = _copies(_homoscedastic_network)
    with torch.no_grad():
        for i, c in enumerate(copies):
            c.likelihood.log_variance.fill_(-1.0 + i)  # a different noise per member
    stack = StackedModule.from_copies(copies)
    x = torch.randn(4, 5, 3, dtype=f64) if batched else torch.randn(5, 3, dtype=f64)
    out = stack(x, batched_input=batched)
    assert stack.fast_path and out.shape == (4, 5, 2)
    torch.testing.assert_close(out, _member_outputs(copies, x, batched))
    _assert_member_gradients(stack, copies, x, batched, out)
    stack.chunk_rows = 10  # two members per chunk at 5 rows
    with torch.no_grad():
        torch.testing.assert_close(stack(x, batched_input=batched), out.detach())


def test_prediction_chunks_match_one_pass():
    copies = _copies(_mlp, m=7)
    stack = StackedModule.from_copies(copies, chunk_rows=10)  # 10 // 5 rows = 2 members per chunk
    x = torch.randn(5, 3, dtype=f64)
    with torch.no_grad():
        chunked = stack(x)
    torch.testing.assert_close(chunked, _member_outputs(copies, x, False))


def test_dropout_in_training_mode_is_independent_per_member():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 200), nn.Dropout(0.5))
    stack = StackedModule.from_copies([copy.deepcopy(base) for _ in range(3)])  # identical members
    stack.train(True)
    out = stack(torch.ones(2, 3))
    assert stack.fast_path
    zero = out == 0
    assert 0.3 < zero.double().mean().item() < 0.7
    assert not torch.equal(zero[0], zero[1])
    stack.train(False)
    with torch.no_grad():
        out = stack(torch.ones(2, 3))
    assert torch.equal(out[0], out[1])


class MemberDropout(nn.Module):
    """Dropout with one rate per stacked member (a plain attribute: not stacked)."""

    def __init__(self, rates):
        super().__init__()
        self.rates = torch.tensor(rates, dtype=f64)

    def forward(self, x):
        return nn.functional.dropout(x, self.rates, self.training)


@pytest.mark.parametrize(
    "rates", [[0.0, 0.1, 0.5, 1.0], [0.1, 0.0, 0.0, 0.5, 0.0]], ids=["all", "block"]
)
def test_per_member_dropout_rates_on_the_fast_path(rates):
    base = nn.Sequential(nn.Linear(3, 4000), MemberDropout(rates)).double()
    stack = StackedModule.from_copies([copy.deepcopy(base) for _ in rates])
    stack.train(True)
    x = torch.ones(5, 3, dtype=f64)
    torch.manual_seed(0)
    out = stack(x)
    assert stack.fast_path
    with torch.no_grad():
        plain = base[0](x)
    for m, p in enumerate(rates):
        dropped = out[m] == 0
        # binomial standard error of the dropped fraction over 20000 units is at most 0.0036
        assert abs(dropped.double().mean().item() - p) < 0.015, (m, p)
        if p < 1:  # the kept units are scaled by 1 / (keep probability) of the 16-bit draws
            scale = 1 / keep_probability(p, x.device)
            assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
            torch.testing.assert_close(out[m][~dropped], (plain * scale)[~dropped])
    stack.train(False)
    with torch.no_grad():
        torch.testing.assert_close(stack(x), plain.expand(len(rates), 5, 4000))
    # at prediction the members run in chunks (here one member each): each keeps its own rate
    stack.train(True)
    stack.chunk_rows = 5
    with torch.no_grad():
        chunked = stack(x)
    for m, p in enumerate(rates):
        assert abs((chunked[m] == 0).double().mean().item() - p) < 0.015, (m, p)


def test_per_member_dropout_rates_refuse_bad_rates():
    cases = (
        ([0.1, 0.2], r"one rate per stacked member, shape \(3,\)"),
        ([0.1, 0.2, 1.5], r"in \[0, 1\]"),
        ([0.1, float("nan"), 0.2], r"in \[0, 1\]"),
    )
    for rates, match in cases:
        base = nn.Sequential(nn.Linear(3, 2), MemberDropout(rates)).double()
        stack = StackedModule.from_copies([copy.deepcopy(base) for _ in range(3)])
        stack.train(True)
        with pytest.raises(ValueError, match=match):
            stack(torch.ones(2, 3, dtype=f64))


def test_a_member_with_dropout_rate_zero_trains_as_without_dropout():
    """Members only share the global random stream through the masks: a member at rate 0 sees
    no mask and trains exactly like the same network without a dropout layer."""
    import bayesdl as bdl

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=f64)
    y = x.sum(1, keepdim=True)
    fits = []
    for dropout in (MemberDropout([0.0, 0.3]), nn.Identity()):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), dropout, nn.Linear(16, 2)).double()
        post = bdl.DeepEnsemble(
            net, "gaussian", n_members=2, reinitialize=False, independent_data_order=False
        )
        post.fit((x, y), epochs=3, batch_size=16, lr=1e-2, seed=0, progress=False)
        fits.append(post.member(0)[0].state_dict())
        fits.append(post.member(1)[0].state_dict())
    for name, value in fits[2].items():
        torch.testing.assert_close(fits[0][name], value)  # rate 0 == no dropout layer
        torch.testing.assert_close(fits[3][name], value)  # the same net without dropout
    assert not torch.equal(fits[1]["3.weight"], fits[3]["3.weight"])  # rate 0.3 trains otherwise


def test_a_module_calling_tensor_methods_leaves_the_fast_path_and_still_agrees():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).mul(2.0)

    copies = _copies(Scaled)
    stack = StackedModule.from_copies(copies)
    x = torch.randn(4, 3, dtype=f64)
    torch.testing.assert_close(stack(x), _member_outputs(copies, x, False))
    assert not stack.fast_path


def test_tied_weights_are_swapped_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    copies = _copies(Tied, m=3)
    stack = StackedModule.from_copies(copies)
    x = torch.randn(2, 4, dtype=f64)
    torch.testing.assert_close(stack(x), _member_outputs(copies, x, False))
    member = {k: v[1] for k, v in stack.params.items()}
    torch.testing.assert_close(stack(x)[1], functional_call(copies[0], member, (x,)))


def test_sampled_tensors_replace_the_stored_ones():
    template = _mlp().double()
    params = {
        k: v.detach()[None].expand(3, *v.shape).clone() for k, v in template.named_parameters()
    }
    stack = StackedModule(template, params)
    noise = {k: 0.01 * torch.randn_like(v) for k, v in params.items()}
    drawn = tuple(params[k] + noise[k] for k in stack.names)
    x = torch.randn(4, 3, dtype=f64)
    out = stack(x, tensors=drawn)
    for i in range(3):
        member = {k: t[i] for k, t in zip(stack.names, drawn, strict=True)}
        torch.testing.assert_close(out[i], functional_call(template, member, (x,)))


def test_meta_copy_keeps_structure_and_ties_and_is_independent():
    from bayesdl.posteriors.stacked import meta_copy

    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), nn.BatchNorm1d(3), shared)
    copy_ = meta_copy(net)
    assert [n for n, _ in copy_.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert all(p.device.type == "meta" for p in (*copy_.parameters(), *copy_.buffers()))
    assert copy_[0] is copy_[3] and copy_[0].weight is copy_[3].weight  # the tie survives
    assert all(p.device.type == "cpu" for p in net.parameters())  # the original is untouched
    copy_[0].register_forward_hook(lambda *args: None)
    copy_.train(False)
    assert not net[0]._forward_hooks and net.training and not copy_.training


def test_loaded_ensemble_trains_on_like_the_original(tmp_path, classification_data):
    x, y = classification_data
    post = bdl.DeepEnsemble(bdl.models.mlp(4, 3, hidden=(8,)), "categorical", n_members=3, seed=0)
    post.fit((x, y), epochs=2, batch_size=16, seed=0)
    bdl.save(post, tmp_path / "m.safetensors")
    loaded = bdl.load(tmp_path / "m.safetensors")
    # the file's tensors became the members' storage: no placeholder is left
    assert all(0 not in t.stride() for t in loaded.state_dict().values() if t.numel() > 1)
    post.fit((x, y), epochs=2, batch_size=16, seed=1)
    loaded.fit((x, y), epochs=2, batch_size=16, seed=1)
    for key, value in post.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_state_dict_assign_takes_the_tensors():
    x = torch.randn(5, 3)
    post = bdl.DeepEnsemble(_mlp(), "categorical", n_members=2, seed=0)
    state = {k: v.clone() for k, v in post.state_dict().items()}
    other = bdl.DeepEnsemble(_mlp(), "categorical", n_members=2, seed=5)
    other.load_state_dict(state, assign=True)
    key = next(k for k in state if k.startswith("members.params."))
    assert other.state_dict()[key].data_ptr() == state[key].data_ptr()
    copied = bdl.DeepEnsemble(_mlp(), "categorical", n_members=2, seed=5)
    copied.load_state_dict(state)
    assert copied.state_dict()[key].data_ptr() != state[key].data_ptr()
    assert torch.equal(copied.predict(x).probs, other.predict(x).probs)
