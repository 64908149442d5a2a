"""Checkpoints of the fit loop: everything a killed fit needs to continue, in one file.

``fit(..., checkpoint_dir=DIR)`` keeps ``DIR/checkpoint.safetensors`` (a
:func:`bayesdl.files.write_file` file of kind ``"checkpoint"``, replaced atomically, so a process
killed at any moment leaves the previous checkpoint or the new one). ``fit(..., resume=True)``
rebuilds the run as a fresh one would (the data-order generator seeded, the validation split
drawn, the optimiser built), then overwrites its state from the file and continues with the
next epoch; with a ``seed`` the result is bit-identical (on the CPU) to a run never interrupted.

Layout. Tensors, with ``{i}`` the position in ``objective.state()`` (or of the optimiser's
parameter):

* ``state.{i}``: the model (``objective.state()``);
* ``optimizer.state.{i}.{key}``: the optimiser's per-parameter tensors (Adam's ``exp_avg``,
  ``exp_avg_sq``, ``step``; SGD's ``momentum_buffer``);
* ``rng.data_order``: the loop's data-order generator (``Generator.get_state()``);
  ``rng.torch`` and, on CUDA, ``rng.cuda``: the global generators inside the seeded fit;
* ``history.train_loss``, ``history.val_loss``: float64, one entry per epoch;
* ``guard.verified.{i}``: the divergence guard's last weights with a finite loss;
* ``early_stopping.best.{i}``, ``early_stopping.best_loss``, ``early_stopping.member_best``:
  with validation data, the best weights so far, their loss (one per member for stacked
  objectives) and each member's best epoch;
* ``member_epochs.final.{i}``: with ``member_epochs``, the weights of members whose count ended;
* ``objective.{name}``: the tensors of the objective's ``checkpoint_state()`` hook.

The JSON header holds ``identity`` (see below), ``epoch`` (the last finished epoch),
``finished`` (the run ended: all epochs, or stopped early), ``data_seed`` (the seed of the
data-order generator, drawn when ``seed=None``), ``history`` (``best_epoch``,
``member_best_epochs``, ``stopped_early``), ``guard`` (``verified_epoch``), ``early_stopping``
(``since_best``), ``optimizer`` (``param_groups``, the learning rate of each included, and
the per-parameter values that are not tensors) and ``objective`` (the JSON part of the hook).

The guard's other snapshot (the weights at the start of the epoch) is not saved: the loop
overwrites it at the start of every epoch before reading it.

Identity. A checkpoint is resumed only by the run that wrote it: the header records the
posterior (method, options, likelihood), the dtype and shape of every state tensor, the
training options that change the trajectory and the size and example shapes of the data. Any
difference raises :class:`~bayesdl.files.ModelFileError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bayesdl.files import ModelFileError, dtype_name, read_file, write_file

if TYPE_CHECKING:
    from bayesdl.training import History, Objective

__all__ = ["FILE_NAME", "Checkpoint", "LoopState", "SavedRun"]

#: The checkpoint's name inside ``checkpoint_dir``.
FILE_NAME = "checkpoint.safetensors"
_KIND = "checkpoint"
# Differences listed in a mismatch message (the rest are counted).
_SHOWN = 8


@dataclass
class LoopState:
    """What the fit loop carries from one epoch to the next, besides the model, the optimiser
    and the random streams (all of it is in a checkpoint)."""

    history: History
    #: Seed of the data-order generator (drawn when the fit has no ``seed``).
    data_seed: int
    #: The divergence guard: weights whose loss was seen to be finite, and their epoch.
    verified: list[Tensor]
    verified_epoch: int = 0
    #: Early stopping: the best weights (per member), their validation loss, each member's best
    #: epoch (stacked objectives) and the epochs since the last improvement.
    best: list[Tensor] | None = None
    best_loss: Tensor | None = None
    member_best: Tensor | None = None
    since_best: int = 0
    #: ``member_epochs``: the weights of the members whose epoch count has ended.
    final: list[Tensor] | None = None
    #: The last finished epoch (0 before the first).
    epoch: int = 0


class Checkpoint:
    """The checkpoint file of one fit: where it is, and the ``identity`` it must match.

    ``identity`` is a JSON-able dict describing the run (see the module docstring); ``device``
    the one the run trains on. The folder is created if missing.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict, device: torch.device) -> None:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"checkpoint_dir {str(folder)!r} cannot be created ({err.strerror or err}); "
                "pass a folder you can write to."
            ) from None
        self.path = folder / FILE_NAME
        self.identity = _plain(identity)
        self.device = device

    def save(
        self,
        loop: LoopState,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        *,
        finished: bool,
    ) -> None:
        """Write the checkpoint of the run after ``loop.epoch`` (draws no random numbers)."""
        tensors = {"rng.data_order": generator.get_state(), "rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        _put(tensors, "state", objective.state())
        _put(tensors, "guard.verified", loop.verified)
        tensors["history.train_loss"] = torch.tensor(loop.history.train_loss, dtype=torch.float64)
        tensors["history.val_loss"] = torch.tensor(loop.history.val_loss, dtype=torch.float64)
        if loop.best is not None:
            _put(tensors, "early_stopping.best", loop.best)
            tensors["early_stopping.best_loss"] = loop.best_loss
        if loop.member_best is not None:
            tensors["early_stopping.member_best"] = loop.member_best
        if loop.final is not None:
            _put(tensors, "member_epochs.final", loop.final)
        optimizer_json, optimizer_tensors = _flatten_optimizer(optimizer)
        tensors.update(optimizer_tensors)
        extra_json, extra_tensors = {}, {}
        hook = getattr(objective, "checkpoint_state", None)
        if hook is not None:
            extra_json, extra_tensors = hook()
            tensors.update({f"objective.{k}": v for k, v in extra_tensors.items()})
        header = {
            "identity": self.identity,
            "epoch": loop.epoch,
            "finished": finished,
            "data_seed": loop.data_seed,
            "history": {
                "best_epoch": loop.history.best_epoch,
                "member_best_epochs": loop.history.member_best_epochs,
                "stopped_early": loop.history.stopped_early,
            },
            "guard": {"verified_epoch": loop.verified_epoch},
            "early_stopping": {"since_best": loop.since_best},
            "optimizer": optimizer_json,
            "objective": extra_json,
        }
        write_file(self.path, _KIND, header, tensors)

    def load(self) -> SavedRun | None:
        """The saved run, checked against this run's identity; ``None`` if there is no file yet.

        Raises :class:`~bayesdl.files.ModelFileError` for a damaged file or one of another run.
        """
        try:
            header, tensors = read_file(self.path, _KIND)
        except FileNotFoundError:
            return None
        differences = _differences(header.get("identity"), self.identity)
        if differences:
            shown = "; ".join(differences[:_SHOWN])
            more = len(differences) - _SHOWN
            raise ModelFileError(
                f"the checkpoint {str(self.path)!r} was written by a different run, so it cannot "
                f"be resumed here: {shown}{f'; and {more} more' if more > 0 else ''}. Resume with "
                "the same model, method and fit options, pass another checkpoint_dir, or delete "
                "the file to start over."
            )
        return SavedRun(self.path, header, tensors)


class SavedRun:
    """A checkpoint read back: its header and tensors, restored into a rebuilt run."""

    def __init__(self, path: Path, header: dict, tensors: dict[str, Tensor]) -> None:
        self.path, self.header, self.tensors = path, header, tensors

    @property
    def data_seed(self) -> int:
        return self.header["data_seed"]

    @property
    def finished(self) -> bool:
        return bool(self.header["finished"])

    def restore(
        self,
        loop: LoopState,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> None:
        """Overwrite the freshly built run (model, optimiser, loop state, data order) with the
        saved one."""
        h, t = self.header, self.tensors
        try:
            state = objective.state()
            with torch.no_grad():
                for target, saved in zip(state, self._list("state", len(state)), strict=True):
                    target.copy_(saved)
            loop.epoch = h["epoch"]
            loop.history.train_loss = t["history.train_loss"].tolist()
            loop.history.val_loss = t["history.val_loss"].tolist()
            loop.history.best_epoch = h["history"]["best_epoch"]
            loop.history.member_best_epochs = h["history"]["member_best_epochs"]
            loop.history.stopped_early = h["history"]["stopped_early"]
            loop.verified = self._like("guard.verified", state)
            loop.verified_epoch = h["guard"]["verified_epoch"]
            loop.since_best = h["early_stopping"]["since_best"]
            if "early_stopping.best_loss" in t:
                loop.best = self._like("early_stopping.best", state)
                loop.best_loss = t["early_stopping.best_loss"].to(state[0].device)
            loop.member_best = t.get("early_stopping.member_best")
            if loop.final is not None:
                loop.final = self._like("member_epochs.final", state)
            _load_optimizer(optimizer, h["optimizer"], t)
            hook = getattr(objective, "load_checkpoint_state", None)
            if hook is not None:
                prefix = "objective."
                extra = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
                hook(h["objective"], extra)
            generator.set_state(t["rng.data_order"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ModelFileError(
                f"the checkpoint {str(self.path)!r} matches this run but its contents do not fit "
                f"it ({type(err).__name__}: {err}); it may come from another version of "
                "bayesdl. Delete it to start over, or pass another checkpoint_dir."
            ) from None

    def restore_rng(self, device: torch.device) -> None:
        """Set the global generators to their saved state (inside the seeded fit)."""
        torch.set_rng_state(self.tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in self.tensors:
            torch.cuda.set_rng_state(self.tensors["rng.cuda"], device)

    def _list(self, prefix: str, n: int) -> list[Tensor]:
        return [self.tensors[f"{prefix}.{i}"] for i in range(n)]

    def _like(self, prefix: str, state: list[Tensor]) -> list[Tensor]:
        """Saved snapshots of the state, on the state's device."""
        return [s.to(t.device) for s, t in zip(self._list(prefix, len(state)), state, strict=True)]


def tensor_signature(t: Tensor) -> str:
    """``"float32[16, 4]"``: what a checkpoint records of a state tensor."""
    return f"{dtype_name(t.dtype)}{list(t.shape)}"


def _put(tensors: dict[str, Tensor], prefix: str, values: list[Tensor]) -> None:
    for i, value in enumerate(values):
        tensors[f"{prefix}.{i}"] = value


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, Tensor]]:
    """``optimizer.state_dict()`` as JSON (param groups, plain per-parameter values) and tensors
    named ``optimizer.state.{i}.{key}``."""
    state_dict = optimizer.state_dict()
    plain: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "state": plain}, tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict, tensors: dict) -> None:
    state: dict[int, dict] = {int(i): dict(entry) for i, entry in saved["state"].items()}
    prefix = "optimizer.state."
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(saved["param_groups"]):
        raise ValueError(f"{len(saved['param_groups'])} parameter groups saved, {len(current)} now")
    groups = []
    for now, then in zip(current, saved["param_groups"], strict=True):
        # JSON made tuples (Adam's betas) lists; give them back their type.
        groups.append(
            {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in then.items()}
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _plain(value):
    """``value`` as it reads back from JSON (tuples become lists, enums their values)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value):
    if hasattr(value, "value"):  # an option enum
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _differences(saved, now: dict, path: str = "") -> list[str]:
    """``"name: saved X, now Y"`` for every entry that differs between two identities."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in [*saved, *(k for k in now if k not in saved)]:
            missing = "<absent>"
            out += _differences(
                saved.get(key, missing), now.get(key, missing), f"{path}.{key}" if path else key
            )
        return out
    if saved == now:
        return []
    return [f"{path or 'identity'}: saved {saved!r}, now {now!r}"]
