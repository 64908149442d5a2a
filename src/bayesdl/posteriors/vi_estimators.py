"""Gradient estimators of mean-field VI's expected log-likelihood, kept apart from the posterior.

* :class:`Estimator`: the options, resolved once.
* :class:`LocalNoise`: a ``TorchFunctionMode`` that serves ``F.linear`` / ``F.convNd`` calls whose
  weight is a Bayesian mean with output noise instead of weight noise (local reparameterisation
  or Flipout), so the user's Linear and Conv layers run as written.
* :class:`SampleWithGaussianKL`: the fused weight sampling and closed-form Gaussian KL used by
  plain reparameterisation.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["LOCAL_LAYERS", "Estimator", "LocalNoise", "SampleWithGaussianKL"]

#: Layer types the output-noise estimators serve.
LOCAL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LOCAL_FUNCS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class Estimator(str, Enum):
    """Gradient estimators of the expected log-likelihood during training."""

    #: Sample the weights, ``w = mu + sigma * eps`` (any layer).
    REPARAMETERIZATION = "reparameterization"
    #: Sample the pre-activations of Linear/Conv layers from their Gaussian (Kingma et al. 2015):
    #: independent noise per example, lower variance, no weight sampling.
    LOCAL = "local"
    #: One weight perturbation per batch, decorrelated across examples by random sign flips
    #: (Wen et al. 2018), for Linear/Conv layers.
    FLIPOUT = "flipout"


class SampleWithGaussianKL(torch.autograd.Function):
    """``w = mu + exp(log_std) * eps`` and the closed-form KL to ``N(0, scale^2)``.

    The same maths as composing the ops with autograd, in about a third of the passes over the
    ``P`` parameters and with one transcendental function (``exp``): the KL uses dot products and
    ``sum(log sigma) = sum(log_std)``, and the backward writes the analytic gradients
    (``dKL/dmu = mu / s^2``, ``dKL/dlog_std = sigma^2 / s^2 - 1``, ``dsigma/dlog_std = sigma``)
    in place. On a CPU this elementwise work, not the matrix products, dominates a training step
    of a mean-field network.
    """

    @staticmethod
    def forward(ctx, mu, log_std, eps, scale: float):
        sigma = log_std.exp()
        w = torch.addcmul(mu, sigma, eps)
        inv_s2 = 1.0 / scale**2
        kl = (
            0.5 * inv_s2 * (torch.dot(sigma, sigma) + torch.dot(mu, mu))
            - log_std.sum()
            + mu.numel() * (math.log(scale) - 0.5)
        )
        ctx.save_for_backward(mu, eps, sigma)
        ctx.inv_s2 = inv_s2
        return w, kl

    @staticmethod
    def backward(ctx, grad_w, grad_kl):
        mu, eps, sigma = ctx.saved_tensors
        c = float(grad_kl)
        grad_mu = torch.add(grad_w, mu, alpha=c * ctx.inv_s2)
        grad_log_std = grad_w * eps
        grad_log_std.mul_(sigma).addcmul_(sigma, sigma, value=c * ctx.inv_s2).sub_(c)
        return grad_mu, grad_log_std, None, None


class LocalNoise(TorchFunctionMode):
    """Serve F.linear / F.convNd calls whose weight is a Bayesian mean with output noise."""

    def __init__(self, table: dict[int, tuple[Tensor, Tensor | None, Estimator]]) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOCAL_FUNCS and len(args) >= 2 and id(args[1]) in self.table:
            sigma_w, sigma_b, estimator = self.table[id(args[1])]
            x, mu_w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
            rest = args[3:]
            mean = func(x, mu_w, bias, *rest, **kwargs)
            if estimator is Estimator.LOCAL:
                # the layer itself adds the bias variance where its bias goes (last axis for
                # linear, the channel axis for convolutions)
                bias_var = None if sigma_b is None else sigma_b * sigma_b
                var = func(x * x, sigma_w * sigma_w, bias_var, *rest, **kwargs)
                return mean + var.clamp_min(1e-30).sqrt() * torch.randn_like(mean)
            # Flipout: one perturbation for the batch, decorrelated per example by sign flips.
            sign_in = torch.empty_like(x).bernoulli_(0.5).mul_(2).sub_(1)
            sign_out = torch.empty_like(mean).bernoulli_(0.5).mul_(2).sub_(1)
            delta_w = sigma_w * torch.randn_like(sigma_w)
            delta_b = None if sigma_b is None else sigma_b * torch.randn_like(sigma_b)
            return mean + func(x * sign_in, delta_w, delta_b, *rest, **kwargs) * sign_out
        return func(*args, **kwargs)
