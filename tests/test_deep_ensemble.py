"""Deep ensembles: independent members, trained as one vectorised program that equals M
separate trainings, and epistemic uncertainty that shrinks with data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import bayesdl as bdl


def _net(n_in=2, n_out=2, hidden=16):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def test_members_are_initialised_independently():
    ens = bdl.DeepEnsemble(_net(), n_members=4, seed=0)
    w = ens._params["model.0.weight"]
    assert w.shape == (4, 16, 2)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(w[i], w[j])
    again = bdl.DeepEnsemble(_net(), n_members=4, seed=0)
    assert torch.equal(again._params["model.0.weight"], w)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.s


def test_warns_about_parameters_it_cannot_reinitialise():
    with pytest.warns(UserWarning, match=r"model\.2\.s"):
        bdl.DeepEnsemble(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), Scale()), n_members=2, seed=0)


def test_vectorised_training_equals_separate_trainings():
    """Stacked Adam on the summed member losses == M independent Adam runs (same data order)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(50, generator=g, dtype=torch.float64)
    template = _net().double()
    ens = bdl.DeepEnsemble(template, "gaussian", n_members=3, seed=5, independent_data_order=False)
    initial = {k: v.detach().clone() for k, v in ens._params.items()}
    opts = dict(epochs=4, batch_size=16, lr=1e-2, weight_decay=1e-3, seed=11)
    ens.fit((x, y), **opts)
    for m in range(3):
        single_net = copy.deepcopy(template)
        single_net.load_state_dict(
            {k.removeprefix("model."): v[m] for k, v in initial.items() if k.startswith("model.")}
        )
        single = bdl.Deterministic(single_net, "gaussian")
        single.fit((x, y), **opts)
        for name, p in single.network.named_parameters():
            torch.testing.assert_close(
                ens._params[name][m], p.detach(), rtol=1e-9, atol=1e-11, msg=name
            )


def test_independent_data_order_differs_between_members_but_is_seeded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    template = _net()

    def trained(seed):
        ens = bdl.DeepEnsemble(template, n_members=2, seed=0, reinitialize=False)
        ens.fit((x, y), epochs=1, batch_size=8, lr=1e-2, seed=seed)
        return ens._params["model.0.weight"].detach()

    a, b = trained(1), trained(1)
    assert torch.equal(a, b)
    # same initial weights (reinitialize=False): only the data order separates the members
    assert not torch.allclose(a[0], a[1])


def test_n_samples_must_match_the_members():
    ens = bdl.DeepEnsemble(_net(), n_members=3, seed=0)
    assert ens.sample_outputs(torch.zeros(4, 2)).shape == (3, 4, 2)
    assert ens.sample_outputs(torch.zeros(4, 2), 3).shape == (3, 4, 2)
    with pytest.raises(ValueError, match="one draw per member.*n_samples=None or 3"):
        ens.sample_outputs(torch.zeros(4, 2), 10)
    with pytest.raises(ValueError, match="n_members"):
        bdl.DeepEnsemble(_net(), n_members=0)


def test_outputs_equal_each_members_own_forward():
    ens = bdl.DeepEnsemble(_net(), n_members=3, seed=2)
    x = torch.randn(5, 2)
    out = ens.sample_outputs(x)
    for m in range(3):
        member = {k: v[m] for k, v in ens._params.items()}
        torch.testing.assert_close(out[m], functional_call(ens.network, member, (x,)))


def test_batchnorm_statistics_are_kept_per_member():
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    ens = bdl.DeepEnsemble(net, n_members=3, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g) * 2 + 1
    y = (x[:, 0] > 1).long()
    ens.fit((x, y), epochs=2, batch_size=16, seed=0)
    rm = ens._buffers["model.1.running_mean"]
    assert rm.shape == (3, 8)
    assert not torch.allclose(rm, torch.zeros_like(rm))
    assert not torch.allclose(rm[0], rm[1])
    assert ens._buffers["model.1.num_batches_tracked"].tolist() == [8, 8, 8]


@pytest.mark.parametrize("seed", [0, 1])
def test_epistemic_uncertainty_shrinks_with_data(seed):
    """An ensemble fitted on 2,000 points is far less unsure inside the data range than on 20."""

    def epistemic(n):
        g = torch.Generator().manual_seed(n + 1000 * seed)
        x = torch.rand(n, 1, generator=g) * 6 - 3
        y = torch.sin(x[:, 0]) + 0.2 * torch.randn(n, generator=g)
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )
        ens = bdl.DeepEnsemble(net, "gaussian", n_members=5, seed=seed)
        ens.fit((x, y), epochs=300, batch_size=n, lr=1e-2, seed=seed)
        grid = torch.linspace(-2.5, 2.5, 101)[:, None]
        return ens.predict(grid).epistemic.mean().item()

    # seeds 0-3 gave ratios 0.004-0.13 here; 0.3 leaves room for other BLAS and torch builds
    small, large = epistemic(20), epistemic(2000)
    assert large < 0.3 * small, (small, large)


