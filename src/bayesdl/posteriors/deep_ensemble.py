"""Deep ensembles (Lakshminarayanan et al., 2017): ``M`` copies of the user's network with
independent initialisations (and, by default, independent data orders), trained together.

The members' parameters are stacked along a leading axis (``torch.func.stack_module_state``) and
every forward pass is one ``torch.func.vmap`` of a functional call over that axis
(:mod:`bayesdl.posteriors.stacked`): the ``M``
trainings run as one vectorised program, not ``M`` sequential ones. Adam is elementwise, so
optimising the stacked leaves with the summed loss is exactly ``M`` independent trainings. The
posterior is the uniform mixture over the members, so ``sample_outputs`` returns the ``M``
members' outputs.

The stacked members themselves (initialisation, the vectorised objective, saving and loading)
live in :class:`StackedMembers`, which MultiSWAG (:mod:`bayesdl.posteriors.swag`) shares.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings

import torch
from torch import Tensor, nn

from bayesdl import training
from bayesdl.distributed import Group, MemberShard
from bayesdl.likelihoods import Likelihood
from bayesdl.posteriors.base import Network, Posterior, register
from bayesdl.posteriors.stacked import StackedModule

__all__ = ["DeepEnsemble", "StackedMembers"]


#: False while a posterior is rebuilt to load saved members into (``_from_options``).
_FILL_MEMBERS: contextvars.ContextVar[bool] = contextvars.ContextVar("fill", default=True)


def _reinitialize(network: Network, seed: int) -> None:
    """Reset every submodule that knows how (``reset_parameters``), under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in network.model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


class _EnsembleObjective:
    """Sum of the members' mean NLLs; the loop sees one loss per member, shape ``(M,)``."""

    def __init__(self, ensemble: StackedMembers) -> None:
        self.ensemble = ensemble
        self.n_members = ensemble.n_members
        self.independent_data_order = ensemble.independent_data_order
        self.n_orders = ensemble.n_members if ensemble.independent_data_order else 1
        self.bootstrap = getattr(ensemble, "bootstrap", False)

    def parameters(self) -> list[Tensor]:
        return list(self.ensemble._params.values())

    def state(self) -> list[Tensor]:
        return [*self.ensemble._params.values(), *self.ensemble._buffers.values()]

    def train(self, mode: bool) -> None:
        self.ensemble._stack.train(mode)

    def loss(self, x: Tensor, y: Tensor, n_data: int) -> Tensor:
        per_member = 0 if self.n_orders > 1 else None
        return self.ensemble._member_losses(x, y, per_member, train=True)

    def val_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.ensemble._member_losses(x, y, None)


