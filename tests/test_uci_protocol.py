"""The UCI benchmark protocol end to end on a tiny fixture: 2 splits, 2 epochs, every method."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import bayesdl as bdl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import uci  # noqa: E402
from tests.test_uci_loader import write_uci  # noqa: E402

REFERENCE = {
    "rmse": {"toy": {"published_a": [1.0, 0.1], "published_b": [0.05, 0.01]}},
    "ll": {"toy": {"published_a": [-9.0, 0.1]}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("uci")
    write_uci(root / "toy", n_rows=40, n_splits=3)
    (root / "toy" / "n_epochs.txt").write_text("2\n")
    (root / "toy" / "n_hidden.txt").write_text("8\n")
    ref = root / "published.json"
    ref.write_text(json.dumps(REFERENCE))
    out = root / "out" / "uci.json"
    results = uci.main(
        ["--data-dir", str(root), "--splits", "2", "--out", str(out), "--reference", str(ref),
         "--quiet"]
    )  # fmt: skip
    return results, out


def test_json_structure_every_method_finite(run):
    results, out = run
    assert json.loads(out.read_text()) == results
    per = results["datasets"]["toy"]
    assert set(per) == set(bdl.available_posteriors())
    for method, r in per.items():
        assert r["n_splits"] == 2, method
        for metric in ("rmse", "ll"):
            mean, se = r[metric]
            assert math.isfinite(mean) and math.isfinite(se) and se >= 0, (method, metric)
            values = r["per_split"][metric]
            assert len(values) == 2
            assert mean == pytest.approx(sum(values) / 2)
            # standard error of the mean over 2 splits: |a - b| / 2
            assert se == pytest.approx(abs(values[0] - values[1]) / 2)
        assert r["rmse"][0] > 0 and r["seconds"] >= 0
        for sel in r["per_split"]["selection"]:
            assert 0 <= sel["candidate"] < len(uci.GRIDS.get(method, uci.DEFAULT_GRID))
            assert 1 <= sel["epochs"] <= 2


def test_markdown_table_bolds_the_best(run):
    _, out = run
    text = out.with_suffix(".md").read_text()
    assert "| data set | published_a (published) | published_b (published) |" in text
    rmse_row = next(line for line in text.splitlines() if line.startswith("| toy"))
    # published_b's RMSE 0.05 is better than anything a 2-epoch net reaches on this target
    assert "**0.05 ± 0.01**" in rmse_row and rmse_row.count("**") == 2
    rows = [line for line in text.splitlines() if line.startswith("| toy")]
    assert len(rows) == 3 and rows[1].count("**") == 2  # RMSE, LL, seconds
    assert "**-9.00" not in rows[1]  # our nets beat a log-likelihood of -9 on this data
    assert rows[2].count("(2)") == len(bdl.available_posteriors())  # seconds per split (2 run)
    assert "all splits of these sets, estimated (min)" in text


def test_score_is_the_mixture_log_density_on_the_original_scale():
    """Against a direct computation: the mixture of the members' Gaussians, mapped back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = 5 + 3 * x[:, 0] + torch.randn(30, generator=g, dtype=torch.float64)
    scaler = bdl.data.Standardizer.fit(x, y)
    post = bdl.DeepEnsemble(uci.mlp(3, 4).double(), "gaussian", n_members=3, seed=0)
    xs = scaler.transform_x(x)
    scores = uci.score(post.predict(xs), y, scaler)
    out = post.sample_outputs(xs)  # (3, 30, 2)
    mean = out[..., 0] * scaler.y_std + scaler.y_mean
    std = (out[..., 1].exp() + post.likelihood.min_variance).sqrt() * scaler.y_std
    dens = torch.distributions.Normal(mean, std).log_prob(y).exp().mean(0)
    assert scores.ll == pytest.approx(float(dens.log().mean()), rel=1e-9)
    assert scores.rmse == pytest.approx(float(((mean.mean(0) - y) ** 2).mean().sqrt()), rel=1e-9)


