"""SWAG and MultiSWAG: moments equal to those of the recorded iterates (float64), draws from the
stated Gaussian, the SWA learning-rate schedules, BatchNorm statistics per draw, MultiSWAG
members that equal separate runs, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal
from torch.func import functional_call

import bayesdl as bdl
from bayesdl.posteriors.swag import SWAG, _SWAGObjective


def _net(n_in=2, n_out=2, hidden=6):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _bn_net():
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _data(n=48, n_in=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=dtype)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def _flat(post, m):
    """Member ``m``'s weights, flattened in ``network.named_parameters()`` order."""
    names = [n for n, _ in post.network.named_parameters()]
    return torch.cat([post._params[n][m].detach().reshape(-1) for n in names])


@pytest.fixture
def recorded(monkeypatch):
    """The weights at every collection, ``(M, P)`` each, read off the members independently."""
    iterates = []
    original = SWAG._collect

    def collect(self):
        iterates.append(torch.stack([_flat(self, m) for m in range(self.n_members)]))
        original(self)

    monkeypatch.setattr(SWAG, "_collect", collect)
    return iterates


@pytest.fixture
def schedule(monkeypatch):
    """``(epoch, lr the epoch ran at, iterates collected after it)`` for every epoch."""
    rows = []
    original = _SWAGObjective.end_epoch

    def end_epoch(self, epoch, optimizer):
        lr = optimizer.param_groups[0]["lr"]
        original(self, epoch, optimizer)
        rows.append((epoch, lr, self.ensemble.n_collected))

    monkeypatch.setattr(_SWAGObjective, "end_epoch", end_epoch)
    return rows


def _fitted(recorded, *, epochs, rank=20, swa_start=0, **options):
    torch.manual_seed(0)
    post = SWAG(_net().double(), "gaussian", rank=rank, swa_start=swa_start, **options)
    post.fit(_data(), epochs=epochs, batch_size=16, lr=2e-2, optimizer="sgd", seed=1)
    return post


# ------------------------------------------------------------------------ the moments
def test_mean_and_covariance_are_those_of_the_collected_iterates(recorded):
    post = _fitted(recorded, epochs=9, swa_start=3)
    assert post.n_collected == len(recorded) == 6  # epochs 4..9
    theta = torch.stack(recorded)[:, 0]  # (n, P)
    assert all(not torch.equal(theta[i], theta[i + 1]) for i in range(5))
    mom = post.moments
    torch.testing.assert_close(mom.mean[0], theta.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mom.variance[0], theta.var(0, correction=0), rtol=1e-9, atol=1e-15)
    # n <= rank: the low-rank factor holds every iterate, D D^T / (K - 1) is their covariance
    d = mom.deviations[0].T  # (P, K)
    assert d.shape == (theta.shape[1], 6)
    torch.testing.assert_close(d @ d.T / 5, torch.cov(theta.T), rtol=1e-9, atol=1e-15)


def test_low_rank_factor_is_the_covariance_of_the_last_rank_iterates(recorded):
    post = _fitted(recorded, epochs=8, rank=3, swa_start=1)
    theta = torch.stack(recorded)[:, 0]
    assert post.n_collected == 7
    mom = post.moments
    torch.testing.assert_close(mom.mean[0], theta.mean(0), rtol=1e-12, atol=1e-14)
    d = mom.deviations[0].T
    assert d.shape[1] == 3
    torch.testing.assert_close(d @ d.T / 2, torch.cov(theta[-3:].T), rtol=1e-9, atol=1e-15)


def test_draws_follow_the_swag_gaussian(recorded):
    """Empirical mean and covariance of the weight draws vs torch's low-rank Gaussian."""
    post = _fitted(recorded, epochs=6, rank=4, swa_start=1, scale=0.7)
    mom = post.moments
    k = mom.deviations.shape[1]
    reference = LowRankMultivariateNormal(
        mom.mean[0],
        cov_factor=mom.deviations[0].T * math.sqrt(0.7 / (2 * (k - 1))),
        cov_diag=0.7 / 2 * mom.variance[0],
    )
    s = 40_000
    params = next(post._parameter_draws(s, torch.Generator().manual_seed(0)))
    draws = torch.cat([p.reshape(s, -1) for p in params], 1)  # (S, P), layout order
    cov = reference.covariance_matrix
    sd = cov.diagonal().sqrt()
    # five standard errors, entry by entry (the covariance estimator's SE for Gaussian data)
    assert ((draws.mean(0) - reference.mean).abs() <= 5 * sd / math.sqrt(s) + 1e-12).all()
    se = ((sd[:, None] * sd[None, :]) ** 2 + cov**2).sqrt() / math.sqrt(s)
    assert ((torch.cov(draws.T) - cov).abs() <= 5 * se + 1e-12).all()


