"""The one fit loop every trainable posterior uses.

A method supplies an :class:`Objective` (its parameters, its loss on a batch, its validation
loss); this module does everything else: batching (tensors or a DataLoader), the optimiser,
epochs, a validation split with early stopping, a progress bar when stderr is a terminal, seeds,
and a guard that stops on a NaN or infinite loss, restores the last good weights and names the
epoch.

Checkpoints: with ``checkpoint_dir`` the loop writes, every ``checkpoint_every`` epochs and after
the last one, everything it needs to continue (:mod:`bayesdl.checkpoint`); ``resume=True`` in a
new process continues from there, bit-identical (on the CPU) to an uninterrupted run with the
same ``seed``.

Stacked objectives (a deep ensemble trains ``K`` members as one program) return a loss per
member, shape ``(K,)``; the loop minimises their sum (the members' gradients stay independent)
and, with a validation set, keeps the best epoch of each member separately.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from bayesdl import distributed
from bayesdl._options import resolve
from bayesdl.checkpoint import Checkpoint, LoopState, tensor_signature
from bayesdl.data import TensorData
from bayesdl.distributed import Group, MemberShard

__all__ = [
    "History",
    "LRSchedule",
    "Objective",
    "OptimizerName",
    "Parallel",
    "TrainConfig",
    "TrainingDivergedError",
    "fit",
    "training_size",
]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the model holds the weights of the last good epoch."""

    def __init__(self, epoch: int, last_good_epoch: int) -> None:
        self.epoch = epoch
        self.last_good_epoch = last_good_epoch
        super().__init__(
            f"training diverged in epoch {epoch}: the loss or the weights became NaN or "
            f"infinite. The weights of epoch {last_good_epoch} (the last good one"
            f"{'; 0 means the initial weights' if last_good_epoch == 0 else ''}) were restored. "
            "Lower the learning rate, standardise inputs and targets, or add weight decay."
        )


class LRSchedule(str, Enum):
    """How the learning rate changes over the epochs."""

    #: The same rate throughout.
    CONSTANT = "constant"
    #: Cosine decay from ``lr`` at the first epoch towards 0 at the last (per epoch).
    COSINE = "cosine"


class Parallel(str, Enum):
    """What a distributed fit spreads over the processes (see :mod:`bayesdl.distributed`)."""

    #: Every process trains the whole model on its shard of each mini-batch; gradients summed.
    DATA = "data"
    #: Stacked members (deep ensembles, MultiSWAG) split between the processes, each trained
    #: on all the data; gathered at the end.
    MEMBERS = "members"


class OptimizerName(str, Enum):
    """Optimisers the loop can build by name."""

    #: Adam (the default); ``weight_decay`` is L2 added to the gradient.
    ADAM = "adam"
    #: AdamW, decoupled weight decay.
    ADAMW = "adamw"
    #: Plain SGD with momentum 0.9.
    SGD = "sgd"


