"""The shared fit loop, tested with scripted objectives where the truth is known."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayesdl.data import TensorData
from bayesdl.training import TrainConfig, TrainingDivergedError, fit


class Quadratic:
    """loss = mean over the batch of (w - y)^2; the optimum is w = mean(y).

    ``nan_at`` makes the loss NaN at that global step (counting from 1), to script divergence.
    """

    n_orders = 1

    def __init__(self, k: int = 1, nan_at: int | None = None) -> None:
        self.w = torch.zeros(k, requires_grad=True)
        self.nan_at = nan_at
        self.steps = 0
        self.modes: list[bool] = []

    def parameters(self) -> list[Tensor]:
        return [self.w]

    def state(self) -> list[Tensor]:
        return [self.w]

    def train(self, mode: bool) -> None:
        self.modes.append(mode)

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        self.steps += 1
        loss = ((self.w[0] - y) ** 2).mean()
        if self.nan_at is not None and self.steps >= self.nan_at:
            loss = loss * float("nan")
        return loss

    def val_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return ((self.w[0] - y) ** 2).mean()


def _data(n=32, value=3.0):
    return TensorData(torch.zeros(n, 1), torch.full((n,), value))


def test_converges_to_the_optimum():
    obj = Quadratic()
    history = fit(obj, _data(), TrainConfig(epochs=200, batch_size=8, lr=0.1, seed=0))
    assert obj.w.item() == pytest.approx(3.0, abs=1e-2)
    assert history.epochs_run == 200 and history.train_loss[-1] < history.train_loss[0]
    assert obj.modes[-1] is False  # left in evaluation mode


def test_nan_in_first_batch_of_an_epoch_restores_the_epoch_before():
    # 4 batches per epoch; step 9 is the first batch of epoch 3: the weights at the start of
    # epoch 3 produced the NaN, so the last good ones are those at the start of epoch 2.
    obj = Quadratic(nan_at=9)
    snapshots = {}

    original = obj.loss

    def loss(x, y, n):
        snapshots.setdefault(obj.steps, obj.w.detach().clone())
        return original(x, y, n)

    obj.loss = loss
    with pytest.raises(TrainingDivergedError, match="epoch 3") as err:
        fit(obj, _data(), TrainConfig(epochs=10, batch_size=8, lr=0.1, seed=0))
    assert err.value.epoch == 3 and err.value.last_good_epoch == 1
    torch.testing.assert_close(obj.w.detach(), snapshots[4])  # start of epoch 2 = before step 5
    assert torch.isfinite(obj.w).all()


def test_nan_mid_epoch_restores_the_start_of_that_epoch():
    obj = Quadratic(nan_at=7)  # third batch of epoch 2
    start_of_epoch_2 = None

    def spy_train(mode, _orig=obj.train):
        nonlocal start_of_epoch_2
        if mode and len(obj.modes) == 1:
            start_of_epoch_2 = obj.w.detach().clone()
        _orig(mode)

    obj.train = spy_train
    with pytest.raises(TrainingDivergedError, match="epoch 2") as err:
        fit(obj, _data(), TrainConfig(epochs=10, batch_size=8, lr=0.1, seed=0))
    assert err.value.last_good_epoch == 1
    torch.testing.assert_close(obj.w.detach(), start_of_epoch_2)


class Members(Quadratic):
    """``k`` stacked members, each its own weight and loss ``(k,)``."""

    def __init__(self, k: int, nan_at: int | None = None) -> None:
        super().__init__(k, nan_at)
        self.n_members = k

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        self.steps += 1
        loss = ((self.w[:, None] - y) ** 2).mean(1)
        return (
            loss * float("nan") if self.nan_at is not None and self.steps >= self.nan_at else loss
        )


def test_member_epochs_survive_divergence():
    """Members whose epoch count ended before the last good epoch keep the weights of that
    count when a later epoch diverges; the others get the last good epoch's."""
    ends: dict[int, Tensor] = {}

    def run(nan_at=None, epochs=6):
        obj = Members(2, nan_at)
        original = obj.loss

        def loss(x, y, n):  # the weights at the start of steps 5, 9, 13: ends of epochs 1-3
            ends.setdefault(obj.steps, obj.w.detach().clone())
            return original(x, y, n)

        obj.loss = loss
        config = TrainConfig(epochs=epochs, batch_size=8, lr=0.1, seed=0, member_epochs=[1, 6])
        return obj, config

    obj, config = run(nan_at=15)  # third batch of epoch 4: epoch 3 was the last good one
    with pytest.raises(TrainingDivergedError, match="epoch 4") as err:
        fit(obj, _data(), config)
    assert err.value.last_good_epoch == 3
    assert obj.w[0] == ends[4][0] and obj.w[1] == ends[12][1]
    assert ends[4][0] != ends[12][0]  # member 0 moved on after its count; its epoch-1 weights stay

    obj, config = run()
    fit(obj, _data(), config)
    assert obj.w[0] == ends[4][0] and obj.w[1] != ends[4][1]
    with pytest.raises(ValueError, match="member_epochs got 2 values, but there are 3 members"):
        fit(Members(3), _data(), config)