def test_outputs_are_the_network_under_each_draw(recorded):
    post = _fitted(recorded, epochs=4, swa_start=1, prediction_noise="weights")
    x = _data(5)[0]
    out = post.sample_outputs(x, 7, generator=torch.Generator().manual_seed(3))
    params = next(post._parameter_draws(7, torch.Generator().manual_seed(3)))
    names = [n for n, _ in post.network.named_parameters()]
    assert out.shape == (7, 5, 2)
    for i in range(7):
        weights = {n: p[i] for n, p in zip(names, params, strict=True)}
        torch.testing.assert_close(out[i], functional_call(post.network, weights, (x,)))
    assert not torch.allclose(out[0], out[1])


def test_refit_collects_a_new_trajectory_and_bad_data_loses_nothing(recorded):
    post = _fitted(recorded, epochs=5, swa_start=1)
    assert post.n_collected == 4
    x, y = _data()
    with pytest.raises(ValueError, match="same number of rows"):
        post.fit((x, y[:-1]), epochs=3)
    assert post.n_collected == 4
    post.fit((x, y), epochs=3, batch_size=16, seed=2)
    assert post.n_collected == 2  # swa_start=1 of 3 epochs: the old 4 are gone


def test_single_run_starts_from_the_given_weights_and_leaves_the_module_alone():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    post = SWAG(net, "gaussian")
    torch.testing.assert_close(post._params["model.0.weight"][0], net[0].weight.detach())
    post.fit(_data(dtype=torch.float32), epochs=2, seed=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------ schedules
def test_constant_schedule(schedule):
    post = SWAG(_net(), "gaussian", swa_start=2, swa_lr=0.01)
    post.fit(_data(dtype=torch.float32), epochs=5, lr=0.1, optimizer="sgd", seed=0)
    assert [(e, round(lr, 12), n) for e, lr, n in schedule] == [
        (1, 0.1, 0),
        (2, 0.1, 0),
        (3, 0.01, 1),
        (4, 0.01, 2),
        (5, 0.01, 3),
    ]


def test_fraction_start_and_swa_lr_from_the_first_epoch(schedule):
    post = SWAG(_net(), "gaussian", swa_start=0.0, swa_lr=0.01)
    post.fit(_data(dtype=torch.float32), epochs=3, lr=0.1, seed=0)
    assert [lr for _, lr, _ in schedule] == [0.01] * 3
    assert post.n_collected == 3
    schedule.clear()
    post = SWAG(_net(), "gaussian", swa_start=0.75)  # floor(0.75 * 2) = 1 epoch first
    post.fit(_data(dtype=torch.float32), epochs=2, seed=0)
    assert [n for *_, n in schedule] == [0, 1]


def test_cyclic_schedule(schedule):
    post = SWAG(_net(), "gaussian", swa_start=1, swa_lr=0.01, swa_schedule="cyclic", cycle_length=3)
    post.fit(_data(dtype=torch.float32), epochs=8, lr=0.1, optimizer="sgd", seed=0)
    lrs = [round(lr, 12) for _, lr, _ in schedule]
    assert lrs == [0.1, 0.1, 0.055, 0.01, 0.1, 0.055, 0.01, 0.1]
    # collected at the end of each complete cycle, at its lowest rate; the last one is partial
    assert [n for *_, n in schedule] == [0, 0, 0, 1, 1, 1, 2, 2]


# ------------------------------------------------------------------------ MultiSWAG
def test_multiswag_members_are_independent_runs_stacked():
    """Stacked MultiSWAG == M separate SWAG runs from the members' initial weights."""
    x, y = _data()
    template = _net().double()
    multi = SWAG(
        template, "gaussian", n_members=3, rank=4, swa_start=2, seed=5, independent_data_order=False
    )
    initial = {k: v.detach().clone() for k, v in multi._params.items()}
    assert not torch.equal(initial["model.0.weight"][0], initial["model.0.weight"][1])
    opts = dict(epochs=6, batch_size=16, lr=2e-2, optimizer="sgd", seed=11)
    multi.fit((x, y), **opts)
    mom = multi.moments
    assert mom.mean.shape == (3, _flat(multi, 0).numel()) and mom.deviations.shape[:2] == (3, 4)
    for m in range(3):
        net = copy.deepcopy(template)
        net.load_state_dict(
            {k.removeprefix("model."): v[m] for k, v in initial.items() if k.startswith("model.")}
        )
        single = SWAG(net, "gaussian", rank=4, swa_start=2)
        single.fit((x, y), **opts)
        one = single.moments
        torch.testing.assert_close(mom.mean[m], one.mean[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mom.variance[m], one.variance[0], rtol=1e-7, atol=1e-14)
        torch.testing.assert_close(mom.deviations[m], one.deviations[0], rtol=1e-7, atol=1e-12)
    assert not torch.allclose(mom.mean[0], mom.mean[1])


@pytest.mark.parametrize("n_members", [1, 2])
def test_local_draws_of_a_linear_layer_have_the_swag_covariance_per_row(n_members):
    """A single Linear layer under the local reparameterisation trick: each row's outputs have
    the mean A mu and covariance A Sigma A^T of the weight Gaussian (A maps the flat weights to
    the row's outputs); two rows share the low-rank part, not the diagonal one."""
    torch.manual_seed(0)
    x_train, y_train = _data()
    post = SWAG(
        nn.Linear(2, 2).double(),
        "gaussian",
        rank=4,
        swa_start=1,
        scale=3.0,
        n_members=n_members,
        seed=0,
    )
    post.fit((x_train, y_train), epochs=7, batch_size=16, lr=5e-2, optimizer="sgd", seed=1)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    assert post._local_layers(x) == (("model.weight", "model.bias"),)
    s = 40_000
    out = post.sample_outputs(x, s * n_members, generator=torch.Generator().manual_seed(0))
    out = out.reshape(n_members, s, 4)  # member-major; (row, output) flattened
    mom = post.moments
    k = mom.deviations.shape[1]
    # A: (4, P) for the flat layout (weight (2, 2) row-major, then bias (2,)).
    a = torch.zeros(4, 6, dtype=torch.float64)
    for r in range(2):
        for o in range(2):
            a[2 * r + o, 2 * o : 2 * o + 2] = x[r]
            a[2 * r + o, 4 + o] = 1.0
    for m in range(n_members):
        factor = mom.deviations[m].T * math.sqrt(3.0 / (2 * (k - 1)))
        low = a @ factor @ factor.T @ a.T
        diag = a @ torch.diag(3.0 / 2 * mom.variance[m]) @ a.T
        same_row = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2)).double()
        cov = low + diag * same_row  # no diagonal-part covariance across rows
        sd = cov.diagonal().sqrt()
        draws = out[m]
        assert ((draws.mean(0) - a @ mom.mean[m]).abs() <= 5 * sd / math.sqrt(s)).all()
        se = ((sd[:, None] * sd[None, :]) ** 2 + cov**2).sqrt() / math.sqrt(s)
        assert ((torch.cov(draws.T) - cov).abs() <= 5 * se + 1e-12).all()
        # the test can tell: whole weight draws would put these across-row entries far off
        assert ((diag * (1 - same_row)).abs() > 10 * se).any()


