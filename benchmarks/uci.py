"""The UCI regression benchmark (Hernandez-Lobato & Adams 2015 splits) for every registered method.

Run from the repository root::

    python -m benchmarks.uci --data-dir ../shared/data/uci [--datasets a,b] [--methods m1,m2]
                             [--splits K] [--epochs-scale F] --out benchmarks/results/uci.json

The protocol, the same for every data set and method (written up in the README):

* the given splits (the first ``K`` with ``--splits``); inputs and targets standardised with the
  statistics of the training rows only;
* one hidden layer of ``n_hidden.txt`` ReLU units (50 for all seven sets); the network outputs a
  mean and a log-variance (heteroscedastic Gaussian likelihood) for every method; MC dropout adds
  a dropout layer after the hidden layer;
* hyper-parameters by one automatic procedure: the last 20% of each training split (in the order
  of its index file) is held out; every candidate of the method's grid (:data:`GRIDS`) is trained
  on the first 80% with Adam for ``n_epochs * epochs_scale`` epochs, keeping the epoch with the
  best validation loss and stopping after :data:`PATIENCE_FRACTION` of the epochs without a
  better one (not SWAG); the candidates of the methods in :data:`STACKED_GRID` train together as
  members of one stacked ensemble with one weight decay (likelihood beta, dropout rate) each; the
  candidate with the best validation log-likelihood of the method's own predictive wins, and the
  method is refitted on the whole training split with that candidate for the chosen number of
  epochs (the full count for SWAG, whose posterior is the trajectory); deep ensembles mix the
  candidates chosen by greedy ensemble selection on validation, refitted in one stacked
  program, and keep their grid members beside the refitted ones (:data:`JOIN_GRID_MEMBERS`);
  optionally (``--variance-scaling``) each candidate's noise variances get a factor fitted on
  validation (:data:`VARIANCE_SCALING`); a candidate whose fit diverges is not chosen, and a
  refit that diverges is scored with its last good weights (:data:`DIVERGENCE`, recorded);
* test RMSE of the predictive mean and mean per-point test log-likelihood of the predictive
  (the Gaussian mixture over the method's draws), both on the original target scale (the
  log-density of standardised targets minus ``log(y_std)``); mean and standard error over splits.

It writes ``{"datasets": {name: {method: {"rmse": [mean, se], "ll": [mean, se], "seconds": s}}}}``
(plus the protocol settings and per-split values) and a Markdown table (``--markdown``, by default
next to ``--out`` with the suffix ``.md``) with our rows beside the published columns of
``--reference``, best per row in bold. ``--merge a.json b.json`` combines earlier runs (for example
two processes on disjoint data sets) into ``--out`` without training.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import bayesdl as bdl
from bayesdl.calibration import fit_scale, scale_outputs
from bayesdl.data import Standardizer, UCIDataset, UCISplit, load_uci
from bayesdl.posteriors.selection import Candidate, CandidateFit, fit_candidates, greedy_selection

__all__ = ["GRIDS", "Result", "main", "run_method", "write_markdown"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "uci_published.json"
VAL_FRACTION = 0.2
BATCH_SIZE = 128
LR = 3e-3
SEED = 0
PREDICT_SEED = 1234

MAX_STEPS = 5_000
#: Early stopping of the grid fits: stop after this fraction of the epoch budget (at least
#: :data:`MIN_PATIENCE` epochs) without a better validation loss. Not for the trajectory
#: methods, whose posterior is collected late in the run.
PATIENCE_FRACTION = 0.2
MIN_PATIENCE = 20
#: Prior precisions tried by every method: weight decay ``lambda / n`` for a training set of ``n``
#: rows (the L2 term of a Gaussian prior of precision ``lambda`` on the mean loss), or for VI the
#: Gaussian prior ``N(0, 1 / lambda)`` itself.
PRECISIONS = (0.3, 3.0, 30.0)

#: Candidates per method: ``"precision"`` (see :data:`PRECISIONS`), ``"dropout"`` (the rate of a
#: dropout layer after the hidden layer), ``"beta"`` (the Gaussian's beta-NLL weight, see
#: :class:`bayesdl.Gaussian`; default 0, the NLL) and other constructor options
#: under ``"build"``. A registered method not listed here gets :data:`DEFAULT_GRID`.
DEFAULT_GRID: tuple[dict, ...] = tuple({"precision": lam} for lam in PRECISIONS)
GRIDS: dict[str, tuple[dict, ...]] = {
    "deterministic": DEFAULT_GRID,
    # Five candidates of five members (25 members in one stacked program): the NLL, beta-NLL
    # (beta = 1), members trained with dropout 0.1 or 0.2 (predictions without it), and beta-NLL
    # with dropout 0.2, all at lambda = 0.3; a grid within the
    # 60-minute budget. Averaging members regularises on its own: the strongest prior (30) won
    # validation on 7 of 140 splits when it was a candidate, and lambda = 3 (a candidate of an
    # earlier grid) won mostly on the large sets, where lambda / n differs from 0.3's by under
    # 0.001
    # (on 14 power splits, LL -2.7832 and RMSE 4.023 without it, -2.7842 and 4.024 with it;
    # it cost a sixth of the grid's time). Beta-NLL won mostly on energy (10 of 20 splits);
    # dropout won on Boston (18 of 20 splits, 15 of them at 0.3, in a trial with both priors)
    # and, at 0.1, on 14 of 20 wine splits, where the other methods also chose their strongest
    # regulariser.
    "deep_ensemble": tuple(
        {"precision": 0.3, "beta": beta, "dropout": p, "build": {"n_members": 5}}
        for beta, p in ((0.0, 0.0), (1.0, 0.0), (0.0, 0.1), (0.0, 0.2), (1.0, 0.2))
    ),
    "mc_dropout": tuple({"precision": 3.0, "dropout": p} for p in (0.01, 0.05, 0.1)),
    "mean_field_vi": DEFAULT_GRID,
    "swag": tuple({**c, "build": {"swa_start": 0.5}} for c in DEFAULT_GRID),
    "laplace": DEFAULT_GRID,
}
#: Methods whose posterior is the training trajectory: refit for the full epoch count.
TRAJECTORY_METHODS = frozenset({"swag", "sgmcmc"})
#: Methods whose prior precision is a constructor option (the others take the grid's precision
#: as weight decay, ``precision / N``).
PRIOR_OPTION = frozenset({"mean_field_vi", "sgmcmc", "ivon"})
#: Step sizes other than :data:`LR`: IVON's step divides by its Hessian estimate (the paper's 0.1).
LRS: dict[str, float] = {"ivon": 0.1}
#: Constructor options of a method for every candidate. IVON: the Hessian average must forget its
#: start within a 5,000-step budget (beta2 = 0.999, the library's default; the paper's 0.99999
#: averages over 100,000 steps), and a start of 1 keeps the first steps as short as SGD's at the
#: step size. Without a clip radius, refits on concrete and energy diverged after 600-760 epochs
#: (at step 0.1 and at 0.05), once the Hessian estimate of some weights had fallen near 0; a
#: radius of 1 bounds each weight's step to the step size.
BUILD: dict[str, dict] = {"ivon": {"beta2": 0.999, "hess_init": 1.0, "clip_radius": 1.0}}
#: What a fit that diverges (``TrainingDivergedError``: a NaN or infinite loss) does to a run.
#: A grid candidate that diverges is not chosen (its validation log-likelihood is NaN). A refit
#: that diverges after at least one good epoch is scored with the weights of its last good
#: epoch, which the fit loop restores; one that diverges in its first epoch stops the run. A
#: sampler's refit that diverges before it kept a sample leaves no posterior: the split has no
#: score (NaN), and the method's mean and standard error are over the splits with one, the table
#: saying how many of how many. Every such event is recorded in the split's selection
#: (``"diverged"``) and listed in the table.
DIVERGENCE = "recorded"
#: Methods whose grid over the prior precision trains as one stacked program: every candidate
#: becomes a group of members of one ensemble with its own weight decay
#: (``TrainConfig.weight_decay`` per member) and its own best validation epoch; the point estimate
#: and Laplace's MAP networks are members started from the same initialisation with the same
#: data order, so each is exactly the network a separate fit would give.
#: MC dropout's candidates (dropout rates) are members with one rate each (:class:`_MemberDropout`)
#: started from the same initialisation with the same data order, each scored by the MC dropout
#: predictive of its own network: the fit a separate run would give up to the draws of the
#: training masks.
STACKED_GRID = frozenset({"deterministic", "deep_ensemble", "laplace", "mc_dropout", "swag"})
#: Methods that train the same networks (the point estimate, Laplace's MAP): the stacked grid fit
#: and the refit on one split's data are trained once and shared (:data:`_POINT_FITS`), so a run
#: of both trains them once and their time counts for the method that ran first.
SHARED_POINT_FIT = frozenset({"deterministic", "laplace"})
_POINT_FITS: dict[str, object] = {}
#: Variance scaling as part of the hyper-parameters (Levi et al., 2022; the noise precision of
#: Gal's grid plays this part for homoscedastic dropout networks): every candidate's predictive
#: noise variances are multiplied by the one factor that maximises its validation
#: log-likelihood (:func:`bayesdl.calibration.fit_scale`, on the same validation outputs), the
#: candidate with the best scaled validation log-likelihood wins, and its factor multiplies the
#: refitted posterior's noise variances (:class:`bayesdl.calibration.CalibratedPosterior`). The
#: predictive means, so the RMSE, are unchanged; the unscaled test log-likelihood is recorded too.
#: Off by default (``--variance-scaling`` turns it on): for deep ensembles it moved the mean test
#: log-likelihood by -0.002 to +0.006 on Boston, concrete and wine (20 splits each); the factors
#: fitted on 91 validation rows of Boston ranged from 0.73 to 1.49 and helped and hurt alike.
VARIANCE_SCALING = False
#: Deep ensembles' predictive mixes candidates of the grid, chosen by greedy ensemble selection
#: on the validation log-likelihood (without replacement; Caruana et al. 2004, as in the
#: hyper-parameter ensembles of Wenzel et al. 2020): start from the winner's grid members and
#: add the candidate whose members raise the validation log-likelihood of the equal-weight
#: mixture most, until none does (:func:`bayesdl.posteriors.selection.greedy_selection`). Every
#: chosen candidate is refitted on the whole training split, all of them in one stacked program
#: (:func:`_refit_mixture`: each its own decay, beta, dropout rate and best grid epoch; the
#: recipe of :meth:`bayesdl.DeepEnsemble.from_candidates`, here with the protocol's own
#: standardisation of the grid and the refit), and the chosen candidates' grid members
#: (trained on the first 80% of the split, early-stopped on the last 20%) join the refits: more
#: members for no extra training (their outputs are mapped from the grid's standardisation to
#: the refit's). Every member is trained on training rows only; all weigh equally. An earlier
#: version joined one fixed partner (beta-NLL with dropout 0.2) to the winner, each refit its
#: own program; see the README for both.
JOIN_GRID_MEMBERS = frozenset({"deep_ensemble"})
#: Build options of the refit that override the candidate's: deep ensembles refit twice the
#: grid's members per chosen candidate. The grid needs enough members to rank its candidates;
#: the predictive gains from more.
REFIT_BUILD: dict[str, dict] = {"deep_ensemble": {"n_members": 10}}


def mlp(n_features: int, n_hidden: int, dropout: float = 0.0) -> nn.Module:
    """``Linear(F, H) -> ReLU [-> Dropout(p)] -> Linear(H, 2)``: mean and log-variance.

    In a stacked grid (:func:`bayesdl.posteriors.selection.fit_candidates`) the dropout layer
    takes each candidate's own rate.
    """
    layers: list[nn.Module] = [nn.Linear(n_features, n_hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(n_hidden, 2))


def build(method: str, candidate: dict, n_features: int, n_hidden: int, seed: int):
    """The posterior of ``method`` for one grid candidate, on a freshly initialised network."""
    torch.manual_seed(seed)
    likelihood = bdl.Gaussian(beta=candidate.get("beta", 0.0))
    net = mlp(n_features, n_hidden, candidate.get("dropout", 0.0))
    options = {**BUILD.get(method, {}), **candidate.get("build", {})}
    if method == "mean_field_vi" and "precision" in candidate:
        options["prior"] = bdl.GaussianPrior(candidate["precision"] ** -0.5)
    elif method in PRIOR_OPTION and "precision" in candidate:
        options["prior_precision"] = candidate["precision"]
    cls = bdl.get_posterior(method)
    if method in ("deep_ensemble", "swag"):
        options.setdefault("seed", seed)
    return cls(net, likelihood, **options)


def epochs_for(n_rows: int, n_epochs: int, epochs_scale: float) -> int:
    """``n_epochs * epochs_scale`` epochs, at most :data:`MAX_STEPS` gradient steps in all."""
    steps_per_epoch = math.ceil(n_rows / BATCH_SIZE)
    return max(1, min(round(n_epochs * epochs_scale), math.ceil(MAX_STEPS / steps_per_epoch)))


@dataclass
class Scores:
    """Test scores of one fitted posterior on the original target scale."""

    rmse: float
    ll: float


def _predict_generator() -> torch.Generator:
    return torch.Generator().manual_seed(PREDICT_SEED)


@dataclass
class Outcome:
    """Validation result of one grid candidate: the log-likelihood before and after the
    variance scaling fitted on the same validation outputs (:data:`VARIANCE_SCALING`), the
    fitted factor and the best epoch."""

    val_ll_unscaled: float
    scale: float
    val_ll: float
    best_epoch: int


def _scaled_outcome(
    outputs: Tensor,
    likelihood,
    y_val: Tensor,
    inner: Standardizer,
    best_epoch: int,
    variance_scaling: bool | None = None,
) -> Outcome:
    """:class:`Outcome` of validation ``outputs`` ``(S, B, 2)`` (``y_val`` original scale);
    ``variance_scaling`` ``None`` means :data:`VARIANCE_SCALING`."""
    raw = score(likelihood.predictive(outputs), y_val, inner).ll
    if variance_scaling is None:
        variance_scaling = VARIANCE_SCALING
    if not (variance_scaling and math.isfinite(raw)):
        return Outcome(raw, 1.0, raw, best_epoch)
    try:
        scale = fit_scale(outputs, inner.transform_y(y_val), likelihood)
    except ValueError:  # no finite optimum (e.g. a collapsed variance): keep the candidate as is
        return Outcome(raw, 1.0, raw, best_epoch)
    scaled = _rescaled(outputs, scale, likelihood)
    return Outcome(raw, scale, score(likelihood.predictive(scaled), y_val, inner).ll, best_epoch)


def _rescaled(outputs: Tensor, scale: float, likelihood) -> Tensor:
    log_scale = torch.tensor(math.log(scale), dtype=outputs.dtype)
    return scale_outputs(outputs, log_scale, likelihood)


def score(pred, y: Tensor, scaler: Standardizer) -> Scores:
    """:class:`Scores` of a predictive on standardised targets against original targets ``y``."""
    mean = scaler.inverse_mean(pred.mean)
    rmse = float(((mean - y) ** 2).mean().sqrt())
    ll = float(pred.log_prob(scaler.transform_y(y)).mean()) + scaler.log_density_correction()
    return Scores(rmse, ll)


def patience_for(method: str, epochs: int) -> int | None:
    """Early-stopping patience of the grid fits (``None`` for trajectory methods)."""
    if method in TRAJECTORY_METHODS:
        return None
    return max(MIN_PATIENCE, round(PATIENCE_FRACTION * epochs))


def _fit(post, method: str, x, y, candidate: dict, epochs: int, seed: int, val=None):
    options = {"epochs": epochs, "batch_size": BATCH_SIZE, "lr": LRS.get(method, LR), "seed": seed}
    if val is not None:
        options["patience"] = patience_for(method, epochs)
    if "precision" in candidate and method not in PRIOR_OPTION:
        options["weight_decay"] = candidate["precision"] / len(x)
    return post.fit((x, y), val_data=val, progress=False, **options)


def run_method(
    method: str,
    split: UCISplit,
    n_hidden: int,
    n_epochs: int,
    epochs_scale: float = 1.0,
    seed: int = SEED,
    variance_scaling: bool | None = None,
) -> tuple[Scores, dict]:
    """Grid on the last 20% of the training split, refit on all of it, test scores.

    Returns the test :class:`Scores` and a record of the selection: the candidate's index, its
    validation log-likelihood (scaled and unscaled), its variance factor (1 without
    :data:`VARIANCE_SCALING`), the refit's epochs, the test log-likelihood before scaling and,
    for :data:`JOIN_GRID_MEMBERS`, the candidates in the predictive (``"mixture"``, the winner
    first). ``variance_scaling`` ``None`` means :data:`VARIANCE_SCALING`.
    """
    if variance_scaling is None:
        variance_scaling = VARIANCE_SCALING
    grid = GRIDS.get(method, DEFAULT_GRID)
    n = len(split.x_train)
    n_val = max(1, round(VAL_FRACTION * n))
    x_in, y_in = split.x_train[: n - n_val], split.y_train[: n - n_val]
    x_val, y_val = split.x_train[n - n_val :], split.y_train[n - n_val :]
    inner = Standardizer.fit(x_in, y_in)
    xi, yi, xv = inner.transform_x(x_in), inner.transform_y(y_in), inner.transform_x(x_val)
    epochs = epochs_for(len(x_in), n_epochs, epochs_scale)
    kept: dict = {}
    diverged: list[dict] = []  # fits that diverged (DIVERGENCE)
    if len(grid) < 2:
        outcomes = []
    elif method in STACKED_GRID:
        outcomes = _stacked_grid(
            method,
            grid,
            n_hidden,
            seed,
            inner,
            epochs,
            (xi, yi),
            (xv, y_val),
            kept=kept,
            variance_scaling=variance_scaling,
        )
    else:
        outcomes = []
        for j, candidate in enumerate(grid):
            post = build(method, candidate, split.x_train.shape[1], n_hidden, seed)
            yv = inner.transform_y(y_val)
            try:
                history = _fit(post, method, xi, yi, candidate, epochs, seed, val=(xv, yv))
            except bdl.TrainingDivergedError as err:  # a setting that diverges is not chosen
                diverged.append({"fit": "grid", "candidate": j, "epoch": err.epoch})
                outcomes.append(Outcome(float("nan"), 1.0, float("nan"), epochs))
                continue
            outputs = post.sample_outputs(xv, generator=_predict_generator())
            best_epoch = history.best_epoch or epochs
            outcomes.append(
                _scaled_outcome(
                    outputs, post.likelihood, y_val, inner, best_epoch, variance_scaling
                )
            )
    k, best = 0, None
    for j, outcome in enumerate(outcomes):
        if math.isfinite(outcome.val_ll) and (best is None or outcome.val_ll > best.val_ll):
            k, best = j, outcome
    if best is None:
        best = Outcome(float("nan"), 1.0, float("nan"), epochs)
    best_epoch = best.best_epoch
    candidate = grid[k]
    mixture = [k]
    refit_epochs = epochs if method in TRAJECTORY_METHODS else max(1, best_epoch)
    scaler = split.standardizer()
    x, y = scaler.transform_x(split.x_train), scaler.transform_y(split.y_train)
    x_test = scaler.transform_x(split.x_test)
    joined = method in JOIN_GRID_MEMBERS and bool(kept)
    if joined:  # greedy selection on the grid's validation outputs, then one stacked refit
        grid_fit: CandidateFit = kept["fit"]
        grid_post, members_of = grid_fit.posterior, grid_fit.members

        def mixture_ll(candidates: list[int]) -> float:  # of their grid members on validation
            predictive = grid_post.likelihood.predictive(
                kept["val_outputs"][members_of(candidates)]
            )
            return score(predictive, y_val, inner).ll

        mixture = greedy_selection(mixture_ll, len(grid), start=k, start_score=best.val_ll_unscaled)
        post = _refit_mixture(
            method,
            [grid[c] for c in mixture],
            [outcomes[c].best_epoch for c in mixture],
            n_hidden,
            seed,
            (x, y),
        )
        outputs = post.sample_outputs(x_test, generator=_predict_generator())
        grid_outputs = grid_post.sample_outputs(inner.transform_x(split.x_test))
        grid_outputs = grid_outputs[members_of(mixture)]
        grid_outputs = _restandardise(grid_outputs, inner, scaler)
        outputs = torch.cat([outputs, grid_outputs.to(outputs)])
    else:
        refit_candidate = _refit_candidate(method, candidate)
        post = build(method, refit_candidate, split.x_train.shape[1], n_hidden, seed)
        key = None
        if method in SHARED_POINT_FIT:  # the same network for every such method: train it once
            settings = (sorted(candidate.items()), n_hidden, seed, refit_epochs, BATCH_SIZE, LR)
            key = "refit" + repr(settings) + _digest(x, y)
        if key in _POINT_FITS:
            post.model.load_state_dict(_POINT_FITS[key])
            if method == "laplace":  # the curvature at the shared MAP network, as Laplace.fit
                post.fit((x, y))
        else:
            try:
                _fit(post, method, x, y, refit_candidate, refit_epochs, seed)
            except bdl.TrainingDivergedError as err:  # scored with the last good weights
                if err.last_good_epoch == 0:
                    raise
                diverged.append(
                    {"fit": "refit", "epoch": err.epoch, "last_good_epoch": err.last_good_epoch}
                )
            if key is not None:
                _POINT_FITS[key] = copy.deepcopy(post.model.state_dict())
        try:
            outputs = post.sample_outputs(x_test, generator=_predict_generator())
        except ValueError:  # a sampler's refit diverged before it kept a sample: no posterior
            if not diverged or diverged[-1]["fit"] != "refit":
                raise
            diverged[-1]["no_posterior"] = True
            failed = {"candidate": k, "epochs": refit_epochs, "diverged": diverged}
            return Scores(float("nan"), float("nan")), failed
    unscaled = score(post.likelihood.predictive(outputs), split.y_test, scaler)
    if best.scale != 1.0:
        outputs = _rescaled(outputs, best.scale, post.likelihood)
    scores = score(post.likelihood.predictive(outputs), split.y_test, scaler)
    selection = {
        "candidate": k,
        "val_ll": best.val_ll,
        "val_ll_unscaled": best.val_ll_unscaled,
        "variance_scale": best.scale,
        "epochs": refit_epochs,
        "ll_unscaled": unscaled.ll,
        "mixed": len(mixture) > 1,
    }
    if joined:
        selection["mixture"] = mixture
    if diverged:
        selection["diverged"] = diverged
    return scores, selection


def _refit_candidate(method: str, candidate: dict) -> dict:
    """``candidate`` with the refit's build options (:data:`REFIT_BUILD`)."""
    if method not in REFIT_BUILD:
        return candidate
    return {**candidate, "build": {**candidate.get("build", {}), **REFIT_BUILD[method]}}


