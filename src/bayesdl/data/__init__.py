"""Data in, tensors out: the boundary where user data is checked.

Training accepts ``(x, y)`` as tensors or numpy arrays, or a ``torch.utils.data.DataLoader``
that yields ``(x, y)`` batches. Everything else in the library sees validated tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from bayesdl.data.digits import DigitsOOD, load_digits_ood
from bayesdl.data.mnist import (
    MNISTFormatError,
    blur,
    contrast,
    gaussian_kernel,
    gaussian_noise,
    load_mnist,
    load_mnist_idx,
    rotate,
)
from bayesdl.data.uci import Standardizer, UCIDataset, UCISplit, load_uci

__all__ = [
    "DigitsOOD",
    "MNISTFormatError",
    "Standardizer",
    "TensorData",
    "UCIDataset",
    "UCISplit",
    "as_inputs",
    "as_training_data",
    "blur",
    "contrast",
    "gaussian_kernel",
    "gaussian_noise",
    "load_digits_ood",
    "load_mnist",
    "load_mnist_idx",
    "load_uci",
    "rotate",
]


def as_inputs(x, *, dtype: torch.dtype, device: torch.device, name: str = "x") -> Tensor:
    """Convert inputs to a floating tensor on ``device`` and check them.

    Raises ``TypeError`` for what cannot be a tensor and ``ValueError`` for an empty batch, a
    missing batch axis, or NaN/inf values.
    """
    if isinstance(x, (Tensor, np.ndarray)):
        t = torch.as_tensor(x)
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        t = torch.as_tensor(np.asarray(x))
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (B, ...), got "
            f"{type(x).__name__}."
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}.")
    if t.ndim < 2:
        raise ValueError(
            f"{name} must have a batch axis first, shape (B, n_features, ...), got shape "
            f"{tuple(t.shape)}. For a single example use x[None]; for one feature use "
            "x[:, None]."
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one example.")
    t = t.to(device=device, dtype=dtype)
    # The sum is finite exactly when every value is, unless finite values overflow it: a cheap
    # reduction first, and the elementwise check only to confirm and to name the rows.
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or inf in {len(bad)} row(s) (first: row {int(bad[0])}); "
            "remove or impute them."
        )
    return t


@dataclass(frozen=True)
class TensorData:
    """A whole data set in memory: inputs ``(N, ...)`` and targets ``(N, ...)``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: Tensor) -> TensorData:
        return TensorData(self.x[index], self.y[index])


def as_training_data(data, *, dtype, device, check_targets) -> TensorData | DataLoader:
    """Validate ``(x, y)`` or pass a DataLoader through (its batches are checked as they come).

    ``check_targets`` is the likelihood's target check; it returns targets in canonical form.
    """
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            "data must be a pair (x, y) of tensors or numpy arrays, or a DataLoader yielding "
            f"(x, y) batches; got {type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, (tuple, list)) else "")
            + "."
        )
    x = as_inputs(data[0], dtype=dtype, device=device)
    y = check_targets(
        torch.as_tensor(np.asarray(data[1]) if isinstance(data[1], list) else data[1])
    )
    if len(y) != len(x):
        raise ValueError(
            f"x and y must have the same number of rows, got {len(x)} inputs and {len(y)} targets."
        )
    if y.is_floating_point():
        y = y.to(dtype)
    return TensorData(x, y.to(device))
