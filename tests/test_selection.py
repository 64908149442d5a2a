"""Deep ensembles from candidate settings: greedy ensemble selection against closed-form
mixture log-likelihoods, the stacked candidate fit, and ``DeepEnsemble.from_candidates`` end to
end on tiny data (predict, save/load, determinism, bad input)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import bayesdl as bdl
from bayesdl.posteriors.selection import (
    DEFAULT_CANDIDATES,
    Candidate,
    MemberBetaGaussian,
    fit_candidates,
    greedy_selection,
    mixture_log_likelihood,
)


def _normal(y: float, mu: float, var: float) -> float:
    return math.exp(-0.5 * (y - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _closed_form(members: list[tuple[float, float]], y: list[float]):
    """The mean log-density of ``y`` under equal-weight mixtures of the listed Gaussian
    ``(mean, variance)`` candidates (one member each), written out by hand."""

    def ll(chosen: list[int]) -> float:
        return sum(
            math.log(sum(_normal(t, *members[c]) for c in chosen) / len(chosen)) for t in y
        ) / len(y)

    return ll


def _outputs(members: list[tuple[float, float]], n_rows: int) -> torch.Tensor:
    """Network outputs ``(M, B, 2)`` (mean, log-variance) of constant members."""
    rows = [[[mu, math.log(var)]] * n_rows for mu, var in members]
    return torch.tensor(rows, dtype=torch.float64)


def test_mixture_log_likelihood_is_the_closed_form():
    members = [(-1.0, 1.0), (1.0, 1.0), (0.0, 4.0)]
    y = [-1.0, 1.0, 0.5]
    ll = _closed_form(members, y)
    outputs = _outputs(members, len(y))
    target = torch.tensor(y, dtype=torch.float64)
    for chosen in ([0], [2], [1, 0], [0, 1, 2], [0, 0, 1]):
        got = mixture_log_likelihood(bdl.Gaussian(min_variance=0.0), outputs[chosen], target)
        assert got == pytest.approx(ll(chosen), rel=1e-12)


def test_greedy_selection_picks_by_validation_likelihood():
    """Singles: -1.961, -1.627 (best), -1.706. With 1: adding 0 gives -1.465, adding 2
    -1.570, so 0 joins; adding 2 to [1, 0] gives -1.539 < -1.465, so selection stops."""
    ll = _closed_form([(-1.0, 1.0), (1.0, 1.0), (0.0, 4.0)], [-1.0, 1.0, 0.5])
    singles = [ll([j]) for j in range(3)]
    assert [round(v, 3) for v in singles] == [-1.961, -1.627, -1.706]
    assert round(ll([1, 0]), 3) == -1.465 and round(ll([1, 2]), 3) == -1.570
    assert round(ll([1, 0, 2]), 3) == -1.539
    assert greedy_selection(ll, 3) == [1, 0]
    # a given start and its score: nothing beats a start whose score is +inf
    assert greedy_selection(ll, 3, start=2, start_score=math.inf) == [2]
    assert greedy_selection(ll, 3, max_size=1) == [1]
    # from 2: adding 1 (-1.570) beats adding 0 (-1.744), then 0 joins (-1.539)
    assert greedy_selection(ll, 3, start=2) == [2, 1, 0]


def test_selection_with_replacement_is_caruanas():
    """y = (0, 0, 0, 3), A = N(0, 1), B = N(3, 1): A is best alone, A + B beats it, and with
    replacement A's weight grows to 3/4 (weights 2/3, 3/4 and 4/5: -1.488, -1.470, -1.476),
    while without replacement the mixture stays at 1/2 each."""
    ll = _closed_form([(0.0, 1.0), (3.0, 1.0)], [0.0, 0.0, 0.0, 3.0])
    assert ll([0, 1, 0, 0]) > ll([0, 1, 0]) > ll([0, 1]) > ll([0])
    assert ll([0, 1, 0, 0, 0]) < ll([0, 1, 0, 0]) and ll([0, 1, 0, 0, 1]) < ll([0, 1, 0, 0])
    assert greedy_selection(ll, 2) == [0, 1]
    assert greedy_selection(ll, 2, replacement=True) == [0, 1, 0, 0]
    assert greedy_selection(ll, 2, replacement=True, max_size=3) == [0, 1, 0]


def test_greedy_selection_never_takes_nan_and_stops_without_gain():
    gain = {1: 0.3, 2: 0.5, 3: -0.2, 4: 0.1}
    calls = []

    def ll(chosen):
        calls.append(list(chosen))
        # additive gains with a size penalty: 2 then 1 help, then nothing does
        return -1.0 + sum(gain.get(c, 0.0) for c in chosen[1:]) - 0.25 * max(0, len(chosen) - 2)

    assert greedy_selection(ll, 5, start=0, start_score=-1.0) == [0, 2, 1]
    assert calls[:4] == [[0, j] for j in range(1, 5)]  # the first round tries every other
    assert greedy_selection(ll, 5, start=0, start_score=0.0) == [0]
    assert greedy_selection(lambda c: math.nan, 5, start=0, start_score=-1.0) == [0]
    # a NaN candidate ahead of a better one does not hide it
    assert greedy_selection(lambda c: math.nan if 1 in c else float(len(c)), 3) == [0, 2]
    with pytest.raises(ValueError, match="no candidate has a finite"):
        greedy_selection(lambda c: -math.inf, 3)
    with pytest.raises(ValueError, match=r"start must be a candidate index in \[0, 3\)"):
        greedy_selection(ll, 3, start=3)


def test_member_beta_gaussian_is_the_library_loss_per_member():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    lik = MemberBetaGaussian([0.0, 0.5, 1.0])
    got = lik.training_loss(params, y)
    for m, beta in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(got[m], bdl.Gaussian(beta=beta).training_loss(params[m], y))
    torch.testing.assert_close(lik.nll(params, y), bdl.Gaussian().nll(params, y))
    # early stopping: the NLL of the beta = 0 member, the mean's squared error of the others
    val = lik.validation_loss(params, y)
    assert val.shape == (3, 5)
    torch.testing.assert_close(val[0], lik.nll(params, y)[0])
    for m in (1, 2):
        torch.testing.assert_close(val[m], 0.5 * (y - params[m, :, 0]) ** 2)
    assert lik.name == "gaussian" and lik.options()["beta"] == 0.0  # saved as the plain one
    for loss in (lik.training_loss, lik.validation_loss):
        with pytest.raises(ValueError, match=r"3 stacked members, \(M, B, 2\); got \(2, 5, 2\)"):
            loss(params[:2], y)
    with pytest.raises(ValueError, match="beta must be a number"):
        MemberBetaGaussian([0.0, 2.0])


def _data(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x[:, 0] - x[:, 1] ** 2 + 0.3 * torch.randn(n, generator=g)
    return x, y


def test_fit_candidates_gives_each_member_its_decay_and_epoch_count(monkeypatch):
    """Decay ``precision / N`` per member, and ``member_epochs`` (3, 5) holds per member the
    network of the same stack trained for that count alone (beta and dropout per member)."""
    x, y = _data(50)
    candidates = [Candidate(0.3, beta=1.0, dropout=0.2), Candidate(3.0)]
    net = bdl.models.mlp(3, 2, hidden=(8,), dropout=0.5)
    seen = []
    fit = bdl.DeepEnsemble.fit
    monkeypatch.setattr(
        bdl.DeepEnsemble, "fit", lambda self, *a, **kw: seen.append(kw) or fit(self, *a, **kw)
    )

    def stack(epochs, member_epochs=None):
        done = fit_candidates(
            net, "gaussian", candidates, (x, y), n_members=1, epochs=epochs,
            member_epochs=member_epochs, seed=0,
        )  # fmt: skip
        return done.posterior.sample_outputs(x), done.member_epochs

    together, counts = stack(5, [3, 5])
    assert seen[0]["weight_decay"] == [0.3 / 50, 3.0 / 50]
    assert counts == [3, 5]
    torch.testing.assert_close(together[0], stack(3)[0][0])
    torch.testing.assert_close(together[1], stack(5)[0][1])
    assert not torch.allclose(together[0], stack(5)[0][0])
    assert isinstance(net[2], nn.Dropout) and net[2].p == 0.5  # the template is left as it was


def test_from_candidates_predicts_saves_loads_and_is_seeded(tmp_path):
    x, y = _data(80)
    x_val, y_val = _data(20, seed=1)
    options = {"hidden": (8,), "epochs": 4, "n_members": 2, "refit_members": 2}
    ens = bdl.DeepEnsemble.from_candidates((x, y), (x_val, y_val), seed=0, **options)
    sel = ens.selection
    assert sel.candidates == DEFAULT_CANDIDATES
    # the winner alone starts the mixture, and the mixture is no worse on validation
    assert sel.chosen[0] == max(range(5), key=sel.val_log_likelihood.__getitem__)
    assert sel.val_log_likelihood_chosen >= max(sel.val_log_likelihood)
    assert ens.n_members == len(sel.chosen) * (2 + 2)
    assert type(ens.likelihood) is bdl.Gaussian and ens.likelihood.beta == 0.0
    pred = ens.predict(x_val)
    assert pred.mean.shape == (20,) and torch.isfinite(pred.log_prob(y_val)).all()
    # save / load: the default network is rebuilt from the file, members and all
    path = tmp_path / "ens.safetensors"
    bdl.save(ens, path)
    loaded = bdl.load(path)
    assert isinstance(loaded, bdl.DeepEnsemble) and loaded.n_members == ens.n_members
    torch.testing.assert_close(loaded.sample_outputs(x_val), ens.sample_outputs(x_val))
    # the same seed, the same ensemble; another seed, another
    again = bdl.DeepEnsemble.from_candidates((x, y), (x_val, y_val), seed=0, **options)
    assert again.selection == sel
    torch.testing.assert_close(again.sample_outputs(x_val), ens.sample_outputs(x_val))
    other = bdl.DeepEnsemble.from_candidates((x, y), (x_val, y_val), seed=1, **options)
    assert not torch.equal(other.sample_outputs(x_val)[:2], ens.sample_outputs(x_val)[:2])


def test_from_candidates_joins_the_refits_and_the_chosen_search_members():
    """Without the refit, the ensemble is exactly the chosen candidates' search members."""
    x, y = _data(60)
    x_val, y_val = _data(15, seed=1)
    candidates = [Candidate(0.3), Candidate(3.0, dropout=0.2)]
    options = {"candidates": candidates, "hidden": (8,), "epochs": 3, "n_members": 2}
    search_only = bdl.DeepEnsemble.from_candidates(
        (x, y), (x_val, y_val), refit_members=0, **options
    )
    net = bdl.models.mlp(3, 2, hidden=(8,), dropout=0.2)
    search = fit_candidates(
        net, "gaussian", candidates, (x, y), n_members=2, val=(x_val, y_val), epochs=3,
        patience=20, seed=0,
    )  # fmt: skip
    chosen = list(search_only.selection.chosen)
    want = search.posterior.sample_outputs(x_val)[search.members(chosen)]
    torch.testing.assert_close(search_only.sample_outputs(x_val), want)
    refit_only = bdl.DeepEnsemble.from_candidates(
        (x, y), (x_val, y_val), refit_members=3, keep_search_members=False, **options
    )
    joined = bdl.DeepEnsemble.from_candidates((x, y), (x_val, y_val), refit_members=3, **options)
    assert refit_only.selection.chosen == search_only.selection.chosen
    both = torch.cat([refit_only.sample_outputs(x_val), want])
    torch.testing.assert_close(joined.sample_outputs(x_val), both)


