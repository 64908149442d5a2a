"""torch.distributed: every method fitted on two gloo processes (torchrun) against one process.

The two-process runs are launched once per test module (``tests/distributed_cases.py`` under
``torch.distributed.run``, with a timeout); each case is then refitted here, in one process, and
the two are compared: state, training history and sampled outputs agree to float round-off for
every method whose training noise is shared by the processes, and the processes end in step.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

import bayesdl as bdl
import distributed_cases as cases
from bayesdl import distributed, training
from bayesdl.data import TensorData

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
TIMEOUT_S = 600
# Training noise per example (dropout masks) comes from each process's own generator.
PER_EXAMPLE_NOISE = {"mc_dropout"}
# Without a seed one process draws another run: only the processes' agreement is checked.
UNSEEDED = {"mean_field_vi_unseeded"}


def _torchrun(*args: str, cwd: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --standalone ARGS`` (a free port on this machine), stopped at ``timeout``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # a deadlock fails the test instead of hanging CI
        pytest.fail(f"{shlex.join(command)} ran past {timeout} s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    _torchrun("--nproc-per-node", "2", str(TESTS / "distributed_cases.py"), str(out), cwd=out)
    return out


def _load(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["meta"])


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_two_processes_match_one(two_processes, name):
    got, meta = _load(two_processes, name)
    torch.set_num_threads(1)  # as the workers run
    want, want_meta = cases.run_case(name)
    assert meta["in_sync"], "the processes ended with different weights"
    assert sorted(got) == sorted(want)
    if name in UNSEEDED:
        assert len(meta["val_loss"]) == 2 and all(np.isfinite(meta["val_loss"]))
        return
    if name in PER_EXAMPLE_NOISE:
        # Other dropout masks, the same problem: a loss within a few percent, nothing more.
        loss, want_loss = meta["train_loss"][-1], want_meta["train_loss"][-1]
        assert abs(loss - want_loss) < 0.05 * abs(want_loss)
        return
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=key)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(meta[key], want_meta[key], rtol=1e-12)
    for key in ("best_epoch", "member_best_epochs", "stopped_early", "files"):
        assert meta.get(key) == want_meta.get(key), key


def test_uneven_last_batch_was_exercised():
    """The cases' data leave a last batch of 11 rows: shards of 6 and 5."""
    assert cases.N_ROWS % 32 == 11 and cases.N_TEST % 2 == 1


def test_rank_zero_alone_writes_the_checkpoint(two_processes):
    _, meta = _load(two_processes, "checkpoint_resume")
    assert meta["files"] == ["checkpoint.safetensors"]


def test_errors_are_raised_on_every_process(two_processes):
    found = [json.loads((two_processes / f"errors-{r}.json").read_text()) for r in (0, 1)]
    assert (
        found[0].keys()
        == found[1].keys()
        == {
            "different_data",
            "members_without_members",
            "too_few_members",
        }
    )
    assert "different training tensors" in found[0]["different_data"]
    assert "DataLoader" in found[0]["different_data"]  # the fix for per-process shards
    assert "parallel='data'" in found[1]["members_without_members"]
    assert "at least 2 members" in found[0]["too_few_members"]


# ---------------------------------------------------------------------------- one process
class _FakeGroup(distributed.Group):
    def __init__(self, rank: int, world: int) -> None:  # no process group needed
        self.rank, self.world, self.device = rank, world, torch.device("cpu")


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("rows", [0, 1, 2, 4, 11, 32])
def test_shards_cover_every_row_once(world, rows):
    x = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    seen, weights = [], 0.0
    for rank in range(world):
        batches = training._shard_batches(iter([(x, x[:, 0])]), _FakeGroup(rank, world), False)
        for xb, _, weight in batches:
            seen += xb[:, 0].tolist()
            weights += weight
    assert seen == [float(i) for i in range(rows)]
    assert weights == pytest.approx(1.0 if rows else 0.0)
    sizes = _FakeGroup(0, world).shares(rows)
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1


def test_stacked_batches_are_sharded_along_the_rows():
    x = torch.arange(2 * 7, dtype=torch.float64).view(2, 7, 1)  # (members, rows, features)
    parts = [
        next(training._shard_batches(iter([(x, x[..., 0])]), _FakeGroup(r, 2), True))
        for r in (0, 1)
    ]
    assert [p[0].shape[1] for p in parts] == [4, 3]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=1), x)


def test_member_parallel_draws_the_single_process_orders():
    data = TensorData(torch.arange(10.0).unsqueeze(1), torch.arange(10.0))
    shard = distributed.MemberShard(1, 3, 4, _FakeGroup(0, 2))

    def batches(**kw):
        g = torch.Generator().manual_seed(0)
        return list(training._tensor_batches(data, 4, 4, g, **kw))

    whole, mine = batches(), batches(members=shard, stacked=True)
    for (xw, _), (xm, _) in zip(whole, mine, strict=True):
        torch.testing.assert_close(xm, xw[1:3])
    # a share of a single member yields its batches without the member axis
    single = batches(members=distributed.MemberShard(2, 3, 4, _FakeGroup(1, 2)), stacked=False)
    assert single[0][0].shape == (4, 1)
    torch.testing.assert_close(single[0][0], whole[0][0][2])