def _regression64(n_rows: int) -> tuple[Tensor, Tensor, nn.Module]:
    """Inputs ``(n_rows, 3)``, noisy targets ``(n_rows,)`` and a Gaussian MLP, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, 3, generator=g, dtype=torch.float64)
    y = x[:, 0] - x[:, 1] ** 2 + 0.1 * torch.randn(n_rows, generator=g, dtype=torch.float64)
    return x, y, nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _stack_equals_separate_fits(n_rows: int, joint: dict, alone: list[dict], **options):
    """Fit a float64 ensemble of ``len(alone)`` members (same data order) with the per-member
    options ``joint``, and check member ``m`` against the one-member ensemble of the same
    initialisation fitted with ``alone[m]``. Returns the stacked outputs ``(M, n_rows, 2)``."""
    x, y, net = _regression64(n_rows)
    stack = bdl.DeepEnsemble(
        net, "gaussian", n_members=len(alone), seed=7, independent_data_order=False
    )
    stack.fit((x, y), **joint, **options)
    together = stack.sample_outputs(x)
    for m, own in enumerate(alone):
        single = bdl.DeepEnsemble(net, "gaussian", n_members=1, seed=7 + m)
        single.fit((x, y), **own, **options)
        torch.testing.assert_close(together[m], single.sample_outputs(x)[0])
    return together


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_one_weight_decay_per_member_equals_separate_fits(optimizer):
    """Member m of an ensemble trained with weight_decay=(a, b) is the one-member ensemble
    (same initialisation) trained with weight_decay a or b: a grid over the prior precision
    trains as one vectorised ensemble."""
    decays = (0.0, 0.3)
    both = _stack_equals_separate_fits(
        40,
        {"weight_decay": decays},
        [{"weight_decay": d} for d in decays],
        epochs=30,
        batch_size=40,
        lr=0.05,
        optimizer=optimizer,
        seed=0,
    )
    assert not torch.allclose(both[0], both[1])


def test_per_member_weight_decay_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randn(10)
    with pytest.raises(ValueError, match="got 3 values, but there are 2 members"):
        bdl.DeepEnsemble(net, "gaussian", n_members=2).fit((x, y), epochs=1, weight_decay=[0, 1, 2])
    with pytest.raises(ValueError, match="no stacked members; pass one number"):
        bdl.Deterministic(net, "gaussian").fit((x, y), epochs=1, weight_decay=[0.1])


def test_member_epochs_keep_each_member_at_its_own_epoch_count():
    """Member m of an ensemble fitted with member_epochs=(a, b) is the one-member ensemble
    (same initialisation, same data order) fitted for a or b epochs: refits of candidates with
    different best epochs train as one program. With validation data a member's best epoch is
    at most its count."""
    counts = (4, 11, 7)
    options = dict(batch_size=16, lr=0.05, seed=0)
    together = _stack_equals_separate_fits(
        48,
        {"epochs": 11, "member_epochs": counts},
        [{"epochs": c} for c in counts],
        **options,
    )
    assert not torch.allclose(together[0], together[2])

    x, y, net = _regression64(48)
    val = (x[:16] + 0.1, y[:16])
    joint = bdl.DeepEnsemble(net, "gaussian", n_members=3, seed=7, independent_data_order=False)
    history = joint.fit((x, y), val_data=val, epochs=11, member_epochs=counts, **options)
    assert all(1 <= b <= c for b, c in zip(history.member_best_epochs, counts, strict=True))


def test_member_epochs_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randn(10)
    with pytest.raises(ValueError, match="member_epochs got 3 values, but there are 2 members"):
        bdl.DeepEnsemble(net, "gaussian", n_members=2).fit((x, y), epochs=3, member_epochs=[1] * 3)
    with pytest.raises(ValueError, match="no stacked members; pass epochs alone"):
        bdl.Deterministic(net, "gaussian").fit((x, y), epochs=2, member_epochs=[1])


def test_member_gives_plain_modules_with_that_members_weights():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    ens = bdl.DeepEnsemble(net, "homoscedastic_gaussian", n_members=3, seed=0)
    x = torch.randn(7, 3)
    outputs = ens.sample_outputs(x)
    for m in range(3):
        model, likelihood = ens.member(m)
        torch.testing.assert_close(likelihood(model(x)), outputs[m])
    with pytest.raises(ValueError, match=r"m must be an integer in \[0, 3\), got 3"):
        ens.member(3)
