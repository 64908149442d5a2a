"""Risk measures from a predictive mixture, and the backtests risk teams run on them.

For a return ``Y`` with predictive CDF ``F`` (an equal-weight mixture of ``S`` Gaussians
``N(mu_s, sigma_s^2)``) and a confidence ``c`` (0.95, 0.99):

* value at risk, ``VaR_c = -F^{-1}(1 - c)``: the loss exceeded with probability ``1 - c``
  (a positive number for a loss);
* expected shortfall, ``ES_c = -E[Y | Y <= -VaR_c]``, in closed form for the mixture:
  ``E[Y 1(Y <= v)] = mean_s(mu_s Phi(z_s) - sigma_s phi(z_s))`` with ``z_s = (v - mu_s) / sigma_s``.

Backtests of a sequence of VaR forecasts, on the exceedances ``I_t = 1(y_t < -VaR_t)``:

* Kupiec's (1995) proportion-of-failures test: is the exceedance rate ``1 - c``? The likelihood
  ratio of ``x`` exceedances in ``n`` days, ``-2 log[(1-p)^(n-x) p^x / ((1-x/n)^(n-x) (x/n)^x)]``
  with ``p = 1 - c``, is chi-squared with one degree of freedom under the null;
* Christoffersen's (1998) independence test: do exceedances cluster? The likelihood ratio of a
  first-order Markov chain against independence, also chi-squared(1); and the conditional
  coverage test, the sum of both, chi-squared(2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bayesdl.metrics.regression import _check_open_level
from bayesdl.predictions import RegressionPrediction

__all__ = [
    "BacktestResult",
    "christoffersen_test",
    "expected_shortfall",
    "kupiec_test",
    "value_at_risk",
]


def _confidence(confidence: object) -> float:
    return _check_open_level(confidence, "confidence", "confidence=0.99 for the 99% VaR")


def _one_target(prediction: object) -> RegressionPrediction:
    if not isinstance(prediction, RegressionPrediction) or prediction.means.ndim != 2:
        raise TypeError(
            "expected a one-target RegressionPrediction (means (S, N)) of returns, got "
            f"{type(prediction).__name__}."
        )
    return prediction


def value_at_risk(prediction: RegressionPrediction, confidence: float = 0.99) -> Tensor:
    """``VaR_c = -F^{-1}(1 - c)`` per forecast, ``(N,)``: positive where the quantile is a loss."""
    c = _confidence(confidence)
    return -_one_target(prediction).quantile(1.0 - c)


def expected_shortfall(prediction: RegressionPrediction, confidence: float = 0.99) -> Tensor:
    """``ES_c = -E[Y | Y <= -VaR_c]`` per forecast, ``(N,)``, in closed form for the mixture.

    Always at least :func:`value_at_risk` at the same confidence.
    """
    c = _confidence(confidence)
    pred = _one_target(prediction)
    v = pred.quantile(1.0 - c)
    sd = pred.variances.sqrt()
    z = (v - pred.means) / sd
    normal_pdf = torch.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    below = torch.special.ndtr(z)
    partial = (pred.means * below - sd * normal_pdf).mean(0)
    tail = below.mean(0)  # = 1 - c up to the quantile's tolerance
    return -partial / tail


@dataclass(frozen=True)
class BacktestResult:
    """A likelihood-ratio backtest.

    Attributes
    ----------
    statistic:
        The likelihood ratio, chi-squared under the null.
    p_value:
        ``P(chi2_df >= statistic)``; small values reject the null (e.g. below 0.05).
    df:
        Degrees of freedom.
    n:
        Days tested.
    exceedances:
        Days whose loss exceeded the VaR.
    """

    statistic: float
    p_value: float
    df: int
    n: int
    exceedances: int

    @property
    def rate(self) -> float:
        """The exceedance rate, ``exceedances / n``."""
        return self.exceedances / self.n


def _chi2_sf(x: float, df: int) -> float:
    """Survival function of chi-squared with 1 or 2 degrees of freedom, in closed form."""
    x = max(x, 0.0)
    if df == 1:
        return math.erfc(math.sqrt(x / 2.0))
    if df == 2:
        return math.exp(-x / 2.0)
    raise ValueError(f"df must be 1 or 2, got {df}.")


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0 else x * math.log(y)


def _exceedances(exceedances: object) -> Tensor:
    e = torch.as_tensor(exceedances)
    if e.ndim != 1 or len(e) == 0:
        raise ValueError(
            "exceedances must be a non-empty (N,) sequence of booleans, got shape "
            f"{tuple(e.shape)}."
        )
    if e.dtype != torch.bool:
        if not ((e == 0) | (e == 1)).all():
            raise ValueError("exceedances must be booleans or 0/1 (did the loss exceed VaR?).")
        e = e != 0
    return e


def kupiec_test(exceedances: object, confidence: float = 0.99) -> BacktestResult:
    """Kupiec's proportion-of-failures test: is the rate of ``exceedances`` ``(N,)`` equal to
    ``1 - confidence``?"""
    p = 1.0 - _confidence(confidence)
    e = _exceedances(exceedances)
    n, x = len(e), int(e.sum())
    rate = x / n
    log_null = _xlogy(n - x, 1.0 - p) + _xlogy(x, p)
    log_alt = _xlogy(n - x, 1.0 - rate) + _xlogy(x, rate)
    lr = -2.0 * (log_null - log_alt)
    return BacktestResult(statistic=lr, p_value=_chi2_sf(lr, 1), df=1, n=n, exceedances=x)


def christoffersen_test(exceedances: object, confidence: float | None = None) -> BacktestResult:
    """Christoffersen's independence test on ``exceedances`` ``(N,)``: is an exceedance today
    as likely after an exceedance yesterday as after none? With ``confidence`` given, the
    conditional coverage test instead (independence and the right rate, two degrees of freedom).
    """
    e = _exceedances(exceedances)
    if len(e) < 2:
        raise ValueError("the independence test needs at least 2 days.")
    prev, cur = e[:-1], e[1:]
    n00 = int((~prev & ~cur).sum())
    n01 = int((~prev & cur).sum())
    n10 = int((prev & ~cur).sum())
    n11 = int((prev & cur).sum())
    pi01 = n01 / (n00 + n01) if n00 + n01 else 0.0
    pi11 = n11 / (n10 + n11) if n10 + n11 else 0.0
    pi = (n01 + n11) / (n00 + n01 + n10 + n11)
    log_null = _xlogy(n00 + n10, 1.0 - pi) + _xlogy(n01 + n11, pi)
    log_alt = (
        _xlogy(n00, 1.0 - pi01) + _xlogy(n01, pi01) + _xlogy(n10, 1.0 - pi11) + _xlogy(n11, pi11)
    )
    lr = -2.0 * (log_null - log_alt)
    n, x = len(e), int(e.sum())
    if confidence is None:
        return BacktestResult(statistic=lr, p_value=_chi2_sf(lr, 1), df=1, n=n, exceedances=x)
    lr = lr + kupiec_test(e, confidence).statistic
    return BacktestResult(statistic=lr, p_value=_chi2_sf(lr, 2), df=2, n=n, exceedances=x)