def test_merge_combines_runs(run, tmp_path):
    results, _ = run
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    per = results["datasets"]["toy"]
    a.write_text(json.dumps({"datasets": {"toy": {"deterministic": per["deterministic"]}}}))
    b.write_text(json.dumps({"datasets": {"other": {"swag": per["swag"]}}}))
    merged = uci.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m.json"), "--quiet"])
    assert set(merged["datasets"]) == {"toy", "other"}
    assert (tmp_path / "m.md").is_file()


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--data-dir must be a folder"):
        uci.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o.json")])
    write_uci(tmp_path / "toy")
    with pytest.raises(SystemExit, match=r"unknown method \['nope'\]"):
        uci.main(["--data-dir", str(tmp_path), "--methods", "nope", "--out", "o.json"])
    with pytest.raises(SystemExit, match=r"unknown data set \['boston'\]"):
        uci.main(["--data-dir", str(tmp_path), "--datasets", "boston", "--out", "o.json"])


def test_module_entry_point():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.uci", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--epochs-scale" in proc.stdout and "--data-dir" in proc.stdout


@pytest.mark.parametrize("method", ["deterministic", "laplace"])
def test_stacked_grid_gives_the_candidates_of_separate_fits(tmp_path, monkeypatch, method):
    """The grid trained as one stacked program (candidates as members with their own weight
    decay, same start and data order) selects from the same numbers as one fit per candidate."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    torch.set_default_dtype(torch.float64)
    try:
        stacked = uci.run_method(method, split, n_hidden=8, n_epochs=30)
        monkeypatch.setattr(uci, "STACKED_GRID", frozenset())
        looped = uci.run_method(method, split, n_hidden=8, n_epochs=30)
    finally:
        torch.set_default_dtype(torch.float32)
    assert stacked[1]["candidate"] == looped[1]["candidate"]
    assert stacked[1]["epochs"] == looped[1]["epochs"]
    assert stacked[1]["val_ll"] == pytest.approx(looped[1]["val_ll"], rel=1e-6)
    assert stacked[0].ll == pytest.approx(looped[0].ll, rel=1e-6)


def _inner_split(split):
    n = len(split.x_train)
    n_val = round(uci.VAL_FRACTION * n)
    inner = bdl.data.Standardizer.fit(split.x_train[: n - n_val], split.y_train[: n - n_val])
    xi = inner.transform_x(split.x_train[: n - n_val])
    yi = inner.transform_y(split.y_train[: n - n_val])
    val = (inner.transform_x(split.x_train[n - n_val :]), split.y_train[n - n_val :])
    return inner, (xi, yi), val


def test_stacked_grid_groups_candidates_by_beta(tmp_path, monkeypatch):
    """Candidates with different likelihood ``beta`` train as members of one stacked fit; every
    candidate's validation score lands at its own place in the grid (interleaved on purpose)."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    grid = (
        {"precision": 0.3, "beta": 1.0},
        {"precision": 3.0, "beta": 0.0},
        {"precision": 30.0, "beta": 1.0},
        {"precision": 0.3, "beta": 0.0},
    )
    monkeypatch.setitem(uci.GRIDS, "deterministic", grid)
    torch.set_default_dtype(torch.float64)
    try:
        inner, (xi, yi), val = _inner_split(split)
        stacked = uci._stacked_grid("deterministic", grid, 8, 0, inner, 30, (xi, yi), val)
        for k, candidate in enumerate(grid):  # each candidate alone, as a one-member stack
            alone = uci._stacked_grid("deterministic", [candidate], 8, 0, inner, 30, (xi, yi), val)
            assert stacked[k].val_ll == pytest.approx(alone[0].val_ll, rel=1e-6)
            assert stacked[k].scale == pytest.approx(alone[0].scale, rel=1e-6)
            assert stacked[k].best_epoch == alone[0].best_epoch
        monkeypatch.setattr(uci, "STACKED_GRID", frozenset())
        looped = uci.run_method("deterministic", split, n_hidden=8, n_epochs=30)
        monkeypatch.undo()
        monkeypatch.setitem(uci.GRIDS, "deterministic", grid)
        grouped = uci.run_method("deterministic", split, n_hidden=8, n_epochs=30)
    finally:
        torch.set_default_dtype(torch.float32)
    assert stacked[0].val_ll != pytest.approx(stacked[3].val_ll)  # beta changes the fit
    assert grouped[1] == pytest.approx(looped[1], rel=1e-6)


