"""Input checks shared by the metric functions.

Every public metric validates its arguments here, once, at the boundary; the computations behind
them assume clean input. Each check raises :class:`TypeError` (wrong kind of object or dtype) or
:class:`ValueError` (wrong shape or values) with a message that says what was expected, what came
and how to fix it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_tensor",
    "check_binary",
    "check_finite",
    "check_floating",
    "check_fraction",
    "check_integer_labels",
    "check_ndim",
    "check_nonempty",
    "check_positive_int",
    "check_real",
    "check_same_device",
    "check_same_length",
    "check_same_shape",
    "result_dtype",
]


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def as_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` as a tensor; accept a :class:`torch.Tensor` or a :class:`numpy.ndarray`."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        try:
            return torch.as_tensor(x)
        except TypeError as err:
            raise TypeError(
                f"{name} must be a numeric array; got a numpy array of dtype {x.dtype}, which "
                f"torch cannot hold. Convert it first, e.g. {name}.astype(np.float64)."
            ) from err
    raise TypeError(
        f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}. "
        f"Wrap it with torch.as_tensor({name})."
    )


def check_real(x: Tensor, name: str) -> Tensor:
    """Reject complex tensors; cast booleans to the default float dtype."""
    if x.is_complex():
        raise TypeError(
            f"{name} must hold real numbers, got complex dtype {x.dtype}. "
            f"Pass the real part ({name}.real) or the magnitude ({name}.abs())."
        )
    if x.dtype == torch.bool:
        return x.to(torch.get_default_dtype())
    return x


def check_floating(x: Tensor, name: str) -> Tensor:
    """Require a floating-point dtype (probabilities, variances...)."""
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype, got {x.dtype}. "
            f"Convert it with {name}.to(torch.float32) (or torch.float64)."
        )
    return x


def check_ndim(x: Tensor, name: str, ndims: tuple[int, ...], layout: str) -> Tensor:
    """Require ``x.ndim`` to be one of ``ndims``; ``layout`` names the expected shape(s)."""
    if x.ndim not in ndims:
        raise ValueError(
            f"{name} must have shape {layout}, got a {x.ndim}-d tensor of shape {_shape(x)}."
        )
    return x


def check_nonempty(x: Tensor, name: str) -> Tensor:
    """Reject tensors with no elements: a metric over no examples is undefined."""
    if x.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {_shape(x)}); the metric is undefined on no examples. "
            "Pass at least one example."
        )
    return x


def check_finite(x: Tensor, name: str) -> Tensor:
    """Reject NaN and +-inf, pointing at the first offending entry."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} must be finite, but {int(bad.sum())} of its {x.numel()} entries are "
                f"NaN or infinite (the first at index {first}: {x[first].item()}). "
                "Remove or impute those examples first."
            )
    return x


def check_same_device(**tensors: Tensor) -> None:
    """Require all tensors to live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(
            f"all inputs must be on the same device, got {listed}. "
            "Move them with .to(device) first."
        )


def check_same_length(**tensors: Tensor) -> int:
    """Require equal first dimensions (one entry per example); return it."""
    lengths = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(
            f"inputs must have one entry per example (the same length), but {listed}. "
            "Pass matching examples."
        )
    return next(iter(lengths.values()))


def check_same_shape(**tensors: Tensor) -> None:
    """Require identical shapes."""
    shapes = {name: _shape(t) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"inputs must have the same shape, got {listed}. "
            "Pass element-wise matching tensors (no broadcasting is done)."
        )


def check_integer_labels(y: Tensor, name: str, n_classes: int) -> Tensor:
    """Require integer class labels in ``[0, n_classes)``; return them as ``long``."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class labels, got dtype {y.dtype}. "
            f"If the values are whole numbers, convert with {name}.long(); if they are one-hot "
            f"rows, use {name}.argmax(-1)."
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"{name} must hold class labels in [0, {n_classes}) to index the {n_classes} "
            f"probability columns, got labels in [{lo}, {hi}]. Relabel the classes to "
            f"0..{n_classes - 1} or pass probabilities for every class."
        )
    return y.long()


def check_binary(x: Tensor, name: str) -> Tensor:
    """Require booleans or numbers that are all 0 or 1 (e.g. a per-example ``correct`` flag)."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"{name} must be boolean or 0/1 numbers, got complex dtype {x.dtype}.")
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} must be boolean or hold only 0 and 1, got {x[first].item()} at index "
            f"{first}. Pass e.g. (probs.argmax(-1) == y)."
        )
    return x


def check_positive_int(value: object, name: str) -> int:
    """Require a positive Python/numpy integer (``bool`` rejected)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__}).")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}. Use e.g. {name}=15.")
    return int(value)


def check_fraction(value: object, name: str) -> float:
    """Require a real number in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a number in (0, 1], got {value!r} ({type(value).__name__})."
        )
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{name} must be a fraction in (0, 1], got {value!r}. "
            f"Write a percentage as a fraction, e.g. {name}=0.95 for 95%."
        )
    return value


def result_dtype(*tensors: Tensor) -> torch.dtype:
    """Floating dtype for the result: the promoted dtype of the floating inputs.

    Falls back to :func:`torch.get_default_dtype` when no input is floating (integer scores,
    boolean flags).
    """
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    if not floating:
        return torch.get_default_dtype()
    dtype = floating[0]
    for other in floating[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype
