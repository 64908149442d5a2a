"""Model files: save / load / inspect round trips, loader safety, fuzzing, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import bayesdl as bdl
from bayesdl import files
from bayesdl.calibration import CalibratedPosterior, temperature_scale, variance_scale
from bayesdl.conformal import ConformalPredictor, conformalize
from bayesdl.data import Standardizer
from bayesdl.posteriors.wrapper import PosteriorWrapper
from conftest import make_posterior

S = 4  # draws per prediction (ensembles use their members)
LIKELIHOODS = {"categorical": 3, "gaussian": 2, "homoscedastic_gaussian": 1}  # -> network outputs


def _n(post) -> int | None:
    """Draws to ask for: None where the method fixes its own count (ensembles)."""
    while isinstance(post, PosteriorWrapper):
        post = post.posterior
    return None if post.name == "deep_ensemble" else S


def _data(likelihood: str, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    if likelihood == "categorical":
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g)


def _fit(method: str, likelihood: str, *, model: nn.Module | None = None, data=None):
    torch.manual_seed(0)
    if model is None:
        model = bdl.models.mlp(4, LIKELIHOODS[likelihood], hidden=(16,), dropout=0.2)
    post = make_posterior(method, model, likelihood)
    post.fit(_data(likelihood) if data is None else data, epochs=2, batch_size=16, seed=0)
    return post


def _fields(pred) -> dict[str, torch.Tensor]:
    first = "probs" if isinstance(pred, bdl.ClassificationPrediction) else "mean"
    return {k: getattr(pred, k) for k in (first, "aleatoric", "epistemic")}


def _assert_same_predictions(a, b, x, seed: int = 7) -> None:
    """Bit-identical predictive fields of ``a`` and ``b`` under the same seeded generator."""
    pa = a.predict(x, _n(a), generator=torch.Generator().manual_seed(seed))
    pb = b.predict(x, _n(b), generator=torch.Generator().manual_seed(seed))
    fa, fb = _fields(pa), _fields(pb)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert torch.equal(fa[k], fb[k]), k


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["bayesdl"])


def _rewrite(src, dst, edit, *, fix_checksum: bool = True) -> None:
    """Write ``src`` to ``dst`` with ``edit(header)`` applied to its bayesdl header; with
    ``fix_checksum`` the checksum is recomputed, so a loader error is about the edit itself."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["bayesdl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stored = meta.pop("checksum")
    edit(meta)
    meta["checksum"] = files._checksum(meta, tensors) if fix_checksum else stored
    save_file(tensors, str(dst), metadata={"bayesdl": json.dumps(meta)})


# ------------------------------------------------------------------------ shared fitted files
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Every registered method fitted on every likelihood, saved: ``(method, likelihood) ->
    (posterior, path)``; plus ``"wrapped"``: conformal over calibrated MC dropout with feature
    names and a standardizer (the header with the most entries)."""
    folder = tmp_path_factory.mktemp("saved")
    out = {}
    for likelihood in LIKELIHOODS:
        for method in bdl.available_posteriors():
            post = _fit(method, likelihood)
            path = folder / f"{method}-{likelihood}.safetensors"
            bdl.save(post, path)
            out[method, likelihood] = post, path
    x, y = _data("gaussian")
    post = out["mc_dropout", "gaussian"][0]
    calibrated = variance_scale(post, x, y, n_samples=S, generator=torch.Generator().manual_seed(1))
    wrapped = conformalize(calibrated, x, y, 0.1, n_samples=S)
    path = folder / "wrapped.safetensors"
    bdl.save(wrapped, path, feature_names=list("abcd"), standardizer=Standardizer.fit(x, y))
    out["wrapped"] = wrapped, path
    return out


# ------------------------------------------------------------------------ 1. round trips
_LOAD_AND_PREDICT = """
import json, os, sys
import torch
import bayesdl as bdl
from safetensors.torch import load_file, save_file

folder, n_samples, seed, *names = sys.argv[1:]
x = load_file(os.path.join(folder, "x.safetensors"))["x"]
out, types = {}, {}
for name in names:
    post = bdl.load(os.path.join(folder, name + ".safetensors"))
    n = None if post.name == "deep_ensemble" else int(n_samples)
    pred = post.predict(x, n, generator=torch.Generator().manual_seed(int(seed)))
    first = "probs" if isinstance(pred, bdl.ClassificationPrediction) else "mean"
    for field in (first, "aleatoric", "epistemic"):
        out[name + "." + field] = getattr(pred, field).contiguous()
    types[name] = type(post).__name__