def test_nan_at_the_very_start_restores_the_initial_weights():
    obj = Quadratic(nan_at=1)
    with pytest.raises(TrainingDivergedError, match="initial weights"):
        fit(obj, _data(), TrainConfig(epochs=3, batch_size=8, lr=0.1))
    assert obj.w.item() == 0.0


def test_early_stopping_restores_the_best_epoch():
    # training pulls w to 3 but validation wants 0: the best validation epoch is the first.
    obj = Quadratic()
    val = TensorData(torch.zeros(4, 1), torch.zeros(4))
    history = fit(
        obj, _data(), TrainConfig(epochs=50, batch_size=8, lr=0.1, patience=3, seed=0), val=val
    )
    assert history.stopped_early and history.epochs_run == 4
    assert history.best_epoch == 1
    assert obj.w.item() == pytest.approx(history.val_loss[0] ** 0.5, rel=1e-5)


class Stacked(Quadratic):
    """K independent quadratics with per-member losses, like a stacked ensemble."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.n_orders = k

    def loss(self, x, y, n):  # y: (K, b)
        return ((self.w[:, None] - y) ** 2).mean(-1)

    def val_loss(self, x, y):
        return ((self.w[:, None] - y[None]) ** 2).mean(-1)


def test_stacked_objective_gets_independent_orders_and_per_member_best():
    obj = Stacked(3)
    seen = []
    original = obj.loss

    def loss(x, y, n):
        seen.append(x[..., 0].clone())
        return original(x, y, n)

    obj.loss = loss
    data = TensorData(torch.arange(12.0)[:, None], torch.arange(12.0))
    fit(obj, data, TrainConfig(epochs=1, batch_size=4, lr=0.1, seed=0))
    first = seen[0]
    assert first.shape == (3, 4)
    assert not torch.equal(first[0], first[1]) or not torch.equal(first[1], first[2])
    # every member still sees every example once per epoch
    for m in range(3):
        assert sorted(torch.cat([b[m] for b in seen]).tolist()) == list(range(12))


def test_member_best_epochs_are_each_members_own():
    """Training pulls every member from 0 towards 3 (lr 0.1, one step an epoch); validation
    targets of 0.5, 1.5 and 2.5 are passed at different epochs, and each member is restored to
    its own best epoch, which the history reports."""
    obj = Stacked(3)
    obj.val_loss = lambda x, y: (obj.w - torch.tensor([0.5, 1.5, 2.5])) ** 2
    val = TensorData(torch.zeros(1, 1), torch.zeros(1))
    history = fit(obj, _data(n=8), TrainConfig(epochs=60, batch_size=8, lr=0.1, seed=0), val=val)
    best = history.member_best_epochs
    assert best is not None and len(best) == 3
    assert best[0] < best[1] < best[2] <= 60
    assert history.best_epoch == max(best)
    torch.testing.assert_close(obj.w.detach(), torch.tensor([0.5, 1.5, 2.5]), atol=0.1, rtol=0)
    assert fit(Quadratic(), _data(), TrainConfig(epochs=2), val=val).member_best_epochs is None


def test_seed_fixes_the_data_order():
    def order(seed):
        obj = Quadratic()
        xs = []
        original = obj.loss
        obj.loss = lambda x, y, n: (xs.append(x.clone()), original(x, y, n))[1]
        fit(
            obj,
            TensorData(torch.arange(16.0)[:, None], torch.zeros(16)),
            TrainConfig(epochs=1, batch_size=4, seed=seed),
        )
        return torch.cat(xs)

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"weight_decay": [0.1, -1.0]}, "weight_decay must be a number >= 0 or a non-empty"),
        ({"weight_decay": []}, "weight_decay"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"patience": 0}, "patience"),
        ({"member_epochs": []}, "member_epochs must be None or a non-empty sequence"),
        ({"epochs": 5, "member_epochs": [2, 6]}, "integers from 1 to epochs=5"),
        ({"member_epochs": [0]}, "member_epochs"),
        ({"member_epochs": 3}, "member_epochs"),
        ({"member_epochs": [True]}, "member_epochs"),
        ({"optimizer": "adamm"}, "unknown optimizer 'adamm'; choose one of 'adam'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_val_fraction_too_small_for_the_data():
    with pytest.raises(ValueError, match="leaves 0 for validation"):
        fit(Quadratic(), _data(n=4), TrainConfig(epochs=1, val_fraction=0.1))


def test_end_epoch_hook_sees_every_finished_epoch_and_the_optimizer():
    obj = Quadratic()
    calls = []

    def end_epoch(epoch, optimizer):
        calls.append((epoch, obj.w.item()))
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # freeze after the first epoch

    obj.end_epoch = end_epoch
    fit(obj, _data(), TrainConfig(epochs=3, batch_size=8, lr=0.1, seed=0))
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] != 0.0 and calls[1][1] == calls[2][1] == calls[0][1]
