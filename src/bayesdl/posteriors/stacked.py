"""Run one module under many stacked parameter sets in one vectorised call.

``torch.func.vmap`` over a functional call of the user's module is how every method here applies
``M`` weight sets (ensemble members, posterior draws) at once. This file is that machinery,
written once:

* :class:`StackedCall` swaps a tensor into each parameter/buffer slot of a private copy of the
  module and calls it. It is what ``torch.func.functional_call`` does, minus the per-call name
  resolution and checks, which matter here because a small network's training step is dominated
  by per-call overhead, not arithmetic. Tied parameters (one tensor in several modules) are
  swapped in every place they live.
* :class:`StackedModule` owns the stacked tensors ``(M, ...)`` and applies the module under all
  of them at once. Modules built from ``nn.Linear``, elementwise activations and dropout (the
  common MLP) take a fast path: the module runs as written, once, on member-stacked activations
  ``(M, B, ...)``, and a ``TorchFunctionMode`` gives ``F.linear`` the batched kernel it needs for
  weights stacked ``(M, out, in)`` (one ``baddbmm``), which is what vmap's batching rule does,
  minus vmap's per-call and per-op overhead (about half the cost of a small network's training
  step). The first call of anything else (convolution, normalisation, a tensor method) leaves
  the fast path for good, and vmap serves the module: its randomness mode is chosen once
  (``"error"`` is cheaper; a module that draws random numbers, such as dropout in training mode,
  switches it to ``"different"``). At prediction both paths process the members in chunks so that
  intermediate activations stay cache-sized.

On the fast path dropout masks come from 16-bit lanes of random integers, as MC dropout's
(a quarter of the generator calls of ``torch.rand``, and much cheaper than ``F.dropout``'s
Bernoulli draws on a CPU), and ``F.dropout`` also accepts a tensor ``p`` of per-member rates
``(M,)``: member ``m``'s activations are dropped with probability ``p[m]``. A module that passes
such a tensor (e.g. one that holds the rates of a grid over the dropout rate) trains ``M``
differently regularised copies as one program; it runs only on the fast path (``F.dropout``
itself refuses a tensor ``p``, alone or under vmap).

Local layers. A caller may hand the fast path a function per ``nn.Linear`` weight slot
(``local=``) that computes the layer's outputs for a chunk of members from the layer's input
when that input is the one shared by every member (``(rows, ..., in)``, not yet member-stacked).
Sampling methods use it for the local reparameterisation trick on the first layer: its outputs
under every draw come from one product of the input with the means (and one with the
variances) plus per-row noise, instead of one product per draw.
:meth:`StackedModule.shared_input_linears` says which layers see that shared input.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state, vmap
from torch.overrides import TorchFunctionMode

from bayesdl.posteriors.base import prediction_rows
from bayesdl.posteriors.mc_dropout import keep_probability, lane_threshold, random_lanes

__all__ = [
    "LocalLinear",
    "PredictionNoise",
    "StackedCall",
    "StackedModule",
    "joint_draws",
    "local_plan",
    "meta_copy",
]

#: ``fn(x, members) -> (m, rows, ..., out)``: a linear layer's outputs for the stacked members
#: ``members`` (a slice of ``range(M)``, ``m`` of them) from the input ``x`` ``(rows, ..., in)``
#: that all members share.
LocalLinear = Callable[[Tensor, slice], Tensor]


class PredictionNoise(str, Enum):
    """How a method with Gaussian weights (mean-field VI, IVON, SWAG) draws them at prediction."""

    #: The local reparameterisation trick in the ``nn.Linear`` layers that take the model's
    #: input (exact per row; rows get independent noise there), whole weight sets elsewhere.
    LOCAL = "local"
    #: Whole weight sets everywhere: the rows of one call share each draw.
    WEIGHTS = "weights"


#: ``id`` of the posteriors that draw whole weight sets in the current context (joint_draws).
_JOINT: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "bayesdl_joint_draws", default=frozenset()
)


@contextlib.contextmanager
def joint_draws(posterior) -> Iterator[None]:
    """Within the block, ``posterior`` (or the posterior a wrapper such as a calibrated one
    holds) draws whole weight sets if it has a :class:`PredictionNoise`, so that the rows of
    one call share each draw (Thompson sampling over rows that are actions, joint predictive
    draws); other methods are left as they are. The posterior is not modified: the choice
    holds in this thread (context) only."""
    while not hasattr(posterior, "prediction_noise") and hasattr(posterior, "posterior"):
        posterior = posterior.posterior
    token = _JOINT.set(_JOINT.get() | {id(posterior)})
    try:
        yield
    finally:
        _JOINT.reset(token)


#: Most per-row normals one draw of the local layers may take, over all members drawn at once
#: (2^25, 128 MB of float32): a call with more rows draws whole weight sets, whose memory does
#: not grow with the rows (784-400 first layer: up to 83,886 rows per call for one member).
LOCAL_NOISE_BUDGET = 2**25


def local_plan(
    posterior, stack: StackedModule, x: Tensor, *, members: int = 1, keep=None
) -> tuple[tuple[str, str | None], ...]:
    """``(weight, bias)`` slot names of the linear layers ``posterior`` computes locally at
    ``x``: those that take the model's input alone (:meth:`StackedModule.shared_input_linears`,
    whose weight is in ``keep`` when given), or none when its ``prediction_noise`` is
    ``"weights"``, a :func:`joint_draws` block asks for whole draws, or ``members`` draws of
    their per-row noise for all the rows of the prediction (so that every process of a
    distributed one decides alike) would pass :data:`LOCAL_NOISE_BUDGET`."""
    if posterior.prediction_noise is not PredictionNoise.LOCAL or x.shape[0] == 0:
        return ()
    if id(posterior) in _JOINT.get():
        return ()
    plan = tuple(p for p in stack.shared_input_linears(x) if keep is None or p[0] in keep)
    units = sum(stack.params[w].shape[1] for w, _ in plan) * math.prod(x.shape[1:-1])
    return plan if members * prediction_rows(x.shape[0]) * units <= LOCAL_NOISE_BUDGET else ()


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure with its parameters and buffers on the meta device
    (shapes, no data); tied parameters stay tied.

    Each submodule is copied shallowly, with its own dicts, sets and lists (parameters,
    buffers, submodules, hooks: nothing registered on the copy reaches the original); other
    attributes are shared. It is three times cheaper than ``copy.deepcopy`` followed by
    ``.to("meta")``, which copies every tensor first; a deep ensemble builds one per
    construction.
    """
    tensors: dict[int, Tensor] = {}

    def meta(t: Tensor) -> Tensor:
        if id(t) not in tensors:
            if isinstance(t, nn.Parameter):
                tensors[id(t)] = nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
            else:
                tensors[id(t)] = t.to("meta")
        return tensors[id(t)]

    copies: dict[int, nn.Module] = {}

    def structure(m: nn.Module) -> nn.Module:
        if id(m) in copies:  # a submodule used in several places stays one module
            return copies[id(m)]
        new = copy.copy(m)
        new.__dict__ = {
            k: v.copy() if isinstance(v, (dict, set, list)) else v for k, v in m.__dict__.items()
        }
        copies[id(m)] = new
        new._parameters = {k: None if v is None else meta(v) for k, v in m._parameters.items()}
        new._buffers = {k: None if v is None else meta(v) for k, v in m._buffers.items()}
        new._modules = {k: None if v is None else structure(v) for k, v in m._modules.items()}
        return new

    return structure(module)


class StackedCall:
    """Call ``module`` with other tensors in place of its named parameters and buffers.

    Parameters
    ----------
    module:
        A module owned by the caller (it is modified during each call and restored after).
    names:
        Parameter and buffer names, in the order the tensors will be passed.
    """

    def __init__(
        self, module: nn.Module, names: tuple[str, ...], reference: nn.Module | None = None
    ) -> None:
        self.module = module
        self.names = names
        # Which slots share one tensor is read off `reference` (a module of the same structure
        # whose ties are intact; `module` itself by default), since converting a module to the
        # meta device unties its parameters.
        reference = module if reference is None else reference
        owners: dict[int, list[tuple[dict, str]]] = {}
        for path, ref in reference.named_modules(remove_duplicate=False):
            mod = module.get_submodule(path)
            for ref_store, store in (
                (ref._parameters, mod._parameters),
                (ref._buffers, mod._buffers),
            ):
                for key, value in ref_store.items():
                    if value is not None:
                        owners.setdefault(id(value), []).append((store, key))
        self.slots: list[list[tuple[dict, str]]] = []
        for name in names:
            try:
                target = reference.get_parameter(name)
            except AttributeError:
                target = reference.get_buffer(name)
            self.slots.append(owners[id(target)])

    def __call__(self, tensors: tuple[Tensor, ...], *args: Tensor, run=None) -> Tensor:
        """``module(*args)`` (or ``run(*args)``, e.g. one of its submodules) with ``tensors``
        in the slots."""
        saved = []
        try:
            for slots, tensor in zip(self.slots, tensors, strict=True):
                for store, key in slots:
                    saved.append((store, key, store[key]))
                    store[key] = tensor
            return (self.module if run is None else run)(*args)
        finally:
            for store, key, value in reversed(saved):
                store[key] = value