save_file(out, os.path.join(folder, "out.safetensors"), metadata={"types": json.dumps(types)})
"""


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_load_in_new_process_predicts_bit_identically(likelihood, saved, tmp_path):
    """Every method: predictions of the file loaded in a fresh interpreter (no model argument)
    equal the fitted posterior's, bit for bit, with the same seeded generator."""
    x = _data(likelihood, 80)[0][64:]  # inputs the posterior was not fitted on
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    methods = bdl.available_posteriors()
    for method in methods:
        (tmp_path / f"{method}.safetensors").write_bytes(saved[method, likelihood][1].read_bytes())
    subprocess.run(
        [sys.executable, "-c", _LOAD_AND_PREDICT, str(tmp_path), str(S), "11", *methods],
        check=True,
        timeout=120,
    )
    out = load_file(str(tmp_path / "out.safetensors"))
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        types = json.loads(f.metadata()["types"])
    for method in methods:
        post = saved[method, likelihood][0]
        assert types[method] == type(post).__name__
        pred = post.predict(x, _n(post), generator=torch.Generator().manual_seed(11))
        for field, want in _fields(pred).items():
            got = out[f"{method}.{field}"]
            assert got.dtype == want.dtype and torch.equal(got, want), (method, field)


def test_load_round_trip_in_process(method, saved):
    post, path = saved[method, "categorical"]
    loaded = bdl.load(path)
    assert type(loaded) is type(post)
    assert loaded.options() == post.options()
    assert loaded.input_shape == post.input_shape == (4,)
    assert isinstance(loaded.model, bdl.models.MLP) and loaded.model.spec == post.model.spec
    _assert_same_state(post, loaded)
    _assert_same_predictions(post, loaded, _data("categorical")[0][:9])


