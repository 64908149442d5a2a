"""Supervised windows over a time series, without look-ahead.

A one-step-ahead forecaster at time ``t`` may use only what is known before ``t``: the series'
values ``y[t - lags], ..., y[t - 1]`` and the exogenous features of time ``t - 1``.
:func:`lagged` builds those rows; every later step of the forecasting workflow (the walk-forward
refits, the standardisation, the adaptive intervals) keeps to the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["LaggedData", "lagged"]


@dataclass(frozen=True)
class LaggedData:
    """Rows of a one-step-ahead forecasting problem, in time order.

    Attributes
    ----------
    x:
        ``(N, lags + lags * E)``: row ``i`` holds ``y[t_i - lags], ..., y[t_i - 1]`` (oldest
        first), then for each of the ``E`` exogenous features its values at the same ``lags``
        times, feature by feature.
    y:
        ``(N,)``: the value to forecast, ``y[t_i]``.
    time:
        ``(N,)`` int64: ``t_i``, the position in the series of each row's target (``lags``,
        ``lags + 1``, ...).
    feature_names:
        One name per column of ``x``: ``"y[t-3]"``, ... and ``"<feature>[t-1]"``.
    """

    x: Tensor
    y: Tensor
    time: Tensor
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


def _series(values: object, name: str, dtype: torch.dtype) -> Tensor:
    if isinstance(values, Tensor):
        t = values.detach().to("cpu", dtype)
    else:
        try:
            t = torch.as_tensor(np.array(values, dtype=np.float64), dtype=dtype)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a sequence of numbers (a list, numpy array, tensor or pandas "
                f"Series), got {type(values).__name__}: {err}"
            ) from None
    return t


def lagged(
    series: object,
    lags: int,
    *,
    exog: object = None,
    exog_names: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> LaggedData:
    """One row per forecastable time step: the last ``lags`` values (and exogenous features).

    Parameters
    ----------
    series:
        The series, ``(T,)``: numbers in time order (a list, numpy array, tensor or pandas
        Series; its index is not used).
    lags:
        How many past values each row holds, ``>= 1``. The first row forecasts ``series[lags]``.
    exog:
        Optional exogenous features, ``(T,)`` or ``(T, E)``, aligned with ``series``: row ``i``
        holds their values at the same past times as the lags (never at ``t_i`` itself, which
        is not known when the forecast is made). Shift a feature yourself if it is known
        earlier (e.g. a calendar).
    exog_names:
        Names of the ``E`` features (default ``x0``, ``x1``, ...).
    dtype:
        Floating dtype of ``x`` and ``y`` (default float32).

    Returns
    -------
    LaggedData
        ``x (N, lags * (1 + E))``, ``y (N,)``, ``time (N,)`` with ``N = T - lags``.

    Raises
    ------
    ValueError
        A series that is not one-dimensional, holds NaN or inf, or is not longer than ``lags``;
        an ``exog`` of another length.
    """
    if isinstance(lags, bool) or not isinstance(lags, int) or lags < 1:
        raise ValueError(f"lags must be a positive integer, got {lags!r}.")
    y = _series(series, "series", dtype)
    if y.ndim != 1:
        raise ValueError(
            f"series must be one-dimensional (T,), got shape {tuple(y.shape)}; for several "
            "series forecast each on its own, or pass the others as exog."
        )
    if len(y) <= lags:
        raise ValueError(
            f"series has {len(y)} values; with lags={lags} it needs at least {lags + 1} for one "
            "row. Use fewer lags or a longer series."
        )
    if not torch.isfinite(y).all():
        first = int((~torch.isfinite(y)).nonzero()[0])
        raise ValueError(
            f"series holds NaN or inf (first at position {first}); fill or drop missing values "
            "before windowing."
        )
    columns = [y]
    names = [f"y[t-{k}]" for k in range(lags, 0, -1)]
    if exog is not None:
        e = _series(exog, "exog", dtype)
        if e.ndim == 1:
            e = e[:, None]
        if e.ndim != 2 or len(e) != len(y):
            raise ValueError(
                f"exog must be (T,) or (T, E) with T = {len(y)} (the series' length), got shape "
                f"{tuple(e.shape)}."
            )
        if not torch.isfinite(e).all():
            raise ValueError("exog holds NaN or inf; fill or drop missing values first.")
        if exog_names is None:
            exog_names = [f"x{j}" for j in range(e.shape[1])]
        if len(exog_names) != e.shape[1]:
            raise ValueError(
                f"exog_names has {len(exog_names)} names for {e.shape[1]} exogenous features."
            )
        for j, feature in enumerate(exog_names):
            columns.append(e[:, j])
            names += [f"{feature}[t-{k}]" for k in range(lags, 0, -1)]
    n = len(y) - lags
    # Column block c, lag k (k = lags .. 1) of row i is columns[c][lags + i - k].
    x = torch.cat([c.unfold(0, lags, 1)[:n] for c in columns], dim=1)
    time = torch.arange(lags, len(y), dtype=torch.long)
    return LaggedData(x=x.contiguous(), y=y[lags:].clone(), time=time, feature_names=tuple(names))
