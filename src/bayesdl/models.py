"""Networks the library builds itself, described by a spec that model files record.

A user's own ``nn.Module`` is saved as its weights only: loading it needs the module again
(``bayesdl.load(path, model=MyNet())``). A network built here carries its spec, a small JSON
object, so ``bayesdl.load(path)`` rebuilds it with no code from the user.

Examples
--------
>>> net = mlp(13, 2, hidden=(50, 50), dropout=0.1)
>>> net.spec["hidden"]
[50, 50]
>>> build(net.spec)[0]
Linear(in_features=13, out_features=50, bias=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from bayesdl._options import resolve

__all__ = ["MLP", "Activation", "build", "mlp", "spec_of"]


class Activation(str, Enum):
    """Hidden-layer activations of :func:`mlp`."""

    #: ``max(0, x)``.
    RELU = "relu"
    #: Hyperbolic tangent.
    TANH = "tanh"
    #: Gaussian error linear unit.
    GELU = "gelu"
    #: ``x * sigmoid(x)``.
    SILU = "silu"
    #: Exponential linear unit.
    ELU = "elu"


_ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.TANH: nn.Tanh,
    Activation.GELU: nn.GELU,
    Activation.SILU: nn.SiLU,
    Activation.ELU: nn.ELU,
}


class MLP(nn.Sequential):
    """A multilayer perceptron built by :func:`mlp`: ``Linear -> activation [-> Dropout]`` per
    hidden layer, then an output ``Linear``. Inputs ``(B, in_features)``, outputs
    ``(B, out_features)``. :attr:`spec` rebuilds it (:func:`build`)."""

    def __init__(self, spec: dict, layers: list[nn.Module]) -> None:
        super().__init__(*layers)
        #: What :func:`build` needs to make this network again (plain JSON values).
        self.spec = spec


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (50,),
    activation: Activation | str = Activation.RELU,
    dropout: float = 0.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> MLP:
    """A fully connected network for tabular inputs.

    Parameters
    ----------
    in_features:
        Input width ``F``: inputs are ``(B, F)``.
    out_features:
        Output width ``K``: one logit per class (categorical), ``2 * n_targets`` (Gaussian: mean
        and log-variance) or ``n_targets`` (homoscedastic Gaussian).
    hidden:
        Widths of the hidden layers; ``()`` gives a linear model.
    activation:
        An :class:`Activation` after every hidden layer.
    dropout:
        Rate of an ``nn.Dropout`` after every hidden activation (0: none); MC dropout needs > 0.
    dtype, device:
        Where the weights are created.

    Returns
    -------
    MLP
        An ``nn.Sequential`` with a ``spec`` attribute.
    """
    _positive_int("in_features", in_features)
    _positive_int("out_features", out_features)
    if isinstance(hidden, int):
        hidden = (hidden,)
    widths = [_positive_int("every hidden width", h) for h in hidden]
    act = resolve(Activation, activation, "activation")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}.")
    spec = {
        "name": "mlp",
        "in_features": in_features,
        "out_features": out_features,
        "hidden": widths,
        "activation": act.value,
        "dropout": float(dropout),
    }
    kw = {"dtype": dtype, "device": device}
    layers: list[nn.Module] = []
    width = in_features
    for h in widths:
        layers += [nn.Linear(width, h, **kw), _ACTIVATIONS[act]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features, **kw))
    return MLP(spec, layers)


_BUILDERS = {"mlp": mlp}


def spec_of(model: nn.Module) -> dict | None:
    """The spec of a network built here, ``None`` for any other module."""
    spec = getattr(model, "spec", None) if isinstance(model, MLP) else None
    return None if spec is None else dict(spec)


def build(
    spec: dict, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """The network a spec describes (see :func:`spec_of`), with freshly initialised weights.

    Raises ``ValueError`` or ``TypeError`` for a spec this library cannot build.
    """
    if not isinstance(spec, dict):
        raise TypeError(
            f"a network spec is a dict such as mlp(...).spec, got {type(spec).__name__} {spec!r}."
        )
    if spec.get("name") not in _BUILDERS:
        raise ValueError(
            f"unknown network {spec.get('name')!r}; this bayesdl builds "
            f"{', '.join(map(repr, _BUILDERS))}."
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    return _BUILDERS[spec["name"]](**options, dtype=dtype, device=device)