def test_mc_dropout_grid_is_one_stack_of_dropout_rates(tmp_path, monkeypatch):
    """MC dropout's rates train as members of one stacked fit; each candidate is scored by the MC
    dropout predictive of its own network (an ``nn.Dropout`` at its rate, the member's weights)
    and reports its own best epoch."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    grid = uci.GRIDS["mc_dropout"]
    assert len({c["dropout"] for c in grid}) == len(grid) > 1
    evaluated, fits = [], []
    sample, fit = bdl.MCDropout.sample_outputs, bdl.DeepEnsemble.fit

    def sample_spy(post, *args, **kwargs):
        evaluated.append(post)
        return sample(post, *args, **kwargs)

    def fit_spy(self, *args, **kwargs):
        fits.append((self, fit(self, *args, **kwargs)))
        return fits[-1][1]

    monkeypatch.setattr(bdl.MCDropout, "sample_outputs", sample_spy)
    monkeypatch.setattr(bdl.DeepEnsemble, "fit", fit_spy)
    inner, train, val = _inner_split(split)
    outcomes = uci._stacked_grid("mc_dropout", grid, 8, 0, inner, 30, train, val)
    monkeypatch.setattr(bdl.MCDropout, "sample_outputs", sample)
    ((stack, history),) = fits
    assert len(outcomes) == len(evaluated) == stack.n_members == len(grid)
    members = stack.sample_outputs(val[0])
    for k, (post, candidate) in enumerate(zip(evaluated, grid, strict=True)):
        assert isinstance(post, bdl.MCDropout)
        assert [m.p for m in post.dropout_layers.values()] == [candidate["dropout"]]
        with torch.no_grad():
            torch.testing.assert_close(post.model.eval()(val[0]), members[k])
        assert math.isfinite(outcomes[k].val_ll)
        assert outcomes[k].best_epoch == history.member_best_epochs[k]
    # the loop over separate fits runs too, on the same protocol (masks differ: not equal)
    monkeypatch.setattr(uci, "STACKED_GRID", frozenset())
    scores, selection = uci.run_method("mc_dropout", split, n_hidden=8, n_epochs=30)
    assert math.isfinite(scores.ll) and 0 <= selection["candidate"] < len(grid)


def test_stacked_grid_refuses_candidates_that_differ_in_build_options(tmp_path):
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    scaler = split.standardizer()
    x, y = scaler.transform_x(split.x_train), scaler.transform_y(split.y_train)
    grid = ({"precision": 1.0, "build": {"n_members": 2}}, {"precision": 3.0})
    with pytest.raises(ValueError, match="may vary only precision, beta and dropout"):
        uci._stacked_grid("deep_ensemble", grid, 8, 0, scaler, 2, (x, y), (x, split.y_train))


def test_dropout_candidates_join_the_stack_without_changing_the_others(tmp_path):
    """Deep ensembles' dropout candidates are members with their own rate in the same stacked
    fit; the members at rate 0 draw no masks, so the other candidates' scores are those of the
    grid without the dropout candidate (no early stop within these 10 epochs)."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    base = [
        {"precision": 0.3, "build": {"n_members": 2}},
        {"precision": 3.0, "build": {"n_members": 2}},
    ]
    grid = [*base, {"precision": 0.3, "dropout": 0.5, "build": {"n_members": 2}}]
    torch.set_default_dtype(torch.float64)
    try:
        inner, train, val = _inner_split(split)
        without = uci._stacked_grid("deep_ensemble", base, 8, 0, inner, 10, train, val)
        with_dropout = uci._stacked_grid("deep_ensemble", grid, 8, 0, inner, 10, train, val)
        no_dropout = [{**c, "dropout": 0.0} for c in grid]
        plain = uci._stacked_grid("deep_ensemble", no_dropout, 8, 0, inner, 10, train, val)
    finally:
        torch.set_default_dtype(torch.float32)
    for k in range(len(base)):
        assert with_dropout[k].val_ll == pytest.approx(without[k].val_ll, rel=1e-9)
        assert with_dropout[k].best_epoch == without[k].best_epoch
    assert with_dropout[2].val_ll != pytest.approx(
        plain[2].val_ll, rel=1e-6
    )  # the rate changes the fit


