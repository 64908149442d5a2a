"""Fits that tests/test_distributed.py runs on two processes (torchrun, gloo) and on one.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_cases.py OUT
[CASE ...]`` runs each case on every process; rank 0 writes ``OUT/CASE.safetensors`` with
the fitted posterior's state, its training history, its sampled outputs and whether every
process ended with the same weights. :func:`run_case` called in a single process gives the
reference the test compares them with.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesdl as bdl
from bayesdl import distributed

N_ROWS = 203  # with batches of 32 the last one has 11 rows: shards of 6 and 5
N_TEST = 17  # prediction rows: shares of 9 and 8
CHECKPOINTS: str | None = None  # a folder every process sees (set by main)


def data(task: str = "regression"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ROWS + N_TEST, 3, generator=g, dtype=torch.float64)
    if task == "regression":
        y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(len(x), generator=g)
        y = y.double()
    else:
        y = (x[:, 0] + 0.5 * x[:, 2] > 0).long() + (x[:, 1] > 0.7).long()
    return x[:N_ROWS], y[:N_ROWS], x[N_ROWS:]


def net(n_out: int = 2, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    layers = [nn.Linear(3, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, n_out))
    return nn.Sequential(*layers).double()


def _fit(post, x, y, **options):
    return post.fit((x, y), batch_size=32, lr=0.01, seed=3, **options)


def case_deterministic(x, y):
    post = bdl.Deterministic(net(), "gaussian")
    return post, _fit(post, x, y, epochs=3)


def case_mc_dropout(x, y):
    post = bdl.MCDropout(net(dropout=0.2), "gaussian")
    return post, _fit(post, x, y, epochs=3)


def case_mc_dropout_predict(x, y):
    """No training: the sampled masks of a distributed prediction are a single process's."""
    post = bdl.MCDropout(net(n_out=3, dropout=0.3), "categorical")
    post.input_shape = (3,)
    return post, bdl.History()


def case_deterministic_classification(x, y):
    post = bdl.Deterministic(net(n_out=3), "categorical")
    return post, _fit(post, x, y, epochs=2, val_fraction=0.1)


def case_mean_field_vi(x, y):
    post = bdl.MeanFieldVI(net(), "gaussian")
    return post, _fit(post, x, y, epochs=3)


def case_mean_field_vi_unseeded(x, y):
    """No seed: rank 0's data seed is shared, and the weight draws stay the same everywhere."""
    post = bdl.MeanFieldVI(net(), "gaussian")
    return post, post.fit((x, y), epochs=2, batch_size=32, lr=0.01, val_fraction=0.2)


def case_mean_field_vi_validation(x, y):
    post = bdl.MeanFieldVI(net(), "gaussian", n_train_samples=2)
    return post, _fit(post, x, y, epochs=4, val_fraction=0.2, patience=1)


def case_deep_ensemble(x, y):
    post = bdl.DeepEnsemble(net(), "gaussian", n_members=3, seed=0)
    return post, _fit(post, x, y, epochs=3, val_fraction=0.2, patience=2)


def case_deep_ensemble_members(x, y):
    post = bdl.DeepEnsemble(net(), "gaussian", n_members=3, seed=0, bootstrap=True)
    history = _fit(
        post, x, y, epochs=3, weight_decay=[0.0, 1e-3, 1e-2], val_fraction=0.2,
        parallel="members",
    )  # fmt: skip
    return post, history


def case_swag(x, y):
    post = bdl.SWAG(net(), "gaussian", rank=3, swa_start=1, seed=0)
    return post, _fit(post, x, y, epochs=3)


def case_multiswag_members(x, y):
    post = bdl.SWAG(net(), "gaussian", rank=3, swa_start=1, n_members=2, seed=0)
    return post, _fit(post, x, y, epochs=3, parallel="members")


def case_sgmcmc(x, y):
    """The chain's noise is drawn in the update, from the generator every process shares."""
    post = bdl.SGMCMC(net(), "gaussian", n_kept=4, burn_in=0.3)
    return post, post.fit((x, y), epochs=3, batch_size=32, lr=0.01, seed=3)


def case_ivon(x, y):
    """IVON's weight draw per step is shared; its update reads the same noise everywhere."""
    post = bdl.IVON(net(), "gaussian", beta2=0.999)
    return post, post.fit((x, y), epochs=3, batch_size=32, lr=0.05, seed=3)


def case_laplace_kron(x, y):
    post = bdl.Laplace(net(), "gaussian", subset="all", hessian="kron")
    return post, _fit(post, x, y, epochs=2)


def case_laplace_full(x, y):
    post = bdl.Laplace(net(), "gaussian", subset="last_layer", hessian="full")
    return post, post.fit((x, y), batch_size=50)


def case_laplace_diag(x, y):
    post = bdl.Laplace(net(), "gaussian", subset="all", hessian="diag")
    return post, post.fit((x, y), batch_size=50)