def _is_randomness_error(err: Exception) -> bool:
    return "randomness" in str(err)


# Functions that act elementwise (or per element with independent randomness): applied to
# member-stacked activations they give each member exactly what it would get alone.
_ELEMENTWISE = frozenset(
    {
        F.relu, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.leaky_relu,
        F.softplus, F.softsign, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid,
        F.tanhshrink, F.tanh, F.sigmoid, F.dropout, torch.relu, torch.tanh, torch.sigmoid,
    }
)  # fmt: skip


def _shared(x: Tensor, m: int) -> Tensor:
    """``x`` ``(B, ...)`` as the input ``(m, B, ...)`` of ``m`` members: a view with stride 0
    along the members (also for ``m = 1``, which ``expand`` would give a nonzero stride), by
    which the fast path recognises an input every member shares."""
    return x.as_strided((m, *x.shape), (0, *x.stride()), x.storage_offset())


class _NoFastPath(RuntimeError):
    """The module called something the stacked fast path cannot batch."""


def _stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for member-stacked weights ``(M, out, in)`` and inputs ``(M, ..., in)``."""
    if weight.ndim != 3 or x.ndim < 3 or x.shape[0] != weight.shape[0]:
        raise _NoFastPath(f"linear with input {tuple(x.shape)}, weight {tuple(weight.shape)}")
    m, n_out, n_in = weight.shape
    if x.stride(0) == 0:  # one input shared by every member: a single (rows, in) @ (in, M*out)
        flat = x[0].reshape(-1, n_in) @ weight.reshape(m * n_out, n_in).T
        out = flat.view(-1, m, n_out).transpose(0, 1)
        out = out if bias is None else out + bias.unsqueeze(1)
    else:
        flat = x.reshape(m, -1, n_in)
        wt = weight.transpose(1, 2)
        out = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, wt)
    return out.reshape(*x.shape[:-1], n_out)


def _member_dropout(
    members: slice,
    n_members: int,
    x: Tensor,
    p: float | Tensor = 0.5,
    training: bool = True,
    inplace: bool = False,
) -> Tensor:
    """``F.dropout`` on the activations ``(m, ...)`` of ``members`` (a slice of the ``M``
    stacked members); ``p`` a float or per-member rates ``(M,)``."""
    if not isinstance(p, Tensor):
        if not 0 <= p <= 1:  # F.dropout's own check and message
            return F.dropout(x, p, training, inplace)
        every = [float(p)] * n_members
    elif p.shape != (n_members,):
        raise ValueError(
            f"per-member dropout rates must have one rate per stacked member, shape "
            f"({n_members},); got {tuple(p.shape)}"
        )
    else:
        every = p.tolist()  # checked as numbers: cheaper than tensor ops on (M,)
        if not all(0 <= r <= 1 for r in every):
            raise ValueError(f"dropout rates must be in [0, 1], got {every}")
    rates = every[members]
    active = [m for m, r in enumerate(rates) if r > 0]
    if not training or not active:
        return x
    # Random numbers only for the block of members from the first to the last positive rate
    # (a grid that puts its rate-0 members together draws nothing for them).
    lo, hi = active[0], active[-1] + 1
    mask = _member_mask((hi - lo, *x.shape[1:]), rates[lo:hi], x.dtype, x.device)
    if hi - lo < len(x):
        ones = mask.new_ones(1).expand
        mask = torch.cat([ones(lo, *x.shape[1:]), mask, ones(len(x) - hi, *x.shape[1:])])
    return x * mask


def _member_mask(
    shape: tuple[int, ...], rates: list[float], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Dropout multipliers of shape ``(m, ...)``, member ``i`` at rate ``rates[i]``: ``1 / q``
    where an activation is kept (with probability ``q``), 0 where it is dropped.

    On the CPU the draws are 16-bit lanes of 64-bit random integers, as MC dropout's masks
    (:func:`~bayesdl.posteriors.mc_dropout.keep_mask`): a quarter of the generator calls, with
    ``q`` the exact keep probability at that resolution, so the activations stay unbiased.
    """
    view = (len(rates), *[1] * (len(shape) - 1))
    if device.type == "cpu":
        # int16 thresholds: rate 1 (threshold 32768) becomes 32767, and its scale 0 zeroes it
        thresholds = [min(lane_threshold(r), 32767) for r in rates]
        keep = random_lanes(shape, None) >= torch.tensor(thresholds, dtype=torch.int16).view(view)
    else:
        keep = torch.rand(shape, device=device) >= torch.tensor(rates, device=device).view(view)
    scale = [1 / keep_probability(r, device) if r < 1 else 0.0 for r in rates]
    return torch.where(keep, torch.tensor(scale, dtype=dtype, device=device).view(view), 0.0)


