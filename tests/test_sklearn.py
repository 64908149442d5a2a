"""The scikit-learn estimators: sklearn's own estimator checks, composition (Pipeline,
GridSearchCV, clone, pickle) and what the uncertainty says (interval coverage on a
heteroscedastic problem, epistemic variance away from the data)."""

from __future__ import annotations

import doctest
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

import bayesdl as bdl
import bayesdl.sklearn
from bayesdl.sklearn import BayesianMLPClassifier, BayesianMLPRegressor

# Tiny and quick: sklearn's checks fit hundreds of times. Few epochs, so a larger step.
TINY = {"hidden": (8,), "epochs": 5, "n_members": 2, "lr": 0.05}

# Methods whose draws are made per row of the batch: a row's Monte Carlo average depends on
# the rows drawn with it, so the two batch-invariance checks cannot apply (see the docstrings).
PER_ROW_DRAWS = ("mc_dropout", "laplace", "mean_field_vi")
BATCH_INVARIANCE = {
    "check_methods_sample_order_invariance": "draws are made per row of the batch",
    "check_methods_subset_invariance": "draws are made per row of the batch",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: a second torch thread does not help them, and on a busy
    machine its spin-waiting made this file over ten times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_failures(estimator) -> dict[str, str]:
    return BATCH_INVARIANCE if estimator.method in PER_ROW_DRAWS else {}


@parametrize_with_checks(
    [
        BayesianMLPClassifier(**TINY),
        BayesianMLPRegressor(**TINY),
        *(BayesianMLPClassifier(method=m, **TINY) for m in PER_ROW_DRAWS),
        *(BayesianMLPRegressor(method=m, **TINY) for m in PER_ROW_DRAWS),
    ],
    expected_failed_checks=_expected_failures,
    xfail_strict=True,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---------------------------------------------------------------------------- data
def _blobs(n=120, seed=0):
    return make_blobs(n_samples=n, centers=3, n_features=4, random_state=seed)


def _heteroscedastic(n, seed, lo=-2.0, hi=2.0):
    """``y = sin(2x) + sd(x) * noise`` with ``sd`` rising from 0.1 to 0.9 over ``[lo, hi]``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, size=(n, 1))
    sd = 0.1 + 0.2 * (x[:, 0] - lo)
    return x, np.sin(2 * x[:, 0]) + sd * rng.normal(size=n)


# ---------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", bdl.available_posteriors())
def test_every_method_classifies(method):
    X, y = _blobs()
    labels = np.array(["ant", "bee", "cat"])[y]
    # IVON's lr is its own step, divided by its Hessian estimate (start 1), not Adam's
    options = {**TINY, "lr": 0.5} if method == "ivon" else TINY
    clf = BayesianMLPClassifier(method=method, **options, random_state=0).fit(X, labels)
    assert list(clf.classes_) == ["ant", "bee", "cat"] and clf.n_features_in_ == 4
    proba = clf.predict_proba(X)
    assert proba.shape == (120, 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(1)])
    assert clf.score(X, labels) > 0.9  # three well separated blobs
    u = clf.predict_uncertainty(X)
    assert all(u[k].shape == (120,) for k in ("total", "aleatoric", "epistemic"))
    assert (u["aleatoric"] >= 0).all() and (u["epistemic"] >= 0).all()
    np.testing.assert_allclose(u["total"], u["aleatoric"] + u["epistemic"], atol=1e-6)
    if method == "deterministic":  # one draw: nothing to disagree on
        np.testing.assert_array_equal(u["epistemic"], 0.0)


@pytest.mark.parametrize("method", bdl.available_posteriors())
def test_every_method_regresses(method):
    X, y = _heteroscedastic(200, seed=0)
    reg = BayesianMLPRegressor(method=method, **TINY, random_state=0).fit(X, y)
    mean = reg.predict(X)
    lower, upper = reg.predict_interval(X, level=0.8)
    assert mean.shape == lower.shape == upper.shape == (200,) and mean.dtype == np.float64
    assert (lower < mean).all() and (mean < upper).all()
    u = reg.predict_uncertainty(X)
    assert (u["aleatoric"] > 0).all() and (u["epistemic"] >= 0).all()
    np.testing.assert_allclose(u["total"], u["aleatoric"] + u["epistemic"], rtol=1e-6)


# ---------------------------------------------------------------------------- options
def test_mc_dropout_gets_a_rate_by_default_and_refuses_none():
    X, y = _blobs(60)
    clf = BayesianMLPClassifier(method="mc_dropout", **TINY, random_state=0).fit(X, y)
    assert clf.posterior_.model.spec["dropout"] > 0
    ensemble = BayesianMLPClassifier(**TINY, random_state=0).fit(X, y)
    assert ensemble.posterior_.model.spec["dropout"] == 0
    with pytest.raises(ValueError, match="needs dropout > 0"):
        BayesianMLPClassifier(method="mc_dropout", dropout=0.0, **TINY).fit(X, y)


def test_method_options_reach_the_posterior():
    X, y = _blobs(60)
    clf = BayesianMLPClassifier(method="laplace", method_options={"hessian": "diag"}, **TINY)
    assert clf.fit(X, y).posterior_.options()["hessian"] == "diag"
    with pytest.raises(ValueError, match="must not set"):
        BayesianMLPClassifier(method_options={"seed": 3}, **TINY).fit(X, y)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "bogus"}, "unknown posterior 'bogus'"),
        ({"hidden": "wide"}, "hidden must be a tuple"),
        ({"hidden": (8, 0)}, "hidden must be a tuple"),
        ({"epochs": 0}, "epochs must be"),
        ({"method_options": [1]}, "method_options must be None or a dict"),
    ],
)
def test_bad_parameters_are_refused_at_fit(params, message):
    X, y = _blobs(30)
    clf = BayesianMLPClassifier(**{**TINY, **params})  # stored as given, checked in fit
    with pytest.raises((ValueError, TypeError), match=message):
        clf.fit(X, y)


def test_one_class_is_refused():
    X, _ = _blobs(30)
    with pytest.raises(ValueError, match="two classes"):
        BayesianMLPClassifier(**TINY).fit(X, np.zeros(30))


# ---------------------------------------------------------------------------- randomness
def test_random_state_reproduces_and_leaves_global_rng_alone():
    X, y = _blobs()
    before = torch.get_rng_state()
    a = BayesianMLPClassifier(method="mc_dropout", **TINY, random_state=3).fit(X, y)
    assert torch.equal(torch.get_rng_state(), before)
    b = BayesianMLPClassifier(method="mc_dropout", **TINY, random_state=3).fit(X, y)
    c = BayesianMLPClassifier(method="mc_dropout", **TINY, random_state=4).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X))
    assert not np.allclose(a.predict_proba(X), c.predict_proba(X))


# ---------------------------------------------------------------------------- units and shapes
@pytest.mark.parametrize("shape", [(200,), (200, 1), (200, 2)])
def test_regression_results_are_in_the_units_of_y(shape):
    X, y = _heteroscedastic(200, seed=1)
    y = np.column_stack([y, np.cos(X[:, 0])])[:, : (shape[1] if len(shape) == 2 else 1)]
    y = y.reshape(shape)
    # Changing y's units changes nothing the network sees: every result moves with them.
    scale = np.array([100.0, 0.01])[: y.shape[1] if y.ndim == 2 else 1].reshape(shape[1:])
    shift = np.array([7.0, -3.0])[: y.shape[1] if y.ndim == 2 else 1].reshape(shape[1:])
    a = BayesianMLPRegressor(**TINY, random_state=0).fit(X, y)
    b = BayesianMLPRegressor(**TINY, random_state=0).fit(X, y * scale + shift)
    assert a.predict(X).shape == shape
    np.testing.assert_allclose(b.predict(X), a.predict(X) * scale + shift, rtol=1e-4)
    for lo_a, lo_b in zip(a.predict_interval(X), b.predict_interval(X), strict=True):
        assert lo_a.shape == shape
        np.testing.assert_allclose(lo_b, lo_a * scale + shift, rtol=1e-4)
    ua, ub = a.predict_uncertainty(X), b.predict_uncertainty(X)
    for key in ("aleatoric", "epistemic"):
        np.testing.assert_allclose(ub[key], ua[key] * scale**2, rtol=1e-3, atol=1e-12)


# ---------------------------------------------------------------------------- composition
def test_in_a_pipeline_with_a_scaler_and_with_text_columns():
    X, y = _blobs()
    pipe = make_pipeline(StandardScaler(), BayesianMLPClassifier(**TINY, random_state=0))
    assert pipe.fit(X * 1000.0, y).score(X * 1000.0, y) > 0.9
    # Text goes through a ColumnTransformer: here a column that names the blob.
    rng = np.random.default_rng(0)
    mixed = np.empty((len(y), 2), dtype=object)
    mixed[:, 0] = rng.normal(size=len(y))
    mixed[:, 1] = np.array(["north", "east", "west"])[y]
    encode = ColumnTransformer([("num", StandardScaler(), [0]), ("text", OneHotEncoder(), [1])])
    pipe = make_pipeline(encode, BayesianMLPClassifier(**TINY, random_state=0))
    assert pipe.fit(mixed, y).score(mixed, y) == 1.0
    assert pipe[-1].n_features_in_ == 4  # 1 number + 3 categories


def test_grid_search_over_hidden():
    X, y = _blobs(90)
    grid = GridSearchCV(
        BayesianMLPClassifier(**TINY, random_state=0), {"hidden": [(2,), (16, 16)]}, cv=3
    ).fit(X, y)
    assert len(grid.cv_results_["params"]) == 2
    best = grid.best_estimator_
    assert best.posterior_.model.spec["hidden"] == list(grid.best_params_["hidden"])
    assert grid.predict(X).shape == (90,)


def test_clone_and_pickle():
    X, y = _heteroscedastic(120, seed=2)
    reg = BayesianMLPRegressor(**TINY, method="swag", random_state=0).fit(X, y)
    fresh = clone(reg)
    assert fresh.get_params() == reg.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(fresh)
    with pytest.raises(NotFittedError):
        fresh.predict(X)
    back = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(back.predict(X), reg.predict(X))
    for got, want in zip(back.predict_interval(X), reg.predict_interval(X), strict=True):
        np.testing.assert_array_equal(got, want)
    assert back.get_params() == reg.get_params()


# ---------------------------------------------------------------------------- the uncertainty
@pytest.fixture(scope="module")
def heteroscedastic_fit():
    X, y = _heteroscedastic(800, seed=0)
    return BayesianMLPRegressor(
        hidden=(32,), epochs=30, batch_size=64, lr=0.01, n_members=5, random_state=0
    ).fit(X, y)


def test_interval_covers_its_level_and_follows_the_noise(heteroscedastic_fit):
    X, y = _heteroscedastic(4000, seed=1)  # fresh points from the same distribution
    lower, upper = heteroscedastic_fit.predict_interval(X, level=0.9)
    covered = np.mean((lower <= y) & (y <= upper))
    assert 0.85 <= covered <= 0.95, covered
    # The noise sd is 0.1-0.3 on the left and 0.7-0.9 on the right: intervals widen with it.
    width = upper - lower
    assert width[X[:, 0] > 1].mean() > 2 * width[X[:, 0] < -1].mean()


def test_epistemic_grows_away_from_the_training_data(heteroscedastic_fit):
    near, _ = _heteroscedastic(500, seed=3)  # inside [-2, 2], where it was trained
    far = np.concatenate([np.linspace(4, 6, 50), np.linspace(-6, -4, 50)])[:, None]
    u_near = heteroscedastic_fit.predict_uncertainty(near)["epistemic"]
    u_far = heteroscedastic_fit.predict_uncertainty(far)["epistemic"]
    assert np.median(u_far) > 3 * np.median(u_near)


def test_module_example_runs():
    assert doctest.testmod(bayesdl.sklearn).failed == 0
