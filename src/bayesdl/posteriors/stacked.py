"""Run one module under many stacked parameter sets in one vectorised call.

``torch.func.vmap`` over a functional call of the user's module is how every method here applies
``M`` weight sets (ensemble members, posterior draws) at once. This file is that machinery,
written once:

* :class:`StackedCall` swaps a tensor into each parameter/buffer slot of a private copy of the
  module and calls it. It is what ``torch.func.functional_call`` does, minus the per-call name
  resolution and checks, which matter here because a small network's training step is dominated
  by per-call overhead, not arithmetic. Tied parameters (one tensor in several modules) are
  swapped in every place they live.
* :class:`StackedModule` owns the stacked tensors ``(M, ...)`` and vmaps :class:`StackedCall` over
  them, choosing vmap's randomness mode once (``"error"`` is cheaper; a module that draws random
  numbers, such as dropout in training mode, switches it to ``"different"``) and chunking over
  ``M`` at prediction so that intermediate activations stay small.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import stack_module_state, vmap

__all__ = ["StackedCall", "StackedModule"]


class StackedCall:
    """Call ``module`` with other tensors in place of its named parameters and buffers.

    Parameters
    ----------
    module:
        A module owned by the caller (it is modified during each call and restored after).
    names:
        Parameter and buffer names, in the order the tensors will be passed.
    """

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        self.module = module
        self.names = names
        owners: dict[int, list[tuple[dict, str]]] = {}
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for key, value in store.items():
                    if value is not None:
                        owners.setdefault(id(value), []).append((store, key))
        self.slots: list[list[tuple[dict, str]]] = []
        for name in names:
            try:
                target = module.get_parameter(name)
            except AttributeError:
                target = module.get_buffer(name)
            self.slots.append(owners[id(target)])

    def __call__(self, tensors: tuple[Tensor, ...], *args: Tensor) -> Tensor:
        saved = []
        try:
            for slots, tensor in zip(self.slots, tensors, strict=True):
                for store, key in slots:
                    saved.append((store, key, store[key]))
                    store[key] = tensor
            return self.module(*args)
        finally:
            for store, key, value in reversed(saved):
                store[key] = value


def _is_randomness_error(err: Exception) -> bool:
    return "randomness" in str(err)


class StackedModule:
    """``M`` parameter sets of one module, stacked along a leading axis, applied with vmap.

    Parameters
    ----------
    copies:
        ``M`` modules of identical structure (e.g. independently initialised copies).
    chunk_rows:
        At prediction (no gradient), members are processed in chunks of about
        ``chunk_rows // B`` so the activations of a chunk stay cache-sized; training runs all
        members at once.

    Attributes
    ----------
    params, buffers:
        ``dict[str, Tensor]`` of stacked tensors ``(M, ...)``; ``params`` are leaves that require
        grad.
    """

    def __init__(self, copies: list[nn.Module], *, chunk_rows: int = 2**12) -> None:
        params, buffers = stack_module_state(copies)
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        self.n_members = len(copies)
        self.base = copy.deepcopy(copies[0]).to("meta")
        self._call = StackedCall(self.base, (*params, *buffers))
        self.chunk_rows = chunk_rows
        self._randomness = "error"
        self._vmapped: dict[tuple, Callable] = {}

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    @property
    def training(self) -> bool:
        return self.base.training

    def tensors(self) -> tuple[Tensor, ...]:
        """Stacked parameters then buffers, in the order of the slots."""
        return (*self.params.values(), *self.buffers.values())

    def __call__(self, x: Tensor, *, batched_input: bool = False) -> Tensor:
        """Outputs of every member, ``(M, B, ...)``.

        ``x`` is ``(B, ...)`` (shared by all members) or, with ``batched_input=True``,
        ``(M, B, ...)`` (one batch per member).
        """
        chunk = None
        if not torch.is_grad_enabled():
            per = max(1, self.chunk_rows // max(1, x.shape[1 if batched_input else 0]))
            chunk = per if per < self.n_members else None
        key = (batched_input, chunk)
        try:
            return self._vmap(key)(self.tensors(), x)
        except RuntimeError as err:
            if self._randomness == "different" or not _is_randomness_error(err):
                raise
            self._randomness = "different"  # the module draws random numbers: one per member
            self._vmapped.clear()
            return self._vmap(key)(self.tensors(), x)

    def _vmap(self, key: tuple) -> Callable:
        if key not in self._vmapped:
            batched_input, chunk = key
            self._vmapped[key] = vmap(
                self._call,
                in_dims=(0, 0 if batched_input else None),
                randomness=self._randomness,
                chunk_size=chunk,
            )
        return self._vmapped[key]