@dataclass
class TrainConfig:
    """Settings of the fit loop; every posterior's ``fit(**training)`` accepts these names.

    Attributes
    ----------
    epochs: passes over the training data.
    batch_size: examples per step (ignored for a DataLoader, which batches itself).
    lr: learning rate.
    weight_decay: L2 strength (see :class:`OptimizerName`); for stacked members (deep ensembles,
        MultiSWAG) also a sequence with one value per member, so that a grid over the prior
        precision trains as one vectorised ensemble.
    optimizer: name of the optimiser. lr_schedule: see :class:`LRSchedule`.
    val_fraction: fraction of the training tensors held out for validation (0: none).
    val_data: an explicit validation pair ``(x, y)`` instead of a split.
    patience: stop after this many epochs without validation improvement (``None``: run all
        epochs, still restoring the best validation epoch when there is validation data).
    member_epochs: for stacked members, one epoch count per member, each at most ``epochs``:
        member ``m`` ends the fit with its weights at the end of epoch ``member_epochs[m]``
        (with validation data, its best epoch up to then; also when a later epoch diverges),
        so members refitted for different epoch counts still train as one vectorised program.
        All members run ``epochs`` epochs of the loop; ``None`` (default) gives every member
        ``epochs``.
    seed: seeds the data order, the split, dropout and initialisation noise during training.
    progress: show a progress bar; ``None`` shows one only when stderr is a terminal.
    checkpoint_dir: a folder (created if missing) where the loop keeps
        ``checkpoint.safetensors``, replaced atomically, with everything needed to continue the
        fit (see :mod:`bayesdl.checkpoint`); ``None`` (default): no checkpoints. Without
        ``resume``, a checkpoint already there is replaced.
    checkpoint_every: write the checkpoint after every this many epochs (default 1), and always
        after the last epoch (also when early stopping ends the fit).
    distributed: run over the processes of an initialised ``torch.distributed`` group (see
        :mod:`bayesdl.distributed`): ``None`` (default) when there is one of more than one
        process, ``True`` requires one, ``False`` trains in this process alone.
    parallel: what a distributed fit spreads over the processes, ``"data"`` (default: shards of
        every mini-batch) or ``"members"`` (stacked members); see :class:`Parallel`.
    resume: continue from the checkpoint in ``checkpoint_dir`` (needs it): the weights, the
        optimiser, the schedule, early stopping, the random streams and the method's own state
        (SWAG's moments, VI's noise) are restored and training goes on with the next epoch.
        With a ``seed`` the result is bit-identical (on the CPU) to a fit never interrupted;
        with ``seed=None`` the data order and split continue too, but dropout and sampling
        noise after the resume come from the new process's global generator. If there is no
        checkpoint yet the fit starts from scratch (so a job script can always pass
        ``resume=True``); a checkpoint of a finished fit restores its result without training.
        A checkpoint of another run (method, its options, likelihood, model shapes, data size,
        or one of ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``optimizer``,
        ``lr_schedule``, ``val_fraction``, ``patience``, ``member_epochs``, ``seed``) raises
        :class:`~bayesdl.files.ModelFileError` naming the differences.
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float | Sequence[float] = 0.0
    optimizer: OptimizerName | str = OptimizerName.ADAM
    lr_schedule: LRSchedule | str = LRSchedule.CONSTANT
    val_fraction: float = 0.0
    val_data: object = None
    patience: int | None = None
    member_epochs: Sequence[int] | None = None
    seed: int | None = None
    progress: bool | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 1
    resume: bool = False
    distributed: bool | None = None
    parallel: Parallel | str = Parallel.DATA

    def __post_init__(self) -> None:
        def bad(name, want):
            return ValueError(f"{name} must be {want}, got {getattr(self, name)!r}.")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", "a positive integer")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", "a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a positive finite number")
        decay = self.weight_decay
        if isinstance(decay, Tensor):
            decay = decay.tolist() if decay.ndim else float(decay)
        if isinstance(decay, Sequence) and not isinstance(decay, str):
            decay = tuple(decay)
            if not decay or not all(_nonnegative(v) for v in decay):
                raise bad("weight_decay", "a number >= 0 or a non-empty sequence of them")
        elif not _nonnegative(decay):
            raise bad("weight_decay", "a number >= 0 or a non-empty sequence of them")
        self.weight_decay = decay
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise bad("val_fraction", "a number in [0, 1)")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise bad("patience", "None or a positive integer")
        if self.member_epochs is not None:
            counts = self.member_epochs
            if isinstance(counts, Tensor):
                counts = counts.tolist()
            if (
                not isinstance(counts, Sequence)
                or isinstance(counts, str)
                or not counts
                or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= self.epochs
                    for c in counts
                )
            ):
                raise bad(
                    "member_epochs",
                    f"None or a non-empty sequence of integers from 1 to epochs={self.epochs}",
                )
            self.member_epochs = tuple(counts)
        if self.checkpoint_dir is not None and not isinstance(
            self.checkpoint_dir, (str, os.PathLike)
        ):
            raise bad("checkpoint_dir", "None or a folder path (str or os.PathLike)")
        if (
            not isinstance(self.checkpoint_every, int)
            or isinstance(self.checkpoint_every, bool)
            or self.checkpoint_every < 1
        ):
            raise bad("checkpoint_every", "a positive integer")
        if not isinstance(self.resume, bool):
            raise bad("resume", "True or False")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError(
                "resume=True continues from a checkpoint, but no checkpoint_dir was given; pass "
                "checkpoint_dir=, the folder the interrupted fit wrote its checkpoint to."
            )
        if self.distributed not in (None, True, False):
            raise bad("distributed", "None, True or False")
        self.parallel = resolve(Parallel, self.parallel, "parallel")
        self.lr_schedule = resolve(LRSchedule, self.lr_schedule, "lr_schedule")
        self.optimizer = resolve(OptimizerName, self.optimizer, "optimizer")

    #: The options that change the trajectory: a checkpoint resumes only with the same ones.
    _TRAJECTORY = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "optimizer",
        "lr_schedule",
        "val_fraction",
        "patience",
        "member_epochs",
        "seed",
    )

    def _trajectory(self) -> dict:
        """The options of :attr:`_TRAJECTORY` as plain values (for a checkpoint's identity)."""
        plain = {name: getattr(self, name) for name in self._TRAJECTORY}
        plain["optimizer"] = self.optimizer.value
        plain["lr_schedule"] = self.lr_schedule.value
        return plain


def _nonnegative(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value >= 0
        and math.isfinite(value)
    )


@dataclass
class History:
    """What happened during ``fit``: mean training loss (and validation loss) per epoch."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    #: The last epoch whose validation loss improved (on any member, for stacked objectives).
    best_epoch: int | None = None
    #: Stacked objectives with validation data: each member's best epoch (its weights are the
    #: ones restored at the end).
    member_best_epochs: list[int] | None = None
    stopped_early: bool = False

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


class Objective(Protocol):
    """What a method supplies to the loop.

    ``n_orders`` is 1 for one model; a stacked objective with ``K`` members that wants each
    member to see its own data order sets it to ``K`` and then receives batches of inputs
    ``(K, b, ...)`` and targets ``(K, b, ...)``.

    Optional members, looked up with ``getattr``:

    * ``end_epoch(epoch, optimizer)`` is called after every finished epoch (1-based), for
      methods that act on the trajectory (SWAG) or adjust the optimiser's learning rate.
    * ``n_members``, for stacked objectives whose every parameter has a leading member axis of
      that length (needed for one weight decay per member).
    * ``bootstrap``: ``True`` for a stacked objective (``n_orders = K``) whose members each train
      on their own bootstrap resample of the training tensors: ``n`` rows drawn with
      replacement once per fit (from the data seed, so a resumed fit draws the same), then
      shuffled every epoch.
    * ``make_optimizer(params, config)``: the optimiser to use instead of ``config.optimizer``
      (a sampler's update rule); ``after_step()``: called after every optimiser step, on every
      process of a distributed fit (a sampler keeps its samples and sets the next step size).
    * ``before_step()``: in a distributed fit, called before every step on every process under
      the generator they share (noise all processes must agree on, such as a weight draw).
    * ``restored(epoch)``: called when a divergence has put back the weights of the end of
      ``epoch`` (0: the start), to put back state kept outside ``state()`` with them (a
      sampler's ring of samples, which it snapshots in ``end_epoch``).
    * ``checkpoint_state() -> (json_part, tensors)`` and ``load_checkpoint_state(json_part,
      tensors)``, for checkpoints (:mod:`bayesdl.checkpoint`): state that changes during the
      fit but is not in ``state()`` (SWAG's moments; VI's noise pool and epoch counter). The
      first returns it as a JSON-able dict and a dict ``str -> Tensor`` (saved as
      ``objective.{name}``) and draws no random numbers; the second puts it back into an
      objective built for the same run (the tensors arrive on the CPU). An objective without
      the pair has no such state.
    """

    n_orders: int

    def parameters(self) -> list[Tensor]:
        """Leaf tensors to optimise."""

    def state(self) -> list[Tensor]:
        """Every tensor that defines the model (parameters and buffers), for snapshots."""

    def train(self, mode: bool) -> None:
        """Switch the underlying modules between training and evaluation mode."""

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        """Training loss on a batch: a scalar, or one per member ``(K,)``."""

    def val_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean validation loss: a scalar, or one per member ``(K,)``."""


def _make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    # The fused kernels update each parameter tensor in one pass instead of about ten (8x faster
    # on a CPU for a 0.5M-parameter net); they need floating tensors on the CPU or a GPU.
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    per_member = isinstance(config.weight_decay, tuple)
    options = {"lr": config.lr, "weight_decay": 0.0 if per_member else config.weight_decay}
    if fused:
        options["fused"] = True
    if config.optimizer is OptimizerName.ADAM:
        return torch.optim.Adam(params, **options)
    if config.optimizer is OptimizerName.ADAMW:
        return torch.optim.AdamW(params, **options)
    return torch.optim.SGD(params, momentum=0.9, **options)


class _MemberDecay:
    """One weight decay per stacked member, applied around the optimiser's step.

    The optimisers take one ``weight_decay`` per parameter group; this gives member ``m`` its
    own: L2 added to the gradients (Adam, SGD: ``g += wd_m * p``) or AdamW's decoupled shrink
    (``p *= 1 - lr * wd_m``) before the step, each one fused call over all tensors.
    """

    def __init__(self, objective: Objective, params: list[Tensor], config: TrainConfig) -> None:
        values = config.weight_decay
        members = _per_member_count(
            "weight_decay", values, objective, params, "parameters", "one number"
        )
        self.params = params
        self.decoupled = config.optimizer is OptimizerName.ADAMW
        first = params[0]
        decay = torch.tensor(values, dtype=first.dtype, device=first.device)
        self.views = [decay.view(members, *[1] * (p.ndim - 1)) for p in params]

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        if self.decoupled:
            lr = optimizer.param_groups[0]["lr"]
            factors = [1 - lr * v for v in self.views]
            torch._foreach_mul_(self.params, factors)
            return
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            torch._foreach_addcmul_(grads, self.params, self.views)


def _per_member_count(
    option: str, values, objective: Objective, tensors: list[Tensor], what: str, alone: str
) -> int:
    """The number ``M`` of the objective's stacked members, checked for an option that holds
    one value per member: ``values`` has ``M`` of them and every one of ``tensors`` (``what``:
    parameters, state) has a leading member axis of ``M``. ``alone`` says what to pass instead
    of one value per member."""
    members = getattr(objective, "n_members", None)
    if members is None:
        raise ValueError(
            f"{option} got {len(values)} values (one per member), but this method has no "
            f"stacked members; pass {alone}."
        )
    if len(values) != members:
        raise ValueError(
            f"{option} got {len(values)} values, but there are {members} members; pass "
            f"{members} values or {alone}."
        )
    bad = [tuple(t.shape) for t in tensors if t.ndim == 0 or t.shape[0] != members]
    if bad:
        raise ValueError(f"{what} without a leading member axis of {members}: {bad}")
    return members


def _member_limits(objective: Objective, state: list[Tensor], config: TrainConfig):
    """``config.member_epochs`` as a tensor ``(M,)`` checked against the objective's stacked
    members (``None`` without it)."""
    if config.member_epochs is None:
        return None
    counts = config.member_epochs
    _per_member_count("member_epochs", counts, objective, state, "state", "epochs alone")
    return torch.tensor(counts, device=state[0].device)


def _tensor_batches(
    data: TensorData,
    batch_size: int,
    n_orders: int,
    generator: torch.Generator,
    rows: Tensor | None = None,
    members: MemberShard | None = None,
    stacked: bool | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled batches; ``rows`` ``(n_orders, n)``: each member's bootstrap rows to shuffle.

    With ``members`` (member-parallel) the orders of all ``n_orders`` members are drawn and
    those of this process's members kept; ``stacked=False`` then means it keeps one member and
    yields its batches without the member axis.
    """
    n = len(data)
    if n_orders == 1:
        order = torch.randperm(n, generator=generator).to(data.x.device)
    else:  # one independent permutation per member, drawn in one call
        order = torch.rand(n_orders, n, generator=generator).argsort(dim=1)
        order = order if rows is None else rows.gather(1, order)
        if members is not None:
            order = order[members.members] if stacked else order[members.lo]
        order = order.to(data.x.device)
    for start in range(0, n, batch_size):
        idx = order[..., start : start + batch_size]
        yield data.x[idx], data.y[idx]


def _bootstrap_rows(
    objective, train, data_seed: int, members: MemberShard | None = None
) -> Tensor | None:
    """Each member's bootstrap resample ``(K, n)`` for an objective that asks for one (drawn
    for all ``K`` members also when this process trains some of them)."""
    if not getattr(objective, "bootstrap", False):
        return None
    if not isinstance(train, TensorData):
        raise ValueError(
            "bootstrap resampling needs the training data as tensors (x, y), not a DataLoader: "
            "pass the tensors, or build the ensemble with bootstrap=False."
        )
    n = len(train)
    members_total = objective.n_orders if members is None else members.total
    # Its own stream, derived from the data seed: the epochs' shuffles stay as without it.
    generator = torch.Generator().manual_seed((data_seed * 0x9E3779B1 + 0xB5) % 2**63)
    return torch.randint(n, (members_total, n), generator=generator)


def loader_batches(
    loader: DataLoader, prepare, n_orders: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches of a DataLoader, each checked and moved by ``prepare``.

    With ``n_orders > 1`` every batch is expanded to ``(n_orders, b, ...)`` (a loader fixes one
    order, so every member of a stacked objective sees it).
    """
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "the DataLoader must yield (x, y) pairs; got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
            )
        x, y = prepare(batch)
        if n_orders > 1:
            x = x.expand(n_orders, *x.shape)
            y = y.expand(n_orders, *y.shape)
        yield x, y


def _n_val(n: int, fraction: float) -> int:
    """Rows a ``val_fraction`` split holds out of ``n``."""
    return round(fraction * n)


def training_size(data, config: TrainConfig, val_data=None) -> int:
    """Training examples ``fit`` will see: the rows of ``(x, y)`` less the ``val_fraction`` split
    (none with ``val_data``), or a DataLoader's dataset size; 0 for what is not data (``fit``
    then says what is wrong)."""
    if isinstance(data, DataLoader):
        return len(data.dataset)
    try:
        n = len(data[0])
    except (TypeError, IndexError, KeyError):
        return 0
    return n - _n_val(n, config.val_fraction) if val_data is None else n


def _split(data: TensorData, fraction: float, generator: torch.Generator):
    n = len(data)
    n_val = _n_val(n, fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"val_fraction={fraction} of {n} examples leaves {n_val} for validation and "
            f"{n - n_val} for training; both need at least one. Use a different fraction."
        )
    perm = torch.randperm(n, generator=generator).to(data.x.device)
    return data.subset(perm[n_val:]), data.subset(perm[:n_val])


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _copy_into(dst: list[Tensor], src: list[Tensor], mask: Tensor | None = None) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src, strict=True):
            if mask is None:
                d.copy_(s)
            else:  # per-member: take src where mask, keep dst elsewhere
                m = mask.reshape(-1, *([1] * (d.ndim - 1)))
                d.copy_(torch.where(m, s, d))


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def _progress(total: int, enabled: bool | None, done: int = 0):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="epoch", leave=False)


