"""The embedded out-of-distribution task: scikit-learn's handwritten digits.

Models learn digits 0-4; digits 5-9 are classes they never saw. The 1,797 8x8 images ship with
scikit-learn, so this needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DigitsOOD", "load_digits_ood"]


@dataclass(frozen=True)
class DigitsOOD:
    """Train / in-distribution test / OOD split of the digits, features scaled to [0, 1].

    Shapes: ``x_*`` are ``(N, 64)`` float32, ``y_*`` are ``(N,)`` long labels in ``0..4``
    (``y_ood`` keeps the true digit 5..9 for reference).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_ood: Tensor
    y_ood: Tensor
    n_classes: int = 5


def load_digits_ood(test_fraction: float = 0.3, seed: int = 0) -> DigitsOOD:
    """Split the digits into 0-4 (train and held-out test) and 5-9 (out of distribution)."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    known = y < 5
    rng = np.random.default_rng(seed)
    idx = rng.permutation(np.flatnonzero(known))
    n_test = round(test_fraction * len(idx))
    test, train = idx[:n_test], idx[n_test:]
    ood = np.flatnonzero(~known)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    return DigitsOOD(
        x_train=t(x[train]),
        y_train=t(y[train]).long(),
        x_test=t(x[test]),
        y_test=t(y[test]).long(),
        x_ood=t(x[ood]),
        y_ood=t(y[ood]).long(),
    )