def _candidates(grid: Sequence[dict]) -> list[Candidate]:
    """The grid's candidates as the library's :class:`~bayesdl.posteriors.selection.Candidate`."""
    return [Candidate(c["precision"], c.get("beta", 0.0), c.get("dropout", 0.0)) for c in grid]


def _stacked_grid(
    method: str,
    grid: Sequence[dict],
    n_hidden: int,
    seed: int,
    inner: Standardizer,
    epochs: int,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    kept: dict | None = None,
    variance_scaling: bool | None = None,
) -> list[Outcome]:
    """Every candidate of ``grid`` in one stacked fit (see :data:`STACKED_GRID`): candidates
    differ only in their precision, likelihood ``beta`` and dropout rate, each a group of members
    with its own weight decay, beta and rate.

    ``train`` holds standardised inputs and targets, ``val`` standardised inputs and targets on
    the original scale. Returns the :class:`Outcome` of each candidate, as the loop over
    candidates would. ``kept``, if given, receives the stacked fit
    (:class:`~bayesdl.posteriors.selection.CandidateFit`, ``"fit"``) and, for methods whose
    draws are the members, their validation outputs ``(M, B, 2)`` (``"val_outputs"``).
    """
    varying = ("precision", "beta", "dropout")
    shared = [{n: v for n, v in c.items() if n not in varying} for c in grid]
    if any(rest != shared[0] for rest in shared):
        raise ValueError(
            f"{method}: a stacked grid may vary only precision, beta and dropout between "
            f"candidates, got {shared}"
        )
    (xi, yi), (xv, y_val) = train, val
    yv = inner.transform_y(y_val)
    options = dict(grid[0].get("build", {}))
    per = options.pop("n_members", 1)
    key = None
    if method in SHARED_POINT_FIT:  # the same networks for every such method: train them once
        settings = (_candidates(grid), per, n_hidden, seed, epochs, BATCH_SIZE, LR)
        key = "grid" + repr(settings) + _digest(xi, yi, xv, yv)
    if key in _POINT_FITS:
        fit = _POINT_FITS[key]
    else:
        fit = _train_stack(method, options, grid, per, n_hidden, seed, epochs, (xi, yi), (xv, yv))
        if key is not None:
            _POINT_FITS[key] = fit
    post, member_best = fit.posterior, fit.member_epochs
    draws = 100 if method == "swag" else per  # outputs per candidate
    if method not in ("laplace", "mc_dropout"):
        n_samples = draws * len(grid) if method == "swag" else None
        outputs = post.sample_outputs(xv, n_samples, generator=_predict_generator())
    outcomes = []
    for k in range(len(grid)):
        if method == "laplace":  # the Laplace predictive around candidate k's MAP network
            model, member_likelihood = post.member(k)
            laplace = bdl.Laplace(model, member_likelihood, **options)
            laplace.fit((xi, yi))
            candidate_outputs = laplace.sample_outputs(xv, generator=_predict_generator())
            likelihood = member_likelihood
        elif method == "mc_dropout":  # its network with an nn.Dropout at the candidate's rate
            model, member_likelihood = post.member(k)
            alone = mlp(xi.shape[1], n_hidden, grid[k]["dropout"])
            alone.load_state_dict(model.state_dict())
            dropout = bdl.MCDropout(alone, member_likelihood)
            candidate_outputs = dropout.sample_outputs(xv, generator=_predict_generator())
            likelihood = member_likelihood
        else:
            candidate_outputs = outputs[k * draws : (k + 1) * draws]
            likelihood = post.likelihood
        best_epoch = max(member_best[k * per : (k + 1) * per])
        outcomes.append(
            _scaled_outcome(
                candidate_outputs, likelihood, y_val, inner, best_epoch, variance_scaling
            )
        )
    if kept is not None:  # the grid fit itself, for JOIN_GRID_MEMBERS
        kept.update(fit=fit)
        if method not in ("laplace", "mc_dropout", "swag"):
            kept["val_outputs"] = outputs
    return outcomes


