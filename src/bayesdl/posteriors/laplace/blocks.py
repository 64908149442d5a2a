"""Which parameters the Laplace posterior covers, and how they are laid out in one vector.

The posterior is a Gaussian over a vector ``theta`` of ``P`` numbers gathered from the subset's
parameters. Internally the vector is a concatenation of *blocks*:

* :class:`TensorBlock`: one parameter tensor, flattened (diagonal and full Hessians);
* :class:`LinearBlock`: one ``nn.Linear`` layer as the matrix ``W' = [W | b]`` of shape
  ``(out, in + 1)`` (``(out, in)`` without a bias), flattened row-major. In this layout the
  Jacobian of the layer's output with respect to its weights is ``I_out (x) a'^T`` for the
  augmented input ``a' = [a, 1]``, which is what makes the Kronecker-factored curvature and the
  closed-form last-layer predictive possible.

The *public* order of ``theta`` (what :meth:`Laplace.posterior_mean` and the dense matrices use)
is the concatenation of the subset's parameters, flattened, in ``model.named_parameters()``
order; :func:`public_index` maps between the two.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayesdl.posteriors.laplace.options import HessianStructure, Subset

__all__ = [
    "Block",
    "LinearBlock",
    "Selection",
    "TensorBlock",
    "join_vector",
    "public_index",
    "select",
    "split_vector",
]

#: Largest subset (number of weights) for which ``hessian="full"`` builds a dense matrix.
MAX_FULL_PARAMETERS = 12_000


class Block(ABC):
    """A contiguous part of the internal parameter vector."""

    #: Parameter names (relative to the user's model) the block covers, in model order.
    names: tuple[str, ...]
    #: Number of entries of the block in the vector.
    size: int

    @abstractmethod
    def split(self, v: Tensor) -> list[Tensor]:
        """Block vectors ``(..., size)`` to parameter-shaped tensors ``(..., *shape)``."""

    @abstractmethod
    def jacobian(self, jac: dict[str, Tensor]) -> Tensor:
        """Per-parameter Jacobians ``(B, K, *shape)`` to the block's ``(B, K, size)``."""

    @abstractmethod
    def join(self, params: dict[str, Tensor]) -> Tensor:
        """The block's vector ``(size,)`` from ``{name: tensor}`` (the inverse of :meth:`split`)."""

    @abstractmethod
    def public_positions(self) -> Tensor:
        """Block-internal index of each entry of the block's parameters in public order."""


@dataclass(frozen=True)
class TensorBlock(Block):
    """One parameter tensor, flattened."""

    name: str
    shape: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.name,)

    @property
    def size(self) -> int:  # type: ignore[override]
        return math.prod(self.shape)

    def split(self, v: Tensor) -> list[Tensor]:
        return [v.reshape(*v.shape[:-1], *self.shape)]

    def jacobian(self, jac: dict[str, Tensor]) -> Tensor:
        j = jac[self.name]
        return j.reshape(*j.shape[:2], self.size)

    def join(self, params: dict[str, Tensor]) -> Tensor:
        return params[self.name].flatten()

    def public_positions(self) -> Tensor:
        return torch.arange(self.size)


@dataclass(frozen=True)
class LinearBlock(Block):
    """An ``nn.Linear`` layer as ``W' = [W | b]``, ``(n_out, n_in + has_bias)``, row-major."""

    weight: str
    bias: str | None
    n_out: int
    n_in: int

    @property
    def names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def n_in_aug(self) -> int:
        """Width of the augmented input ``a' = [a, 1]`` (``n_in`` without a bias)."""
        return self.n_in + (self.bias is not None)

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.n_out * self.n_in_aug

    def split(self, v: Tensor) -> list[Tensor]:
        w = v.reshape(*v.shape[:-1], self.n_out, self.n_in_aug)
        if self.bias is None:
            return [w]
        return [w[..., : self.n_in], w[..., self.n_in]]

    def jacobian(self, jac: dict[str, Tensor]) -> Tensor:
        jw = jac[self.weight]
        if self.bias is not None:
            jw = torch.cat([jw, jac[self.bias].unsqueeze(-1)], dim=-1)
        return jw.reshape(*jw.shape[:2], self.size)

    def join(self, params: dict[str, Tensor]) -> Tensor:
        w = params[self.weight]
        if self.bias is not None:
            w = torch.cat([w, params[self.bias].unsqueeze(-1)], dim=-1)
        return w.flatten()

    def public_positions(self) -> Tensor:
        grid = torch.arange(self.size).view(self.n_out, self.n_in_aug)
        if self.bias is None:
            return grid.flatten()
        return torch.cat([grid[:, : self.n_in].flatten(), grid[:, self.n_in]])

    @classmethod
    def of(cls, prefix: str, layer: nn.Linear) -> LinearBlock:
        dot = f"{prefix}." if prefix else ""
        trained_bias = layer.bias is not None and layer.bias.requires_grad
        bias = f"{dot}bias" if trained_bias else None
        return cls(f"{dot}weight", bias, layer.out_features, layer.in_features)


def public_index(blocks: Sequence[Block], order: Sequence[str]) -> Tensor:
    """For each position of the public vector, its position in the internal vector.

    ``order`` is the subset's parameter names in model order; ``internal[public_index]`` is the
    public vector.
    """
    offset = 0
    pieces: dict[str, Tensor] = {}
    for block in blocks:
        positions = block.public_positions() + offset
        sizes = [block.size]
        if isinstance(block, LinearBlock) and block.bias is not None:
            sizes = [block.n_out * block.n_in, block.n_out]
        for name, part in zip(block.names, positions.split(sizes), strict=True):
            pieces[name] = part
        offset += block.size
    return torch.cat([pieces[name] for name in order])