def test_local_and_weight_draws_agree_per_row_through_an_mlp(recorded):
    """Through a tanh MLP the per-row output distribution of the local draws is that of whole
    weight draws (means within Monte Carlo error, spreads within 4%)."""
    post = _fitted(recorded, epochs=6, rank=5, swa_start=1, scale=4.0)
    options = {**post.options(), "prediction_noise": "weights"}
    weights = SWAG(_net().double(), "gaussian", **options)
    weights.load_state_dict(post.state_dict())
    x = _data(6, seed=4)[0]
    n = 30_000
    a = post.sample_outputs(x, n, generator=torch.Generator().manual_seed(1))
    b = weights.sample_outputs(x, n, generator=torch.Generator().manual_seed(2))
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() / se).max() < 4.5
    torch.testing.assert_close(a.std(0) / b.std(0), torch.ones_like(se), rtol=0, atol=0.04)


def test_multiswag_draws_come_member_by_member():
    x, y = _data()
    multi = SWAG(_net().double(), "gaussian", n_members=2, scale=1e-20, swa_start=1, seed=0)
    multi.fit((x, y), epochs=3, seed=0)
    out = multi.sample_outputs(x[:4], 6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 4, 2)
    mean = multi.moments.mean
    for i in range(6):  # a vanishing scale puts every draw on its member's SWA mean
        m = i // 3
        weights, offset = {}, 0
        for name, p in multi.network.named_parameters():
            weights[name] = mean[m, offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        torch.testing.assert_close(out[i], functional_call(multi.network, weights, (x[:4],)))
    assert multi.default_n_samples == 100
    assert SWAG(_net(), n_members=3, seed=0).default_n_samples == 102
    with pytest.raises(ValueError, match="multiple of 2; got 5"):
        multi.sample_outputs(x[:4], 5)


# ------------------------------------------------------------------------ BatchNorm
def _bn_fitted(**options):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) * 2 + 1
    y = (x[:, 0] > 1).long()
    post = SWAG(_bn_net().double(), swa_start=0, **options)
    post.fit((x, y), epochs=4, batch_size=8, lr=0.05, seed=0)
    return post, x, y


