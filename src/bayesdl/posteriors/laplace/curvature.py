"""The generalised Gauss-Newton (GGN) matrix ``H = sum_n J_n^T Lambda_n J_n`` of a subset.

``J_n`` is the Jacobian of the network's raw outputs ``f_n`` (``K`` numbers) with respect to the
subset's weights and ``Lambda_n`` the Hessian (for the heteroscedastic Gaussian, the Fisher) of
the negative log-likelihood with respect to ``f_n``:

* categorical (logits): ``diag(p) - p p^T`` with ``p = softmax(f)``; it factors as
  ``L L^T`` with ``L = diag(sqrt p) - p sqrt(p)^T``;
* homoscedastic Gaussian (the network outputs the mean): ``diag(1 / sigma^2)``;
* heteroscedastic Gaussian (mean ``m`` and log-variance ``s``, variance
  ``v = exp(s) + min_variance``): the Fisher in ``(m, s)``, ``diag(1 / v, exp(2 s) / (2 v^2))``,
  which is ``diag(1 / v, 1 / 2)`` without the variance floor.

Three ways to get the sums, each returning one batch's contribution keyed like the structure's
state (:mod:`~bayesdl.posteriors.laplace.structures`), so batches add up:

* :func:`last_layer_terms`: the output ``nn.Linear`` layer from its inputs ``a`` alone
  (``J_n = I_K (x) a'_n^T``): no Jacobian is formed;
* :func:`jacobian_terms`: any subset, from per-example Jacobians (``torch.func``);
* :func:`kron_terms`: KFAC for ``nn.Linear`` layers anywhere in the network, from forward hooks
  (layer inputs) and one backward pass per column of ``L`` (output-side factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from bayesdl.likelihoods import Categorical, Gaussian, HomoscedasticGaussian, Likelihood
from bayesdl.posteriors.laplace.blocks import Block, LinearBlock
from bayesdl.posteriors.laplace.options import HessianStructure
from bayesdl.posteriors.laplace.structures import row_chunks

__all__ = [
    "OutputHessian",
    "gram",
    "jacobian_terms",
    "jacobians",
    "kron_terms",
    "last_layer_terms",
]


class OutputHessian:
    """``Lambda(f)`` of a likelihood, for raw network outputs ``f`` ``(B, K)``."""

    def __init__(self, likelihood: Likelihood) -> None:
        if not isinstance(likelihood, (Categorical, Gaussian, HomoscedasticGaussian)):
            raise ValueError(
                f"Laplace supports the Categorical, Gaussian and HomoscedasticGaussian "
                f"likelihoods, got {type(likelihood).__name__}."
            )
        self.likelihood = likelihood

    def _gaussian_diagonal(self, f: Tensor) -> Tensor:
        lik = self.likelihood
        if isinstance(lik, HomoscedasticGaussian):
            var = lik.log_variance.detach().to(f.dtype).exp() + lik.min_variance
            return (1.0 / var).expand(f.shape)
        d = lik.n_targets
        s = f[:, d:]
        v = s.exp() + lik.min_variance
        return torch.cat([1.0 / v, (2 * s).exp() / (2 * v * v)], dim=1)

    def diagonal(self, f: Tensor) -> Tensor:
        """``diag(Lambda_n)``, ``(B, K)``."""
        if isinstance(self.likelihood, Categorical):
            p = torch.softmax(f, dim=-1)
            return p - p * p
        return self._gaussian_diagonal(f)

    def total(self, f: Tensor) -> Tensor:
        """``sum_n Lambda_n``, ``(K, K)``."""
        if isinstance(self.likelihood, Categorical):
            p = torch.softmax(f, dim=-1)
            return torch.diag(p.sum(0)) - p.T @ p
        return torch.diag(self._gaussian_diagonal(f).sum(0))

    def factor(self, f: Tensor) -> Tensor:
        """``L_n`` with ``Lambda_n = L_n L_n^T``, ``(B, K, K)``."""
        if isinstance(self.likelihood, Categorical):
            p = torch.softmax(f, dim=-1)
            s = p.sqrt()
            return torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)
        return torch.diag_embed(self._gaussian_diagonal(f).sqrt())


def gram(a: Tensor) -> Tensor:
    """``a^T a`` ``(D, D)`` for ``a`` ``(N, D)``, with a quarter fewer flops for wide ``a``.

    A GEMM does not know its result is symmetric; splitting the columns in two and computing
    the two diagonal blocks and one off-diagonal block skips the mirror block.
    """
    d = a.shape[1]
    if d < 256:
        return a.T @ a
    h = d // 2
    left, right = a[:, :h], a[:, h:]
    off = left.T @ right
    top = torch.cat([left.T @ left, off], dim=1)
    return torch.cat([top, torch.cat([off.T, right.T @ right], dim=1)], dim=0)


def _count(x: Tensor) -> Tensor:
    return torch.tensor(float(len(x)), dtype=x.dtype, device=x.device)


def last_layer_terms(
    structure: HessianStructure, block: LinearBlock, a: Tensor, f: Tensor, lam: OutputHessian
) -> dict[str, Tensor]:
    """GGN terms of the output layer ``f = W a + b`` for one batch, from ``a`` ``(B, n_in)``."""
    bias = block.bias is not None
    if structure is HessianStructure.KRON:
        factor = gram(a)
        if bias:  # [a, 1]^T [a, 1] without building [a, 1]
            s = a.sum(0, keepdim=True)
            corner = a.new_full((1, 1), float(len(a)))
            factor = torch.cat([torch.cat([factor, s.T], 1), torch.cat([s, corner], 1)], 0)
        return {"A.0": factor, "B.0": lam.total(f), "n_data": _count(a)}
    if structure is HessianStructure.DIAG:
        d = lam.diagonal(f)
        h = d.T @ (a * a)
        if bias:
            h = torch.cat([h, d.sum(0).unsqueeze(1)], dim=1)
        return {"diagonal": h.flatten()}
    # full: H = sum_n (L_n (x) a'_n)(L_n (x) a'_n)^T, in chunks of rows
    factor = lam.factor(f)
    if bias:
        a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
    p = block.size
    matrix = a.new_zeros(p, p)
    for rows in row_chunks(len(a), f.shape[1] * p):
        g = torch.einsum("nkj,ni->njki", factor[rows], a[rows]).reshape(-1, p)
        matrix += g.T @ g
    return {"matrix": matrix}


def jacobians(
    model: nn.Module, blocks: Sequence[Block], names: Sequence[str], x: Tensor
) -> tuple[Tensor, Tensor]:
    """Outputs ``f`` ``(B, K)`` and per-example Jacobians ``(B, K, P)`` (internal layout)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    subset = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in subset}

    def output(sub: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, ({**rest, **sub}, buffers), (xi.unsqueeze(0),)).squeeze(0)
        return out, out

    jac, f = vmap(jacrev(output, has_aux=True), in_dims=(None, 0))(subset, x)
    return f, torch.cat([b.jacobian(jac) for b in blocks], dim=-1)