def test_point_estimate_and_laplace_share_one_grid_fit(tmp_path, monkeypatch):
    """Laplace's grid trains the point estimate's networks: after the point estimate's grid on
    the same data it trains nothing and scores exactly what a fresh fit gives."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    inner, train, val = _inner_split(split)
    grid = uci.GRIDS["laplace"]
    monkeypatch.setattr(uci, "_POINT_FITS", {})
    fits = []
    fit = bdl.DeepEnsemble.fit

    def fit_spy(self, *args, **kwargs):
        fits.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(bdl.DeepEnsemble, "fit", fit_spy)
    fresh = uci._stacked_grid("laplace", grid, 8, 0, inner, 30, train, val)
    uci._POINT_FITS.clear()
    uci._stacked_grid("deterministic", grid, 8, 0, inner, 30, train, val)
    shared = uci._stacked_grid("laplace", grid, 8, 0, inner, 30, train, val)
    assert len(fits) == 2  # the fresh Laplace grid and the point estimate's: none for `shared`
    assert shared == fresh
    other_seed = uci._stacked_grid("laplace", grid, 8, 1, inner, 30, train, val)
    assert len(fits) == 3 and other_seed != fresh  # another seed is another fit
    # the whole protocol: the refit is shared too, and Laplace's scores are those of its own run
    monkeypatch.setattr(bdl.DeepEnsemble, "fit", fit)
    uci._POINT_FITS.clear()
    alone = uci.run_method("laplace", split, n_hidden=8, n_epochs=30)
    uci._POINT_FITS.clear()
    point = uci.run_method("deterministic", split, n_hidden=8, n_epochs=30)
    trained = []
    monkeypatch.setattr(uci, "_fit", lambda *args, **kwargs: trained.append(args))
    after = uci.run_method("laplace", split, n_hidden=8, n_epochs=30)
    assert trained == []  # neither the grid nor the refit trained again
    assert after == alone
    assert math.isfinite(point[0].ll)


def test_variance_scale_of_a_single_draw_is_the_mean_squared_z_score(monkeypatch):
    """One Gaussian per point: the factor maximising the validation log-likelihood is, in closed
    form, ``s = mean((y - mu)^2 / sigma^2)``; the scaled log-likelihood is the closed form at it
    (on the original scale: minus ``log(y_std)``) and never below the unscaled one."""
    monkeypatch.setattr(uci, "VARIANCE_SCALING", True)
    g = torch.Generator().manual_seed(0)
    n = 400
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    log_var = 0.3 * torch.randn(n, generator=g, dtype=torch.float64) - 1.0
    y_std = 2.5  # targets on the original scale: standardised * 2.5 + 4
    z = mu + 3.0 * torch.exp(0.5 * log_var) * torch.randn(n, generator=g, dtype=torch.float64)
    inner = bdl.data.Standardizer(
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        4.0,
        y_std,
    )
    y = z * y_std + 4.0
    outputs = torch.stack([mu, log_var], dim=-1).unsqueeze(0)  # (1, n, 2)
    outcome = uci._scaled_outcome(outputs, bdl.Gaussian(min_variance=0.0), y, inner, best_epoch=7)
    s = float(((z - mu) ** 2 / log_var.exp()).mean())
    assert 6.0 < s < 12.0  # the spread was three times the predicted one
    assert outcome.scale == pytest.approx(s, rel=1e-6)
    var = s * log_var.exp()
    closed = float((-0.5 * torch.log(2 * math.pi * var) - 0.5 * (z - mu) ** 2 / var).mean())
    assert outcome.val_ll == pytest.approx(closed - math.log(y_std), rel=1e-7)  # L-BFGS optimum
    raw = float(
        (-0.5 * torch.log(2 * math.pi * log_var.exp()) - 0.5 * (z - mu) ** 2 / log_var.exp()).mean()
    )
    assert outcome.val_ll_unscaled == pytest.approx(raw - math.log(y_std), rel=1e-9)
    assert outcome.val_ll > outcome.val_ll_unscaled and outcome.best_epoch == 7


def test_variance_scaling_moves_the_log_likelihood_not_the_rmse(tmp_path, monkeypatch):
    """The protocol with and without the validation variance factor: the same networks, so the
    same RMSE; the scaled test log-likelihood is the refit's outputs with their noise variances
    times the factor, and the unscaled one is recorded beside it."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    monkeypatch.setattr(uci, "VARIANCE_SCALING", True)
    scores, selection = uci.run_method("deep_ensemble", split, n_hidden=8, n_epochs=2)
    assert selection["variance_scale"] > 0 and selection["variance_scale"] != 1.0
    assert scores.ll != pytest.approx(selection["ll_unscaled"], rel=1e-6)
    assert selection["val_ll"] >= selection["val_ll_unscaled"] - 1e-9
    monkeypatch.setattr(uci, "VARIANCE_SCALING", False)
    plain, unscaled = uci.run_method("deep_ensemble", split, n_hidden=8, n_epochs=2)
    assert unscaled["variance_scale"] == 1.0 and unscaled["val_ll"] == unscaled["val_ll_unscaled"]
    assert plain.ll == unscaled["ll_unscaled"]
    assert plain.rmse == pytest.approx(scores.rmse, rel=1e-6)
    if unscaled["candidate"] == selection["candidate"]:
        assert plain.ll == pytest.approx(selection["ll_unscaled"], rel=1e-9)


