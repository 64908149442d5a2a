"""The UCI regression folder format (Hernandez-Lobato & Adams 2015 splits) from any directory.

A data set is one folder::

    data.txt              whitespace-separated numbers, one row per example   (N, C)
    index_features.txt    column indices of the inputs (0-based)
    index_target.txt      column index of the target (one value)
    index_train_<i>.txt   row indices of the training set of split i
    index_test_<i>.txt    row indices of the test set of split i
    n_splits.txt          number of splits
    n_hidden.txt          hidden units of the published network (50, or 100 for large sets)
    n_epochs.txt          training epochs of the published protocol

:func:`load_uci` reads and checks everything once and returns a :class:`UCIDataset`; its splits
are :class:`UCISplit` tensors, and :class:`Standardizer` scales inputs and targets with the
training statistics of a split and maps predictions back to the original target scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Standardizer", "UCIDataset", "UCIFormatError", "UCISplit", "load_uci"]


class UCIFormatError(ValueError):
    """A file of a UCI folder is missing or malformed (the message names the file)."""


@dataclass(frozen=True)
class Standardizer:
    """Affine scaling of inputs and targets fitted on training data.

    Attributes
    ----------
    x_mean, x_std:
        Per-feature mean and standard deviation, ``(F,)``; constant features get ``std = 1``
        so they map to 0 instead of dividing by zero.
    y_mean, y_std:
        Target mean and standard deviation (Python floats).
    """

    x_mean: Tensor
    x_std: Tensor
    y_mean: float
    y_std: float

    @classmethod
    def fit(cls, x: Tensor, y: Tensor) -> Standardizer:
        """Statistics of training inputs ``(N, F)`` and targets ``(N,)`` (population std)."""
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"Standardizer.fit expects x (N, F) and y (N,) with N >= 1, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        x_std = x.std(0, correction=0)
        x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
        y_std = float(y.std(correction=0))
        return cls(x.mean(0), x_std, float(y.mean()), y_std if y_std > 0 else 1.0)

    def transform_x(self, x: Tensor) -> Tensor:
        """Standardised inputs, same shape as ``x``."""
        return (x - self.x_mean.to(x)) / self.x_std.to(x)

    def transform_y(self, y: Tensor) -> Tensor:
        """Standardised targets, same shape as ``y``."""
        return (y - self.y_mean) / self.y_std

    def inverse_mean(self, mean: Tensor) -> Tensor:
        """Predicted means (any shape) on the original target scale."""
        return mean * self.y_std + self.y_mean

    def inverse_variance(self, variance: Tensor) -> Tensor:
        """Predicted variances (any shape) on the original target scale."""
        return variance * self.y_std**2

    def log_density_correction(self) -> float:
        """Add this to a log-density of standardised targets to get the original scale's.

        ``y = y_mean + y_std * z`` gives ``log p(y) = log p(z) - log(y_std)``.
        """
        return -math.log(self.y_std)


@dataclass(frozen=True)
class UCISplit:
    """One train/test split: inputs ``(N, F)`` and targets ``(N,)`` on the original scale."""

    index: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def standardizer(self) -> Standardizer:
        """Statistics of this split's training set (never the test set)."""
        return Standardizer.fit(self.x_train, self.y_train)


@dataclass(frozen=True)
class UCIDataset:
    """A checked UCI folder.

    Attributes
    ----------
    name: the folder's name. data: all rows ``(N, C)``, float64.
    features: input column indices. target: target column index.
    train_indices, test_indices: row indices of every split, ``list`` of ``(n_i,)`` long tensors.
    n_hidden, n_epochs: the published network width and epoch count.
    """

    name: str
    data: Tensor
    features: tuple[int, ...]
    target: int
    train_indices: list[Tensor]
    test_indices: list[Tensor]
    n_hidden: int
    n_epochs: int

    @property
    def n_splits(self) -> int:
        return len(self.train_indices)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def split(self, i: int, dtype: torch.dtype = torch.float32) -> UCISplit:
        """Split ``i`` as tensors of ``dtype``."""
        if not isinstance(i, int) or not 0 <= i < self.n_splits:
            raise ValueError(f"split index must be an integer in [0, {self.n_splits}), got {i!r}.")
        x = self.data[:, list(self.features)].to(dtype)
        y = self.data[:, self.target].to(dtype)
        tr, te = self.train_indices[i], self.test_indices[i]
        return UCISplit(i, x[tr], y[tr], x[te], y[te])

    @property
    def splits(self) -> list[UCISplit]:
        """Every split, float32."""
        return [self.split(i) for i in range(self.n_splits)]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UCIFormatError(
            f"missing file {path.name} in {path.parent} (a UCI folder needs data.txt, "
            "index_features.txt, index_target.txt, index_train_<i>.txt, index_test_<i>.txt, "
            "n_splits.txt, n_hidden.txt, n_epochs.txt)."
        )
    return path