def case_loader(x, y):
    """Each process brings its own DataLoader of a different size (rank 0: rows 0-119, rank 1:
    rows 120-202, batches of 16: 8 against 6 batches). In one process the reference reads, at
    step t, the union of what each process reads at step t."""
    post = bdl.MeanFieldVI(net(), "gaussian")
    cut, batch = 120, 16
    parts = [(0, cut), (cut, N_ROWS)]
    if distributed.world_size() > 1:
        lo, hi = parts[distributed.rank()]
        loader = DataLoader(TensorDataset(x[lo:hi], y[lo:hi]), batch_size=batch)
        return post, post.fit(loader, epochs=2, lr=0.01, seed=3)
    steps = []
    for t in range(-(-max(hi - lo for lo, hi in parts) // batch)):
        rows = [
            torch.arange(lo + t * batch, min(hi, lo + (t + 1) * batch))
            for lo, hi in parts
            if lo + t * batch < hi
        ]
        steps.append(torch.cat(rows).tolist())

    class Loader(DataLoader):
        def __len__(self):  # the dataset size N (the KL term's scale) is all the rows
            return len(steps)

    loader = Loader(TensorDataset(x, y), batch_sampler=steps)
    return post, post.fit(loader, epochs=2, lr=0.01, seed=3)


def case_checkpoint_resume(x, y):
    """Two epochs with a checkpoint (written by rank 0 only), then resumed to four."""
    folder = Path(CHECKPOINTS or tempfile.mkdtemp()) / "checkpoint_resume"
    post = bdl.MeanFieldVI(net(), "gaussian")
    _fit(post, x, y, epochs=4, checkpoint_dir=folder, checkpoint_every=2)
    # A new posterior resumes the finished run's checkpoint.
    again = bdl.MeanFieldVI(net(), "gaussian")
    history = _fit(again, x, y, epochs=4, checkpoint_dir=folder, resume=True)
    files = sorted(p.name for p in folder.iterdir())
    return again, history, files


CASES = {
    name.removeprefix("case_"): fn
    for name, fn in dict(globals()).items()
    if name.startswith("case_") and callable(fn)
}
CLASSIFICATION = {"mc_dropout_predict", "deterministic_classification"}


def run_case(name: str):
    """Fit case ``name``; ``(tensors, meta)`` to compare between runs."""
    x, y, x_test = data("classification" if name in CLASSIFICATION else "regression")
    result = CASES[name](x, y)
    post, history = result[0], result[1]
    g = torch.Generator().manual_seed(11)
    n = 6 if isinstance(post, bdl.SWAG) else 4
    if isinstance(post, (bdl.Laplace, bdl.DeepEnsemble)):
        n = None
    outputs = post.sample_outputs(x_test, n, generator=g, distributed=distributed.world_size() > 1)
    tensors = {f"state.{k}": v.detach().contiguous() for k, v in post.state_dict().items()}
    tensors["outputs"] = outputs.contiguous()
    if isinstance(post, bdl.Laplace):
        tensors["prior_precision"] = torch.tensor(post.prior_precision, dtype=torch.float64)
    meta = {
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "best_epoch": history.best_epoch,
        "member_best_epochs": history.member_best_epochs,
        "stopped_early": history.stopped_early,
    }
    if len(result) > 2:
        meta["files"] = result[2]
    return tensors, meta


def errors() -> dict[str, str]:
    """The messages of fits that must fail on every process alike."""
    x, y, _ = data()
    found = {}
    try:  # each process passes different tensors
        bdl.Deterministic(net(), "gaussian").fit((x + distributed.rank(), y), epochs=1)
    except ValueError as err:
        found["different_data"] = str(err)
    try:
        bdl.MeanFieldVI(net(), "gaussian").fit((x, y), epochs=1, parallel="members")
    except ValueError as err:
        found["members_without_members"] = str(err)
    try:
        bdl.DeepEnsemble(net(), "gaussian", n_members=1).fit((x, y), parallel="members")
    except ValueError as err:
        found["too_few_members"] = str(err)
    return found


def _in_sync(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every process holds the same state (a checksum gathered from each)."""
    mine = torch.stack([t.double().sum() for k, t in sorted(tensors.items()) if "state." in k])
    parts = [torch.empty_like(mine) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(parts, mine)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def main(out: str, names: list[str]) -> None:
    global CHECKPOINTS
    CHECKPOINTS = out
    torch.set_num_threads(1)
    group = distributed.init("gloo")
    assert group is not None and group.world == 2, group
    for name in names or sorted(CASES):
        tensors, meta = run_case(name)
        meta["in_sync"] = _in_sync(tensors)
        if group.rank == 0:
            save_file(tensors, str(Path(out) / f"{name}.safetensors"), {"meta": json.dumps(meta)})
    if not names:
        found = errors()
        (Path(out) / f"errors-{group.rank}.json").write_text(json.dumps(found))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