def _refit_mixture(
    method: str,
    candidates: Sequence[dict],
    epochs: Sequence[int],
    n_hidden: int,
    seed: int,
    train: tuple[Tensor, Tensor],
):
    """Refit the mixture's ``candidates`` on the whole split (standardised ``train``) as one
    stacked program: each gets :data:`REFIT_BUILD`'s members with its own weight decay, beta
    and dropout rate, kept at its own epoch count ``epochs[i]`` (its best validation epoch in
    the grid; ``TrainConfig.member_epochs``). Member ``m`` of candidate ``i`` is the network a
    refit of that candidate alone would give, up to the initialisation and data order."""
    refits = [_refit_candidate(method, c) for c in candidates]
    options = dict(refits[0].get("build", {}))
    per = options.pop("n_members", 1)
    member_epochs = [max(1, e) for e in epochs for _ in range(per)]
    fit = _train_stack(
        method,
        options,
        refits,
        per,
        n_hidden,
        seed,
        max(member_epochs),
        train,
        member_epochs=member_epochs,
    )
    return fit.posterior


def _restandardise(outputs: Tensor, old: Standardizer, new: Standardizer) -> Tensor:
    """Gaussian outputs ``[mu, log_var]`` ``(S, B, 2)`` of targets standardised by ``old`` as
    outputs for targets standardised by ``new`` (the same distributions on the original scale)."""
    ratio = old.y_std / new.y_std
    mean = outputs[..., :1] * ratio + (old.y_mean - new.y_mean) / new.y_std
    return torch.cat([mean, outputs[..., 1:] + 2.0 * math.log(ratio)], dim=-1)