def _integers(path: Path) -> list[int]:
    """Whitespace-separated integers (``3`` or ``3.0``) from ``path``."""
    tokens = _require(path).read_text().split()
    out = []
    for tok in tokens:
        try:
            value = float(tok)
        except ValueError:
            raise UCIFormatError(
                f"{path.name} must hold whitespace-separated integers, found {tok!r} in {path}."
            ) from None
        if not math.isfinite(value) or value != int(value):
            raise UCIFormatError(f"{path.name} must hold integers, found {tok!r} in {path}.")
        out.append(int(value))
    return out


def _count(path: Path, *, minimum: int) -> int:
    values = _integers(path)
    if len(values) != 1 or values[0] < minimum:
        raise UCIFormatError(
            f"{path.name} must hold one integer >= {minimum}, got {values!r} in {path}."
        )
    return values[0]


def _indices(path: Path, bound: int, what: str) -> list[int]:
    values = _integers(path)
    if not values:
        raise UCIFormatError(f"{path.name} is empty; it must list at least one {what} index.")
    for v in values:
        if not 0 <= v < bound:
            raise UCIFormatError(
                f"{path.name} holds {what} index {v}, out of range: data.txt has {bound} "
                f"{what}s (valid indices 0..{bound - 1}). Indices are 0-based."
            )
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise UCIFormatError(f"{path.name} lists {what} index {dup} more than once.")
    return values


def load_uci(directory: str | Path) -> UCIDataset:
    """Read and check one UCI data set folder (see the module docstring for the format).

    Raises
    ------
    UCIFormatError (a ``ValueError``)
        naming the file that is missing or malformed, the index out of range, or the split
        whose train and test rows overlap.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UCIFormatError(f"{root} is not a directory; pass the folder of one UCI data set.")
    data_path = _require(root / "data.txt")
    try:
        data = np.loadtxt(data_path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise UCIFormatError(
            f"data.txt must be a table of numbers, one row per example ({data_path}): {err}"
        ) from None
    if data.size == 0:
        raise UCIFormatError(f"data.txt is empty ({data_path}).")
    if not np.isfinite(data).all():
        row = int(np.flatnonzero(~np.isfinite(data).all(1))[0])
        raise UCIFormatError(f"data.txt contains NaN or inf (first in row {row}) ({data_path}).")
    n_rows, n_cols = data.shape
    features = _indices(root / "index_features.txt", n_cols, "column")
    target = _indices(root / "index_target.txt", n_cols, "column")
    if len(target) != 1:
        raise UCIFormatError(f"index_target.txt must hold one column index, got {target}.")
    if target[0] in features:
        raise UCIFormatError(
            f"the target column {target[0]} is also listed in index_features.txt; remove it."
        )
    n_splits = _count(root / "n_splits.txt", minimum=1)
    n_hidden = _count(root / "n_hidden.txt", minimum=1)
    n_epochs = _count(root / "n_epochs.txt", minimum=1)
    train, test = [], []
    for i in range(n_splits):
        tr = _indices(root / f"index_train_{i}.txt", n_rows, "row")
        te = _indices(root / f"index_test_{i}.txt", n_rows, "row")
        both = set(tr) & set(te)
        if both:
            raise UCIFormatError(
                f"split {i}: {len(both)} row(s) are in both index_train_{i}.txt and "
                f"index_test_{i}.txt (first: {min(both)}); a test row must not be trained on."
            )
        train.append(torch.tensor(tr, dtype=torch.long))
        test.append(torch.tensor(te, dtype=torch.long))
    return UCIDataset(
        name=root.name,
        data=torch.from_numpy(data),
        features=tuple(features),
        target=target[0],
        train_indices=train,
        test_indices=test,
        n_hidden=n_hidden,
        n_epochs=n_epochs,
    )
