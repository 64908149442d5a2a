"""Walk-forward evaluation: refit on the past, forecast the next block, move on.

At each refit time ``s`` (every ``refit_every`` rows from ``start``) a fresh posterior is fitted on
the rows whose targets lie before ``s`` (all of them: an expanding window; or the last
``window_size``: a rolling one), with inputs and targets standardised by the statistics of those
training rows only, and predicts the rows ``s, ..., s + refit_every - 1``. No forecast ever
sees its own target or a later one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bayesdl.data.uci import Standardizer
from bayesdl.forecast.windows import LaggedData
from bayesdl.posteriors.base import Posterior
from bayesdl.predictions import RegressionPrediction

__all__ = ["WalkForward", "walk_forward"]


@dataclass(frozen=True)
class WalkForward:
    """The forecasts of a walk-forward run, on the series' own scale.

    Attributes
    ----------
    prediction:
        The predictive mixture of every forecast row, ``means`` and ``variances`` ``(S, N)``.
    y:
        ``(N,)`` what happened.
    time:
        ``(N,)`` the position of each forecast's target in the series.
    refits:
        ``[(start, n_train), ...]`` one per fitted posterior: the first row it forecast (index
        into ``time``'s rows of the whole :class:`LaggedData`) and how many rows it was fitted on.
    """

    prediction: RegressionPrediction
    y: Tensor
    time: Tensor
    refits: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)


def walk_forward(
    make_posterior: Callable[[int], Posterior],
    data: LaggedData,
    *,
    start: int,
    refit_every: int = 20,
    window: str = "expanding",
    window_size: int | None = None,
    fit_options: dict | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> WalkForward:
    """Forecast the rows ``start, start + 1, ...`` of ``data`` one step ahead, refitting as it goes.

    Parameters
    ----------
    make_posterior:
        ``make_posterior(n_features)`` returns a new, unfitted posterior with a Gaussian
        likelihood (heteroscedastic: a network with two outputs, mean and log-variance; or
        ``"homoscedastic_gaussian"``) for inputs ``(B, n_features)``. Called once per refit.
    data:
        Rows from :func:`~bayesdl.forecast.lagged`, in time order.
    start:
        The first row to forecast; the rows before it are the first training set.
    refit_every:
        Rows forecast by each fitted posterior (``K``); the last block may be shorter.
    window:
        ``"expanding"`` (train on every earlier row) or ``"rolling"`` (the last ``window_size``).
    window_size:
        Training rows of a rolling window (default and at most ``start``).
    fit_options:
        Keyword arguments of ``posterior.fit`` (epochs, lr, batch_size, patience, ...). The
        ``seed`` of each refit is ``seed + refit index`` unless given here.
    n_samples:
        Posterior draws per forecast (default the method's own).
    seed:
        Seed of the refits (refit ``i`` builds its posterior under ``torch.manual_seed(seed + i)``
        and fits with ``seed + i``) and of the predictive draws.
    progress:
        Called as ``progress(done_rows, total_rows)`` after each refit's block.

    Returns
    -------
    WalkForward
        ``prediction`` with ``(S, N)`` means and variances, ``N = len(data) - start``.
    """
    if not isinstance(data, LaggedData):
        raise TypeError(
            f"data must be a LaggedData from bayesdl.forecast.lagged, got {type(data).__name__}."
        )
    n = len(data)
    for name, value in (("start", start), ("refit_every", refit_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if start >= n:
        raise ValueError(
            f"start={start} leaves nothing to forecast: the data has {n} rows. Pass a start "
            f"below {n}."
        )
    if window not in ("expanding", "rolling"):
        raise ValueError(f"window must be 'expanding' or 'rolling', got {window!r}.")
    if window_size is not None and (
        isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2
    ):
        raise ValueError(f"window_size must be an integer >= 2, got {window_size!r}.")
    if window == "expanding" and window_size is not None:
        raise ValueError("window_size applies to window='rolling' only.")
    size = min(window_size or start, start)
    options = dict(fit_options or {})
    means, variances, refits = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for index, s in enumerate(range(start, n, refit_every)):
        end = min(s + refit_every, n)
        first = 0 if window == "expanding" else s - size
        x_train, y_train = data.x[first:s], data.y[first:s]
        scaler = Standardizer.fit(x_train, y_train)
        # Each refit's network starts from weights of its own seed, and the caller's global
        # random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            posterior = make_posterior(data.x.shape[1])
        if not isinstance(posterior, Posterior):
            raise TypeError(
                f"make_posterior must return a bayesdl posterior, got {type(posterior).__name__}."
            )
        if getattr(posterior.likelihood, "task", None) != "regression":
            raise ValueError(
                "the forecaster needs a Gaussian likelihood (likelihood='gaussian' or "
                f"'homoscedastic_gaussian'), got {type(posterior.likelihood).__name__}."
            )
        fit = {"seed": seed + index, **options}
        posterior.fit((scaler.transform_x(x_train), scaler.transform_y(y_train)), **fit)
        pred = posterior.predict(scaler.transform_x(data.x[s:end]), n_samples, generator=generator)
        means.append(pred.means * scaler.y_std + scaler.y_mean)
        variances.append(pred.variances * scaler.y_std**2)
        refits.append((s, s - first))
        if progress is not None:
            progress(end - start, n - start)
    if len({m.shape[0] for m in means}) != 1:
        raise ValueError(
            "the posteriors made a different number of draws per refit; pass n_samples."
        )
    prediction = RegressionPrediction(torch.cat(means, dim=1), torch.cat(variances, dim=1))
    if not bool(torch.isfinite(prediction.means).all()):
        raise ValueError("a refit produced non-finite forecasts; check the fit options.")
    return WalkForward(
        prediction=prediction, y=data.y[start:].clone(), time=data.time[start:].clone(),
        refits=refits,
    )  # fmt: skip
