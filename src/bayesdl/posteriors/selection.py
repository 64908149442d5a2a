"""Deep ensembles built from a grid of candidate settings by greedy ensemble selection.

The recipe (:func:`ensemble_from_candidates`, also :meth:`DeepEnsemble.from_candidates`):

1. **Search.** Every :class:`Candidate` (a prior precision, a beta-NLL weight, a dropout rate)
   gets ``n_members`` members, and all of them train together as one stacked program on the
   training rows (:func:`fit_candidates`), each member with its own weight decay, loss and
   dropout rate, each early-stopped on the validation rows at its own best epoch.
2. **Selection.** A candidate's score is the mean validation log-likelihood of the
   equal-weight mixture of its members. Starting from the best candidate, greedy ensemble
   selection (:func:`greedy_selection`; Caruana et al., 2004, "Ensemble selection from
   libraries of models") adds the candidate whose members raise the validation
   log-likelihood of the mixture most, until none does. Mixing hyper-parameter settings, not
   only initialisations, is the hyper-deep ensemble of Wenzel et al. (2020), "Hyperparameter
   ensembles for robustness and uncertainty quantification".
3. **Refit.** The chosen candidates are trained again on the training and validation rows
   together (``refit_members`` members each, one stacked program, each candidate for its best
   search epoch), and the chosen candidates' search members join them: one equal-weight
   :class:`~bayesdl.posteriors.deep_ensemble.DeepEnsemble`.

The pieces are public for protocols that need them apart (for example a benchmark that
standardises the search and the refit differently): :func:`fit_candidates`,
:func:`greedy_selection`, :class:`MemberDropout`, :class:`MemberBetaGaussian`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesdl.data import TensorData, as_training_data
from bayesdl.likelihoods import Gaussian, Likelihood, get_likelihood
from bayesdl.posteriors.base import _INPUT_SHAPE_KEY
from bayesdl.posteriors.deep_ensemble import DeepEnsemble, StackedMembers

__all__ = [
    "DEFAULT_CANDIDATES",
    "Candidate",
    "CandidateFit",
    "MemberBetaGaussian",
    "MemberDropout",
    "Selection",
    "ensemble_from_candidates",
    "fit_candidates",
    "greedy_selection",
]

#: Fewest validation rows :func:`ensemble_from_candidates` ranks candidates on.
MIN_VALIDATION_ROWS = 5


@dataclass(frozen=True)
class Candidate:
    """One hyper-parameter setting of the search: a group of members trained alike.

    Attributes
    ----------
    prior_precision:
        ``lambda`` of a Gaussian prior ``N(0, 1 / lambda)`` on the weights, as L2 weight decay
        ``lambda / N`` on the mean loss over ``N`` training rows (default 0.3).
    beta:
        Weight of beta-NLL (Seitzer et al., 2022; see :class:`bayesdl.Gaussian`) in ``[0, 1]``;
        0 is the NLL. Gaussian likelihood only.
    dropout:
        Rate of the model's dropout layers while this candidate's members train, in ``[0, 1)``;
        predictions run without dropout. A rate above 0 needs an ``nn.Dropout`` in the model.
    """

    prior_precision: float = 0.3
    beta: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name, low, high in (("prior_precision", 0, math.inf), ("beta", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Candidate.{name} must be a number, got {value!r}.")
            if not low <= value <= high:
                raise ValueError(f"Candidate.{name} must be in [{low}, {high}], got {value!r}.")
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"Candidate.dropout must be a rate in [0, 1), got {rate!r}.")


#: The search of the UCI regression benchmark (``benchmarks/uci.py``): the NLL, beta-NLL
#: (beta = 1), dropout 0.1, dropout 0.2, and beta-NLL with dropout 0.2, all at precision 0.3.
#: For likelihoods other than the Gaussian, the candidates with ``beta = 0``.
DEFAULT_CANDIDATES: tuple[Candidate, ...] = (
    Candidate(0.3, beta=0.0, dropout=0.0),
    Candidate(0.3, beta=1.0, dropout=0.0),
    Candidate(0.3, beta=0.0, dropout=0.1),
    Candidate(0.3, beta=0.0, dropout=0.2),
    Candidate(0.3, beta=1.0, dropout=0.2),
)


def _as_candidate(item, i: int) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, Mapping):
        known = {f.name for f in fields(Candidate)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(
                f"candidate {i} has unknown settings {unknown}; a candidate takes "
                f"{sorted(known)}, e.g. {{'prior_precision': 0.3, 'dropout': 0.1}}."
            )
        return Candidate(**item)
    raise TypeError(
        f"candidate {i} must be a bayesdl.posteriors.selection.Candidate or a dict of its "
        f"settings, got {type(item).__name__} {item!r}."
    )


def _as_candidates(candidates) -> tuple[Candidate, ...]:
    if isinstance(candidates, (Candidate, Mapping, str)) or not isinstance(candidates, Sequence):
        raise TypeError(
            f"candidates must be a list of Candidate (or dicts), got {type(candidates).__name__}."
        )
    if not candidates:
        raise ValueError(
            "candidates is empty; pass at least one Candidate, or candidates=None for the "
            "default search (DEFAULT_CANDIDATES)."
        )
    return tuple(_as_candidate(c, i) for i, c in enumerate(candidates))


# ------------------------------------------------------------------------ per-member modules
class MemberDropout(nn.Module):
    """Dropout at one rate per stacked member, ``rates`` ``(M,)``.

    Stacked members (:mod:`bayesdl.posteriors.stacked`) apply ``F.dropout`` with a tensor of
    per-member rates, so members with different rates train as one program; a member at rate 0
    draws no mask. It runs only inside stacked members, and is the identity in evaluation mode.
    """

    def __init__(self, rates: Sequence[float]) -> None:
        super().__init__()
        self.rates = torch.tensor(rates, dtype=torch.float64)  # not a buffer: not stacked

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.rates, self.training)


class MemberBetaGaussian(Gaussian):
    """A Gaussian likelihood whose stacked members train with their own beta-NLL weight
    (:class:`bayesdl.Gaussian`'s ``beta``), ``betas`` ``(M,)``, as one vectorised program.

    Early stopping (:meth:`validation_loss`) watches the NLL of the ``beta = 0`` members and
    the squared error of the mean, ``(y - mu)^2 / 2``, of the others: beta-NLL trains the mean
    as the squared error does, so stopping it on the NLL (which its variances were not fitted
    for) cuts its means short, and stopping it on its own loss (which keeps falling while the
    variances shrink below the errors) lets the variances overfit. Scores and predictions are
    the plain Gaussian's, and the library saves it as one (``name`` is ``"gaussian"``).
    """

    def __init__(
        self, betas: Sequence[float], n_targets: int = 1, min_variance: float = 1e-6
    ) -> None:
        super().__init__(n_targets, min_variance)
        for beta in betas:  # the same check as the library's
            Gaussian(beta=beta)
        self.member_beta = torch.tensor(betas).unsqueeze(-1)  # (M, 1): broadcasts over (M, B)

    def _check_members(self, params: Tensor) -> None:
        if params.ndim != 3 or len(params) != len(self.member_beta):
            raise ValueError(
                f"expected the outputs of {len(self.member_beta)} stacked members, (M, B, 2); "
                f"got {tuple(params.shape)}"
            )

    def training_loss(self, params: Tensor, y: Tensor) -> Tensor:
        self._check_members(params)
        out, var = self._nll_per_target(params, y)
        return out * var.detach() ** self.member_beta.to(var)

    def validation_loss(self, params: Tensor, y: Tensor) -> Tensor:
        self._check_members(params)
        nll = self.nll(params, y)  # (M, B)
        squared = 0.5 * (y - self.mean_variance(params)[0]) ** 2
        if squared.ndim > nll.ndim:  # several targets: summed, as the NLL is
            squared = squared.sum(-1)
        return torch.where(self.member_beta.to(nll) > 0, squared, nll)


def _member_model(model: nn.Module, rates: Sequence[float]) -> nn.Module:
    """A copy of ``model`` whose ``nn.Dropout`` layers drop at ``rates`` (one per member;
    no layer at all where every rate is 0)."""
    dropouts = [name for name, m in model.named_modules() if type(m) is nn.Dropout]
    if any(rates) and not dropouts:
        raise ValueError(
            f"candidates with dropout {sorted({r for r in rates if r})} need an nn.Dropout "
            f"layer in the model, and {type(model).__name__} has none. Add one (e.g. "
            "bayesdl.models.mlp(..., dropout=0.1); each candidate sets its own rate) or use "
            "candidates with dropout=0."
        )
    work = copy.deepcopy(model)
    for name in dropouts:
        parent, _, child = name.rpartition(".")
        layer = MemberDropout(rates) if any(rates) else nn.Identity()
        setattr(work.get_submodule(parent), child, layer)
    return work


def _member_likelihood(likelihood: Likelihood, betas: Sequence[float]) -> Likelihood:
    if not any(betas):
        return copy.deepcopy(likelihood)
    if type(likelihood) is not Gaussian:
        raise ValueError(
            f"candidates with beta > 0 train with beta-NLL, which needs the heteroscedastic "
            f"Gaussian likelihood; got {type(likelihood).__name__}. Use likelihood='gaussian' "
            "or candidates with beta=0."
        )
    return MemberBetaGaussian(betas, likelihood.n_targets, likelihood.min_variance)


# ------------------------------------------------------------------------ the stacked fit
@dataclass
class CandidateFit:
    """The members of several candidates trained as one stacked program (:func:`fit_candidates`).

    Attributes
    ----------
    posterior:
        The stacked members (a :class:`DeepEnsemble` unless ``build`` made another stacked
        posterior), candidate after candidate: members ``i * n_members`` to
        ``(i + 1) * n_members - 1`` belong to ``candidates[i]``. Its network trains with
        per-member dropout and its likelihood with per-member beta.
    candidates:
        The candidates, in order.
    n_members:
        Members per candidate.
    member_epochs:
        Per member, its best validation epoch (with validation data), else its epoch count.
    """

    posterior: StackedMembers
    candidates: tuple[Candidate, ...]
    n_members: int
    member_epochs: list[int]

    def members(self, chosen: Sequence[int]) -> list[int]:
        """Indices of the members of the candidates ``chosen`` (repeats repeat them)."""
        per = self.n_members
        return [m for c in chosen for m in range(c * per, (c + 1) * per)]

    @property
    def candidate_epochs(self) -> list[int]:
        """Per candidate, the latest best epoch of its members."""
        per = self.n_members
        return [
            max(self.member_epochs[i * per : (i + 1) * per]) for i in range(len(self.candidates))
        ]


def fit_candidates(
    model: nn.Module,
    likelihood: str | Likelihood,
    candidates: Sequence[Candidate | Mapping],
    train: tuple[Tensor, Tensor],
    *,
    n_members: int = 5,
    val: tuple[Tensor, Tensor] | None = None,
    epochs: int = 100,
    member_epochs: Sequence[int] | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    patience: int | None = None,
    seed: int = 0,
    build: Callable[[nn.Module, Likelihood, int], StackedMembers] | None = None,
    progress: bool = False,
) -> CandidateFit:
    """Train ``n_members`` members per candidate, all candidates in one stacked program.

    Member ``m`` of candidate ``i`` trains with weight decay ``prior_precision / N`` (``N`` the
    training rows), the candidate's beta-NLL weight and dropout rate, and is the network a
    separate deep ensemble of that candidate would give, up to its initialisation seed
    (``seed + i * n_members + m``) and data order.

    Parameters
    ----------
    model:
        The template network (see :class:`DeepEnsemble`); candidates with dropout need an
        ``nn.Dropout`` in it, whose rate each candidate replaces.
    likelihood, candidates:
        As for :func:`ensemble_from_candidates`.
    train:
        Training inputs ``(N, ...)`` and targets ``(N,)`` or ``(N, T)``.
    val:
        Validation data: each member keeps the weights of its best validation epoch, and
        training stops after ``patience`` epochs without a better one (``None``: run all).
    epochs, member_epochs:
        The epoch budget; ``member_epochs`` (one count per member, at most ``epochs``) ends
        each member at its own count.
    seed:
        Seeds the data orders and dropout masks (and the default ``build``'s initialisations).
    build:
        ``build(model, likelihood, n)``: the untrained stacked posterior of ``n`` members on
        the per-member model and likelihood. Default: ``DeepEnsemble(model, likelihood,
        n_members=n, seed=seed)``; e.g. ``reinitialize=False, independent_data_order=False``
        gives members that start from the template's weights and see one data order, so that
        they differ only by candidate.

    Returns
    -------
    CandidateFit
        The stacked members and each member's best epoch.
    """
    candidates = _as_candidates(candidates)
    _positive_int("n_members", n_members)
    x, y = train
    n_rows = len(x)
    decay = [c.prior_precision / n_rows for c in candidates for _ in range(n_members)]
    betas = [c.beta for c in candidates for _ in range(n_members)]
    rates = [c.dropout for c in candidates for _ in range(n_members)]
    likelihood = get_likelihood(likelihood)
    if build is None:

        def build(model: nn.Module, likelihood: Likelihood, n: int) -> StackedMembers:
            return DeepEnsemble(model, likelihood, n_members=n, seed=seed)

    post = build(_member_model(model, rates), _member_likelihood(likelihood, betas), len(betas))
    history = post.fit(
        (x, y),
        val_data=val,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        weight_decay=decay,
        patience=None if val is None else patience,
        member_epochs=member_epochs,
        progress=progress,
    )
    best = history.member_best_epochs or list(member_epochs or [epochs] * len(betas))
    return CandidateFit(post, candidates, n_members, best)


# ------------------------------------------------------------------------ greedy selection
def greedy_selection(
    log_likelihood: Callable[[list[int]], float],
    n_candidates: int,
    *,
    start: int | None = None,
    start_score: float | None = None,
    replacement: bool = False,
    max_size: int | None = None,
) -> list[int]:
    """Greedy forward ensemble selection (Caruana et al., 2004) on a validation score.

    From ``[start]`` (default: the candidate whose ``log_likelihood([i])`` is highest), add the
    candidate ``j`` for which ``log_likelihood(chosen + [j])`` is highest, while that beats the
    current mixture's score strictly; a NaN score never wins. Ties go to the lower index.

    Parameters
    ----------
    log_likelihood:
        The validation score of the equal-weight mixture of the listed candidates' members,
        higher is better (a candidate listed twice weighs twice).
    n_candidates:
        Candidates ``0 .. n_candidates - 1``.
    start, start_score:
        The first candidate and its score (``log_likelihood([start])`` when not given).
    replacement:
        ``False``: each candidate joins at most once. ``True``: Caruana's selection with
        replacement, where adding a candidate again raises its weight.
    max_size:
        Most entries in the result (default ``n_candidates`` without replacement, twice that
        with).

    Returns
    -------
    list[int]
        The chosen candidates, in the order they joined, ``start`` first.
    """
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}.")
    if max_size is None:
        max_size = 2 * n_candidates if replacement else n_candidates
    if start is None:
        singles = [log_likelihood([j]) for j in range(n_candidates)]
        finite = [j for j in range(n_candidates) if math.isfinite(singles[j])]
        if not finite:
            raise ValueError(
                f"no candidate has a finite validation log-likelihood ({singles}); every "
                "candidate diverged or predicts zero density on validation."
            )
        start = max(finite, key=singles.__getitem__)
        start_score = singles[start]
    elif not (isinstance(start, int) and 0 <= start < n_candidates):
        raise ValueError(f"start must be a candidate index in [0, {n_candidates}), got {start!r}.")
    chosen = [start]
    current = log_likelihood(chosen) if start_score is None else start_score
    while len(chosen) < max_size:
        pool = (
            range(n_candidates)
            if replacement
            else (j for j in range(n_candidates) if j not in chosen)
        )
        best, best_score = None, None
        for j in pool:
            score = log_likelihood([*chosen, j])
            if not math.isnan(score) and (best_score is None or score > best_score):
                best, best_score = j, score
        if best is None or not best_score > current:
            break
        chosen.append(best)
        current = best_score
    return chosen


def mixture_log_likelihood(likelihood: Likelihood, outputs: Tensor, y: Tensor) -> float:
    """Mean per-row log-likelihood of ``y`` under the equal-weight mixture of ``outputs``
    ``(S, B, K)`` (the likelihood's predictive)."""
    return float(likelihood.predictive(outputs).log_prob(y).mean())


# ------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class Selection:
    """What :func:`ensemble_from_candidates` chose (``ensemble.selection``).

    Attributes
    ----------
    candidates: the candidates searched.
    val_log_likelihood: per candidate, the mean validation log-likelihood of its members.
    chosen: the candidates in the ensemble, in the order greedy selection added them.
    val_log_likelihood_chosen: that of the chosen candidates' search members together.
    epochs: per chosen candidate, its refit's epoch count (its best search epoch).
    """

    candidates: tuple[Candidate, ...]
    val_log_likelihood: tuple[float, ...]
    chosen: tuple[int, ...]
    val_log_likelihood_chosen: float
    epochs: tuple[int, ...]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _tensor_pair(data, name: str, likelihood: Likelihood, dtype) -> TensorData:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"{name} must be a pair (x, y) of tensors or numpy arrays, got "
            f"{type(data).__name__}. (DataLoaders are not supported here: the search scores "
            "every candidate on the whole validation set.)"
        )
    try:
        return as_training_data(
            data, dtype=dtype, device=torch.device("cpu"), check_targets=likelihood.check_targets
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def _split(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction!r}.")
    n = len(data.x)
    n_val = round(fraction * n)
    if n_val < MIN_VALIDATION_ROWS or n - n_val < 1:
        raise ValueError(
            f"val_fraction={fraction} of {n} rows leaves {n_val} validation rows; greedy "
            f"selection needs at least {MIN_VALIDATION_ROWS}. Pass more rows, a larger "
            "val_fraction, or val=(x_val, y_val)."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return TensorData(data.x[train], data.y[train]), TensorData(data.x[val], data.y[val])


def ensemble_from_candidates(
    train,
    val=None,
    *,
    model: nn.Module | None = None,
    likelihood: str | Likelihood = "gaussian",
    candidates: Sequence[Candidate | Mapping] | None = None,
    n_members: int = 5,
    refit_members: int = 10,
    keep_search_members: bool = True,
    replacement: bool = False,
    val_fraction: float = 0.2,
    hidden: Sequence[int] = (50,),
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 3e-3,
    patience: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> DeepEnsemble:
    """A deep ensemble whose members mix hyper-parameter settings chosen on validation data.

    See :meth:`DeepEnsemble.from_candidates` (the same function) for the arguments.
    """
    likelihood = get_likelihood(likelihood)
    if candidates is None:
        gaussian = type(likelihood) is Gaussian
        candidates = [c for c in DEFAULT_CANDIDATES if gaussian or c.beta == 0]
    candidates = _as_candidates(candidates)
    _positive_int("n_members", n_members)
    _positive_int("refit_members", refit_members, minimum=0)
    _positive_int("epochs", epochs)
    if not isinstance(keep_search_members, bool) or not isinstance(replacement, bool):
        raise TypeError("keep_search_members and replacement must be True or False.")
    if refit_members == 0 and not keep_search_members:
        raise ValueError(
            "refit_members=0 with keep_search_members=False leaves no members; refit some "
            "members or keep the search's."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (the template every member copies), got "
            f"{type(model).__name__}."
        )
    dtype = torch.get_default_dtype()
    if model is not None:
        ref = next(model.parameters(), None)
        dtype = dtype if ref is None else ref.dtype
    data = _tensor_pair(train, "train", likelihood, dtype)
    if val is None:
        fit_data, val_data = _split(data, val_fraction, seed)
    else:
        fit_data, val_data = data, _tensor_pair(val, "val", likelihood, dtype)
        for what, a, b in (
            ("inputs", fit_data.x, val_data.x),
            ("targets", fit_data.y, val_data.y),
        ):
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(
                    f"train and val {what} must agree beyond the row axis, got "
                    f"{tuple(a.shape)} and {tuple(b.shape)}; pass validation rows shaped like "
                    "the training rows."
                )
        if len(val_data.x) < MIN_VALIDATION_ROWS:
            raise ValueError(
                f"val has {len(val_data.x)} rows; greedy selection needs at least "
                f"{MIN_VALIDATION_ROWS} to rank candidates. Pass more validation rows."
            )
        data = TensorData(torch.cat([fit_data.x, val_data.x]), torch.cat([fit_data.y, val_data.y]))
    if model is None:
        model = _default_model(data, likelihood, candidates, hidden, dtype)
    if patience is None:
        patience = max(20, round(0.2 * epochs))
    options = {"batch_size": batch_size, "lr": lr, "seed": seed, "progress": progress}

    search = fit_candidates(
        model,
        likelihood,
        candidates,
        (fit_data.x, fit_data.y),
        n_members=n_members,
        val=(val_data.x, val_data.y),
        epochs=epochs,
        patience=patience,
        **options,
    )
    val_outputs = search.posterior.sample_outputs(val_data.x)

    def score(chosen: list[int]) -> float:
        return mixture_log_likelihood(likelihood, val_outputs[search.members(chosen)], val_data.y)

    alone = [score([i]) for i in range(len(candidates))]
    chosen = greedy_selection(score, len(candidates), replacement=replacement)
    epochs_of = search.candidate_epochs
    refit_epochs = [max(1, epochs_of[c]) for c in chosen]
    parts: list[tuple[DeepEnsemble, list[int]]] = []
    if refit_members:
        refit = fit_candidates(
            model,
            likelihood,
            [candidates[c] for c in chosen],
            (data.x, data.y),
            n_members=refit_members,
            epochs=max(refit_epochs),
            member_epochs=[e for e in refit_epochs for _ in range(refit_members)],
            **options,
        )
        parts.append((refit.posterior, list(range(refit.posterior.n_members))))
    if keep_search_members:
        parts.append((search.posterior, search.members(chosen)))
    ensemble = _joined(model, likelihood, parts, seed)
    ensemble.selection = Selection(
        candidates=candidates,
        val_log_likelihood=tuple(alone),
        chosen=tuple(chosen),
        val_log_likelihood_chosen=score(chosen),
        epochs=tuple(refit_epochs),
    )
    return ensemble


def _default_model(data, likelihood, candidates, hidden, dtype) -> nn.Module:
    from bayesdl.models import mlp

    if data.x.ndim != 2:
        raise ValueError(
            f"the default network takes table rows (N, F); got inputs {tuple(data.x.shape)}. "
            "Pass model=... for other inputs."
        )
    width = likelihood.n_outputs_raw
    if width < 1:  # a Categorical without n_classes: from the labels
        width = max(2, int(data.y.max()) + 1)
    rate = max(c.dropout for c in candidates)
    return mlp(data.x.shape[1], width, hidden=hidden, dropout=rate, dtype=dtype)


def _joined(
    model: nn.Module,
    likelihood: Likelihood,
    parts: Sequence[tuple[DeepEnsemble, list[int]]],
    seed: int,
) -> DeepEnsemble:
    """One DeepEnsemble on ``model`` holding the listed members of every part, in order."""
    n = sum(len(members) for _, members in parts)
    options = {"n_members": n, "independent_data_order": True, "reinitialize": True, "seed": seed}
    ensemble = DeepEnsemble._from_options(model, copy.deepcopy(likelihood), options)
    states = [(post.state_dict(), members) for post, members in parts]
    first = states[0][0]
    state = {
        key: torch.cat([s[key][members] for s, members in states]).detach().clone()
        for key in first
        if key.startswith("members.")
    }
    if _INPUT_SHAPE_KEY in first:
        state[_INPUT_SHAPE_KEY] = first[_INPUT_SHAPE_KEY]
    ensemble.load_state_dict(state, assign=True)
    return ensemble