def test_without_a_process_group_fits_run_alone():
    x, y, _ = cases.data()
    assert distributed.resolve(None) is None and distributed.resolve(False) is None
    assert distributed.init() is None  # no torchrun environment: nothing to join
    assert distributed.rank() == 0 and distributed.world_size() == 1
    with pytest.raises(RuntimeError, match="torchrun"):
        bdl.Deterministic(cases.net(), "gaussian").fit((x, y), epochs=1, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        bdl.Deterministic(cases.net(), "gaussian").fit((x, y), epochs=1, distributed="yes")
    with pytest.raises(ValueError, match="unknown parallel"):
        bdl.Deterministic(cases.net(), "gaussian").fit((x, y), epochs=1, parallel="model")


def test_data_size_of_loaders(monkeypatch):
    """``N`` is the dataset a DistributedSampler shards, else every process's rows summed."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(torch.zeros(10, 1), torch.zeros(10))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    group = SimpleNamespace(sum_values=lambda *v: [3 * v[0]])  # three processes of this size
    assert training._data_size(DataLoader(dataset, sampler=sampler), group) == 10
    assert training._data_size(DataLoader(dataset), group) == 30
    assert training._data_size(DataLoader(dataset), None) == 10


# ---------------------------------------------------------------------------- the command line
def _diagnosis_csv(path: Path, n: int = 240) -> None:
    rng = np.random.default_rng(0)
    age, marker = rng.uniform(20, 80, n), rng.standard_normal(n)
    clinic = rng.choice(["north", "south", "east"], n)
    logit = 0.08 * (age - 50) + 2.0 * marker + (clinic == "east")
    diagnosis = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "malignant", "benign")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["age", "marker", "clinic", "diagnosis"])
        writer.writerows(zip(age.round(1), marker.round(4), clinic, diagnosis, strict=True))


def test_readme_torchrun_command_matches_one_process(tmp_path):
    """The README's torchrun line, run as written (plus a few epochs), writes the model one
    process writes."""
    (line,) = re.findall(r"^\$ torchrun (.*)$", README.read_text(), flags=re.MULTILINE)
    args = shlex.split(line, comments=True)
    assert args[:4] == ["--standalone", "--nproc-per-node", "2", "-m"], args
    assert args[4:6] == ["bayesdl", "fit"]
    _diagnosis_csv(tmp_path / args[6])
    out = args[args.index("--out") + 1]
    quick = ["--epochs", "4", "--quiet"]
    done = _torchrun(*args[1:], *quick, cwd=tmp_path)
    assert "processes: 2 (torch.distributed, gloo; parallel data)" in done.stdout
    assert done.stdout.count("model written to") == 1  # rank 0 alone reports
    one = subprocess.run(
        [sys.executable, "-m", "bayesdl", *args[5:], *quick, "--out", "one.safetensors"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr
    two_state = bdl.load(tmp_path / out).state_dict()
    one_state = bdl.load(tmp_path / "one.safetensors").state_dict()
    for key, value in one_state.items():
        torch.testing.assert_close(two_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_cli_rejects_members_for_methods_without_them(tmp_path, capsys):
    from bayesdl.cli import main

    _diagnosis_csv(tmp_path / "d.csv")
    status = main(
        [
            "fit",
            str(tmp_path / "d.csv"),
            "--target",
            "diagnosis",
            "--method",
            "mean_field_vi",
            "--parallel",
            "members",
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert status == 2
    assert "--parallel data" in capsys.readouterr().err


def test_cli_member_parallel_ensemble_matches_one_process(tmp_path):
    """Three members over two processes (2 and 1) write the ensemble one process writes."""
    _diagnosis_csv(tmp_path / "d.csv")
    fit = ["fit", "d.csv", "--target", "diagnosis", "--method", "deep_ensemble", "--members", "3"]
    fit += ["--epochs", "3", "--quiet"]
    done = _torchrun(
        "--nproc-per-node", "2", "-m", "bayesdl", *fit, "--parallel", "members",
        "--out", "two.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert "parallel members" in done.stdout
    one = subprocess.run(
        [sys.executable, "-m", "bayesdl", *fit, "--out", "one.safetensors"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr
    two_state = bdl.load(tmp_path / "two.safetensors").state_dict()
    one_state = bdl.load(tmp_path / "one.safetensors").state_dict()
    assert two_state.keys() == one_state.keys()
    for key, value in one_state.items():
        torch.testing.assert_close(two_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
