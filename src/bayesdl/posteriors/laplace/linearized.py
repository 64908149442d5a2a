"""The user's network as the Laplace posterior sees it: raw outputs, the GGN terms of a batch,
and the Jacobian side of the linearised predictive.

For the output layer (``subset="last_layer"``) one forward pass with a pre-hook on the layer
gives its inputs ``a``; every Jacobian quantity follows from ``a`` in closed form. Other subsets
use per-example Jacobians (``torch.func``, in row chunks that bound memory) or, for KFAC, hooks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayesdl.posteriors.base import shared_rows
from bayesdl.posteriors.laplace import curvature as curv
from bayesdl.posteriors.laplace.blocks import Selection, join_vector, split_vector
from bayesdl.posteriors.laplace.options import HessianStructure, Predictive
from bayesdl.posteriors.laplace.structures import Curvature, covariance_factor, row_chunks
from bayesdl.posteriors.stacked import StackedModule

__all__ = ["LinearizedNetwork"]


class LinearizedNetwork:
    """``model`` with the subset ``selection``; the caller puts the model in eval mode.

    Parameters
    ----------
    model:
        The user's module (raw outputs ``(B, K)``).
    selection:
        The resolved subset (:func:`~bayesdl.posteriors.laplace.blocks.select`).
    hessian:
        The Hessian structure.
    output_hessian:
        ``Lambda(f)`` of the likelihood.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: Selection,
        hessian: HessianStructure,
        output_hessian: curv.OutputHessian,
    ) -> None:
        self.model = model
        self.selection = selection
        self.hessian = hessian
        self.output_hessian = output_hessian
        self._stack: StackedModule | None = None

    @property
    def last_layer(self) -> bool:
        return self.selection.last_layer is not None

    def theta(self) -> Tensor:
        """The subset's current weights as the internal vector ``(P,)``."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        return join_vector(self.selection.blocks, params)

    def last_layer_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One pass of the model: the output layer's inputs ``a`` ``(B, n_in)`` and ``f``."""
        layer = self.selection.last_layer
        seen: list[Tensor] = []
        hooks = [
            layer.register_forward_pre_hook(lambda m, args: seen.append(args[0])),
            layer.register_forward_hook(lambda m, args, out: seen.append(out)),
        ]
        try:
            f = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        name = self.selection.names[0].rpartition(".")[0] or "the model itself"
        if len(seen) != 2:
            raise ValueError(
                f"subset='last_layer' needs the output layer {name!r} to run exactly once per "
                f"forward pass; it ran {len(seen) // 2} times. Use subset='all'."
            )
        a, out = seen
        if out is not f and not (out.shape == f.shape and torch.equal(out, f)):
            raise ValueError(
                f"subset='last_layer' needs the model's output to be the output of its last "
                f"nn.Linear layer {name!r}, but the model changes it afterwards (layer output "
                f"{tuple(out.shape)}, model output {tuple(f.shape)}). Use subset='all'."
            )
        if a.ndim != 2:
            raise ValueError(
                f"subset='last_layer' needs the output layer {name!r} to see (B, features) "
                f"inputs, got {tuple(a.shape)}. Use subset='all'."
            )
        return a, f

    def jacobians(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f`` ``(B, K)`` and the Jacobians ``(B, K, P)`` (internal layout), in row chunks."""
        sel = self.selection
        per_row = 16 * sel.n_params  # rows of about 16 outputs; a bound, not the exact width
        parts = [
            curv.jacobians(self.model, sel.blocks, sel.names, x[rows])
            for rows in row_chunks(len(x), per_row)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def curvature_terms(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Raw outputs ``f`` and the GGN terms of one batch (keyed like the structure's state)."""
        lam = self.output_hessian
        if self.last_layer:
            a, f = self.last_layer_forward(x)
            return f, curv.last_layer_terms(self.hessian, self.selection.blocks[0], a, f, lam)
        if self.hessian is HessianStructure.KRON:
            return curv.kron_terms(self.model, self.selection.blocks, x, lam)
        f, jac = self.jacobians(x)
        return f, curv.jacobian_terms(self.hessian, jac, f, lam)

    def linearize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f(x)`` ``(B, K)`` and what :meth:`covariance` needs: ``a`` or the Jacobians."""
        if self.last_layer:
            a, f = self.last_layer_forward(x)
            return f, a
        return self.jacobians(x)

    def covariance(self, curvature: Curvature, cache: Tensor, prior_precision: float) -> Tensor:
        """``J Sigma J^T`` ``(B, K, K)`` from what :meth:`linearize` returned."""
        if self.last_layer:
            return curvature.last_layer_covariance(cache, prior_precision)
        return curvature.functional_covariance(cache, prior_precision)

    def sample(
        self,
        curvature: Curvature,
        x: Tensor,
        n: int,
        prior_precision: float,
        predictive: Predictive,
        generator: torch.Generator | None,
    ) -> Tensor:
        """``n`` draws of the raw outputs at ``x``, ``(n, B, K)``."""
        if self.last_layer:
            a, f = self.last_layer_forward(x)
            if predictive is Predictive.GLM:
                return f + _draw(curvature.last_layer_factor(a, prior_precision), n, generator)
            # weight-space draws of [W | b], applied to the features computed once
            block = self.selection.blocks[0]
            dw = curvature.sample(n, prior_precision, generator).view(n, block.n_out, -1)
            raw = f + torch.einsum("bi,ski->sbk", a, dw[..., : block.n_in])
            return raw if block.bias is None else raw + dw[..., block.n_in].unsqueeze(1)
        if predictive is Predictive.GLM:
            f, jac = self.jacobians(x)
            factor = covariance_factor(curvature.functional_covariance(jac, prior_precision))
            return f + _draw(factor, n, generator)
        return self._weight_space(curvature, x, n, prior_precision, generator)

    def _weight_space(self, curvature, x, n, prior_precision, generator) -> Tensor:
        """The network under ``n`` weight draws, in one vectorised call (StackedModule)."""
        delta = curvature.sample(n, prior_precision, generator)
        draws = split_vector(self.selection.blocks, self.theta() + delta)
        if self._stack is None:
            self._stack = StackedModule(
                self.model,
                {k: v.detach().unsqueeze(0) for k, v in self.model.named_parameters()},
                {k: v.unsqueeze(0) for k, v in self.model.named_buffers()},
            )
        self._stack.train(False)
        current = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        tensors = [
            draws[k] if k in draws else current[k].detach().expand(n, *current[k].shape)
            for k in self._stack.names
        ]
        return self._stack(x, tensors=tensors)


def _draw(factor: Tensor, n: int, generator) -> Tensor:
    """``n`` draws of ``R z``, ``(n, B, K)``, for factors ``R`` ``(B, K, K)``."""
    b, k, j = factor.shape

    def normal(rows: int) -> Tensor:
        like = {"dtype": factor.dtype, "device": factor.device}
        return torch.randn(n, rows, j, generator=generator, **like)

    z = shared_rows(normal, b, axis=1)
    return torch.einsum("bkj,sbj->sbk", factor, z).reshape(n, b, k)