def _reference_bn_output(post, params, i, x_train, x):
    """Draw ``i`` in a plain copy of the network: statistics from all of x_train at once."""
    net = copy.deepcopy(post.network)
    names = [n for n, _ in net.named_parameters()]
    with torch.no_grad():
        for name, p in zip(names, params, strict=True):
            net.get_parameter(name).copy_(p[i])
        bn = net.model[1]
        bn.reset_running_stats()
        bn.momentum = None
        net.train()
        net(x_train)
        net.eval()
        return net(x)


def test_batchnorm_statistics_are_recomputed_for_each_draw():
    post, x_train, _ = _bn_fitted(bn_batch_size=64)  # one batch: exact statistics
    assert post.has_batchnorm
    xq = torch.randn(5, 3, dtype=torch.float64)
    out = post.sample_outputs(xq, 3, generator=torch.Generator().manual_seed(0))
    params = next(post._parameter_draws(3, torch.Generator().manual_seed(0)))
    for i in range(3):
        want = _reference_bn_output(post, params, i, x_train, xq)
        torch.testing.assert_close(out[i], want, rtol=1e-10, atol=1e-12)
    # the members' own running statistics are not what the draws use
    with post._evaluating():
        own = post._member_outputs(xq, None)[0]
    assert not torch.allclose(own, out[0])


def test_batchnorm_running_mean_is_exact_for_any_batching():
    post, x_train, _ = _bn_fitted(bn_batch_size=16)  # 3 batches of 14, 13, 13 rows
    params = next(post._parameter_draws(2, torch.Generator().manual_seed(0)))
    buffers = dict(zip(post._buffers, post._draw_buffers(params, 2), strict=True))
    for i in range(2):
        h = x_train @ params[0][i].T + params[1][i]  # the first Linear under draw i
        torch.testing.assert_close(buffers["model.1.running_mean"][i], h.mean(0))