def split_vector(blocks: Sequence[Block], v: Tensor) -> dict[str, Tensor]:
    """Internal vectors ``(..., P)`` to ``{name: (..., *shape)}`` for every subset parameter."""
    out: dict[str, Tensor] = {}
    for block, part in zip(blocks, v.split([b.size for b in blocks], dim=-1), strict=True):
        out.update(zip(block.names, block.split(part), strict=True))
    return out


def join_vector(blocks: Sequence[Block], params: dict[str, Tensor]) -> Tensor:
    """The internal vector ``(P,)`` of the subset's values in ``params``."""
    return torch.cat([b.join(params) for b in blocks])


@dataclass(frozen=True)
class Selection:
    """The resolved subset: its blocks, its parameter names in model order, and whether it is
    the output layer (closed-form Jacobians)."""

    blocks: tuple[Block, ...]
    names: tuple[str, ...]
    last_layer: nn.Linear | None

    @property
    def n_params(self) -> int:
        return sum(b.size for b in self.blocks)


def _own_parameters(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _last_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    owners = [(n, m) for n, m in model.named_modules() if _own_parameters(m)]
    if not owners:
        raise ValueError(
            "the model has no trainable parameters; there is nothing to put a posterior on."
        )
    name, module = owners[-1]
    if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
        raise ValueError(
            f"subset='last_layer' needs the model's output layer to be an nn.Linear, but its "
            f"last layer with parameters is {name or 'the model itself'!r} "
            f"({type(module).__name__}). Use subset='all' or a list of parameter names."
        )
    return name, module


def _named_selection(model: nn.Module, subset: Sequence[str]) -> list[str]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for entry in subset:
        if not isinstance(entry, str):
            raise TypeError(f"subset entries must be parameter or module names, got {entry!r}.")
        if entry in params:
            chosen.add(entry)
        elif entry in modules and entry:
            prefix = f"{entry}."
            found = [n for n in params if n.startswith(prefix)]
            if not found:
                raise ValueError(
                    f"subset entry {entry!r} is a module without trainable "
                    "parameters; name one that has some."
                )
            chosen.update(found)
        else:
            raise ValueError(
                f"subset entry {entry!r} names no parameter or module of the model. Trainable "
                f"parameters: {sorted(params)}."
            )
    if not chosen:
        raise ValueError(
            "the subset names no parameter; pass 'last_layer', 'all' or a non-empty list of "
            f"parameter or module names, e.g. {sorted(params)[:2]}."
        )
    return [n for n in params if n in chosen]


def _kron_blocks(model: nn.Module, names: list[str]) -> list[Block]:
    chosen = set(names)
    blocks, unusable = [], []
    for path, module in model.named_modules():
        dot = f"{path}." if path else ""
        own = [f"{dot}{n}" for n in _own_parameters(module)]
        picked = [n for n in own if n in chosen]
        if not picked:
            continue
        linear = isinstance(module, nn.Linear) and module.weight.requires_grad
        if linear and len(picked) == len(own):
            blocks.append(LinearBlock.of(path, module))
        else:
            why = "nn.Linear, only partly in the subset" if linear else type(module).__name__
            unusable.append(f"{path or 'the model itself'!r} ({why})")
    if unusable:
        raise ValueError(
            "hessian='kron' is built for nn.Linear layers only, and the subset includes layers "
            f"it cannot use: {', '.join(unusable)}. Use hessian='diag' or 'full', or a subset "
            "of nn.Linear layers (e.g. subset='last_layer')."
        )
    return blocks


def select(model: nn.Module, subset, hessian: HessianStructure) -> Selection:
    """Resolve ``subset`` (a :class:`Subset` value or a list of names) for ``hessian``.

    Raises ``ValueError`` for a subset that names no parameter, a structure the selected layers
    cannot use, or a dense Hessian that would be too large.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(subset, str):
        try:
            subset = Subset(subset)
        except ValueError:
            choices = ", ".join(repr(s.value) for s in Subset)
            raise ValueError(
                f"unknown subset {subset!r}; choose one of {choices} or pass a list of parameter "
                f"or module names (e.g. {sorted(params)[:2]})."
            ) from None
    if subset is Subset.LAST_LAYER:
        path, layer = _last_layer(model)
        block = LinearBlock.of(path, layer)
        selection = Selection((block,), block.names, layer)
    elif subset is Subset.ALL:
        names = list(params)
        if not names:
            raise ValueError(
                "the model has no trainable parameters (all have "
                "requires_grad=False); there is nothing to put a posterior on."
            )
    elif isinstance(subset, (list, tuple)):
        names = _named_selection(model, subset)
    else:
        raise TypeError(
            f"subset must be 'last_layer', 'all' or a list of parameter names, got "
            f"{type(subset).__name__}."
        )
    if subset is not Subset.LAST_LAYER:
        if hessian is HessianStructure.KRON:
            blocks: list[Block] = _kron_blocks(model, names)
        else:
            blocks = [TensorBlock(n, tuple(params[n].shape)) for n in names]
        selection = Selection(tuple(blocks), tuple(names), None)
    if hessian is HessianStructure.FULL and selection.n_params > MAX_FULL_PARAMETERS:
        raise ValueError(
            f"hessian='full' would build a dense {selection.n_params} x {selection.n_params} "
            f"matrix (more than {MAX_FULL_PARAMETERS} weights). Use hessian='kron' or 'diag', or "
            "a smaller subset such as 'last_layer'."
        )
    return selection
