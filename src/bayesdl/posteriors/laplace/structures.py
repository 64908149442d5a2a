"""The Gaussian posterior ``N(theta*, (H + lambda I)^-1)`` for each Hessian structure.

``H`` is the generalised Gauss-Newton matrix of the subset (internal layout, see
:mod:`~bayesdl.posteriors.laplace.blocks`) and ``lambda`` the scalar prior precision. Each
structure stores what it needs of ``H`` and a decomposition that makes every ``lambda`` cheap:

* :class:`Diagonal`: ``H ~ diag(h)``;
* :class:`Kron`: per ``nn.Linear`` layer, ``H_l ~ B_l (x) A_l / N`` (KFAC) with
  ``A_l = sum_n a'_n a'_n^T`` over the augmented layer inputs and ``B_l = sum_n G_n^T Lambda_n G_n``
  over the output-side factors. With ``A = Q_A diag(alpha) Q_A^T`` and ``B = Q_B diag(beta)
  Q_B^T``, ``H_l + lambda I = (Q_B (x) Q_A) diag(beta alpha^T / N + lambda) (Q_B (x) Q_A)^T``
  exactly, so the prior is added without approximation;
* :class:`Full`: the dense ``H = V diag(e) V^T``.

Every structure offers the eigenvalues of ``H`` (for the marginal likelihood), weight-space
draws, and the function-space covariance ``J Sigma J^T`` both from explicit Jacobians
``(B, K, P)`` and, for the output layer, in closed form from its inputs ``a`` (``J = I_K (x)
a'^T``), without forming a Jacobian.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor

from bayesdl.posteriors.laplace.blocks import Block, LinearBlock

__all__ = [
    "Curvature",
    "Diagonal",
    "Full",
    "Kron",
    "covariance_factor",
    "from_state",
    "row_chunks",
]

# Rows of a (rows, K, P) intermediate processed at once: bounds memory for large subsets.
_CHUNK_ELEMENTS = 2**22


def row_chunks(n_rows: int, per_row: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


def covariance_factor(cov: Tensor) -> Tensor:
    """A factor ``R`` with ``R R^T = cov`` for a batch of covariances ``(B, K, K)``.

    Cholesky where it succeeds; a symmetric eigendecomposition (negative round-off eigenvalues
    set to 0) for the rows where the matrix is singular to working precision.
    """
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bool(bad.any()):
        e, v = torch.linalg.eigh(cov[bad])
        chol = chol.clone()
        chol[bad] = v * e.clamp_min(0).sqrt().unsqueeze(-2)
    return chol


class Curvature(ABC):
    """The GGN of one subset and the posterior covariance it implies for a prior precision."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = tuple(blocks)

    @property
    def n_params(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def _block(self) -> LinearBlock:
        """The single output-layer block (closed-form paths)."""
        (block,) = self.blocks
        assert isinstance(block, LinearBlock)
        return block

    # ------------------------------------------------------------------ state
    @classmethod
    @abstractmethod
    def state_shapes(cls, blocks: Sequence[Block]) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors :meth:`state` returns."""

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The tensors that define the curvature (saved with the posterior)."""

    # ------------------------------------------------------------------ maths
    @abstractmethod
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``H``, ``(P,)`` (clamped at 0 against round-off)."""

    @abstractmethod
    def dense(self) -> Tensor:
        """``H`` as a dense ``(P, P)`` matrix in the internal layout."""

    @abstractmethod
    def dense_covariance(self, prior_precision: float) -> Tensor:
        """``(H + lambda I)^-1``, dense ``(P, P)``, internal layout."""

    @abstractmethod
    def sample(self, n: int, prior_precision: float, generator) -> Tensor:
        """``n`` draws from ``N(0, (H + lambda I)^-1)``, ``(n, P)``, internal layout."""

    @abstractmethod
    def functional_covariance(self, jac: Tensor, prior_precision: float) -> Tensor:
        """``J Sigma J^T`` for Jacobians ``(B, K, P)`` (internal layout): ``(B, K, K)``."""

    @abstractmethod
    def last_layer_covariance(self, a: Tensor, prior_precision: float) -> Tensor:
        """``J Sigma J^T`` ``(B, K, K)`` of the output layer from its inputs ``a`` ``(B, n_in)``."""

    def last_layer_factor(self, a: Tensor, prior_precision: float) -> Tensor:
        """``R`` with ``R R^T = J Sigma J^T`` of the output layer, ``(B, K, K)``."""
        return covariance_factor(self.last_layer_covariance(a, prior_precision))


class Diagonal(Curvature):
    """``H ~ diag(h)``; ``h`` is ``(P,)``."""

    def __init__(self, blocks: Sequence[Block], diagonal: Tensor) -> None:
        super().__init__(blocks)
        self.diagonal = diagonal

    @classmethod
    def state_shapes(cls, blocks):
        return {"diagonal": (sum(b.size for b in blocks),)}

    def state(self):
        return {"diagonal": self.diagonal}

    def eigenvalues(self):
        return self.diagonal.clamp_min(0)

    def dense(self):
        return torch.diag(self.diagonal)

    def _variances(self, prior_precision: float) -> Tensor:
        return 1.0 / (self.eigenvalues() + prior_precision)

    def dense_covariance(self, prior_precision):
        return torch.diag(self._variances(prior_precision))

    def sample(self, n, prior_precision, generator):
        d = self.diagonal
        z = torch.randn(n, len(d), generator=generator, dtype=d.dtype, device=d.device)
        return z * self._variances(prior_precision).sqrt()

    def functional_covariance(self, jac, prior_precision):
        return torch.einsum("nkp,p,nlp->nkl", jac, self._variances(prior_precision), jac)

    def last_layer_covariance(self, a, prior_precision):
        block = self._block
        var = self._variances(prior_precision).view(block.n_out, block.n_in_aug)
        out = (a * a) @ var[:, : block.n_in].T
        if block.bias is not None:
            out = out + var[:, block.n_in]
        return torch.diag_embed(out)

    def last_layer_factor(self, a, prior_precision):
        return self.last_layer_covariance(a, prior_precision).sqrt()  # diagonal: elementwise


class Full(Curvature):
    """The dense GGN ``H`` ``(P, P)``."""

    def __init__(self, blocks: Sequence[Block], matrix: Tensor) -> None:
        super().__init__(blocks)
        self.matrix = matrix

    @classmethod
    def state_shapes(cls, blocks):
        p = sum(b.size for b in blocks)
        return {"matrix": (p, p)}

    def state(self):
        return {"matrix": self.matrix}

    @cached_property
    def _eigh(self) -> tuple[Tensor, Tensor]:
        e, v = torch.linalg.eigh(self.matrix)
        return e.clamp_min(0), v

    def eigenvalues(self):
        return self._eigh[0]

    def dense(self):
        return self.matrix

    def dense_covariance(self, prior_precision):
        e, v = self._eigh
        return (v / (e + prior_precision)) @ v.T

    def sample(self, n, prior_precision, generator):
        e, v = self._eigh
        z = torch.randn(n, len(e), generator=generator, dtype=e.dtype, device=e.device)
        return (z / (e + prior_precision).sqrt()) @ v.T

    def _project(self, jv: Tensor, prior_precision: float) -> Tensor:
        e = self._eigh[0]
        return torch.einsum("nkp,p,nlp->nkl", jv, 1.0 / (e + prior_precision), jv)

    def functional_covariance(self, jac, prior_precision):
        v = self._eigh[1]
        return self._project(jac @ v, prior_precision)

    def last_layer_covariance(self, a, prior_precision):
        block = self._block
        v = self._eigh[1].view(block.n_out, block.n_in_aug, -1)
        parts = []
        for rows in row_chunks(len(a), block.n_out * self.n_params):
            jv = torch.einsum("ni,kip->nkp", a[rows], v[:, : block.n_in])
            if block.bias is not None:
                jv = jv + v[:, block.n_in]
            parts.append(self._project(jv, prior_precision))
        return torch.cat(parts)


class Kron(Curvature):
    """KFAC: per ``nn.Linear`` block ``H_l ~ B_l (x) A_l / N``.

    ``A_l`` is ``(n_in_aug, n_in_aug)``, ``B_l`` is ``(n_out, n_out)``, both sums over the ``N``
    training examples.
    """

    def __init__(
        self, blocks: Sequence[LinearBlock], factors: Sequence[tuple[Tensor, Tensor]], n_data
    ) -> None:
        super().__init__(blocks)
        self.factors = [(a, b) for a, b in factors]
        ref = self.factors[0][0]
        self.n_data = torch.as_tensor(n_data, dtype=ref.dtype, device=ref.device)

    @classmethod
    def state_shapes(cls, blocks):
        shapes: dict[str, tuple[int, ...]] = {"n_data": ()}
        for i, b in enumerate(blocks):
            shapes[f"A.{i}"] = (b.n_in_aug, b.n_in_aug)
            shapes[f"B.{i}"] = (b.n_out, b.n_out)
        return shapes

    def state(self):
        out = {"n_data": self.n_data}
        for i, (a, b) in enumerate(self.factors):
            out[f"A.{i}"], out[f"B.{i}"] = a, b
        return out

    @classmethod
    def from_state(cls, blocks, state):
        n = len(blocks)
        return cls(blocks, [(state[f"A.{i}"], state[f"B.{i}"]) for i in range(n)], state["n_data"])

    @cached_property
    def _eigh(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per block ``(alpha, Q_A, beta, Q_B)``."""
        out = []
        for a, b in self.factors:
            alpha, qa = torch.linalg.eigh(a)
            beta, qb = torch.linalg.eigh(b)
            out.append((alpha.clamp_min(0), qa, beta.clamp_min(0), qb))
        return out

    def _block_eigenvalues(self) -> list[Tensor]:
        """Per block, the eigenvalues of ``H_l`` as an ``(n_out, n_in_aug)`` grid."""
        return [torch.outer(beta, alpha) / self.n_data for alpha, _, beta, _ in self._eigh]

    def eigenvalues(self):
        return torch.cat([e.flatten() for e in self._block_eigenvalues()])

    def dense(self):
        return torch.block_diag(*[torch.kron(b, a) / self.n_data for a, b in self.factors])

    def dense_covariance(self, prior_precision):
        mats = []
        for (_, qa, _, qb), e in zip(self._eigh, self._block_eigenvalues(), strict=True):
            q = torch.kron(qb, qa)
            mats.append((q / (e.flatten() + prior_precision)) @ q.T)
        return torch.block_diag(*mats)

    def sample(self, n, prior_precision, generator):
        parts = []
        for (_, qa, _, qb), e in zip(self._eigh, self._block_eigenvalues(), strict=True):
            z = torch.randn(n, *e.shape, generator=generator, dtype=e.dtype, device=e.device)
            z = z / (e + prior_precision).sqrt()
            parts.append((qb @ z @ qa.T).flatten(1))
        return torch.cat(parts, dim=1)

    def functional_covariance(self, jac, prior_precision):
        out = jac.new_zeros(*jac.shape[:2], jac.shape[1])
        jacs = jac.split([b.size for b in self.blocks], dim=-1)
        for block, j, (_, qa, _, qb), e in zip(
            self.blocks, jacs, self._eigh, self._block_eigenvalues(), strict=True
        ):
            j = j.reshape(*j.shape[:2], block.n_out, block.n_in_aug)
            t = torch.einsum("nkoi,ob,ic->nkbc", j, qb, qa)
            out = out + torch.einsum("nkbc,bc,nlbc->nkl", t, 1.0 / (e + prior_precision), t)
        return out

    def _last_layer_scales(self, a: Tensor, prior_precision: float) -> tuple[Tensor, Tensor]:
        """``M (B, n_out)`` with ``J Sigma J^T = Q_B diag(M_n) Q_B^T``, and ``Q_B``."""
        block = self._block
        (_, qa, _, qb), e = self._eigh[0], self._block_eigenvalues()[0]
        u = a @ qa[: block.n_in]
        if block.bias is not None:
            u = u + qa[block.n_in]
        return (u * u) @ (1.0 / (e + prior_precision)).T, qb

    def last_layer_covariance(self, a, prior_precision):
        m, qb = self._last_layer_scales(a, prior_precision)
        return torch.einsum("kb,nb,lb->nkl", qb, m, qb)

    def last_layer_factor(self, a, prior_precision):
        m, qb = self._last_layer_scales(a, prior_precision)
        return qb * m.sqrt().unsqueeze(1)


def from_state(kind: type[Curvature], blocks: Sequence[Block], state: dict[str, Tensor]):
    """Rebuild a curvature of class ``kind`` from :meth:`Curvature.state`."""
    if kind is Kron:
        return Kron.from_state(blocks, state)
    (key,) = kind.state_shapes(blocks)
    return kind(blocks, state[key])