# ------------------------------------------------------------------------ 2. own modules
class TwoLayerNet(nn.Module):
    """A user's own module: the file cannot rebuild it."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_own_module_round_trip(method, tmp_path):
    post = _fit(method, "categorical", model=TwoLayerNet())
    path = tmp_path / "own.safetensors"
    bdl.save(post, path)
    info = bdl.inspect(path)
    assert info.network is None and info.network_class.endswith("TwoLayerNet")

    loaded = bdl.load(path, model=TwoLayerNet())
    assert type(loaded) is type(post) and isinstance(loaded.model, TwoLayerNet)
    _assert_same_state(post, loaded)
    _assert_same_predictions(post, loaded, _data("categorical")[0][:9])

    with pytest.raises(bdl.ModelFileError, match=r"TwoLayerNet.*model=MyNet\(\)"):
        bdl.load(path)
    # The narrower module: the message names a parameter and both shapes.
    with pytest.raises(
        bdl.ModelFileError,
        match=r"body\.0\.weight: file \((\d+, )?16, 4\), "
        r"module \((\d+, )?8, 4\)",
    ):
        bdl.load(path, model=TwoLayerNet(hidden=8))


def test_a_refused_file_leaves_the_given_module_as_it_was(tmp_path):
    post = _fit("mc_dropout", "categorical", model=TwoLayerNet())
    src, path = tmp_path / "own.safetensors", tmp_path / "edited.safetensors"
    bdl.save(post, src)
    _rewrite(src, path, lambda h: h["wrappers"].append({"name": "mystery", "options": {}}))
    module = TwoLayerNet().double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(bdl.ModelFileError, match="mystery"):
        bdl.load(path, model=module)
    after = module.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    loaded = bdl.load(src, model=module)  # the valid file: the module takes its dtype
    assert loaded.dtype == torch.float32 and module.head.weight.dtype == torch.float32


def test_load_rejects_a_non_module(saved):
    with pytest.raises(TypeError, match="Module"):
        bdl.load(saved["mc_dropout", "categorical"][1], model="TwoLayerNet")


# ------------------------------------------------------------------------ 3. wrappers
def _chain(post, chain: str, task: str):
    x, y = _data("categorical" if task == "classification" else "gaussian")
    x_cal, y_cal = x[32:], y[32:]
    scale = temperature_scale if task == "classification" else variance_scale

    def calibrated(p):
        return scale(p, x_cal, y_cal, n_samples=S, generator=torch.Generator().manual_seed(2))

    def conformal(p):
        return conformalize(
            p, x_cal, y_cal, 0.1, n_samples=S, generator=torch.Generator().manual_seed(3)
        )

    steps = {
        "calibrated": [calibrated],
        "conformal": [conformal],
        "conformal_over_calibrated": [calibrated, conformal],
        "calibrated_over_conformal": [conformal, calibrated],
    }[chain]
    for step in steps:
        post = step(post)
    return post


@pytest.mark.parametrize(
    "chain", ["calibrated", "conformal", "conformal_over_calibrated", "calibrated_over_conformal"]
)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_wrappers_round_trip(task, chain, saved, tmp_path):
    likelihood = "categorical" if task == "classification" else "gaussian"
    wrapped = _chain(saved["mc_dropout", likelihood][0], chain, task)
    path = tmp_path / "wrapped.safetensors"
    bdl.save(wrapped, path)
    loaded = bdl.load(path)
    x = _data(likelihood, 80)[0][64:]

    names, a, b = [], wrapped, loaded
    while isinstance(a, PosteriorWrapper):
        assert type(b) is type(a)
        names.append(a.wrapper_name)
        if isinstance(a, CalibratedPosterior):
            assert b.scale == a.scale and a.scale != 1.0
        else:
            assert isinstance(a, ConformalPredictor)
            assert (b.threshold, b.alpha, b.n_calibration, b.randomized) == (
                a.threshold,
                a.alpha,
                a.n_calibration,
                a.randomized,
            )
            if task == "regression":
                ia = a.intervals(x, S, generator=torch.Generator().manual_seed(5))
                ib = b.intervals(x, S, generator=torch.Generator().manual_seed(5))
                assert torch.equal(ia.lower, ib.lower) and torch.equal(ia.upper, ib.upper)
            else:
                sa = a.sets(x, S, generator=torch.Generator().manual_seed(5))
                sb = b.sets(x, S, generator=torch.Generator().manual_seed(5))
                assert torch.equal(sa.sets, sb.sets)
        _assert_same_predictions(a, b, x)
        a, b = a.posterior, b.posterior
    assert type(b) is type(a) is bdl.MCDropout
    assert [name for name, _ in bdl.inspect(path).wrappers] == names
    assert (
        names
        == {
            "calibrated": ["calibration"],
            "conformal": ["conformal"],
            "conformal_over_calibrated": ["conformal", "calibration"],
            "calibrated_over_conformal": ["calibration", "conformal"],
        }[chain]
    )


# ------------------------------------------------------------------------ 4. inspect
def test_inspect_reports_what_was_saved(tmp_path):
    x, y = _data("gaussian")
    std = Standardizer.fit(x * 3 + 1, y * 2 - 5)
    post = _fit("mc_dropout", "gaussian")
    path = tmp_path / "m.safetensors"
    bdl.save(post, path, feature_names=("age", "bmi", "bp", "s1"), standardizer=std)
    info = bdl.inspect(path)
    assert isinstance(info, bdl.ModelInfo)
    assert info.method == "mc_dropout" and info.method_options == post.options()
    assert info.task == "regression"
    assert info.likelihood == "gaussian" and info.likelihood_options == post.likelihood.options()
    assert info.network == post.model.spec == bdl.models.mlp(4, 2, hidden=(16,), dropout=0.2).spec
    assert info.network_class == "bayesdl.models.MLP"
    assert info.dtype == torch.float32
    assert info.input_shape == (4,) and info.output_width == 2
    assert info.wrappers == ()
    assert info.feature_names == ("age", "bmi", "bp", "s1")
    assert torch.equal(info.standardizer.x_mean, std.x_mean)
    assert torch.equal(info.standardizer.x_std, std.x_std)
    assert (info.standardizer.y_mean, info.standardizer.y_std) == (std.y_mean, std.y_std)
    assert info.library_version == bdl.__version__
    assert info.format_version == files.FORMAT_VERSION
    # Recorded, not applied: the loaded posterior predicts as the saved one.
    _assert_same_predictions(post, bdl.load(path), x[:5])


def test_inspect_defaults_and_unfitted(saved, tmp_path):
    info = bdl.inspect(saved["laplace", "categorical"][1])
    assert (info.task, info.likelihood, info.output_width) == ("classification", "categorical", 3)
    assert info.feature_names is None and info.standardizer is None
    # The width K of the posterior's outputs (S, B, K): mean and log-variance here, although the
    # network itself has one output (the noise is the likelihood's parameter).
    post, path = saved["swag", "homoscedastic_gaussian"]
    assert post.model.spec["out_features"] == 1
    k = post.sample_outputs(_data("gaussian")[0][:1], S).shape[-1]
    assert bdl.inspect(path).output_width == k == 2

    unfitted = bdl.MCDropout(bdl.models.mlp(4, 3, dropout=0.1), "categorical")
    bdl.save(unfitted, tmp_path / "u.safetensors")
    info = bdl.inspect(tmp_path / "u.safetensors")
    assert info.input_shape is None and info.output_width is None
    assert bdl.load(tmp_path / "u.safetensors").input_shape is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"feature_names": ["a", "b", "c"]}, ValueError, r"3 names.*\(4,\)"),
        ({"feature_names": list("abcde")}, ValueError, r"5 names"),
        ({"feature_names": ["a", "b", 3, "d"]}, TypeError, r"strings.*3"),
        ({"feature_names": "abcd"}, TypeError, r"strings.*'abcd'"),
        ({"feature_names": [None] * 4}, TypeError, r"strings"),
        ({"standardizer": "z-score"}, TypeError, r"Standardizer, got str"),
    ],
)
def test_bad_save_arguments_raise_and_write_nothing(kwargs, error, match, saved, tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(error, match=match):
        bdl.save(saved["mc_dropout", "categorical"][0], path, **kwargs)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_standardizer_of_other_width_raises(saved, tmp_path):
    x, y = _data("gaussian")
    with pytest.raises(ValueError, match=r"3 input columns.*\(4,\)"):
        bdl.save(
            saved["mc_dropout", "gaussian"][0],
            tmp_path / "m.safetensors",
            standardizer=Standardizer.fit(x[:, :3], y),
        )


def test_save_rejects_what_is_not_a_posterior(tmp_path):
    with pytest.raises(TypeError, match="Sequential"):
        bdl.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.safetensors")


# ------------------------------------------------------------------------ 5. dtype, device, format
def test_float64_round_trip(tmp_path):
    x, y = _data("categorical")
    net = bdl.models.mlp(4, 3, hidden=(16,), dropout=0.2, dtype=torch.float64)
    post = _fit("mc_dropout", "categorical", model=net, data=(x.double(), y))
    bdl.save(post, tmp_path / "m.safetensors")
    assert bdl.inspect(tmp_path / "m.safetensors").dtype == torch.float64
    loaded = bdl.load(tmp_path / "m.safetensors")
    assert loaded.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in loaded.model.parameters())
    _assert_same_state(post, loaded)
    _assert_same_predictions(post, loaded, x[:6].double())
    assert loaded.predict(x[:2].double(), S).probs.dtype == torch.float64


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")])
def test_map_location_cpu(map_location, saved):
    post, path = saved["deep_ensemble", "gaussian"]
    loaded = bdl.load(path, map_location=map_location)
    assert loaded.device == torch.device("cpu")
    _assert_same_predictions(post, loaded, _data("gaussian")[0][:5])
    own = bdl.load(path, model=bdl.models.mlp(4, 2, hidden=(16,), dropout=0.2), map_location="cpu")
    _assert_same_predictions(post, own, _data("gaussian")[0][:5])


def test_file_is_plain_safetensors_with_the_documented_header(saved):
    post, path = saved["swag", "gaussian"]
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["bayesdl"])
        keys = list(f.keys())
        first = f.get_tensor(keys[0])
    assert all(k.startswith("posterior.") for k in keys)
    state = post.state_dict()
    assert sorted(keys) == sorted("posterior." + k for k in state)
    assert torch.equal(first, state[keys[0].removeprefix("posterior.")])
    assert meta["format_version"] == files.FORMAT_VERSION
    assert meta["library_version"] == bdl.__version__
    assert meta["method"] == "swag" and meta["likelihood"] == "gaussian"
    assert meta["input_shape"] == [4] and meta["output_width"] == 2
    assert meta["kind"] == "model" and "checksum" in meta


def test_missing_file_and_missing_folder(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        bdl.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bdl.save(saved["deterministic", "categorical"][0], tmp_path / "missing" / "m.safetensors")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------ 6. safety
class _Payload:
    """Unpickling this creates ``marker``: the code a pickle-based loader would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live))))  # the payload works when unpickled...
    assert live.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(bdl.ModelFileError, match="not a readable safetensors file"):
        bdl.load(path)
    with pytest.raises(bdl.ModelFileError):
        bdl.inspect(path)
    assert not marker.exists()  # ...but not through bayesdl.load