class StackedMembers(Posterior):
    """Abstract base: ``n_members`` copies of the user's network trained as one vectorised program.

    It owns the stacked members (``_stack``, ``_params``, ``_buffers``: tensors ``(M, ...)``),
    their objective (one loss per member) and their saved state; a subclass says how the members
    become posterior draws (``_sample_outputs``). See :class:`DeepEnsemble` for the parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        *,
        n_members: int,
        independent_data_order: bool,
        reinitialize: bool,
        seed: int | None,
    ) -> None:
        super().__init__(model, likelihood)
        if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
            raise ValueError(f"n_members must be a positive integer, got {n_members!r}.")
        self.n_members = n_members
        for name, flag in (
            ("independent_data_order", independent_data_order),
            ("reinitialize", reinitialize),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.independent_data_order = independent_data_order
        if seed is None:
            seed = int(torch.randint(2**31, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}.")
        #: Seed of the members' initialisations (member ``m`` uses ``seed + m``).
        self.seed = seed
        self.reinitialize = reinitialize
        self._stack = self._stacked_members(n_members, reinitialize, seed)
        self._params = self._stack.params
        self._buffers = self._stack.buffers
        if reinitialize and n_members > 1 and _FILL_MEMBERS.get():
            self._warn_shared_parameters()

    def _stacked_members(self, n_members: int, reinitialize: bool, seed: int) -> StackedModule:
        """The members' tensors stacked ``(M, ...)``: member ``m`` is the template re-initialised
        under ``seed + m`` (or the template's own weights), written straight into the stack from
        one working copy (as ``stack_module_state`` of ``M`` copies gives, at a third of the
        memory traffic)."""
        fill = _FILL_MEMBERS.get()
        # A working copy only where members are re-initialised; else the template is read only.
        work = copy.deepcopy(self.network) if fill and reinitialize else self.network
        named = [*work.named_parameters(), *work.named_buffers()]
        stacked = {
            name: self._member_tensor((n_members, *t.shape), t.dtype, t.device, torch.empty)
            for name, t in named
        }
        with torch.no_grad():
            for m in range(n_members if fill else 0):
                if reinitialize:
                    _reinitialize(work, seed + m)
                for name, t in named:
                    stacked[name][m].copy_(t)
        params = {
            name: stacked[name].requires_grad_(p.requires_grad)
            for name, p in work.named_parameters()
        }
        buffers = {name: stacked[name] for name, _ in work.named_buffers()}
        return StackedModule(work, params, buffers)

    @staticmethod
    def _member_tensor(shape: tuple[int, ...], dtype, device, make=torch.zeros) -> Tensor:
        """A tensor of the members' state, ``make(shape)``; while the posterior is rebuilt to
        load saved members (``_from_options``), a placeholder without memory of that size (all
        strides 0), which loading replaces by the saved tensor itself."""
        if _FILL_MEMBERS.get():
            return make(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, [0] * len(shape), dtype=dtype, device=device)

    @classmethod
    def _from_options(cls, model: nn.Module, likelihood: Likelihood, options: dict):
        # The members' state comes from a file next: placeholders instead of initialised,
        # filled tensors (the file's tensors become the state: no memory is allocated twice).
        token = _FILL_MEMBERS.set(False)
        try:
            return cls(model, likelihood, **options)
        finally:
            _FILL_MEMBERS.reset(token)

    def options(self) -> dict:
        return {
            "n_members": self.n_members,
            "independent_data_order": self.independent_data_order,
            "reinitialize": self.reinitialize,
            "seed": self.seed,
        }

    def _warn_shared_parameters(self) -> None:
        resettable = {
            f"model.{n}" if n else "model"
            for n, m in self.model.named_modules()
            if callable(getattr(m, "reset_parameters", None))
        }
        same = [
            name
            for name, p in self._params.items()
            if name.startswith("model.")
            and name.rpartition(".")[0] not in resettable  # e.g. BatchNorm resets to constants
            and bool((p == p[:1]).all())
        ]
        if same:
            warnings.warn(
                f"these parameters start equal in every member because their module has no "
                f"reset_parameters(): {same}. Give the module a reset_parameters() method so "
                "the members are initialised independently.",
                stacklevel=4,
            )

    def member(self, m: int) -> tuple[nn.Module, Likelihood]:
        """Member ``m`` as plain modules: copies of the user's model and of the likelihood
        holding that member's parameters and buffers (e.g. to save one member, or to fit a
        Laplace approximation around it)."""
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.n_members:
            raise ValueError(f"m must be an integer in [0, {self.n_members}), got {m!r}.")
        network = copy.deepcopy(self.network)
        own = {**dict(network.named_parameters()), **dict(network.named_buffers())}
        with torch.no_grad():
            for name, stacked in (*self._params.items(), *self._buffers.items()):
                own[name].copy_(stacked[m])
        return network.model, network.likelihood

    @contextlib.contextmanager
    def _evaluating(self):
        """The members in evaluation mode (dropout off, BatchNorm on its running statistics)."""
        was_training = self._stack.training
        self._stack.train(False)
        try:
            yield
        finally:
            self._stack.train(was_training)

    def _member_outputs(self, x: Tensor, data_dim: int | None) -> Tensor:
        """Outputs of every member, ``(M, B, K)``; ``x`` is ``(B, ...)`` or ``(M, B, ...)``."""
        return self._stack(x, batched_input=data_dim is not None)

    def _member_losses(
        self, x: Tensor, y: Tensor, data_dim: int | None, train: bool = False
    ) -> Tensor:
        """Mean loss per member, ``(M,)``: the likelihood's training loss with ``train``, else
        its validation loss."""
        # Only the network runs under vmap; the likelihood broadcasts over the member axis.
        loss = self.likelihood.training_loss if train else self.likelihood.validation_loss
        return loss(self._member_outputs(x, data_dim), y).mean(-1)

    def _objective(self) -> _EnsembleObjective:
        return _EnsembleObjective(self)

    #: Other attributes with a leading member axis that a fit fills (SWAG's moments).
    _MEMBER_TENSORS: tuple[str, ...] = ()

    @contextlib.contextmanager
    def _member_shard(self, group: Group):
        """Hold only this process's contiguous share of the members while the body trains them
        (``parallel="members"``), then gather every process's members back into the stack
        (also after a divergence, which all processes report together)."""
        total = self.n_members
        if total < group.world:
            raise ValueError(
                f"parallel='members' gives each of the {group.world} processes at least one "
                f"member, but there are {total}: use at least {group.world} members, fewer "
                "processes, or parallel='data'."
            )
        lo, hi = group.share(total)
        full = (self._stack, self._params, self._buffers)
        extra = {name: getattr(self, name) for name in self._MEMBER_TENSORS}
        with torch.no_grad():
            params = {
                k: v[lo:hi].clone().requires_grad_(v.requires_grad) for k, v in self._params.items()
            }
            buffers = {k: v[lo:hi].clone() for k, v in self._buffers.items()}
            for name, t in extra.items():
                setattr(self, name, t[lo:hi].clone())
        self._stack = StackedModule(self.network, params, buffers)
        self._params, self._buffers, self.n_members = params, buffers, hi - lo

        def restore(gather: bool) -> None:
            local = {**params, **buffers, **{n: getattr(self, n) for n in extra}}
            self._stack, self._params, self._buffers = full
            self.n_members = total
            for name, t in extra.items():
                setattr(self, name, t)
            if not gather:
                return
            targets = {**self._params, **self._buffers, **extra}
            with torch.no_grad():
                for name, target in targets.items():
                    gathered = group.gather(local[name].detach().to(group.device).contiguous())
                    target.copy_(gathered)

        try:
            yield MemberShard(lo, hi, total, group)
        except training.TrainingDivergedError:
            restore(gather=True)
            raise
        except BaseException:
            restore(gather=False)
            raise
        restore(gather=True)

    def _extra_state(self) -> dict[str, Tensor]:
        return {
            **{f"members.params.{k}": v.detach() for k, v in self._params.items()},
            **{f"members.buffers.{k}": v for k, v in self._buffers.items()},
        }

    def _loaded_in_place(self) -> dict[str, Tensor]:
        """The tensors of :meth:`_extra_state` that loading fills (copied, or with ``assign``
        replaced), keyed the same; by default all of them."""
        return self._extra_state()

    def _load_extra_state(self, state: dict[str, Tensor]) -> None:
        own = self._loaded_in_place()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {unexpected}")
        for key, target in own.items():
            if state[key].shape != target.shape:
                raise RuntimeError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}"
                )
        # The live tensors (``own`` holds detached aliases of the parameters), for assign.
        live = {f"members.params.{k}": v for k, v in self._params.items()}
        for key, target in own.items():
            self._take(live.get(key, target), state[key])


@register
class DeepEnsemble(StackedMembers):
    """An ensemble of ``n_members`` independently initialised copies of ``model``.

    Parameters
    ----------
    model:
        The user's module. It is the template: its weights are not used unless
        ``reinitialize=False`` (then every member starts from them and only the data order and
        dropout differ), and it is not modified by training.
    likelihood:
        See :class:`~bayesdl.posteriors.base.Posterior`.
    n_members:
        Ensemble size ``M`` (default 5).
    independent_data_order:
        Each member sees its own shuffling of the training data (default ``True``).
    reinitialize:
        Re-draw each member's weights with the layers' ``reset_parameters`` (default ``True``).
    seed:
        Seed of the initialisations (member ``m`` uses ``seed + m``); ``None`` draws one from
        torch's global generator.
    bootstrap:
        Each member trains on its own bootstrap resample of the training tensors (``n`` rows
        drawn with replacement, once per ``fit``; default ``False``): bagging, as in
        bootstrapped Thompson sampling (Osband et al., 2016). Needs
        ``independent_data_order=True`` and the data as tensors, not a DataLoader.

    Notes
    -----
    ``sample_outputs(x)`` returns the members' outputs, ``(M, B, K)``; ``n_samples`` must be
    ``None`` or ``M``, since the ensemble is represented exactly by its members.
    """

    name = "deep_ensemble"
    #: What :meth:`from_candidates` chose (a :class:`~bayesdl.posteriors.selection.Selection`);
    #: ``None`` for an ensemble built otherwise or loaded from a file.
    selection = None

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        *,
        n_members: int = 5,
        independent_data_order: bool = True,
        reinitialize: bool = True,
        seed: int | None = None,
        bootstrap: bool = False,
    ) -> None:
        if not isinstance(bootstrap, bool):
            raise TypeError(f"bootstrap must be True or False, got {bootstrap!r}.")
        if bootstrap and not independent_data_order:
            raise ValueError(
                "bootstrap=True gives each member its own resample of the data, which needs "
                "independent_data_order=True."
            )
        self.bootstrap = bootstrap
        super().__init__(
            model,
            likelihood,
            n_members=n_members,
            independent_data_order=independent_data_order,
            reinitialize=reinitialize,
            seed=seed,
        )

    def options(self) -> dict:
        return {**super().options(), "bootstrap": self.bootstrap}

    @classmethod
    def from_candidates(
        cls,
        train,
        val=None,
        *,
        model: nn.Module | None = None,
        likelihood: str | Likelihood = "gaussian",
        candidates=None,
        n_members: int = 5,
        refit_members: int = 10,
        keep_search_members: bool = True,
        replacement: bool = False,
        val_fraction: float = 0.2,
        hidden=(50,),
        epochs: int = 100,
        batch_size: int = 128,
        lr: float = 3e-3,
        patience: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> DeepEnsemble:
        """A fitted deep ensemble whose members mix hyper-parameter settings chosen on
        validation data: a hyper-deep ensemble (Wenzel et al., 2020) by greedy ensemble
        selection (Caruana et al., 2004).

        1. Every candidate gets ``n_members`` members; all train as one stacked program on
           ``train``, each early-stopped on ``val`` at its own best epoch.
        2. Each candidate is scored by the mean validation log-likelihood of its members'
           equal-weight mixture. From the best one, the candidate whose members raise the
           mixture's validation log-likelihood most is added, until none does.
        3. The chosen candidates are refitted on ``train`` and ``val`` together
           (``refit_members`` each, each for its best search epoch), and their search members
           join the refits. All members weigh equally.

        The recipe of the UCI regression benchmark (``benchmarks/uci.py``), where it has the best
        test log-likelihood of the library's methods. Standardise inputs and targets first (e.g.
        :class:`bayesdl.data.Standardizer`): weight decay and learning rate assume unit scales.

        Parameters
        ----------
        train:
            ``(x, y)``: inputs ``(N, ...)`` (``(N, F)`` for the default network) and targets
            ``(N,)`` or ``(N, T)`` (class labels ``(N,)`` for ``"categorical"``); tensors or
            numpy arrays.
        val:
            Validation ``(x_val, y_val)``, shaped like ``train`` beyond the row axis, at least
            5 rows. ``None``: a random ``val_fraction`` of ``train`` (seeded by ``seed``).
        model:
            The template network (its weights are not used: every member is re-initialised
            with ``reset_parameters``). Candidates with dropout need an ``nn.Dropout`` layer in
            it, whose rate each candidate replaces. ``None``: :func:`bayesdl.models.mlp` with
            ``hidden`` ReLU layers, which :func:`bayesdl.load` rebuilds without code.
        likelihood:
            ``"gaussian"`` (default; mean and log-variance outputs), ``"categorical"``, or
            another :class:`~bayesdl.likelihoods.Likelihood`.
        candidates:
            :class:`~bayesdl.posteriors.selection.Candidate` settings (or dicts of them:
            ``prior_precision``, ``beta``, ``dropout``). ``None``:
            :data:`~bayesdl.posteriors.selection.DEFAULT_CANDIDATES` (the five of the UCI
            benchmark; the three with ``beta = 0`` for non-Gaussian likelihoods).
        n_members:
            Members per candidate in the search.
        refit_members:
            Members per chosen candidate in the refit on all rows (0: no refit).
        keep_search_members:
            Keep the chosen candidates' search members beside the refitted ones.
        replacement:
            Selection with replacement (Caruana's): a candidate may be chosen again, which
            adds its members again.
        val_fraction:
            Share of ``train`` held out when ``val`` is ``None``.
        hidden:
            Hidden widths of the default network.
        epochs, batch_size, lr, patience:
            Adam training of every member; ``patience`` (default ``max(20, epochs / 5)``)
            epochs without a better validation loss end the search.
        seed:
            Seeds the validation split, the initialisations and the data orders: the same seed
            gives the same ensemble.
        progress:
            Show progress bars.

        Returns
        -------
        DeepEnsemble
            Fitted, with ``len(chosen) * (refit_members + n_members)`` members (fewer without
            the refit or the search members); ``sample_outputs(x)`` is ``(M, B, K)``. Its
            :attr:`selection` records the candidates' validation scores and the choice.
            :func:`bayesdl.save` and :func:`bayesdl.load` keep the members (not the record).

        Raises
        ------
        ValueError, TypeError
            For empty or malformed candidates, mismatched shapes, too few validation rows, a
            dropout candidate on a model without ``nn.Dropout``, or ``beta > 0`` with a
            likelihood other than the Gaussian.

        Examples
        --------
        >>> import torch, bayesdl as bdl
        >>> x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
        >>> y = x[:, 0] - x[:, 1] ** 2
        >>> ens = bdl.DeepEnsemble.from_candidates((x, y), epochs=20, refit_members=2)
        >>> ens.predict(x[:4]).mean.shape
        torch.Size([4])
        >>> ens.selection.chosen  # doctest: +SKIP
        (2, 0)
        """
        from bayesdl.posteriors.selection import ensemble_from_candidates

        return ensemble_from_candidates(
            train,
            val,
            model=model,
            likelihood=likelihood,
            candidates=candidates,
            n_members=n_members,
            refit_members=refit_members,
            keep_search_members=keep_search_members,
            replacement=replacement,
            val_fraction=val_fraction,
            hidden=hidden,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            seed=seed,
            progress=progress,
        )

    @property
    def default_n_samples(self) -> int:  # type: ignore[override]
        return self.n_members

    def _resolve_n_samples(self, n_samples: int | None) -> int:
        if n_samples is not None and n_samples != self.n_members:
            raise ValueError(
                f"a DeepEnsemble returns exactly one draw per member ({self.n_members}); "
                f"got n_samples={n_samples!r}. Pass n_samples=None or {self.n_members}."
            )
        return self.n_members

    def _sample_outputs(
        self, x: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        with self._evaluating():
            return self._member_outputs(x, None)
