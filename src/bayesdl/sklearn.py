"""scikit-learn estimators over the library's posteriors on its own networks.

:class:`BayesianMLPClassifier` and :class:`BayesianMLPRegressor` put an approximate posterior
(any registered method: ``bayesdl.available_posteriors()``) over the weights of a
:func:`bayesdl.models.mlp` network and behave like any scikit-learn estimator: constructor
parameters are only stored, ``fit(X, y)`` learns, ``predict`` / ``predict_proba`` / ``score``
answer, ``get_params`` / ``set_params`` / ``clone`` / pickling work, and they compose with
``Pipeline`` and ``GridSearchCV``. On top of that they say how sure they are:

* ``predict_uncertainty(X)``: the aleatoric and epistemic parts (and their sum);
* ``BayesianMLPRegressor.predict_interval(X, level)``: central intervals of the predictive
  mixture, in the units of ``y``.

>>> from sklearn.datasets import make_regression
>>> X, y = make_regression(n_samples=100, n_features=3, noise=5.0, random_state=0)
>>> reg = BayesianMLPRegressor(epochs=5, n_members=2, random_state=0).fit(X, y)
>>> reg.predict(X[:4]).shape, reg.predict_interval(X[:4], level=0.9)[0].shape
((4,), (4,))

Inputs are numeric arrays ``(N, F)``, standardised with the training rows' mean and standard
deviation inside ``fit`` (a constant column is only centred). Text or categorical columns
belong in a ``Pipeline`` with a ``ColumnTransformer`` in front, as for any scikit-learn
estimator. The networks train in float32; results are float64 numpy arrays.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from bayesdl.likelihoods import Categorical, Gaussian
from bayesdl.models import mlp
from bayesdl.posteriors import Posterior, get_posterior
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn: the estimator's own method

    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)


__all__ = ["BayesianMLPClassifier", "BayesianMLPRegressor"]

#: Dropout rate that ``dropout=None`` gives ``method="mc_dropout"`` (the others get none).
MC_DROPOUT_RATE = 0.1
#: Constructor options the estimator sets itself, from its own parameters.
_OWN_OPTIONS = {"n_members": "n_members", "seed": "random_state"}


class _BayesianMLP(BaseEstimator):
    """What both estimators share: parameters, the network, the posterior, the input scaling.

    Subclasses supply the likelihood and the encoding of ``y`` (:meth:`_encode_targets`).
    """

    def __init__(
        self,
        method: str = "deep_ensemble",
        hidden: tuple[int, ...] = (50,),
        activation: str = "relu",
        dropout: float | None = None,
        n_members: int = 5,
        method_options: dict | None = None,
        epochs: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        val_fraction: float = 0.0,
        patience: int | None = None,
        n_samples: int | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool = False,
    ) -> None:
        self.method = method
        self.hidden = hidden
        self.activation = activation
        self.dropout = dropout
        self.n_members = n_members
        self.method_options = method_options
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.patience = patience
        self.n_samples = n_samples
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- hooks
    def _encode_targets(self, y: np.ndarray) -> tuple[np.ndarray, object]:
        """Validated ``y`` -> (training targets, likelihood); sets the target's fitted state."""
        raise NotImplementedError

    def _validate_xy(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # ----------------------------------------------------------------- fitting
    def fit(self, X, y):
        """Standardise ``X``, encode ``y`` and fit the posterior.

        Parameters
        ----------
        X:
            Numeric inputs, array-like ``(N, F)``.
        y:
            Targets ``(N,)`` (the regressor also takes ``(N, D)``).

        Returns
        -------
        self
        """
        X, y = self._validate_xy(X, y)
        # Every parameter is checked before any fitted state changes.
        cls = get_posterior(self.method)
        hidden, dropout = self._hidden(), self._dropout()
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        options = self._method_options(cls, seed)
        targets, likelihood = self._encode_targets(y)
        scale = X.std(axis=0)
        self._x_mean = X.mean(axis=0)
        self._x_scale = np.where(scale > 0, scale, 1.0)
        #: Seeds the prediction draws, so that the same fit predicts the same numbers.
        self._seed = seed
        x = torch.as_tensor(self._scaled(X), dtype=torch.float32)
        # Everything random (initial weights, data order, dropout, sampling) comes from the seed;
        # the caller's global torch generator is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = mlp(
                x.shape[1],
                likelihood.n_outputs_raw,
                hidden=hidden,
                activation=self.activation,
                dropout=dropout,
            )
            posterior = cls(net, likelihood, **options)
            self.history_ = posterior.fit(
                (x, torch.as_tensor(targets)),
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                weight_decay=self.weight_decay,
                val_fraction=self.val_fraction,
                patience=self.patience,
                seed=seed,
                progress=bool(self.verbose),
            )
        self.posterior_: Posterior = posterior
        return self

    def _hidden(self) -> tuple[int, ...]:
        hidden = self.hidden
        if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
            return (int(hidden),)
        try:
            widths = tuple(hidden)
        except TypeError:
            widths = None
        if widths is None or not all(
            isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1 for h in widths
        ):
            raise ValueError(
                f"hidden must be a tuple of positive layer widths such as (50,) or (64, 64), "
                f"got {hidden!r}."
            )
        return tuple(int(h) for h in widths)

    def _dropout(self) -> float:
        if self.dropout is None:
            return MC_DROPOUT_RATE if self.method == "mc_dropout" else 0.0
        if self.method == "mc_dropout" and self.dropout == 0:
            raise ValueError(
                "method='mc_dropout' samples dropout masks, so it needs dropout > 0, got "
                f"dropout={self.dropout!r}; pass e.g. dropout=0.1, or dropout=None for "
                f"{MC_DROPOUT_RATE}."
            )
        return self.dropout

    def _method_options(self, cls: type[Posterior], seed: int) -> dict:
        extra = {} if self.method_options is None else self.method_options
        if not isinstance(extra, Mapping):
            raise TypeError(
                f"method_options must be None or a dict of {cls.__name__}'s constructor options, "
                f"got {type(extra).__name__}."
            )
        accepted = inspect.signature(cls.__init__).parameters
        own = {k: v for k, v in _OWN_OPTIONS.items() if k in accepted}
        clash = sorted(set(extra) & set(own))
        if clash:
            raise ValueError(
                f"method_options must not set {clash}: the estimator sets them from its own "
                f"parameters ({', '.join(own[k] for k in clash)}); pass those instead."
            )
        options = dict(extra)
        if "n_members" in own:
            options["n_members"] = self.n_members
        if "seed" in own:
            options["seed"] = seed
        return options

    # ----------------------------------------------------------------- predicting
    def _scaled(self, X: np.ndarray) -> np.ndarray:
        return (X - self._x_mean) / self._x_scale

    def _predictive(self, X) -> ClassificationPrediction | RegressionPrediction:
        """The posterior's predictive at ``X`` (validated and standardised), seeded draws."""
        check_is_fitted(self, "posterior_")
        X = _validate_data(self, X, reset=False, dtype=np.float64)
        x = torch.as_tensor(self._scaled(X), dtype=torch.float32)
        generator = torch.Generator().manual_seed(self._seed)
        return self.posterior_.predict(x, self.n_samples, generator=generator)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