def test_torch_save_file_is_refused_without_running_it(tmp_path):
    live = tmp_path / "live"
    torch.save({"state": _Payload(str(live))}, tmp_path / "check.pt")
    torch.load(tmp_path / "check.pt", weights_only=False)
    assert live.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "model.safetensors"
    torch.save({"state": _Payload(str(marker)), "w": torch.ones(3)}, path)
    with pytest.raises(bdl.ModelFileError, match="not a readable safetensors file"):
        bdl.load(path)
    assert not marker.exists()


def test_plain_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.ones(2, 2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(bdl.ModelFileError, match="not a bayesdl model file"):
        bdl.load(tmp_path / "m.safetensors")


def test_truncated_files_are_refused(saved, tmp_path):
    blob = saved["mc_dropout", "categorical"][1].read_bytes()
    path = tmp_path / "model.safetensors"
    lengths = sorted({*range(0, len(blob), max(1, len(blob) // 97)), len(blob) - 1})
    for n in lengths:
        path.write_bytes(blob[:n])
        with pytest.raises(bdl.ModelFileError):
            bdl.load(path)
    path.write_bytes(blob)
    bdl.load(path)  # the whole file is fine


def _data_start(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def test_flipped_bits_are_refused(saved, tmp_path):
    blob = saved["mc_dropout", "categorical"][1].read_bytes()
    path = tmp_path / "model.safetensors"
    start = _data_start(blob)
    for pos in (start, (start + len(blob)) // 2, len(blob) - 1):  # tensor bytes
        flipped = bytearray(blob)
        flipped[pos] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(bdl.ModelFileError, match="checksum does not match"):
            bdl.load(path)
    # A digit of the JSON header: still valid JSON, a different output width.
    pos = blob.index(b"output_width")
    pos += next(i for i, c in enumerate(blob[pos:]) if chr(c).isdigit())
    flipped = bytearray(blob)
    flipped[pos] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert (
        _header(path)["output_width"]
        != _header(saved["mc_dropout", "categorical"][1])["output_width"]
    )
    with pytest.raises(bdl.ModelFileError, match="checksum does not match"):
        bdl.load(path)


def test_random_bytes_are_refused(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "model.safetensors"
    for size in (1, 8, 100, 5000):
        path.write_bytes(rng.randbytes(size))
        with pytest.raises(bdl.ModelFileError):
            bdl.load(path)


@pytest.mark.parametrize("fix_checksum", [True, False])
def test_newer_format_version_is_refused(fix_checksum, saved, tmp_path):
    path = tmp_path / "m.safetensors"
    _rewrite(
        saved["mc_dropout", "categorical"][1],
        path,
        lambda h: h.update(format_version=99),
        fix_checksum=fix_checksum,
    )
    with pytest.raises(bdl.ModelFileError, match=r"format version 99 by a newer bayesdl.*-U"):
        bdl.load(path)
    with pytest.raises(bdl.ModelFileError, match="newer"):
        bdl.inspect(path)


def _set(key, value):
    return lambda h: h.update({key: value})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("method", "bayes_by_magic"), r"'bayes_by_magic' posterior.*does not know"),
        (_set("likelihood", "student_t"), r"likelihood.*unknown likelihood 'student_t'"),
        (_set("likelihood_options", {"dof": 3}), r"likelihood.*dof"),
        (
            _set("wrappers", [{"name": "temperature_forest", "options": {}}]),
            r"'temperature_forest', which this bayesdl does not know",
        ),
        (_set("wrappers", [{"name": "calibration", "options": {"scale": -1.0}}]), r"scale.*-1"),
        (_set("wrappers", [{"name": "conformal"}]), r"'wrappers'"),
        (_set("network", {"name": "resnet18"}), r"unknown network 'resnet18'"),
        (lambda h: h["network"].update(hidden=[8]), r"0\.weight: file \(16, 4\), module \(8, 4\)"),
        (_set("dtype", "float8"), r"unknown dtype 'float8'"),
        (_set("kind", "checkpoint"), r"'checkpoint' file, not a model file.*resume=True"),
        (_set("format_version", 0), r"no valid format_version \(got 0\)"),
        (_set("input_shape", [4, -1]), r"'input_shape'"),
        (_set("output_width", 0), r"'output_width' \(0\)"),
        (_set("feature_names", ["a", 2]), r"feature_names"),
        (_set("method_options", {"chunk_size": -5}), r"chunk_size.*-5"),
        (_set("method", None), r"'method' entry \(None\)"),
        (_set("standardization", {"y_mean": 0.0, "y_std": 1.0}), r"standardisation"),
        (lambda h: h.pop("library_version"), r"'library_version'"),
    ],
)
def test_edited_header_is_refused(edit, match, saved, tmp_path):
    """Headers with a valid checksum but contents this bayesdl cannot use."""
    path = tmp_path / "m.safetensors"
    _rewrite(saved["mc_dropout", "categorical"][1], path, edit)
    with pytest.raises(bdl.ModelFileError, match=match):
        bdl.load(path)


def test_rewrite_helper_keeps_a_valid_file(saved, tmp_path):
    """The edits above are refused for what they change, not because rewriting breaks files."""
    post, src = saved["mc_dropout", "categorical"]
    _rewrite(src, tmp_path / "m.safetensors", lambda h: None)
    _assert_same_predictions(post, bdl.load(tmp_path / "m.safetensors"), _data("categorical")[0])


@pytest.mark.parametrize(
    ("key", "method", "edit"),
    [
        ("hidden", "mc_dropout", lambda h: h["network"].update(hidden=[2**62])),
        ("in_features", "mc_dropout", lambda h: h["network"].update(in_features=2**62)),
        ("n_members", "deep_ensemble", lambda h: h["method_options"].update(n_members=2**62)),
        ("rank", "swag", lambda h: h["method_options"].update(rank=2**62)),
    ],
)
def test_huge_sizes_in_header_are_refused(key, method, edit, saved, tmp_path):
    path = tmp_path / "m.safetensors"
    _rewrite(saved[method, "categorical"][1], path, edit)
    with pytest.raises(bdl.ModelFileError, match=key):
        bdl.load(path)


# ------------------------------------------------------------------------ 7. fuzzing
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


def _refused_or_unchanged(path: Path, original: Path) -> None:
    """Loading the damaged ``path`` raises ModelFileError, or (for an edit the format ignores,
    e.g. whitespace in safetensors' header padding) gives exactly the original posterior."""
    try:
        loaded = bdl.load(path)
    except bdl.ModelFileError:
        return
    assert _header(path) == _header(original)
    with safe_open(str(original), "pt") as f:
        want = {k.removeprefix("posterior."): f.get_tensor(k) for k in f.keys()}
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@FUZZ
@given(data=st.data())
def test_fuzz_truncation(saved, fuzz_path, data):
    original = saved["wrapped"][1]
    blob = original.read_bytes()
    fuzz_path.write_bytes(blob[: data.draw(st.integers(0, len(blob) - 1), label="length")])
    with pytest.raises(bdl.ModelFileError):
        bdl.load(fuzz_path)


@FUZZ
@given(data=st.data())
def test_fuzz_replaced_bytes(saved, fuzz_path, data):
    original = saved["wrapped"][1]
    blob = bytearray(original.read_bytes())
    # Half the edits in the header, where the structure is.
    end = data.draw(st.sampled_from([_data_start(blob), len(blob)]), label="region")
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=8)
    )
    for pos, value in edits:
        blob[pos] = value
    if bytes(blob) == original.read_bytes():
        return
    fuzz_path.write_bytes(bytes(blob))
    _refused_or_unchanged(fuzz_path, original)


@FUZZ
@given(
    blob=st.one_of(
        st.binary(max_size=4096),
        # A plausible header length, then garbage: gets past the first check.
        st.binary(max_size=600).map(lambda b: len(b).to_bytes(8, "little") + b),
        st.builds(
            lambda meta, tail: (
                (h := json.dumps({"__metadata__": {"bayesdl": meta}}).encode()),
                len(h).to_bytes(8, "little") + h + tail,
            )[1],
            st.text(max_size=200),
            st.binary(max_size=64),
        ),
    )
)
def test_fuzz_random_files(fuzz_path, blob):
    fuzz_path.write_bytes(blob)
    with pytest.raises(bdl.ModelFileError):
        bdl.load(fuzz_path)


# Integers stay small: sizes (widths, members, ranks) past memory are the known failure of
# test_huge_sizes_in_header_are_refused, and sizes that fit would only make the fuzz slow.
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["mlp", "relu", "categorical", "gaussian", "calibration", "conformal"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "options", "scale", "hidden"]) | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=8,
)
_DELETE = object()
_FUZZ_FILES = [
    (m, lik)
    for m in ("mc_dropout", "deep_ensemble", "laplace", "mean_field_vi", "swag", "deterministic")
    for lik in ("categorical", "gaussian")
]


def _header_paths(node, prefix=()) -> list[tuple]:
    """Paths to every entry of a header, three levels deep (not into the tensor table)."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))[:3]
    else:
        return []
    out = []
    for key, value in items:
        out.append((*prefix, key))
        if len(prefix) < 2 and key != "tensors":
            out += _header_paths(value, (*prefix, key))
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_header_values(saved, fuzz_path, data):
    """Any JSON value (or none) at any entry of a checksummed header: the loader's own checks
    answer, with ModelFileError or a posterior; never another exception."""
    key = data.draw(st.sampled_from([*_FUZZ_FILES, "wrapped"]), label="file")
    original = saved[key][1]
    header = _header(original)
    header.pop("checksum")
    path = data.draw(st.sampled_from(_header_paths(header)), label="path")
    value = data.draw(st.just(_DELETE) | _JSON, label="value")

    def edit(h):
        node = h
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            node.pop(path[-1])
        else:
            node[path[-1]] = value

    _rewrite(original, fuzz_path, edit)
    with contextlib.suppress(bdl.ModelFileError):
        bdl.inspect(fuzz_path)
    with contextlib.suppress(bdl.ModelFileError):
        bdl.load(fuzz_path)


# ------------------------------------------------------------------------ 8. atomic writes
_SAVER = """
import os, sys
import torch
torch.set_num_threads(1)  # the process forks below: no thread pools to inherit
import bayesdl as bdl

refs, path = sys.argv[1], sys.argv[2]
posts = []
for seed in (0, 1):
    torch.manual_seed(seed)
    net = bdl.models.mlp(100, 2, hidden=(1000, 900))  # 1M parameters, 3 members: 12 MB
    posts.append(bdl.DeepEnsemble(net, "gaussian", n_members=3, seed=seed))
    bdl.save(posts[-1], os.path.join(refs, f"{seed}.safetensors"))
bdl.save(posts[0], path)
print("ready", flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:  # the saver the test kills: saves A, B, A, ... to the same path
        i = 0
        while True:
            bdl.save(posts[i % 2], path)
            i += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("killed", flush=True)
"""


def _first_tensor(path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(sorted(f.keys())[0])


def test_save_survives_sigkill(tmp_path):
    refs, folder = tmp_path / "refs", tmp_path / "models"
    refs.mkdir()
    folder.mkdir()
    path = folder / "model.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(refs), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(0)
    child = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        versions = [_first_tensor(refs / f"{s}.safetensors") for s in (0, 1)]
        assert not torch.equal(*versions)
        key = sorted(_header(refs / "0.safetensors")["tensors"])[0]
        for _ in range(5):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            child = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(child, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "killed"
            child = None
            loaded = bdl.load(path)  # whole and verified: version A or B
            got = loaded.state_dict()[key.removeprefix("posterior.")]
            assert any(torch.equal(got, v) for v in versions)
            names = os.listdir(folder)
            assert "model.safetensors" in names
            leftovers = [n for n in names if n != "model.safetensors"]
            # A saver killed mid-write leaves its temporary file (write_atomic's, or the one
            # safetensors writes before renaming it onto that: ".tmpXXXXXX"); nothing else.
            assert all(
                (n.startswith(".model.safetensors.") and n.endswith(".tmp")) or n.startswith(".tmp")
                for n in leftovers
            ), names
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.stdin.close()
        proc.kill()
        proc.wait(timeout=30)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content")

    def write(tmp):
        Path(tmp).write_bytes(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_atomic(path, write)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_interrupted_save_keeps_the_old_model(saved, tmp_path, monkeypatch):
    import safetensors.torch

    old = saved["mc_dropout", "categorical"][0]
    path = tmp_path / "model.safetensors"
    bdl.save(old, path)
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bdl.save(saved["deterministic", "categorical"][0], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    _assert_same_predictions(old, bdl.load(path), _data("categorical")[0][:4])


def test_saved_file_permissions_follow_umask(saved, tmp_path):
    mask = os.umask(0o022)
    try:
        bdl.save(saved["deterministic", "categorical"][0], tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