class _StackedMode(TorchFunctionMode):
    """Runs a module on the member-stacked activations of ``members``, a slice of the
    ``n_members`` stacked members (all of them, or a chunk at prediction).

    ``local`` maps ``id`` of a weight tensor of this call to the :data:`LocalLinear` that
    computes its layer from a shared input; ``calls`` (a probe) collects ``(id(weight),
    id(bias) or None, shared input)`` of every ``F.linear``."""

    def __init__(
        self,
        members: slice,
        n_members: int,
        local: Mapping[int, LocalLinear] | None = None,
        calls: list[tuple[int, int | None, bool]] | None = None,
    ) -> None:
        super().__init__()
        self.members, self.n_members = members, n_members
        self.local, self.calls = local, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            if self.local or self.calls is not None:
                x = args[0] if args else kwargs["input"]
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                shared = x.ndim >= 3 and x.stride(0) == 0
                if self.calls is not None:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    self.calls.append((id(weight), None if bias is None else id(bias), shared))
                layer = self.local.get(id(weight)) if self.local else None
                if layer is not None:
                    if not shared:
                        raise RuntimeError(
                            "a layer computed from its shared input got member-stacked inputs "
                            "(the module's data flow changed since it was probed)"
                        )
                    return layer(x[0], self.members)
            return _stacked_linear(*args, **kwargs)
        if func is F.dropout:
            return _member_dropout(self.members, self.n_members, *args, **kwargs)
        if func in _ELEMENTWISE:
            return func(*args, **kwargs)
        raise _NoFastPath(f"{getattr(func, '__qualname__', func)} has no stacked fast path")