class BayesianMLPClassifier(ClassifierMixin, _BayesianMLP):
    """A classifier that says how sure it is: a posterior over an MLP's weights.

    The network is ``bayesdl.models.mlp(F, n_classes, hidden, activation, dropout)`` with a
    categorical likelihood; the posterior is the registered method ``method``. Class labels may
    be of any type scikit-learn accepts (integers, strings, ...); they are kept, sorted, in
    :attr:`classes_`, and column ``k`` of :meth:`predict_proba` is ``classes_[k]``.

    Parameters
    ----------
    method:
        A registered posterior (``bayesdl.available_posteriors()``): ``"deep_ensemble"``
        (default), ``"mc_dropout"``, ``"mean_field_vi"``, ``"laplace"`` (trained to the MAP for
        ``epochs``, then the Laplace approximation), ``"swag"`` or ``"deterministic"``.
    hidden:
        Widths of the hidden layers, default ``(50,)``.
    activation:
        Hidden activation: ``"relu"`` (default), ``"tanh"``, ``"gelu"``, ``"silu"``, ``"elu"``.
    dropout:
        Dropout rate after every hidden activation. ``None`` (default): 0.1 for
        ``"mc_dropout"`` (which needs a rate > 0), none for the other methods.
    n_members:
        Independently trained members, for the methods that have them: the deep ensemble
        (default 5) and SWAG (MultiSWAG when > 1). Ignored by the other methods.
    method_options:
        Further constructor options of the method's class, e.g. ``{"hessian": "diag"}`` for
        Laplace or ``{"kl_weight": 0.5}`` for mean-field VI (default ``None``: its defaults).
        ``n_members`` and ``seed`` come from this estimator's own parameters.
    epochs, batch_size, lr, weight_decay, val_fraction, patience:
        The shared fit loop's settings (:class:`bayesdl.training.TrainConfig`): defaults 100
        epochs of Adam at ``lr=1e-3`` on batches of 32, no weight decay, no validation split,
        no early stopping.
    n_samples:
        Posterior draws per prediction; ``None`` (default) is the method's own default (one
        per member for the deep ensemble, which accepts no other number; 100 for sampling
        methods).
    random_state:
        Seeds the initial weights, the data order, dropout and the prediction draws: an int
        gives the same fit and predictions every time, ``None`` a fresh seed per ``fit``.
    verbose:
        Show a progress bar while training.

    Attributes
    ----------
    posterior_:
        The fitted :class:`bayesdl.Posterior`, on standardised inputs; its outputs are the
        logits of :attr:`classes_`.
    classes_:
        The class labels, sorted, ``(C,)``.
    n_features_in_:
        Number of input columns ``F``.
    feature_names_in_:
        Column names, when ``X`` was a DataFrame with string column names.
    history_:
        The :class:`bayesdl.History` of the training (loss per epoch).

    Notes
    -----
    ``sklearn.utils.estimator_checks.check_estimator`` passes every check for the default
    ``method="deep_ensemble"`` and for ``"deterministic"``. Two checks cannot apply to the
    methods that draw per row of the batch, ``"mc_dropout"`` (a dropout mask per row),
    ``"laplace"`` (its linearised predictive samples function values per row) and
    ``"mean_field_vi"`` (the local reparameterisation trick in the first layer draws its noise
    per row): ``check_methods_sample_order_invariance`` and ``check_methods_subset_invariance``
    ask that a row's prediction does not depend on the other rows of the batch, but there each
    row's Monte Carlo average has noise of its own (shrinking as ``n_samples`` grows);
    ``method_options={"prediction_noise": "weights"}`` gives ``"mean_field_vi"`` whole weight
    draws shared by the rows. For ``"swag"`` the classifier's probabilities for one row differ
    between batch orders by float32 rounding (about ``1e-7``), which the relative tolerance of
    ``check_methods_sample_order_invariance`` (``1e-7``) can flag. There is no
    ``sample_weight``.
    """

    def _validate_xy(self, X, y):
        X, y = _validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        return X, y

    def _encode_targets(self, y):
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two classes, but y holds one class "
                f"({classes[0]!r}) only."
            )
        self.classes_ = classes
        return codes.astype(np.int64), Categorical(n_classes=len(classes))

    def predict_proba(self, X) -> np.ndarray:
        """Predictive class probabilities (the mixture over draws), ``(N, C)``, columns in
        the order of :attr:`classes_`."""
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of :meth:`predict_proba`, ``(N, C)``."""
        log_p = _numpy(self._predictive(X).log_predictive)
        # Normalise in float64, so that the rows sum to 1 to float64 precision.
        top = log_p.max(axis=1, keepdims=True)
        return log_p - (top + np.log(np.exp(log_p - top).sum(axis=1, keepdims=True)))

    def predict(self, X) -> np.ndarray:
        """The most probable class under the predictive, ``(N,)``, labels of :attr:`classes_`."""
        best = np.argmax(self.predict_log_proba(X), axis=1)
        return self.classes_[best]

    def predict_uncertainty(self, X) -> dict[str, np.ndarray]:
        """How uncertain each prediction is, in nats, each ``(N,)``.

        Returns
        -------
        dict with ``"total"`` (entropy of the predictive), ``"aleatoric"`` (expected entropy
        of the draws: noise in the labels) and ``"epistemic"`` (mutual information between
        the label and the weights: lack of knowledge), ``total = aleatoric + epistemic``.
        """
        pred = self._predictive(X)
        return {
            "total": _numpy(pred.total),
            "aleatoric": _numpy(pred.aleatoric),
            "epistemic": _numpy(pred.epistemic),
        }


class BayesianMLPRegressor(RegressorMixin, _BayesianMLP):
    """A regressor that says how sure it is: a posterior over an MLP's weights.

    The network is ``bayesdl.models.mlp(F, 2 * D, ...)`` with a heteroscedastic Gaussian
    likelihood: for each of the ``D`` targets a mean and a log-variance, so the noise may vary
    with ``X``. Targets are standardised inside ``fit``; every result is in the units of ``y``.
    ``y`` may be ``(N,)`` or ``(N, D)`` for several targets (predictions then are ``(N, D)``).

    Parameters
    ----------
    method, hidden, activation, dropout, n_members, method_options, epochs, batch_size, lr,
    weight_decay, val_fraction, patience, n_samples, random_state, verbose:
        As for :class:`BayesianMLPClassifier`.

    Attributes
    ----------
    posterior_:
        The fitted :class:`bayesdl.Posterior`, on standardised inputs and targets.
    n_features_in_:
        Number of input columns ``F``.
    feature_names_in_:
        Column names, when ``X`` was a DataFrame with string column names.
    history_:
        The :class:`bayesdl.History` of the training (loss per epoch, standardised targets).

    Notes
    -----
    ``check_estimator`` passes every check for the default ``method="deep_ensemble"``, and for
    ``"deterministic"`` and ``"swag"``; for ``"mc_dropout"``, ``"laplace"`` and
    ``"mean_field_vi"`` the two batch-invariance checks cannot apply, for the reason given in
    :class:`BayesianMLPClassifier`. There is no ``sample_weight``.
    """

    def _validate_xy(self, X, y):
        return _validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)

    def _encode_targets(self, y):
        self._y_shape = y.shape[1:]
        y2 = y.reshape(len(y), -1)
        scale = y2.std(axis=0)
        self._y_mean = y2.mean(axis=0)
        self._y_scale = np.where(scale > 0, scale, 1.0)
        z = ((y2 - self._y_mean) / self._y_scale).astype(np.float32)
        n_targets = y2.shape[1]
        return (z[:, 0] if n_targets == 1 else z), Gaussian(n_targets=n_targets)

    def _to_units(self, t: torch.Tensor, power: int = 1) -> np.ndarray:
        """Standardised means (``power=1``) or variances (``power=2``) in ``y``'s units and
        shape: ``(N,)`` or ``(N, D)``."""
        z = _numpy(t).reshape(t.shape[0], -1)
        out = z * self._y_scale**power + (self._y_mean if power == 1 else 0.0)
        return out.reshape(t.shape[0], *self._y_shape)

    def predict(self, X) -> np.ndarray:
        """The predictive mean, ``(N,)`` (``(N, D)`` for several targets), in ``y``'s units."""
        return self._to_units(self._predictive(X).mean)

    def predict_interval(self, X, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Central prediction intervals of the predictive (the Gaussian mixture over draws).

        Parameters
        ----------
        X:
            Inputs ``(N, F)``.
        level:
            Probability the interval holds, strictly between 0 and 1 (default 0.9).

        Returns
        -------
        ``(lower, upper)``, each shaped like :meth:`predict`, in ``y``'s units: the mixture's
        ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.
        """
        lower, upper = self._predictive(X).interval(level)
        return self._to_units(lower), self._to_units(upper)

    def predict_uncertainty(self, X) -> dict[str, np.ndarray]:
        """The predictive variance and its parts, in ``y``'s units squared, shaped like
        :meth:`predict`.

        Returns
        -------
        dict with ``"total"`` (variance of the predictive mixture), ``"aleatoric"`` (expected
        noise variance ``E[sigma^2]``) and ``"epistemic"`` (variance of the draws' means
        ``Var[mu]``), ``total = aleatoric + epistemic``.
        """
        pred = self._predictive(X)
        return {
            "total": self._to_units(pred.total, 2),
            "aleatoric": self._to_units(pred.aleatoric, 2),
            "epistemic": self._to_units(pred.epistemic, 2),
        }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": True}