def _run_identity(
    identity: dict | None,
    state: list[Tensor],
    config: TrainConfig,
    train: TensorData | DataLoader,
    val: TensorData | None,
    processes: int = 1,
) -> dict:
    """What a checkpoint must match to be resumed by this run (see :mod:`bayesdl.checkpoint`)."""
    if isinstance(train, TensorData):
        data = {
            "n_train": len(train),
            "x": tensor_signature(train.x[0]),
            "y": tensor_signature(train.y[0]),
        }
    else:
        data = {"n_train": len(train.dataset)}
    data["n_val"] = None if val is None else len(val)
    if processes > 1:  # the per-example noise of each process depends on how many there are
        data["processes"] = processes
    return {
        **(identity or {}),
        "state": {str(i): tensor_signature(t) for i, t in enumerate(state)},
        "training": config._trajectory(),
        "data": data,
    }


def _mix(*values: int) -> int:
    """A seed derived from several integers (Python hashes tuples of ints deterministically)."""
    return hash(values) % 2**63


@contextlib.contextmanager
def _own_noise(seed: int, device: torch.device):
    """This process's own global generator (per-example noise, e.g. dropout masks) for one
    step of a distributed fit; the shared one is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def _sum_gradients(group: Group, params: list[Tensor]) -> None:
    """Sum the gradients over the processes (a parameter this process did not reach counts 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    group.sum_([p.grad for p in params])


def _shard_batches(
    batches: Iterator[tuple[Tensor, Tensor]], group: Group, stacked: bool
) -> Iterator[tuple[Tensor, Tensor, float]]:
    """This process's contiguous rows of each global batch (the same batches on every process),
    with its share of the batch's rows as the loss weight."""
    dim = 1 if stacked else 0
    for xb, yb in batches:
        rows = yb.shape[dim]
        lo, hi = group.share(rows)
        yield xb.narrow(dim, lo, hi - lo), yb.narrow(dim, lo, hi - lo), (hi - lo) / max(rows, 1)


def _joined_batches(
    batches: Iterator[tuple[Tensor, Tensor]], group: Group, stacked: bool
) -> Iterator[tuple[Tensor, Tensor, float]]:
    """Each process's own batches (a DataLoader shard), stepped together: every step sums the
    rows over the processes; one that has run out takes part with none until all have."""
    dim = 1 if stacked else 0
    done = False
    while True:
        batch = None if done else next(batches, None)
        done = batch is None
        rows = 0 if done else batch[1].shape[dim]
        (total,) = group.sum_values(rows)
        if total == 0:
            return
        if done:
            yield None, None, 0.0
        else:
            yield batch[0], batch[1], rows / total


def _data_size(train: TensorData | DataLoader, group: Group | None) -> int:
    """``N`` for the loss (the KL term of a variational objective is divided by it)."""
    if isinstance(train, TensorData):
        return len(train)
    if group is None or isinstance(train.sampler, DistributedSampler):
        return len(train.dataset)  # a DistributedSampler shards one dataset held by every process
    return int(group.sum_values(len(train.dataset))[0])  # each process holds its own part


def _check_same_data(group: Group, train: TensorData, val: TensorData | None) -> None:
    sums = [len(train), float(train.x.double().sum()), float(train.y.double().sum())]
    if val is not None:
        sums += [len(val), float(val.x.double().sum()), float(val.y.double().sum())]
    group.check_same(
        "training tensors (rows, sum of x, sum of y)",
        sums,
        "pass every process the same (x, y) (each trains on its share of every batch), or give "
        "each process its own shard as a DataLoader.",
    )


def _member_config(config: TrainConfig, shard: MemberShard) -> TrainConfig:
    """The options of this process's members: per-member values cut to its share."""
    changes = {}
    for name in ("weight_decay", "member_epochs"):
        values = getattr(config, name)
        if isinstance(values, tuple):
            if len(values) != shard.total:
                raise ValueError(
                    f"{name} got {len(values)} values, but there are {shard.total} members; "
                    f"pass {shard.total} values or one."
                )
            changes[name] = values[shard.members]
    return replace(config, **changes) if changes else config


def fit(
    objective: Objective,
    train: TensorData | DataLoader,
    config: TrainConfig,
    *,
    val: TensorData | None = None,
    prepare=None,
    device: torch.device | None = None,
    identity: dict | None = None,
    members: MemberShard | None = None,
) -> History:
    """Run the loop. ``prepare`` checks and moves DataLoader batches; ``val`` is validation data;
    ``identity`` (JSON-able: method, options, likelihood) is what a checkpoint must match;
    ``members``: with ``parallel="members"``, the stacked members this process trains (the
    objective holds just those).

    Returns a :class:`History`. With validation data, the weights of the best validation epoch
    (of each member, for stacked objectives) are restored at the end.
    """
    device = device or torch.device("cpu")
    if isinstance(train, TensorData) and len(train) == 0:
        raise ValueError("the training data is empty; pass at least one example.")
    if members is not None:
        group = members.group
        dp = None
        config = _member_config(config, members)
    else:
        group = dp = distributed.resolve(config.distributed)
        if dp is not None and config.parallel is Parallel.MEMBERS:
            raise ValueError(
                "parallel='members' spreads stacked members over the processes; this method "
                "has none. Use parallel='data' (the default), or a deep ensemble or MultiSWAG."
            )
    processes = 1 if group is None else group.world
    state = objective.state()
    checkpoint = saved = None
    if config.checkpoint_dir is not None:
        folder = Path(config.checkpoint_dir)
        if members is not None:  # each process keeps its own members' run
            folder = folder / f"members-{members.lo}-{members.hi}-of-{members.total}"
        checkpoint = Checkpoint(
            folder, _run_identity(identity, state, config, train, val, processes), device
        )
        if config.resume:
            saved = checkpoint.load()  # None: no checkpoint yet, start from scratch
            if dp is not None:
                dp.check_same(
                    "checkpoints (the epoch each resumes from; -1: none)",
                    [-1 if saved is None else saved.header["epoch"]],
                    "give every process the same checkpoint_dir, on a file system they share.",
                )
        if dp is not None and dp.rank != 0:
            checkpoint = None  # the weights are the same everywhere: rank 0 writes
    data_seed = config.seed
    if data_seed is None:  # a resumed unseeded run keeps its data order and split
        data_seed = saved.data_seed if saved else int(torch.randint(2**62, ()).item())
        if group is not None and saved is None:
            data_seed = group.broadcast_int(data_seed)
    generator = torch.Generator()
    generator.manual_seed(data_seed)
    if val is None and config.val_fraction > 0:
        if not isinstance(train, TensorData):
            raise ValueError(
                "val_fraction needs training data as tensors; for a DataLoader pass "
                "val_data=(x_val, y_val) instead."
            )
        train, val = _split(train, config.val_fraction, generator)
    if group is not None and isinstance(train, TensorData):
        _check_same_data(group, train, val)
    n_data = _data_size(train, dp)
    boot_rows = _bootstrap_rows(objective, train, data_seed, members)
    # Data orders are drawn for every member, so each keeps the one it has in a single process.
    independent = getattr(objective, "independent_data_order", objective.n_orders > 1)
    n_orders = members.total if members is not None and independent else objective.n_orders
    # The seed of the global generator inside the fit: in member-parallel runs each process's.
    run_seed = config.seed
    if members is not None:
        run_seed = _mix(data_seed if config.seed is None else config.seed, members.lo)
    elif dp is not None and run_seed is None:  # the shared noise must be the same everywhere
        run_seed = _mix(data_seed, -1)
    if dp is not None and saved is None:
        dp.broadcast_(state)  # the same starting weights everywhere
    before_step = getattr(objective, "before_step", None) if dp is not None else None

    params = objective.parameters()
    optimizer = getattr(objective, "make_optimizer", _make_optimizer)(params, config)
    after_step = getattr(objective, "after_step", None)
    member_decay = (
        _MemberDecay(objective, params, config) if isinstance(config.weight_decay, tuple) else None
    )
    limits = _member_limits(objective, state, config)
    # Two snapshots guard against divergence: `run.verified` holds weights whose loss was seen
    # to be finite, `candidate` the weights at the start of this epoch (verified by its first
    # batch).
    run = LoopState(
        history=History(),
        data_seed=data_seed,
        verified=[t.detach().clone() for t in state],
        final=None if limits is None else [t.detach().clone() for t in state],
    )
    candidate = [t.detach().clone() for t in state]
    if saved is not None:
        saved.restore(run, objective, optimizer, generator)
    history = run.history
    last_epoch = run.epoch if saved is not None and saved.finished else config.epochs
    quiet = group is not None and group.rank != 0  # one progress bar, rank 0's
    bar = _progress(config.epochs, False if quiet else config.progress, run.epoch)

    def diverged(epoch: int, restore: list[Tensor], good_epoch: int) -> TrainingDivergedError:
        _copy_into(state, restore)
        restored = getattr(objective, "restored", None)
        if restored is not None:  # state outside state() that must go back with the weights
            restored(good_epoch)
        if run.final is not None and val is None:  # members whose count had ended keep its weights
            _copy_into(state, run.final, limits <= good_epoch)
        if bar is not None:
            bar.close()
        objective.train(False)
        return TrainingDivergedError(epoch, good_epoch)

    def agreed(flag: bool) -> bool:  # the processes decide together
        return flag if group is None else group.any(flag)

    stacked = objective.n_orders > 1
    with _seeded(run_seed, device):
        if saved is not None and run_seed is not None:
            saved.restore_rng(device)
        for epoch in range(run.epoch + 1, last_epoch + 1):
            if config.lr_schedule is LRSchedule.COSINE:
                rate = 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
                for group_ in optimizer.param_groups:
                    group_["lr"] = rate
            objective.train(True)
            _copy_into(candidate, state)
            if isinstance(train, TensorData):
                batches = _tensor_batches(
                    train, config.batch_size, n_orders, generator, boot_rows, members, stacked
                )
                if dp is not None:
                    batches = _shard_batches(batches, dp, stacked)
            else:
                batches = loader_batches(train, prepare, objective.n_orders)
                if dp is not None:
                    batches = _joined_batches(batches, dp, stacked)
            total, count, first = 0.0, 0, True
            for step, batch in enumerate(batches):
                xb, yb = batch[0], batch[1]
                optimizer.zero_grad(set_to_none=True)
                if before_step is not None:  # noise every process shares (a weight draw)
                    before_step()
                rows = 0 if yb is None else yb.shape[1] if stacked else len(yb)
                if rows and dp is not None:
                    with _own_noise(_mix(data_seed, dp.rank, epoch, step), device):
                        loss = objective.loss(xb, yb, n_data)
                elif rows:
                    loss = objective.loss(xb, yb, n_data)
                if first:  # one check per epoch: are this epoch's starting weights good?
                    if agreed(bool(rows) and not bool(torch.isfinite(loss).all())):
                        raise diverged(epoch, run.verified, run.verified_epoch)
                    first = False
                if dp is not None:
                    if rows:
                        (loss.sum() * batch[2]).backward()
                    _sum_gradients(dp, params)
                else:
                    loss.sum().backward()
                if member_decay is not None:
                    member_decay.apply(optimizer)
                optimizer.step()
                if after_step is not None:  # e.g. a sampler keeps a sample, sets the next rate
                    after_step()
                if not rows:
                    continue
                if members is not None:
                    total = total + loss.detach().sum() * (rows / members.total)
                else:
                    total = total + loss.detach().mean() * rows
                count += rows
            if dp is not None:
                total, count = dp.sum_values(float(total), count)
            elif members is not None:
                (total,) = group.sum_values(float(total))
            epoch_loss = float(total) / max(count, 1)
            if agreed(not math.isfinite(epoch_loss) or not _all_finite(state)):
                raise diverged(epoch, candidate, epoch - 1)
            run.verified, candidate, run.verified_epoch = candidate, run.verified, epoch - 1
            history.train_loss.append(epoch_loss)
            end_epoch = getattr(objective, "end_epoch", None)
            if end_epoch is not None:  # e.g. SWAG collects its moments and sets the SWA rate
                end_epoch(epoch, optimizer)
            if run.final is not None and val is None:  # keep members whose count ends here
                ending = limits == epoch
                if bool(ending.any()):
                    _copy_into(run.final, state, ending)

            if val is not None:
                _track_best(run, objective, state, val, limits, epoch, dp, members)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_loss:.4g}")
            stop = (
                config.patience is not None
                and val is not None
                and run.since_best >= config.patience
            )
            history.stopped_early = stop
            run.epoch = epoch
            finished = stop or epoch == config.epochs
            if config.checkpoint_dir is not None and (
                finished or epoch % config.checkpoint_every == 0
            ):
                if checkpoint is not None:
                    checkpoint.save(run, objective, optimizer, generator, finished=finished)
                if dp is not None:  # no process goes on (to a resume, say) before it is written
                    dp.barrier()
            if stop:
                break
    if bar is not None:
        bar.close()
    if run.final is not None and val is None:
        _copy_into(state, run.final)
    if run.best is not None:
        _copy_into(state, run.best)
        if run.member_best is not None:
            best = run.member_best
            if members is not None:
                best = group.gather(best.to(group.device)).cpu()
            history.member_best_epochs = best.tolist()
    objective.train(False)
    return history