def test_batchnorm_inputs_round_trip_and_dataloader_fit():
    post, x_train, y_train = _bn_fitted(bn_batch_size=64)
    xq = torch.randn(4, 3, dtype=torch.float64)
    want = post.sample_outputs(xq, 2, generator=torch.Generator().manual_seed(1))
    state = post.state_dict()
    assert torch.equal(state["swag.bn_inputs"], x_train)
    fresh = SWAG(_bn_net().double(), swa_start=0, bn_batch_size=64)
    fresh.load_state_dict(state)
    got = fresh.sample_outputs(xq, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=40
    )
    on_loader = SWAG(_bn_net().double(), swa_start=0, bn_batch_size=64)
    on_loader.fit(loader, epochs=2, seed=0)
    want = on_loader.sample_outputs(xq, 2, generator=torch.Generator().manual_seed(1))
    state = on_loader.state_dict()
    assert "swag.bn_inputs" not in state  # a DataLoader is not saved
    fresh = SWAG(_bn_net().double(), swa_start=0, bn_batch_size=64)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="set_batchnorm_inputs"):
        fresh.sample_outputs(xq, 2)
    fresh.set_batchnorm_inputs(x_train)
    got = fresh.sample_outputs(xq, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_without_batchnorm_nothing_is_recomputed(recorded, monkeypatch):
    def fail(*args):
        raise AssertionError("BatchNorm recomputation on a model without BatchNorm")

    monkeypatch.setattr(SWAG, "_recompute_batchnorm", fail)
    post = _fitted(recorded, epochs=3)
    assert not post.has_batchnorm and post._bn_inputs is None
    assert "swag.bn_inputs" not in post.state_dict()
    assert post.sample_outputs(_data(3)[0], 4).shape == (4, 3, 2)
    with pytest.raises(ValueError, match="no BatchNorm"):
        post.set_batchnorm_inputs(_data(3)[0])


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"scale": 0}, "scale must be a positive finite number"),
        ({"scale": -0.5}, "scale must be a positive"),
        ({"scale": float("inf")}, "scale must be a positive"),
        ({"swa_start": 1.0}, r"swa_start must be a fraction .* \[0, 1\).*got 1.0"),
        ({"swa_start": -1}, "swa_start must be"),
        ({"swa_start": True}, "swa_start must be"),
        ({"swa_lr": 0.0}, "swa_lr must be None or a positive"),
        ({"swa_schedule": "cosine"}, "unknown swa_schedule 'cosine'; choose one of"),
        ({"swa_schedule": "cyclic"}, "needs swa_lr"),
        ({"cycle_length": 1}, "cycle_length must be an integer >= 2"),
        ({"n_members": 0}, "n_members must be a positive integer"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        SWAG(_net(), "gaussian", **options)


def test_swa_start_outside_the_training_run():
    data = _data(dtype=torch.float32)
    post = SWAG(_net(), "gaussian", swa_start=10)
    with pytest.raises(ValueError, match="swa_start=10 epochs is outside the training run of 10"):
        post.fit(data, epochs=10)
    cyclic = SWAG(_net(), "gaussian", swa_start=0.5, swa_lr=1e-3, swa_schedule="cyclic")
    with pytest.raises(ValueError, match="only 3 epochs"):
        cyclic.fit(data, epochs=6)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant', got 'cosine'"):
        SWAG(_net(), "gaussian").fit(data, epochs=2, lr_schedule="cosine")
    assert post.n_collected == 0


def test_predicting_before_any_iterate_was_collected():
    post = SWAG(_net(), "gaussian")
    with pytest.raises(ValueError, match="no iterate yet; call fit first"):
        post.moments  # noqa: B018
    with pytest.raises(ValueError, match="no iterate yet; call fit first"):
        post.predict(torch.zeros(3, 2), 4)
    # early stopping ends the fit before the SWA phase: validation labels are the opposite
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    post = SWAG(_net(), "categorical", swa_start=5)
    with pytest.warns(UserWarning, match="collected no iterate"):
        history = post.fit((x, y), epochs=10, lr=0.1, val_data=(x, 1 - y), patience=1, seed=0)
    assert history.stopped_early and history.epochs_run < 5
    with pytest.raises(ValueError, match="collected no iterate.*swa_start=5"):
        post.predict(x[:3], 4)


def test_registered():
    assert bdl.get_posterior("swag") is bdl.SWAG


def test_local_draws_with_middle_dimensions_match_flat_rows(recorded):
    """Inputs ``(B, T, in)`` (a linear layer applied per position): each position's outputs
    have the distribution of the same row given flat, ``(B * T, in)`` (MultiSWAG, 2 members)."""
    torch.manual_seed(0)
    x_train, y_train = _data()
    post = SWAG(_net().double(), "gaussian", rank=4, swa_start=1, scale=3.0, n_members=2, seed=0)
    post.fit((x_train, y_train), epochs=6, batch_size=16, lr=5e-2, optimizer="sgd", seed=1)
    x = _data(6, seed=3)[0].reshape(3, 2, 2)  # 3 rows of 2 positions
    assert post._local_layers(x) == (("model.0.weight", "model.0.bias"),)
    n = 20_000
    with torch.no_grad():  # the internal draw: the input-shape check wants (B, 2)
        a = post._sample_outputs(x, n, torch.Generator().manual_seed(0)).reshape(2, n // 2, 6, 2)
    b = post.sample_outputs(x.reshape(6, 2), n, generator=torch.Generator().manual_seed(1))
    b = b.reshape(2, n // 2, 6, 2)
    se = (a.var(1) / (n // 2) + b.var(1) / (n // 2)).sqrt()
    assert ((a.mean(1) - b.mean(1)).abs() / se).max() < 4.5
    torch.testing.assert_close(a.std(1) / b.std(1), torch.ones_like(se), rtol=0, atol=0.05)