class StackedModule:
    """One module's structure with ``M`` stacked parameter sets, applied all at once.

    Parameters
    ----------
    template:
        A module of the structure to run (its own tensors are not used; ties between its
        parameters are respected).
    params, buffers:
        ``dict[str, Tensor]`` of stacked tensors ``(M, ...)`` keyed like
        ``template.named_parameters()`` / ``named_buffers()``. ``params`` may be leaves that
        require grad (they are trained in place, e.g. by a deep ensemble).
    chunk_rows:
        At prediction (no gradient), members are processed in chunks of about
        ``chunk_rows // B`` so the activations of a chunk stay cache-sized; training runs all
        members at once.

    Sampling-based methods (posterior draws) pass freshly drawn tensors per call instead:
    ``stack(x, tensors=...)``.
    """

    def __init__(
        self,
        template: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor] | None = None,
        *,
        chunk_rows: int = 2**11,
    ) -> None:
        self.params = params
        self.buffers = {} if buffers is None else buffers
        self.base = meta_copy(template)
        self._call = StackedCall(self.base, (*self.params, *self.buffers), reference=template)
        self.chunk_rows = chunk_rows
        self.fast_path = True  # until the module calls something the fast path cannot serve
        self._randomness = "error"
        self._vmapped: dict[tuple, Callable] = {}
        self._shared_inputs: dict[tuple[int, ...], tuple[tuple[str, str | None], ...]] = {}
        # A network ``likelihood(model(x))`` whose likelihood has tensors of its own (the
        # homoscedastic Gaussian's noise): the fast path runs the model, then the likelihood's
        # link for all members (its ``stacked_forward``, or its forward under vmap), since the
        # link mixes the members' tensors with the outputs.
        self._link = [
            (i, name.removeprefix("likelihood."))
            for i, name in enumerate(self.names)
            if name.startswith("likelihood.")
        ]
        if self._link and not (hasattr(self.base, "model") and hasattr(self.base, "likelihood")):
            self._link = []

    @classmethod
    def from_copies(cls, copies: list[nn.Module], **options) -> StackedModule:
        """Stack the parameters and buffers of ``M`` modules of identical structure."""
        params, buffers = stack_module_state(copies)
        return cls(copies[0], params, buffers, **options)

    @property
    def names(self) -> tuple[str, ...]:
        """Slot names: parameters then buffers."""
        return self._call.names

    @property
    def n_members(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    @property
    def training(self) -> bool:
        return self.base.training

    def tensors(self) -> tuple[Tensor, ...]:
        """Stacked parameters then buffers, in the order of the slots."""
        return (*self.params.values(), *self.buffers.values())

    def __call__(
        self,
        x: Tensor,
        *,
        batched_input: bool = False,
        tensors: tuple[Tensor, ...] | None = None,
        local: Mapping[str, LocalLinear] | None = None,
    ) -> Tensor:
        """Outputs under every parameter set, ``(M, B, ...)``.

        ``x`` is ``(B, ...)`` (shared by all members) or, with ``batched_input=True``,
        ``(M, B, ...)`` (one batch per member). ``tensors`` replaces the stored stacked tensors
        for this call (same order as :attr:`names`, each ``(M, ...)``). ``local`` maps weight
        slot names, among those :meth:`shared_input_linears` returned, to the functions that
        compute their layers (their slots' tensors are then not read).
        """
        tensors = self.tensors() if tensors is None else tuple(tensors)
        n = tensors[0].shape[0]
        chunk = None
        if not torch.is_grad_enabled():
            per = max(1, self.chunk_rows // max(1, x.shape[1 if batched_input else 0]))
            chunk = per if per < n else None
        if local and not self.fast_path:
            raise RuntimeError("local layers need the fast path; probe shared_input_linears first")
        if self.fast_path:
            try:
                return self._fast(tensors, x, batched_input, chunk, local)
            except _NoFastPath:
                if local:
                    raise RuntimeError(
                        "local layers need the fast path, which this module left after it was "
                        "probed"
                    ) from None
                self.fast_path = False
        key = (batched_input, chunk)
        try:
            return self._vmap(key)(tensors, x)
        except RuntimeError as err:
            if self._randomness == "different" or not _is_randomness_error(err):
                raise
            self._randomness = "different"  # the module draws random numbers: one per member
            self._vmapped.clear()
            return self._vmap(key)(tensors, x)

    def shared_input_linears(self, x: Tensor) -> tuple[tuple[str, str | None], ...]:
        """``(weight, bias or None)`` slot names of the ``F.linear`` calls whose input is the
        input shared by every member when the module runs on ``x`` ``(B, ...)``, among those
        whose weight and bias are used by no other call. One member is run on the first row to
        see (the stored tensors' first member; with the module in eval mode no random numbers
        are drawn; once per input shape). Empty when the module has no fast path."""
        if not self.fast_path:
            return ()
        key = tuple(x.shape[1:])
        if key not in self._shared_inputs:
            self._shared_inputs[key] = self._probe_shared_inputs(x)
        return self._shared_inputs[key]

    def _probe_shared_inputs(self, x: Tensor) -> tuple[tuple[str, str | None], ...]:
        first = tuple(t[:1] for t in self.tensors())
        row = _shared(x[:1], 1)
        calls: list[tuple[int, int | None, bool]] = []
        run = self.base.model if self._link else None
        try:
            with torch.no_grad(), _StackedMode(slice(0, 1), 1, calls=calls):
                self._call(first, row, run=run)
        except _NoFastPath:
            self.fast_path = False
            return ()
        names = {id(t): name for name, t in zip(self.names, first, strict=True)}
        uses: dict[int, int] = {}
        for w, b, _ in calls:
            for used in (w, b):
                uses[used] = uses.get(used, 0) + 1
        return tuple(
            (names[w], None if b is None else names[b])
            for w, b, shared in calls
            if shared
            and w in names
            and uses[w] == 1
            and (b is None or (b in names and uses[b] == 1))
        )

    def _fast(
        self,
        tensors: tuple[Tensor, ...],
        x: Tensor,
        batched_input: bool,
        chunk: int | None,
        local: Mapping[str, LocalLinear] | None = None,
    ) -> Tensor:
        n = tensors[0].shape[0]
        step = chunk or n
        slots = [(self.names.index(name), layer) for name, layer in (local or {}).items()]
        outs = []
        for start in range(0, n, step):
            part = tuple(t[start : start + step] for t in tensors) if chunk else tensors
            m = part[0].shape[0]
            xin = x[start : start + m] if batched_input else _shared(x, m)
            layers = {id(part[i]): layer for i, layer in slots} or None
            with _StackedMode(slice(start, start + m), n, local=layers):
                if not self._link:
                    outs.append(self._call(part, xin))
                    continue
                raw = self._call(part, xin, run=self.base.model)
            outs.append(self._apply_link(part, raw))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _apply_link(self, part: tuple[Tensor, ...], raw: Tensor) -> Tensor:
        """The likelihood's link on member-stacked outputs ``(m, B, ...)``, each member with
        its own likelihood tensors."""
        likelihood = self.base.likelihood
        names = [name for _, name in self._link]
        stacked = getattr(likelihood, "stacked_forward", None)
        if stacked is not None:  # the likelihood's own batched link
            return stacked(raw, {name: part[i] for i, name in self._link})

        def link(tensors: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return torch.func.functional_call(
                likelihood, dict(zip(names, tensors, strict=True)), (out,)
            )

        return vmap(link)(tuple(part[i] for i, _ in self._link), raw)

    def _vmap(self, key: tuple) -> Callable:
        if key not in self._vmapped:
            batched_input, chunk = key
            self._vmapped[key] = vmap(
                self._call,
                in_dims=(0, 0 if batched_input else None),
                randomness=self._randomness,
                chunk_size=chunk,
            )
        return self._vmapped[key]
