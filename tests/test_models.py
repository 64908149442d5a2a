"""Networks the library builds (bayesdl.models): layers, specs, rebuilding, bad arguments."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from bayesdl.models import MLP, Activation, build, mlp, spec_of

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


def _expected_layers(hidden, activation: str, dropout: float) -> list[type]:
    layers = []
    for _ in hidden:
        layers += [nn.Linear, ACTIVATIONS[activation]] + ([nn.Dropout] if dropout > 0 else [])
    return [*layers, nn.Linear]


@pytest.mark.parametrize("hidden", [(), (7,), (5, 6, 7)])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mlp_layers_and_shapes(hidden, activation, dropout):
    net = mlp(3, 2, hidden=hidden, activation=activation, dropout=dropout)
    assert isinstance(net, MLP) and isinstance(net, nn.Sequential)
    assert [type(m) for m in net] == _expected_layers(hidden, activation, dropout)
    widths = [3, *hidden, 2]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(itertools.pairwise(widths))
    assert all(m.p == dropout for m in net if isinstance(m, nn.Dropout))
    assert net(torch.randn(5, 3)).shape == (5, 2)
    assert net.spec == {
        "name": "mlp",
        "in_features": 3,
        "out_features": 2,
        "hidden": list(hidden),
        "activation": activation,
        "dropout": dropout,
    }
    assert json.loads(json.dumps(net.spec)) == net.spec  # plain JSON, as model files need


def test_mlp_defaults_and_argument_forms():
    net = mlp(13, 2)
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert net[0].out_features == 50
    assert net.spec["hidden"] == [50] and net.spec["dropout"] == 0.0
    assert [m.out_features for m in mlp(3, 2, hidden=9) if isinstance(m, nn.Linear)] == [9, 2]
    tanh = mlp(3, 2, hidden=[4], activation=Activation.TANH, dropout=1e-3)
    assert isinstance(tanh[1], nn.Tanh) and tanh.spec["activation"] == "tanh"
    assert isinstance(tanh[2], nn.Dropout) and tanh[2].p == 1e-3
    wide = mlp(3, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in wide.parameters())


def test_dropout_is_active_in_training_only():
    net = mlp(4, 3, hidden=(64,), dropout=0.5)
    x = torch.randn(8, 4)
    torch.manual_seed(0)
    assert not torch.equal(net.train()(x), net(x))
    assert torch.equal(net.eval()(x), net(x))


@pytest.mark.parametrize(
    "spec",
    [
        mlp(4, 3).spec,
        mlp(2, 1, hidden=(), activation="gelu").spec,
        mlp(5, 2, hidden=(8, 6), activation="elu", dropout=0.25).spec,
    ],
)
def test_build_from_spec_gives_the_same_structure(spec):
    torch.manual_seed(0)
    net = build(spec)
    again = build(spec, dtype=torch.float64)
    assert isinstance(net, MLP) and net.spec == spec
    assert spec_of(net) == spec
    assert [type(m) for m in net] == [type(m) for m in again]
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert all(p.dtype == torch.float64 for p in again.parameters())
    direct = mlp(
        spec["in_features"],
        spec["out_features"],
        hidden=spec["hidden"],
        activation=spec["activation"],
        dropout=spec["dropout"],
    )
    assert [type(m) for m in net] == [type(m) for m in direct]
    assert shapes == {k: v.shape for k, v in direct.state_dict().items()}
    # Freshly initialised: a spec holds no weights.
    assert not torch.equal(net[0].weight, build(spec)[0].weight)


def test_spec_of():
    net = mlp(4, 3, hidden=(6,))
    spec = spec_of(net)
    assert spec == net.spec
    spec["hidden"] = [99]
    assert net.spec["hidden"] == [6]  # a copy: editing it leaves the network's spec alone
    assert spec_of(nn.Sequential(nn.Linear(4, 3))) is None
    assert spec_of(nn.Linear(4, 3)) is None

    class WithSpec(nn.Module):  # a spec attribute alone does not make a library network
        def __init__(self) -> None:
            super().__init__()
            self.spec = {"name": "mlp", "in_features": 4, "out_features": 3}

    assert spec_of(WithSpec()) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, r"in_features.*got 0"),
        ({"in_features": -3}, r"in_features.*got -3"),
        ({"in_features": 2.5}, r"in_features.*got 2\.5"),
        ({"in_features": "4"}, r"in_features.*got '4'"),
        ({"in_features": True}, r"in_features.*got True"),
        ({"out_features": 0}, r"out_features.*got 0"),
        ({"hidden": (8, 0)}, r"hidden width.*got 0"),
        ({"hidden": (-4,)}, r"hidden width.*got -4"),
        ({"hidden": (8.0,)}, r"hidden width.*got 8\.0"),
        ({"dropout": 1.0}, r"dropout.*\[0, 1\).*got 1\.0"),
        ({"dropout": -0.1}, r"dropout.*got -0\.1"),
        ({"dropout": "0.1"}, r"dropout.*got '0\.1'"),
        ({"activation": "swish"}, r"'swish'.*relu"),
        ({"activation": None}, r"activation None"),
    ],
)
def test_bad_arguments_raise_with_the_value(kwargs, match):
    args = {"in_features": 4, "out_features": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        mlp(**args)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ({"name": "resnet18", "depth": 18}, ValueError, r"unknown network 'resnet18'.*'mlp'"),
        ({"in_features": 4, "out_features": 3}, ValueError, r"unknown network None"),
        ("mlp", TypeError, r"a network spec is a dict.*got str 'mlp'"),
        ({**mlp(4, 3).spec, "hidden": [0]}, ValueError, r"got 0"),
        ({**mlp(4, 3).spec, "activation": "swish"}, ValueError, r"'swish'"),
        ({**mlp(4, 3).spec, "depth": 3}, TypeError, r"depth"),
    ],
)
def test_build_rejects_unknown_specs(spec, error, match):
    with pytest.raises(error, match=match):
        build(spec)