def _validation_loss(
    objective: Objective, val: TensorData, state: list[Tensor], dp: Group | None
) -> Tensor:
    """The mean validation loss (one per member for stacked objectives); over the processes'
    row shards in a data-parallel fit (every process gets the same value)."""
    with torch.no_grad():
        if dp is None:
            return objective.val_loss(val.x, val.y).detach()
        lo, hi = dp.share(len(val))
        # A process without rows still runs one (weighted 0), drawing what the others draw.
        rows = slice(lo, hi) if hi > lo else slice(0, 1)
        part = objective.val_loss(val.x[rows], val.y[rows]).detach() * (hi - lo)
        part = part.to(dp.device).contiguous()
        dp.sum_([part])
        return (part / len(val)).to(state[0].device)


def _track_best(
    run: LoopState,
    objective: Objective,
    state: list[Tensor],
    val: TensorData,
    limits: Tensor | None,
    epoch: int,
    dp: Group | None = None,
    members: MemberShard | None = None,
) -> None:
    """Early stopping's bookkeeping after ``epoch``: the validation loss, the best weights (per
    member) and the epochs since the last improvement (decided together by member-parallel
    processes)."""
    objective.train(False)
    vl = _validation_loss(objective, val, state, dp)
    if members is None:
        run.history.val_loss.append(float(vl.mean()))
    else:
        (summed,) = members.group.sum_values(float(vl.sum()))
        run.history.val_loss.append(summed / members.total)
    if run.best is None:
        run.best, run.best_loss = [t.detach().clone() for t in state], vl.clone()
        run.history.best_epoch = epoch
        run.member_best = torch.full(vl.shape, epoch) if vl.ndim else None
        run.since_best = 0
        return
    improved = vl < run.best_loss
    if limits is not None:  # no member improves after its own epoch count
        improved = improved & (limits >= epoch).to(improved.device)
    if vl.ndim == 0:
        if improved:
            _copy_into(run.best, state)
    else:
        _copy_into(run.best, state, improved)
        run.member_best[improved.cpu()] = epoch
    run.best_loss = torch.where(improved, vl, run.best_loss)
    any_improved = bool(improved.any())
    if members is not None:
        any_improved = members.group.any(any_improved)
    if any_improved:
        run.history.best_epoch = epoch
    run.since_best = 0 if any_improved else run.since_best + 1
