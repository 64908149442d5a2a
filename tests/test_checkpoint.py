"""Checkpoints of the fit loop: a fit killed at any point and resumed ends bit-identical (CPU)
to one never interrupted; a checkpoint of another run is refused, naming the difference."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bayesdl as bdl
from bayesdl.checkpoint import FILE_NAME, Checkpoint
from bayesdl.files import ModelFileError, read_file
from bayesdl.training import TrainConfig
from conftest import make_posterior, mlp

TESTS = Path(__file__).resolve().parent


class _Killed(Exception):
    """Stands in for SIGKILL in the in-process tests: raised right after a checkpoint."""


@contextlib.contextmanager
def _killed_after(epoch: int):
    """The next fit dies just after writing its checkpoint of ``epoch``."""
    save = Checkpoint.save

    def save_then_die(self, loop, *args, **kwargs):
        save(self, loop, *args, **kwargs)
        if loop.epoch == epoch:
            raise _Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save", save_then_die)
        with pytest.raises(_Killed):
            yield


@contextlib.contextmanager
def _saved_epochs():
    """Records the epoch of every checkpoint written inside the block."""
    epochs: list[int] = []
    save = Checkpoint.save

    def recording(self, loop, *args, **kwargs):
        epochs.append(loop.epoch)
        save(self, loop, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save", recording)
        yield epochs


def _build(method: str, init_seed: int = 0, *, hidden: int = 8, likelihood="categorical", **kw):
    torch.manual_seed(init_seed)  # the user's module; a resume must overwrite its weights
    n_out = 2 if likelihood == "gaussian" else 3
    if method == "swag":  # its default seed is drawn from the global generator
        kw.setdefault("seed", 0)
    return make_posterior(method, mlp(hidden=hidden, n_out=n_out), likelihood, **kw)


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ after resuming: {different}"


def _check_resume(
    method: str, data, folder: Path, killed_at: int, options: dict, **posterior_options
):
    """Uninterrupted fit vs. a fit killed after the checkpoint of ``killed_at`` and resumed by a
    fresh posterior (other initial weights): same history, bit-identical state. Returns the
    resumed posterior and its history."""
    reference = _build(method, **posterior_options)
    expected = reference.fit(data, **options)  # no checkpoints: writing them changes nothing
    with _killed_after(killed_at):
        _build(method, **posterior_options).fit(data, checkpoint_dir=folder, **options)
    resumed = _build(method, init_seed=1, **posterior_options)
    with _saved_epochs() as epochs:
        history = resumed.fit(data, checkpoint_dir=folder, resume=True, **options)
    assert epochs and min(epochs) > killed_at  # it continued, it did not start over
    assert history == expected
    _assert_same_state(resumed, reference)
    return resumed, history


# ----------------------------------------------------------------- killed processes
# Big enough that an epoch takes tens of milliseconds: the test sees the checkpoint of epoch 2
# and kills the fit long before it ends.
_SLOW_EPOCHS = 12


def slow_fit(method: str, folder: str, resume: bool = False, out: str | None = None):
    """The fit the subprocesses run (and the test process, uninterrupted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    options = {"swag": {"rank": 3, "swa_start": 2}}.get(method, {})
    post = _build(method, init_seed=int(resume), hidden=32, **options)
    checkpoints = {} if folder is None else {"checkpoint_dir": folder, "resume": resume}
    post.fit((x, y), epochs=_SLOW_EPOCHS, batch_size=32, lr=1e-2, seed=3, **checkpoints)
    if out is not None:
        from safetensors.torch import save_file

        save_file(post.state_dict(), out)
    return post


def _spawn(method: str, folder: Path, resume: bool, out: Path | None = None) -> subprocess.Popen:
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "torch.set_num_threads(1)\n"
        "from test_checkpoint import slow_fit\n"
        f"slow_fit({method!r}, {str(folder)!r}, {resume!r}, {out and str(out)!r})\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize("method", ["deep_ensemble", "mean_field_vi", "swag", "mc_dropout"])
def test_a_killed_process_resumes_bit_identical(method, tmp_path):
    path = tmp_path / FILE_NAME
    first = _spawn(method, tmp_path, resume=False)
    deadline = time.monotonic() + 60
    epoch = 0
    while epoch < 2:
        assert first.poll() is None, f"the fit ended before it was killed: {first.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 60 s"
        if path.exists():  # written atomically: always whole, so it must read
            epoch = read_file(path, "checkpoint")[0]["epoch"]
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    first.stderr.close()
    header, _ = read_file(path, "checkpoint")
    assert 2 <= header["epoch"] < _SLOW_EPOCHS and not header["finished"]

    out = tmp_path / "resumed.safetensors"
    second = _spawn(method, tmp_path, resume=True, out=out)
    threads = torch.get_num_threads()  # the uninterrupted run, here, while the second runs
    torch.set_num_threads(1)
    try:
        expected = slow_fit(method, None).state_dict()
    finally:
        torch.set_num_threads(threads)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err.decode()
    assert read_file(path, "checkpoint")[0]["finished"]

    from safetensors.torch import load_file

    resumed = load_file(out)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


# ----------------------------------------------------------------- in-process equivalence
@pytest.mark.parametrize("method", bdl.available_posteriors())
def test_every_trained_method_resumes_bit_identical(method, classification_data, tmp_path):
    # Laplace trains (through the same loop) when given epochs, then takes its curvature.
    options = {"epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0, "checkpoint_every": 2}
    _check_resume(method, classification_data, tmp_path, 4, options)


def test_checkpoints_are_written_every_k_epochs_and_after_the_last(classification_data, tmp_path):
    folder = tmp_path / "new" / "dir"  # created
    with _saved_epochs() as epochs:
        history = _build("deterministic").fit(
            classification_data, epochs=7, seed=0, checkpoint_dir=folder, checkpoint_every=3
        )
    assert epochs == [3, 6, 7]
    header, tensors = read_file(folder / FILE_NAME, "checkpoint")
    assert header["epoch"] == 7 and header["finished"]
    assert header["identity"]["method"] == "deterministic"
    assert header["identity"]["training"]["epochs"] == 7
    n_state = len(header["identity"]["state"])
    for i in range(n_state):
        assert f"state.{i}" in tensors and f"guard.verified.{i}" in tensors
    assert {"rng.data_order", "rng.torch", "history.train_loss"} <= tensors.keys()
    assert any(k.startswith("optimizer.state.0.exp_avg") for k in tensors)
    assert tensors["history.train_loss"].tolist() == history.train_loss
    assert header["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_early_stopping_state_survives_the_interruption(classification_data, tmp_path):
    options = {
        "epochs": 30,
        "batch_size": 8,
        "lr": 5e-2,
        "seed": 0,
        "val_fraction": 0.25,
        "patience": 3,
    }
    killed_at = 20
    _, history = _check_resume("deep_ensemble", classification_data, tmp_path, killed_at, options)
    # The scenario tested: killed while the count of epochs without improvement was running
    # (it reaches the patience less than `patience` epochs after the kill), and the members'
    # best epochs (restored at the end) differ.
    assert history.stopped_early and 0 < history.epochs_run - killed_at < options["patience"]
    assert len(set(history.member_best_epochs)) > 1


def test_cosine_schedule_resumes(classification_data, tmp_path):
    options = {"epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0, "lr_schedule": "cosine"}
    _check_resume("mc_dropout", classification_data, tmp_path, 3, options)


@pytest.mark.parametrize("val", [False, True])
def test_member_epochs_resume(classification_data, tmp_path, val):
    options = {"epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0, "member_epochs": (2, 4, 6)}
    if val:
        options["val_fraction"] = 0.25
    _check_resume("deep_ensemble", classification_data, tmp_path, 3, options)


def test_swag_keeps_collecting_across_the_interruption(classification_data, tmp_path):
    # Cyclic rate (set by SWAG's end_epoch for the next epoch); killed mid-cycle, after one
    # iterate was collected. MultiSWAG: two members.
    options = {"epochs": 9, "batch_size": 16, "lr": 5e-2, "seed": 0}
    swag = {
        "swa_start": 2,
        "swa_schedule": "cyclic",
        "swa_lr": 5e-3,
        "cycle_length": 2,
        "n_members": 2,
        "rank": 2,
    }
    resumed, _ = _check_resume("swag", classification_data, tmp_path, 5, options, **swag)
    assert resumed.n_collected == 3


@pytest.mark.parametrize("noise", ["pooled", "fresh"])
def test_vi_noise_and_kl_annealing_resume(classification_data, tmp_path, noise):
    # 4 steps per epoch: a noise pool (128 steps) and a fresh block span the interruption.
    options = {"epochs": 6, "batch_size": 16, "lr": 1e-2, "seed": 0}
    vi = {"training_noise": noise, "kl_annealing_epochs": 4, "n_train_samples": 2}
    _check_resume("mean_field_vi", classification_data, tmp_path, 3, options, **vi)


def test_regression_with_a_learned_noise_resumes(regression_data, tmp_path):
    options = {"epochs": 5, "batch_size": 16, "lr": 1e-2, "seed": 0, "optimizer": "sgd"}
    _check_resume("mc_dropout", regression_data, tmp_path, 2, options, likelihood="gaussian")


def test_a_finished_checkpoint_returns_its_result_without_training(classification_data, tmp_path):
    options = {"epochs": 4, "seed": 0, "val_fraction": 0.25, "checkpoint_dir": tmp_path}
    done = _build("mc_dropout")
    expected = done.fit(classification_data, **options)
    path = tmp_path / FILE_NAME
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    again = _build("mc_dropout", init_seed=1)
    assert again.fit(classification_data, resume=True, **options) == expected
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # no epoch ran
    _assert_same_state(again, done)


def test_resume_without_a_checkpoint_starts_from_scratch(classification_data, tmp_path):
    options = {"epochs": 3, "seed": 0}
    plain = _build("mc_dropout")
    expected = plain.fit(classification_data, **options)
    fresh = _build("mc_dropout")
    with _saved_epochs() as epochs:
        history = fresh.fit(classification_data, checkpoint_dir=tmp_path, resume=True, **options)
    assert epochs == [1, 2, 3] and history == expected
    _assert_same_state(fresh, plain)


def test_unseeded_resume_keeps_the_split_and_finishes(classification_data, tmp_path):
    options = {"epochs": 5, "batch_size": 16, "val_fraction": 0.25, "checkpoint_dir": tmp_path}
    with _killed_after(2):
        _build("mc_dropout").fit(classification_data, **options)
    header, tensors = read_file(tmp_path / FILE_NAME, "checkpoint")
    resumed = _build("mc_dropout", init_seed=1)
    history = resumed.fit(classification_data, resume=True, **options)
    assert history.epochs_run == 5 and len(history.val_loss) == 5
    assert history.train_loss[:2] == tensors["history.train_loss"].tolist()
    assert read_file(tmp_path / FILE_NAME, "checkpoint")[0]["data_seed"] == header["data_seed"]


# ----------------------------------------------------------------- refusals
def _written(tmp_path, data, method="mc_dropout", **kw):
    _build(method, **kw.pop("posterior", {})).fit(
        data, epochs=2, seed=0, checkpoint_dir=tmp_path, **kw
    )


@pytest.mark.parametrize(
    ("saved", "named"),
    [
        ({"method": "deterministic"}, ["method", "'deterministic'", "'mc_dropout'"]),
        ({"posterior": {"hidden": 16}}, ["state.0", "float32[16, 4]", "float32[8, 4]"]),
        ({"lr": 1e-2}, ["training.lr", "0.01", "0.001"]),
        ({"posterior": {"likelihood": "gaussian"}}, ["likelihood", "'gaussian'"]),
    ],
    ids=["method", "hidden_size", "lr", "likelihood"],
)
def test_a_checkpoint_of_another_run_is_refused(
    classification_data, regression_data, tmp_path, saved, named
):
    # Written by another run; resumed by mc_dropout, hidden 8, categorical, lr 1e-3.
    saved = dict(saved)
    method = saved.pop("method", "mc_dropout")
    posterior = saved.pop("posterior", {})
    data = regression_data if posterior.get("likelihood") == "gaussian" else classification_data
    _written(tmp_path, data, method, posterior=posterior, **saved)
    with pytest.raises(ModelFileError) as info:
        _build("mc_dropout").fit(
            classification_data, epochs=2, seed=0, checkpoint_dir=tmp_path, resume=True
        )
    message = str(info.value)
    for word in [*named, "delete the file", "checkpoint_dir"]:
        assert word in message


def test_a_damaged_checkpoint_is_refused(classification_data, tmp_path):
    _written(tmp_path, classification_data)
    path = tmp_path / FILE_NAME
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a bit flip in the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="damaged"):
        _build("mc_dropout").fit(
            classification_data, epochs=2, seed=0, checkpoint_dir=tmp_path, resume=True
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"resume": True}, "checkpoint_dir"),
        ({"checkpoint_dir": "x", "checkpoint_every": 0}, "checkpoint_every must be a positive"),
        ({"checkpoint_dir": "x", "checkpoint_every": True}, "checkpoint_every"),
        ({"checkpoint_dir": 3}, "checkpoint_dir must be None or a folder path"),
        ({"checkpoint_dir": "x", "resume": "yes"}, "resume must be True or False"),
    ],
)
def test_bad_checkpoint_options(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)