def jacobian_terms(
    structure: HessianStructure, jac: Tensor, f: Tensor, lam: OutputHessian
) -> dict[str, Tensor]:
    """GGN terms (diagonal or full) of one batch from its Jacobians ``(B, K, P)``."""
    g = torch.einsum("nkj,nkp->njp", lam.factor(f), jac)
    if structure is HessianStructure.DIAG:
        return {"diagonal": (g * g).sum((0, 1))}
    g = g.reshape(-1, g.shape[-1])
    return {"matrix": g.T @ g}


def kron_terms(
    model: nn.Module, blocks: Sequence[LinearBlock], x: Tensor, lam: OutputHessian
) -> tuple[Tensor, dict[str, Tensor]]:
    """KFAC factors of every block for one batch, and the outputs ``f`` ``(B, K)``.

    The examples of a batch must not interact (true of a network in eval mode without
    batch-mixing layers): the gradient of ``sum_n (L_n^T f_n)_j`` with respect to a layer's
    output then holds each example's own row ``G_n^T L_n[:, j]``, with ``G_n`` the Jacobian of
    ``f_n`` with respect to that output.
    """
    records: dict[int, tuple[Tensor, Tensor]] = {}

    def hook_for(i: int, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if i in records:
                raise ValueError(
                    f"hessian='kron' needs each nn.Linear layer to run once per forward pass, "
                    f"but {name!r} ran twice (a shared layer). Use hessian='diag' or 'full'."
                )
            a = inputs[0]
            if a.ndim != 2:
                raise ValueError(
                    f"hessian='kron' needs nn.Linear layers applied to (B, features) inputs, but "
                    f"{name!r} received {tuple(a.shape)}. Use hessian='diag' or 'full'."
                )
            probe = torch.zeros_like(output, requires_grad=True)  # d f / d probe = d f / d output
            records[i] = (a.detach(), probe)
            return output + probe

        return hook

    handles = []
    for i, block in enumerate(blocks):
        name = block.weight.rpartition(".")[0]
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(i, name)))
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [b.weight.rpartition(".")[0] for i, b in enumerate(blocks) if i not in records]
    if missing:
        raise ValueError(
            f"the layers {missing} did not run in the forward pass; leave them out of the subset."
        )
    factor = lam.factor(f.detach())
    probes = [records[i][1] for i in range(len(blocks))]
    grams = [x.new_zeros(b.n_out, b.n_out) for b in blocks]
    n_cols = factor.shape[2]
    for j in range(n_cols):
        grads = torch.autograd.grad(
            f, probes, factor[:, :, j], retain_graph=j + 1 < n_cols, allow_unused=True
        )
        for out_factor, g in zip(grams, grads, strict=True):
            if g is not None:
                out_factor += g.T @ g
    terms: dict[str, Tensor] = {"n_data": _count(x)}
    for i, block in enumerate(blocks):
        a = records[i][0]
        if block.bias is not None:
            a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
        terms[f"A.{i}"], terms[f"B.{i}"] = gram(a), grams[i]
    return f.detach(), terms