def test_restandardise_keeps_the_distribution_on_the_original_scale():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(3, 7, 2, generator=g, dtype=torch.float64)
    old = bdl.data.Standardizer(torch.zeros(1), torch.ones(1), 2.0, 0.5)
    new = bdl.data.Standardizer(torch.zeros(1), torch.ones(1), -1.0, 3.0)
    moved = uci._restandardise(outputs, old, new)
    torch.testing.assert_close(new.inverse_mean(moved[..., 0]), old.inverse_mean(outputs[..., 0]))
    torch.testing.assert_close(
        new.inverse_variance(moved[..., 1].exp()), old.inverse_variance(outputs[..., 1].exp())
    )


def test_deep_ensemble_keeps_the_chosen_candidates_grid_members(tmp_path, monkeypatch):
    """The refitted members and the chosen candidate's grid members form one equal-weight
    mixture: its mean is the average of the two groups' means."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    preds, moved = [], []
    score, restandardise = uci.score, uci._restandardise
    monkeypatch.setattr(uci, "score", lambda pred, *a: preds.append(pred) or score(pred, *a))
    monkeypatch.setattr(
        uci, "_restandardise", lambda *a: moved.append(restandardise(*a)) or moved[-1]
    )
    joined, selection = uci.run_method("deep_ensemble", split, n_hidden=8, n_epochs=3)
    joined_pred = preds[-1]  # the test predictive
    (grid_members,) = moved
    per = uci.GRIDS["deep_ensemble"][0]["build"]["n_members"]
    assert grid_members.shape == (per, len(split.x_test), 2)
    monkeypatch.setattr(uci, "JOIN_GRID_MEMBERS", frozenset())
    alone, again = uci.run_method("deep_ensemble", split, n_hidden=8, n_epochs=3)
    assert again["candidate"] == selection["candidate"] and len(moved) == 1
    refit = preds[-1].n_samples  # the refit's members (REFIT_BUILD), weighted by count
    assert refit == uci.REFIT_BUILD["deep_ensemble"]["n_members"]
    expected = (refit * preds[-1].mean + per * grid_members[..., 0].mean(0)) / (refit + per)
    torch.testing.assert_close(joined_pred.mean, expected)
    assert joined.ll != pytest.approx(alone.ll, rel=1e-6)


def test_variance_scaling_flag_turns_it_on(tmp_path, monkeypatch):
    monkeypatch.setattr(uci, "VARIANCE_SCALING", False)  # the default, whatever it becomes
    write_uci(tmp_path / "toy", n_rows=40, n_splits=1)
    (tmp_path / "toy" / "n_epochs.txt").write_text("2\n")
    (tmp_path / "toy" / "n_hidden.txt").write_text("8\n")
    out = tmp_path / "uci.json"
    args = ["--data-dir", str(tmp_path), "--methods", "deterministic", "--out", str(out)]
    scaled = uci.main([*args, "--quiet", "--variance-scaling"])
    plain = uci.main([*args, "--quiet"])  # the flag does not outlive its run
    assert not plain["protocol"]["variance_scaling"] and scaled["protocol"]["variance_scaling"]
    (before,) = plain["datasets"]["toy"]["deterministic"]["per_split"]["selection"]
    (after,) = scaled["datasets"]["toy"]["deterministic"]["per_split"]["selection"]
    assert before["variance_scale"] == 1.0 and after["variance_scale"] != 1.0


def test_seed_flag_changes_the_fits_and_is_recorded(tmp_path):
    write_uci(tmp_path / "toy", n_rows=40, n_splits=1)
    (tmp_path / "toy" / "n_epochs.txt").write_text("2\n")
    (tmp_path / "toy" / "n_hidden.txt").write_text("8\n")
    args = ["--data-dir", str(tmp_path), "--methods", "deep_ensemble", "--quiet"]
    first = uci.main([*args, "--out", str(tmp_path / "a.json")])
    again = uci.main([*args, "--out", str(tmp_path / "b.json"), "--seed", "0"])
    other = uci.main([*args, "--out", str(tmp_path / "c.json"), "--seed", "1"])
    assert first["protocol"]["seed"] == 0 and other["protocol"]["seed"] == 1
    # the deep-ensemble predictive's settings are recorded with the run
    assert first["protocol"]["refit_build"] == uci.REFIT_BUILD
    assert first["protocol"]["mixture"] == "greedy, stacked refit"
    assert first["protocol"]["join_grid_members"] == ["deep_ensemble"]

    def ll(results):
        return results["datasets"]["toy"]["deep_ensemble"]["per_split"]["ll"]

    assert ll(first) == ll(again)  # the default seed is 0 and runs are reproducible
    assert ll(other) != ll(first)


def _record_stacks_and_scores(monkeypatch):
    """Record ``run_method``'s stacked fits (their keyword view) and scored predictives."""
    stacks, preds = [], []
    train_stack, score = uci._train_stack, uci.score

    def recorded(method, options, grid, per, n_hidden, seed, epochs, train, *rest, **kw):
        stacks.append(
            {"grid": list(grid), "per": per, "seed": seed, "epochs": epochs, "rows": len(train[0])}
            | kw
        )
        return train_stack(method, options, grid, per, n_hidden, seed, epochs, train, *rest, **kw)

    monkeypatch.setattr(uci, "_train_stack", recorded)
    monkeypatch.setattr(uci, "score", lambda pred, *a: preds.append(pred) or score(pred, *a))
    return stacks, preds


