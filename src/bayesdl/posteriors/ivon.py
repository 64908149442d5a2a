"""IVON: variational learning at the cost of Adam (Shen et al., 2024, "Variational Learning Is
Effective for Large Deep Networks").

The posterior is a diagonal Gaussian ``N(m, 1 / (lambda (h + delta)))`` over every weight, where
``lambda`` is the effective sample size (the training set's size by default), ``delta =
prior_precision / lambda`` and ``h`` an online estimate of the diagonal Hessian. Each step draws one
weight sample ``w = m + sigma * eps``, takes the mini-batch gradient ``g`` of the mean NLL there,
and updates, with ``h_hat = g * eps / sigma`` (the reparameterisation estimate of the Hessian):

* ``g_bar = beta1 g_bar + (1 - beta1) g``;
* ``h = beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 * (h - h_hat)^2 / (h + delta)`` (the
  last term keeps ``h`` positive);
* ``m -= lr * (g_bar / (1 - beta1^t) + delta m) / (h + delta)``.

One forward and backward per step, as for a deterministic network; prediction draws from the
Gaussian exactly as :class:`~bayesdl.posteriors.mean_field_vi.MeanFieldVI` does (IVON is that
posterior, learned another way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bayesdl import training
from bayesdl._options import is_number, is_positive, require
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import refuse_options, register
from bayesdl.posteriors.mean_field_vi import MeanFieldVI, PredictionNoise, _VIObjective
from bayesdl.priors import GaussianPrior

__all__ = ["IVON"]


class _IVONStep(torch.optim.Optimizer):
    """The IVON update of the flat means ``m`` (writing ``log_std`` from ``h`` after each step),
    and Adam for the point parameters (a likelihood's own, which get no distribution)."""

    def __init__(self, ivon: IVON, lr: float, point: list[Tensor]) -> None:
        groups = [{"params": [ivon.mu], "lr": lr}]
        if point:
            groups.append({"params": point, "lr": ivon.point_lr})
        super().__init__(groups, {"beta1": ivon.beta1, "beta2": ivon.beta2})
        self.ivon = ivon

    @torch.no_grad()
    def step(self, closure=None):
        self._ivon(self.param_groups[0])
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    _adam(p, self.state[p], group["lr"])

    def _ivon(self, group: dict) -> None:
        """The update in about a dozen passes over the weights (``sigma`` and ``h + delta`` are
        kept between steps; ``log_std`` is written at the end of each epoch)."""
        ivon = self.ivon
        lr, b1, b2 = group["lr"], group["beta1"], group["beta2"]
        m = ivon.mu
        if m.grad is None:
            return
        state = self.state[m]
        delta, ess = ivon._delta, ivon._ess
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["momentum"] = torch.zeros_like(m)
            state["hessian"] = torch.full_like(m, ivon.hess_init)
        state["step"] += 1
        h, g_bar = state["hessian"], state["momentum"]
        denom = ivon._denom  # h + delta of the step's draw
        h_hat = torch.mul(m.grad, ivon._last_noise).div_(ivon._sigma)
        g_bar.lerp_(m.grad, 1 - b1)
        gap = torch.sub(h, h_hat).square_()  # the correction (h - h_hat)^2 / (h + delta)
        h.lerp_(h_hat, 1 - b2).addcdiv_(gap, denom, value=0.5 * (1 - b2) ** 2)
        torch.add(h, delta, out=denom)
        bias = 1 - b1 ** float(state["step"])
        update = torch.add(g_bar, m, alpha=delta * bias)  # (g_bar / bias + delta m) * bias
        if ivon.clip_radius is None:
            m.addcdiv_(update, denom, value=-lr / bias)
        else:  # each weight's preconditioned step at most clip_radius (before lr)
            step = update.div_(denom).mul_(1 / bias).clamp_(-ivon.clip_radius, ivon.clip_radius)
            m.sub_(step, alpha=lr)
        torch.rsqrt(denom, out=ivon._sigma).mul_(ess**-0.5)


def _adam(p: Tensor, state: dict, lr: float, b1: float = 0.9, b2: float = 0.999) -> None:
    """One Adam step (Kingma and Ba, 2015) of a point parameter."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float64)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = float(state["step"])
    state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
    denominator = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(1e-8)
    p.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - b1**t))


class _IVONObjective(_VIObjective):
    """The mean NLL at one weight draw ``m + sigma * eps`` (the prior enters the update, not
    the loss; ``sigma`` comes from the Hessian estimate, so there is nothing to exponentiate and
    no KL term)."""

    def parameters(self) -> list[Tensor]:
        return [self.vi.mu, *self.point]

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        vi = self.vi
        w = torch.addcmul(vi.mu, vi._sigma, vi._next_noise())
        views = vi._views(w)
        out = vi._swap(tuple(views[n] for n in vi.bayesian_names), x)
        return vi.likelihood.training_loss(out, y).mean()

    def make_optimizer(self, params: list[Tensor], config: training.TrainConfig) -> _IVONStep:
        return _IVONStep(self.vi, config.lr, self.point)

    def before_step(self) -> None:
        super().before_step()  # the step's shared noise; also on a process without rows
        self.vi._last_noise = self.vi._queued[0]

    def end_epoch(self, epoch: int, optimizer) -> None:
        super().end_epoch(epoch, optimizer)
        self.vi._write_log_std()

    def checkpoint_state(self) -> tuple[dict, dict[str, Tensor]]:
        plain, tensors = super().checkpoint_state()
        return plain, {**tensors, "ivon.sigma": self.vi._sigma, "ivon.denom": self.vi._denom}

    def load_checkpoint_state(self, json_part: dict, tensors: dict[str, Tensor]) -> None:
        super().load_checkpoint_state(json_part, tensors)
        vi = self.vi
        with torch.no_grad():
            vi._sigma.copy_(tensors["ivon.sigma"])
            vi._denom.copy_(tensors["ivon.denom"])


@register
class IVON(MeanFieldVI):
    """A diagonal Gaussian over every weight of ``model``, learned by IVON.

    Parameters
    ----------
    model, likelihood:
        The network (its current weights are the initial means) and what its outputs mean.
        Every weight of the model gets a distribution; a likelihood's own trainable parameters
        (the homoscedastic Gaussian's noise) are point estimates trained by Adam at
        ``point_lr``.
    ess:
        The effective sample size ``lambda`` (``None``: the number of training examples, which
        gives the Bayes posterior; larger values give a narrower one).
    hess_init:
        The initial Hessian estimate ``h`` (default 1), which sets the initial spread
        ``1 / sqrt(lambda (h + delta))`` and the length of the first steps, about ``lr / h``
        (the paper uses 0.1 to 1; 0.1 at ``lr=0.1`` diverges on small regression networks).
    beta1, beta2:
        Decay rates of the gradient and Hessian averages (defaults 0.9 and 0.999). The paper
        uses ``beta2 = 0.99999`` for runs of hundreds of thousands of steps; over the few
        thousand steps of a tabular fit that would leave ``h``, and so the spread, at
        ``hess_init``.
    prior_precision:
        Precision of the Gaussian prior ``N(0, 1/prior_precision)`` on every weight (default 1).
    point_lr:
        Adam's learning rate for those point parameters (default 0.01).
    clip_radius:
        Clip each weight's preconditioned step ``(g_bar + delta m) / (h + delta)`` to
        ``[-clip_radius, clip_radius]`` before it is multiplied by ``lr`` (``None``, the default:
        no clipping). Where the Hessian estimate of a weight falls near 0 its step grows as
        ``1 / delta``; a radius keeps such late steps from diverging.
    chunk_size, prediction_noise:
        As for :class:`~bayesdl.posteriors.mean_field_vi.MeanFieldVI`'s prediction (by default
        the local reparameterisation trick in the linear layers that take the model's input).

    ``fit``'s ``lr`` is IVON's step (the paper uses about 0.1 with ``hess_init`` near 0.1 to 1; the
    update divides by ``h + delta``, so it is not an Adam learning rate). ``optimizer``,
    ``weight_decay`` (use ``prior_precision``) and ``lr_schedule`` other than constant do not
    apply.
    """

    name = "ivon"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        ess: float | None = None,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        prior_precision: float = 1.0,
        point_lr: float = 0.01,
        clip_radius: float | None = None,
        chunk_size: int | None = None,
        prediction_noise: PredictionNoise | str = PredictionNoise.LOCAL,
    ) -> None:
        for name, value, ok in (
            ("ess", ess, ess is None or is_positive(ess)),
            ("hess_init", hess_init, is_positive(hess_init)),
            ("beta1", beta1, is_number(beta1) and 0 <= beta1 < 1),
            ("beta2", beta2, is_number(beta2) and 0 <= beta2 < 1),
            ("prior_precision", prior_precision, is_positive(prior_precision)),
            ("point_lr", point_lr, is_positive(point_lr)),
            ("clip_radius", clip_radius, clip_radius is None or is_positive(clip_radius)),
        ):
            require(ok, name, value, _WANT[name])
        self.ess, self.hess_init = ess, float(hess_init)
        self.beta1, self.beta2, self.prior_precision = float(beta1), float(beta2), prior_precision
        self.point_lr = float(point_lr)
        self.clip_radius = None if clip_radius is None else float(clip_radius)
        super().__init__(
            model,
            likelihood,
            prior=GaussianPrior(1 / math.sqrt(prior_precision)),
            init_std=1.0,  # set from hess_init and the data size when fit starts
            training_noise="pooled",
            chunk_size=chunk_size,
            prediction_noise=prediction_noise,
        )
        self._ess, self._delta = 1.0, float(prior_precision)
        self.log_std.requires_grad_(False)  # set by the update from h, not by a gradient
        # During a fit: the spread of the next draw and h + delta (the update keeps both).
        self._sigma: Tensor | None = None
        self._denom: Tensor | None = None

    def options(self) -> dict:
        return {
            "ess": self.ess,
            "hess_init": self.hess_init,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "prior_precision": self.prior_precision,
            "point_lr": self.point_lr,
            "clip_radius": self.clip_radius,
            "chunk_size": self.chunk_size,
            "prediction_noise": self.prediction_noise.value,
        }

    @classmethod
    def _from_options(cls, model, likelihood, options: dict):
        return cls(model, likelihood, **options)

    def fit(self, data, *, val_data=None, **training_options) -> training.History:
        """Learn the Gaussian (see :class:`Posterior.fit`); each fit starts from ``hess_init``."""
        refuse_options(
            "IVON",
            training_options,
            {"weight_decay": (0, 0.0), "lr_schedule": ("constant",), "optimizer": ("adam",)},
            "the prior is prior_precision and the update is IVON's",
        )
        config = training.TrainConfig(**training_options)
        n = training.training_size(data, config, val_data)
        self._ess = float(self.ess or max(n, 1))
        self._delta = self.prior_precision / self._ess
        before = self.log_std.detach().clone()
        start = self.hess_init + self._delta
        self._denom = torch.full_like(self.mu.detach(), start)
        self._sigma = torch.full_like(self._denom, (self._ess * start) ** -0.5)
        self._write_log_std()
        try:
            return super().fit(data, val_data=val_data, **training_options)
        except training.TrainingDivergedError as err:
            if err.last_good_epoch == 0:  # back to the posterior before the fit, spread too
                with torch.no_grad():
                    self.log_std.copy_(before)
            raise

    def _write_log_std(self) -> None:
        """The spread the update keeps (``sigma``) into ``log_std``, which prediction reads."""
        with torch.no_grad():
            torch.log(self._sigma, out=self.log_std)

    def _objective(self) -> _IVONObjective:
        super()._objective()  # resets the training noise and the workspace
        return _IVONObjective(self)


_WANT = {
    "ess": "None or a number > 0",
    "hess_init": "a number > 0",
    "beta1": "in [0, 1)",
    "beta2": "in [0, 1)",
    "prior_precision": "a number > 0",
    "point_lr": "a number > 0",
    "clip_radius": "None or a number > 0",
}
