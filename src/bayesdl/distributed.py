"""Scale-out on ``torch.distributed``: the fit loop, Laplace and prediction over several processes.

Launch the same script on every process with ``torchrun`` (gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc-per-node 2 train.py          # or: torchrun ... -m bayesdl fit ...

and in the script::

    import bayesdl as bdl
    group = bdl.distributed.init()        # reads torchrun's environment; None when alone
    post = bdl.MeanFieldVI(net, likelihood="gaussian")
    post.fit((x, y), epochs=40, seed=0)   # detects the process group (or pass distributed=True)
    pred = post.predict(x_test, distributed=True)   # rows sharded, outputs gathered
    if bdl.distributed.rank() == 0:
        bdl.save(post, "model.safetensors")
    bdl.distributed.shutdown()

What is sharded (``parallel="data"``, the default): every process holds the same training
tensors (checked); each global mini-batch, drawn exactly as a single process draws it, is split
into contiguous row shards, one per process, and the gradients are summed over processes with
each shard's loss weighted by its share of the batch, so a step is the single-process step up to
the order of float additions. The variational KL term is scaled by the global data size; Laplace
curvature (diagonal, Kronecker factors, full GGN), its log-likelihood and example count are sums
over every process's rows; SWAG's moments are collected from weights that are identical on every
process; validation losses are reduced, so early stopping is decided once, for all. A DataLoader
is taken as this process's own shard (e.g. with a ``DistributedSampler``): its batches may differ
in size and number between processes (a process that has run out contributes nothing until all
have), and the data size ``N`` is the sampler's dataset size for a ``DistributedSampler``, else
the sum of every process's dataset size.

``parallel="members"`` (deep ensembles, MultiSWAG) spreads the stacked members over the
processes instead: each trains its contiguous share of the members on all the data, with the
data orders, bootstrap resamples and per-member options those members have in a single process,
and the members are gathered at the end.

Randomness. Inside a distributed fit every process runs the same seeded global generator, so what
every process must agree on (initial weights, a variational weight draw per step) is drawn
identically; noise per example (dropout masks) comes from a generator of the process's own, so
that shards are not masked alike. Exactly reproducible with the same ``seed`` and number of
processes; equal to a single process up to float round-off for every method whose training noise
is per step, not per example (all but dropout and the local variational estimators).

Checkpoints are written by rank 0 (``parallel="members"``: one file per process, in a folder per
member range); a resumed run reads the same files and must use the same number of processes.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Group", "MemberShard", "init", "rank", "resolve", "shutdown", "world_size"]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 when there is none)."""
    return dist.get_rank() if _initialised() else 0


def world_size() -> int:
    """The number of processes in the default process group (1 when there is none)."""
    return dist.get_world_size() if _initialised() else 1


def init(backend: str | None = None, *, timeout_s: float = 600.0) -> Group | None:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``);
    ``backend`` defaults to ``"nccl"`` when CUDA is available (each process then uses the GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. Returns the :class:`Group`, or ``None`` when the
    environment describes a single process (or none): code written for several processes then
    runs as it is on one. A group already initialised is reused.
    """
    if not _initialised():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
                "launch with torchrun (e.g. torchrun --nproc-per-node 2 script.py), which sets "
                "all of them."
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return resolve(None)


def shutdown() -> None:
    """Wait for every process, then leave the process group (if one was joined); safe to call
    without one. (A process that leaves while others still talk to it aborts.)"""
    if _initialised():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
            # Free now, in this thread, what still holds the group (and its worker threads):
            # left to interpreter shutdown, a worker thread that releases a finished
            # collective's tensors needs the GIL and aborts the process ("terminate called
            # without an active exception"; about 1 run in 10 without this).
            gc.collect()


def resolve(distributed: bool | None) -> Group | None:
    """The :class:`Group` a call runs over: ``None`` runs alone.

    ``distributed=None`` detects an initialised default process group of more than one
    process; ``True`` requires one (a group of one process runs alone); ``False`` runs alone.
    """
    if distributed is None:
        if not _initialised() or dist.get_world_size() == 1:
            return None
    elif distributed is True:
        if not _initialised():
            raise RuntimeError(
                "distributed=True needs an initialised process group: launch the script with "
                "torchrun and call bayesdl.distributed.init() (or "
                "torch.distributed.init_process_group) before fitting."
            )
        if dist.get_world_size() == 1:
            return None
    elif distributed is False:
        return None
    else:
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}.")
    return Group(dist.get_rank(), dist.get_world_size())


def _share(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``index`` when ``n`` items are cut into ``parts`` contiguous parts
    whose sizes differ by at most one (the first ``n % parts`` parts are the larger)."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


class Group:
    """The processes of the default group, with the few collectives the library needs.

    Tensors given to the collectives live on the backend's device (the CPU for gloo, the
    current GPU for NCCL), which is where the library's tensors are during a fit.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world})"

    def share(self, n: int, index: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of this process's (or process ``index``'s) contiguous share of ``n``."""
        return _share(n, self.world, self.rank if index is None else index)

    def shares(self, n: int) -> list[int]:
        """The size of every process's share of ``n``."""
        return [hi - lo for lo, hi in (self.share(n, i) for i in range(self.world))]

    # ------------------------------------------------------------------ collectives
    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum every tensor over the processes, in place, in one collective per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def barrier(self) -> None:
        """Wait until every process has reached this point."""
        dist.barrier()

    def sum_values(self, *values: float) -> list[float]:
        """Python numbers summed over the processes (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (every process gets the same answer)."""
        return self.sum_values(float(bool(flag)))[0] > 0

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite every tensor with rank ``src``'s, in place."""
        for t in tensors:
            if t.is_contiguous():
                dist.broadcast(t.data, src)
            else:
                buf = t.detach().contiguous()
                dist.broadcast(buf, src)
                with torch.no_grad():
                    t.copy_(buf)

    def broadcast_int(self, value: int, src: int = 0) -> int:
        """Rank ``src``'s integer, on every process."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src)
        return int(t.item())

    def gather(self, t: Tensor, dim: int = 0) -> Tensor:
        """Every process's ``t`` concatenated along ``dim`` in rank order; the sizes along
        ``dim`` may differ between processes (the other dimensions may not)."""
        size = torch.tensor([t.shape[dim]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        moved = t.movedim(dim, 0)
        if moved.shape[0] < longest:
            pad = moved.new_zeros((longest - moved.shape[0], *moved.shape[1:]))
            moved = torch.cat([moved, pad])
        moved = moved.contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        dist.all_gather(parts, moved)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).movedim(0, dim)

    def check_same(self, what: str, values: Sequence[float], fix: str) -> None:
        """Raise on every process if ``values`` differ between processes."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            raise ValueError(
                f"the processes were given different {what} ({[p.tolist() for p in parts]} by "
                f"rank); {fix}"
            )


@dataclass(frozen=True)
class MemberShard:
    """The stacked members ``[lo, hi)`` of ``total`` that this process trains
    (``parallel="members"``)."""

    lo: int
    hi: int
    total: int
    group: Group

    @property
    def members(self) -> slice:
        return slice(self.lo, self.hi)