def test_from_candidates_with_a_validation_fraction_and_classification():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    ens = bdl.DeepEnsemble.from_candidates(
        (x, y), likelihood="categorical", hidden=(8,), epochs=3, n_members=1, refit_members=1
    )
    # the beta-NLL candidates are for Gaussians: the default search keeps the other three
    assert all(c.beta == 0 for c in ens.selection.candidates)
    assert len(ens.selection.candidates) == 3
    assert ens.predict(x[:5]).probs.shape == (5, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"candidates": []}, ValueError, "candidates is empty"),
        ({"candidates": [{"precision": 1.0}]}, ValueError, r"unknown settings \['precision'\]"),
        ({"candidates": ["big"]}, TypeError, "candidate 0 must be"),
        ({"candidates": [{"dropout": 1.5}]}, ValueError, r"dropout must be a rate in \[0, 1\)"),
        ({"val": (torch.randn(10, 4), torch.randn(10))}, ValueError, "must agree beyond"),
        ({"val": (torch.randn(3, 3), torch.randn(3))}, ValueError, "val has 3 rows"),
        ({"val_fraction": 0.05}, ValueError, "leaves 2 validation rows"),
        ({"train": (torch.randn(40, 3), torch.randn(39))}, ValueError, "same number of rows"),
        ({"train": torch.randn(40, 3)}, TypeError, r"train must be a pair \(x, y\)"),
        ({"n_members": 0}, ValueError, "n_members must be an integer >= 1"),
        ({"refit_members": 0, "keep_search_members": False}, ValueError, "leaves no members"),
        (
            {"model": nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))},
            ValueError,
            "need an nn.Dropout layer",
        ),
        (
            {"likelihood": "categorical", "candidates": [Candidate(beta=1.0)]},
            ValueError,
            "needs the heteroscedastic Gaussian",
        ),
    ],
)
def test_from_candidates_refuses_bad_input(kwargs, error, match):
    x, y = _data(40)
    train = kwargs.pop("train", (x, y))
    if "likelihood" in kwargs:
        y = (y > 0).long()
        train = (x, y)
    with pytest.raises(error, match=match):
        bdl.DeepEnsemble.from_candidates(train, epochs=1, **kwargs)


def test_the_docstring_example_runs():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(bdl.DeepEnsemble.from_candidates, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4
    assert bdl.Candidate is Candidate  # exported at the top level