@pytest.mark.parametrize("prefer_mix", [True, False])
def test_deep_ensemble_mixes_candidates_when_validation_prefers_it(
    tmp_path, monkeypatch, prefer_mix
):
    """The other candidates' grid members join the predictive exactly when the validation
    log-likelihood of the mixture beats the chosen candidate's alone, and every candidate in
    the mixture is refitted in one stacked program: its own decay, beta and dropout rate, kept
    at its own best grid epoch."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    grid = (
        {"precision": 0.3, "build": {"n_members": 2}},
        {"precision": 3.0, "beta": 1.0, "dropout": 0.2, "build": {"n_members": 2}},
    )
    monkeypatch.setitem(uci.GRIDS, "deep_ensemble", grid)
    # candidate 0 is the choice; its members' own validation log-likelihood (the one the
    # mixture's is compared with) is set below or above any finite value
    stacked_grid = uci._stacked_grid
    alone = -math.inf if prefer_mix else math.inf
    trained = []

    def chosen_first(*args, **kwargs):
        real = stacked_grid(*args, **kwargs)  # trains the grid (kept for the join)
        trained.extend(real)
        return [uci.Outcome(alone, 1.0, 0.0, o.best_epoch) for o in real[:1]] + [
            uci.Outcome(-1.0, 1.0, -1.0, o.best_epoch) for o in real[1:]
        ]

    monkeypatch.setattr(uci, "_stacked_grid", chosen_first)
    moved = []
    restandardise = uci._restandardise
    monkeypatch.setattr(
        uci, "_restandardise", lambda *a: moved.append(restandardise(*a)) or moved[-1]
    )
    stacks, preds = _record_stacks_and_scores(monkeypatch)
    _, selection = uci.run_method("deep_ensemble", split, n_hidden=8, n_epochs=3)
    assert selection["candidate"] == 0 and selection["mixed"] is prefer_mix
    assert selection["mixture"] == ([0, 1] if prefer_mix else [0])
    assert len(moved[0]) == (4 if prefer_mix else 2)
    grid_fit, refit = stacks  # the grid, then one refit of the whole mixture
    assert len(grid_fit["grid"]) == 2 and "member_epochs" not in grid_fit
    n = uci.REFIT_BUILD["deep_ensemble"]["n_members"]
    chosen = grid[: 1 + prefer_mix]
    assert refit["seed"] == 0 and refit["per"] == n and refit["rows"] == len(split.x_train)
    # each chosen candidate with its own precision, beta and dropout rate
    assert uci._candidates(refit["grid"]) == uci._candidates(chosen)
    best = [max(1, o.best_epoch) for o in trained[: len(chosen)]]
    assert refit["member_epochs"] == [e for e in best for _ in range(n)]
    assert refit["epochs"] == max(best) and selection["epochs"] == best[0]
    # the refits and the chosen candidates' grid members weigh alike in the test predictive
    assert preds[-1].n_samples == len(chosen) * (n + 2)


def test_refit_candidate_overrides_only_the_listed_build_options(monkeypatch):
    monkeypatch.setattr(uci, "REFIT_BUILD", {"deep_ensemble": {"n_members": 7}})
    candidate = {"precision": 0.3, "beta": 1.0, "build": {"n_members": 5, "other": 1}}
    refit = uci._refit_candidate("deep_ensemble", candidate)
    assert refit == {"precision": 0.3, "beta": 1.0, "build": {"n_members": 7, "other": 1}}
    assert candidate["build"]["n_members"] == 5  # the grid's candidate is left as it was
    assert uci._refit_candidate("swag", candidate) is candidate
    refit["build"].pop("other")
    post = uci.build("deep_ensemble", refit, n_features=3, n_hidden=4, seed=0)
    assert post.n_members == 7


def test_diverged_fits_are_not_chosen_and_are_recorded(tmp_path, monkeypatch):
    """A grid candidate whose fit diverges loses the selection; a refit that diverges after a
    good epoch is scored with the weights it kept; both are recorded and listed in the table.
    A refit that diverges in its first epoch stops the run."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    fit = uci._fit
    calls = []

    def diverging(post, method, x, y, candidate, epochs, seed, val=None):
        calls.append(val is None)
        history = fit(post, method, x, y, candidate, 2, seed, val=val)  # two good epochs
        if val is None or len(calls) == 2:  # the refit, and the second grid candidate: NaN
            raise bdl.TrainingDivergedError(3, last_good)
        return history

    monkeypatch.setattr(uci, "_fit", diverging)
    last_good = 2
    scores, selection = uci.run_method("ivon", split, n_hidden=8, n_epochs=5)
    assert calls == [False, False, False, True]  # three grid candidates, then the refit
    assert selection["candidate"] != 1 and math.isfinite(scores.ll)
    assert selection["diverged"] == [
        {"fit": "grid", "candidate": 1, "epoch": 3},
        {"fit": "refit", "epoch": 3, "last_good_epoch": 2},
    ]
    results = {"datasets": {"toy": {"ivon": {
        "rmse": [scores.rmse, 0.0], "ll": [scores.ll, 0.0], "seconds": 1.0, "n_splits": 1,
        "per_split": {"selection": [selection]},
    }}}}  # fmt: skip
    uci.write_markdown(results, None, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "## Diverged fits" in text
    assert "toy, ivon: 1 grid fit(s) diverged (not chosen); 1 refit(s) diverged at epoch 3" in text
    calls.clear()
    last_good = 0
    with pytest.raises(bdl.TrainingDivergedError):
        uci.run_method("ivon", split, n_hidden=8, n_epochs=5)


def test_a_sampler_refit_that_diverges_before_its_first_sample_has_no_score(tmp_path, monkeypatch):
    """SG-MCMC keeps no sample before its burn-in: a refit that diverges there leaves nothing
    to predict with. The split gets no score (NaN, recorded), and the summary averages the
    splits that have one and says how many."""
    write_uci(tmp_path / "toy", n_rows=60, n_splits=1)
    split = bdl.data.load_uci(tmp_path / "toy").split(0)
    fit = uci._fit

    def diverging(post, method, x, y, candidate, epochs, seed, val=None):
        if val is None:  # the refit: diverges in epoch 2, before any sample
            raise bdl.TrainingDivergedError(2, 1)
        return fit(post, method, x, y, candidate, epochs, seed, val=val)

    monkeypatch.setattr(uci, "_fit", diverging)
    scores, selection = uci.run_method("sgmcmc", split, n_hidden=8, n_epochs=60)
    assert math.isnan(scores.ll) and math.isnan(scores.rmse)
    assert selection["diverged"][-1] == {
        "fit": "refit", "epoch": 2, "last_good_epoch": 1, "no_posterior": True
    }  # fmt: skip
    result = uci.Result(rmse=[scores.rmse, 1.0, 3.0], ll=[scores.ll, -1.0, -2.0])
    result.selection = [selection, {}, {}]
    summary = result.summary()
    assert summary["n_scored"] == 2 and summary["n_splits"] == 3
    assert summary["ll"][0] == pytest.approx(-1.5) and summary["rmse"][0] == pytest.approx(2.0)
    uci.write_markdown({"datasets": {"toy": {"sgmcmc": summary}}}, None, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "-1.500 ± 0.500 (2 of 3 splits)" in text
    assert "1 of them before the first sample (no score)" in text