def _digest(*tensors: Tensor) -> str:
    """A fingerprint of the dtypes, shapes and values of ``tensors``."""
    digest = hashlib.sha1()
    for t in tensors:
        digest.update(repr((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train_stack(
    method: str,
    options: dict,
    grid: Sequence[dict],
    per: int,
    n_hidden: int,
    seed: int,
    epochs: int,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None = None,
    member_epochs: Sequence[int] | None = None,
) -> CandidateFit:
    """The stacked fit of :func:`_stacked_grid` and :func:`_refit_mixture` (standardised
    ``train`` and ``val``; ``per`` members per candidate of ``grid``, each with its own decay,
    beta and dropout rate) by :func:`bayesdl.posteriors.selection.fit_candidates`: the members
    and each one's best validation epoch (its epoch count without ``val``)."""
    xi, _ = train
    torch.manual_seed(seed)
    net = mlp(xi.shape[1], n_hidden, max(c.get("dropout", 0.0) for c in grid))
    build = None  # deep ensembles: independently initialised members
    if method == "swag":

        def build(net, likelihood, n):
            return bdl.SWAG(net, likelihood, n_members=n, reinitialize=False, seed=seed, **options)

    elif method != "deep_ensemble":  # point estimates (Laplace's MAP, MC dropout's network):

        def build(net, likelihood, n):  # same start, same data order
            return bdl.DeepEnsemble(
                net, likelihood, n_members=n, reinitialize=False, independent_data_order=False
            )

    return fit_candidates(
        net,
        bdl.Gaussian(),
        _candidates(grid),
        train,
        n_members=per,
        val=val,
        epochs=epochs,
        member_epochs=member_epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        patience=patience_for(method, epochs),
        seed=seed,
        build=build,
    )


@dataclass
class Result:
    """Per-split scores of one method on one data set."""

    rmse: list[float] = field(default_factory=list)
    ll: list[float] = field(default_factory=list)
    seconds: float = 0.0
    selection: list[dict] = field(default_factory=list)

    @staticmethod
    def _mean_se(values: list[float]) -> list[float]:
        """Mean and standard error over the splits with a score (see :data:`DIVERGENCE`)."""
        t = torch.tensor(values, dtype=torch.float64)
        t = t[torch.isfinite(t)]
        se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else 0.0
        return [float(t.mean()) if len(t) else float("nan"), se]

    def summary(self) -> dict:
        return {
            "rmse": self._mean_se(self.rmse),
            "ll": self._mean_se(self.ll),
            "seconds": round(self.seconds, 2),
            "n_splits": len(self.rmse),
            "n_scored": sum(math.isfinite(v) for v in self.ll),
            "per_split": {"rmse": self.rmse, "ll": self.ll, "selection": self.selection},
        }


def run_dataset(
    ds: UCIDataset,
    method: str,
    n_splits: int,
    epochs_scale: float,
    log,
    seed: int = SEED,
    variance_scaling: bool | None = None,
) -> dict:
    """One method on the first ``n_splits`` splits of ``ds``: the summary of :class:`Result`."""
    result = Result()
    for i in range(min(n_splits, ds.n_splits)):
        start = time.perf_counter()
        scores, selection = run_method(
            method,
            ds.split(i),
            ds.n_hidden,
            ds.n_epochs,
            epochs_scale,
            seed=seed,
            variance_scaling=variance_scaling,
        )
        seconds = time.perf_counter() - start
        result.seconds += seconds
        result.rmse.append(scores.rmse)
        result.ll.append(scores.ll)
        result.selection.append(selection)
        log(
            f"{ds.name} {method} split {i}: rmse {scores.rmse:.4g} ll {scores.ll:.4g} "
            f"({seconds:.1f} s, candidate {selection['candidate']}, "
            f"{selection['epochs']} epochs"
            + (f", diverged: {selection['diverged']}" if "diverged" in selection else "")
            + ")"
        )
    return {**result.summary(), "splits_in_data": ds.n_splits}


# ----------------------------------------------------------------------------- the table
def _fmt(value: list[float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def write_markdown(results: dict, reference: dict | None, path: Path) -> None:
    """Two tables (RMSE, lower is better; LL, higher is better), data sets as rows, published
    columns then ours, the best mean of each row in bold."""
    datasets = results["datasets"]
    ours = sorted({m for per in datasets.values() for m in per})
    lines = ["# UCI regression benchmark", ""]
    settings = results.get("protocol", {})
    parts = results.get("merged_from")
    if parts:
        lines += ["Merged from:", ""]
        lines += [
            f"- `{p['file']}` ({', '.join(p['methods'])}): "
            f"{json.dumps(p['protocol'], sort_keys=True)}"
            for p in parts
        ]
        lines.append("")
    elif settings:
        lines += [f"Protocol: {json.dumps(settings, sort_keys=True)}", ""]
    for metric, higher, digits in (("rmse", False, 3), ("ll", True, 3)):
        published = []
        if reference is not None:
            published = sorted(
                {m for name in datasets for m in reference.get(metric, {}).get(name, {})}
            )
        title = "RMSE (lower is better)" if metric == "rmse" else "test log-likelihood (higher)"
        lines += [f"## {title}", ""]
        header = ["data set", *(f"{m} (published)" for m in published), *ours]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in sorted(datasets):
            cells: list[tuple[float, str] | None] = []
            pub = reference.get(metric, {}).get(name, {}) if reference else {}
            for m in published:
                cells.append((pub[m][0], _fmt(pub[m], 2)) if m in pub else None)
            for m in ours:
                r = datasets[name].get(m)
                if r is None:
                    cells.append(None)
                    continue
                text = _fmt(r[metric], digits)
                if r.get("n_scored", r["n_splits"]) < r["n_splits"]:
                    text += f" ({r['n_scored']} of {r['n_splits']} splits)"
                cells.append((r[metric][0], text))
            finite = [c[0] for c in cells if c is not None and math.isfinite(c[0])]
            best = (max if higher else min)(finite) if finite else None
            row = [name]
            for c in cells:
                if c is None:
                    row.append("")
                else:
                    row.append(f"**{c[1]}**" if best is not None and c[0] == best else c[1])
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "## Seconds per split (and the splits run)",
        "",
        "| data set | " + " | ".join(ours) + " |",
        "|" + "---|" * (len(ours) + 1),
    ]
    full = dict.fromkeys(ours, 0.0)
    for name in sorted(datasets):
        row = [name]
        for m in ours:
            r = datasets[name].get(m)
            if r is None:
                row.append("")
                continue
            per_split = r["seconds"] / max(1, r["n_splits"])
            full[m] += per_split * r.get("splits_in_data", r["n_splits"])
            row.append(f"{per_split:.1f} ({r['n_splits']})")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "| all splits of these sets, estimated (min) | "
        + " | ".join(f"{full[m] / 60:.0f}" for m in ours)
        + " |",
        "",
    ]
    events = []
    for name in sorted(datasets):
        for m in ours:
            r = datasets[name].get(m)
            picks = (r or {}).get("per_split", {}).get("selection", [])
            grid = sum(e["fit"] == "grid" for p in picks for e in p.get("diverged", []))
            refit = [e for p in picks for e in p.get("diverged", []) if e["fit"] == "refit"]
            if grid or refit:
                text = f"- {name}, {m}: {grid} grid fit(s) diverged (not chosen)"
                if refit:
                    epochs = ", ".join(f"{e['epoch']} (kept {e['last_good_epoch']})" for e in refit)
                    text += f"; {len(refit)} refit(s) diverged at epoch {epochs}"
                    lost = sum(e.get("no_posterior", False) for e in refit)
                    if lost:
                        text += f"; {lost} of them before the first sample (no score)"
                events.append(text)
    if events:
        lines += ["## Diverged fits", "", *events, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- the command
def _names(text: str | None, choices: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(choices)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise SystemExit(
            f"unknown {what} {unknown or text!r}; choose from {', '.join(choices)} "
            "(comma-separated)."
        )
    return names


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.uci", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data-dir", type=Path, help="folder holding one folder per data set")
    parser.add_argument("--datasets", help="comma-separated data set folder names (default: all)")
    parser.add_argument("--methods", help="comma-separated registered methods (default: all)")
    parser.add_argument("--splits", type=int, default=None, help="use the first K splits")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="epochs = n_epochs * F")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="seed of the initialisations and data orders (another seed measures seed noise)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--markdown", type=Path, default=None, help="default: OUT with .md")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these JSON files, no runs")
    parser.add_argument(
        "--variance-scaling",
        action="store_true",
        help="fit a noise-variance factor per candidate on validation (see VARIANCE_SCALING)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    variance_scaling = VARIANCE_SCALING or args.variance_scaling
    if args.merge:
        results: dict = {"datasets": {}}
        for path in args.merge:
            part = json.loads(path.read_text())
            results.setdefault("protocol", part.get("protocol", {}))
            results.setdefault("merged_from", []).append(
                {
                    "file": path.name,
                    "protocol": part.get("protocol", {}),
                    "methods": sorted({m for per in part["datasets"].values() for m in per}),
                }
            )
            for name, per in part["datasets"].items():
                results["datasets"].setdefault(name, {}).update(per)
        if args.data_dir is not None:  # runs of an older version did not record the split count
            for name, per in results["datasets"].items():
                if (args.data_dir / name).is_dir():
                    n = load_uci(args.data_dir / name).n_splits
                    for r in per.values():
                        r.setdefault("splits_in_data", n)
    else:
        if args.data_dir is None or not args.data_dir.is_dir():
            raise SystemExit(f"--data-dir must be a folder of UCI data sets, got {args.data_dir}.")
        if args.splits is not None and args.splits < 1:
            raise SystemExit(f"--splits must be a positive integer, got {args.splits}.")
        if not args.epochs_scale > 0:
            raise SystemExit(f"--epochs-scale must be positive, got {args.epochs_scale}.")
        available = sorted(p.name for p in args.data_dir.iterdir() if (p / "data.txt").is_file())
        datasets = _names(args.datasets, available, "data set")
        methods = _names(args.methods, bdl.available_posteriors(), "method")
        n_splits = args.splits or 10**9
        results = {
            "protocol": {
                "epochs_scale": args.epochs_scale,
                "batch_size": BATCH_SIZE,
                "lr": LR,
                "lrs": {m: LRS[m] for m in methods if m in LRS},
                "build": {m: BUILD[m] for m in methods if m in BUILD},
                "val_fraction": VAL_FRACTION,
                "max_steps": MAX_STEPS,
                "precisions": list(PRECISIONS),
                "grids": {m: list(GRIDS.get(m, DEFAULT_GRID)) for m in methods},
                "patience_fraction": PATIENCE_FRACTION,
                "min_patience": MIN_PATIENCE,
                "stacked_grid": sorted(STACKED_GRID),
                "join_grid_members": sorted(JOIN_GRID_MEMBERS),
                "mixture": "greedy, stacked refit",
                "refit_build": REFIT_BUILD,
                "variance_scaling": variance_scaling,
                "splits": args.splits,
                "seed": args.seed,
                "threads": torch.get_num_threads(),
            },
            "datasets": {},
        }
        for name in datasets:
            ds = load_uci(args.data_dir / name)
            for method in methods:
                summary = run_dataset(
                    ds, method, n_splits, args.epochs_scale, log, args.seed, variance_scaling
                )
                results["datasets"].setdefault(name, {})[method] = summary
                _write(results, args)  # after every method: a long run keeps what it finished
    _write(results, args)
    log(f"wrote {args.out} and {args.markdown or args.out.with_suffix('.md')}")
    return results


def _write(results: dict, args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else None
    write_markdown(results, reference, args.markdown or args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
