"""Model files: a fitted posterior, and what wraps it, in one safetensors file.

>>> bdl.save(posterior, "model.safetensors")                      # doctest: +SKIP
>>> posterior = bdl.load("model.safetensors")                     # library-built network
>>> posterior = bdl.load("model.safetensors", model=MyNet())      # your own module

The file is a plain safetensors file (see :mod:`bayesdl.files` for the container: checksum,
atomic writes). Its tensors are the posterior's ``state_dict()`` under ``posterior.*``
(member weights, variational means and scales, Laplace factors, SWAG moments, buffers) and
the input standardisation under ``preprocessing.*``. The JSON header
(safetensors' ``__metadata__["bayesdl"]``) says how to rebuild it: the method and its options,
the likelihood and its options, the network (the spec of a network from :mod:`bayesdl.models`,
or the class name of the user's own module), dtype, input shape, output width, the wrappers
(calibration, conformal threshold) from the outside in, feature names and standardisation.

Loading runs no code from the file: there is no pickle and no ``torch.load``; the method,
likelihood, network and wrappers are looked up by name in this library's registries. Every
problem with a file raises :class:`~bayesdl.files.ModelFileError`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayesdl._version import __version__
from bayesdl.calibration import CalibratedPosterior
from bayesdl.conformal import ConformalPredictor
from bayesdl.data.uci import Standardizer
from bayesdl.decisions import OODGate, Referral
from bayesdl.files import ModelFileError, dtype_name, first_line, read_file, write_file
from bayesdl.likelihoods import likelihood_from_options
from bayesdl.models import build, spec_of
from bayesdl.posteriors.base import _INPUT_SHAPE_KEY, Posterior, get_posterior
from bayesdl.posteriors.stacked import meta_copy
from bayesdl.posteriors.wrapper import PosteriorWrapper, check_posterior
from bayesdl.tabular import TabularPipeline

__all__ = ["ModelFileError", "ModelInfo", "inspect", "load", "save"]

_WRAPPERS: dict[str, type[PosteriorWrapper]] = {
    c.wrapper_name: c for c in (CalibratedPosterior, ConformalPredictor, Referral, OODGate)
}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPES |= {"float32": torch.float32, "float64": torch.float64}
_STATE = "posterior."
_X_MEAN, _X_STD = "preprocessing.x_mean", "preprocessing.x_std"


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (:func:`inspect`); no posterior is built.

    Attributes
    ----------
    method, method_options: the registered posterior and its constructor options.
    task: ``"classification"`` or ``"regression"``.
    likelihood, likelihood_options: the likelihood's name and options.
    network: the spec of a network from :mod:`bayesdl.models`, or ``None`` for a module of
        the user's own (then ``network_class`` names it, and loading needs ``model=``).
    dtype: the floating type of the weights.
    input_shape: shape of one input example ``(F,)`` or ``(C, H, W)``...; ``None`` if never fitted.
    output_width: width ``K`` of the likelihood's natural parameters, the last axis of
        ``sample_outputs`` (logits: the classes; Gaussians: ``2 * n_targets``, also for a
        homoscedastic network that outputs only the means); ``None`` when the input shape is.
    wrappers: ``[(name, options), ...]`` from the outside in (``"referral"``,
        ``"ood_gate"``, ``"conformal"``, ``"calibration"``).
    feature_names: names of the input columns, if given to :func:`save`.
    standardizer: the input/target standardisation, if given to :func:`save`.
    pipeline: the :class:`~bayesdl.tabular.TabularPipeline` that encodes raw table columns
        into the model's inputs (the command line's models), if given to :func:`save`.
    library_version, format_version: who wrote the file, in which layout.
    """

    method: str
    method_options: dict
    task: str
    likelihood: str
    likelihood_options: dict
    network: dict | None
    network_class: str
    dtype: torch.dtype
    input_shape: tuple[int, ...] | None
    output_width: int | None
    wrappers: tuple[tuple[str, dict], ...]
    feature_names: tuple[str, ...] | None
    standardizer: Standardizer | None
    pipeline: TabularPipeline | None
    library_version: str
    format_version: int


# ---------------------------------------------------------------------------------- saving
def save(
    posterior: Posterior | PosteriorWrapper,
    path: str | os.PathLike,
    *,
    feature_names: Sequence[str] | None = None,
    standardizer: Standardizer | None = None,
    pipeline: TabularPipeline | None = None,
) -> None:
    """Write a fitted posterior (or a calibrated / conformal one) to ``path``, atomically.

    Parameters
    ----------
    posterior:
        Any registered posterior, or one wrapped (at any depth) by
        :class:`~bayesdl.calibration.CalibratedPosterior` or
        :class:`~bayesdl.conformal.ConformalPredictor`.
    path:
        The file to create or replace (by convention ``*.safetensors``); its folder must exist.
        A process killed while saving leaves the old file or the new one, never a torn one.
    feature_names:
        Names of the input columns ``(F,)``, recorded for the command line and reports.
    standardizer:
        A :class:`~bayesdl.data.Standardizer` the inputs were standardised with before fitting;
        recorded, not applied (see :class:`ModelInfo`).
    pipeline:
        A :class:`~bayesdl.tabular.TabularPipeline` whose encoded features are the model's
        inputs; recorded so that the file predicts from raw tables (``bayesdl predict``). The
        feature names default to its encoded features' names.
    """
    header, tensors = model_payload(
        posterior, feature_names=feature_names, standardizer=standardizer, pipeline=pipeline
    )
    write_file(path, "model", header, tensors)


def model_payload(
    posterior: Posterior | PosteriorWrapper,
    *,
    feature_names: Sequence[str] | None = None,
    standardizer: Standardizer | None = None,
    pipeline: TabularPipeline | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """The header and tensors :func:`save` writes (for files that hold a posterior among other
    things, such as a bandit agent's); :func:`posterior_from_payload` reads them back."""
    check_posterior(posterior)
    wrappers = []
    inner = posterior
    while isinstance(inner, PosteriorWrapper):
        wrappers.append({"name": inner.wrapper_name, "options": inner.wrapper_options()})
        inner = inner.posterior
    if inner.likelihood.name is None:
        raise ValueError(
            f"model files hold the library's likelihoods only; this posterior uses "
            f"{type(inner.likelihood).__name__}. Save its state_dict() yourself instead."
        )
    shape = inner.input_shape
    if pipeline is not None:
        if not isinstance(pipeline, TabularPipeline):
            raise TypeError(
                "pipeline must be a bayesdl.tabular.TabularPipeline, got "
                f"{type(pipeline).__name__}."
            )
        if pipeline.task != inner.task:
            raise ValueError(f"the pipeline is for {pipeline.task} but the model for {inner.task}.")
        if shape is not None and tuple(shape) != (pipeline.n_features,):
            raise ValueError(
                f"the pipeline encodes {pipeline.n_features} features but the model takes inputs "
                f"of shape {tuple(shape)}."
            )
        if feature_names is None:
            feature_names = pipeline.feature_names
    tensors = {_STATE + k: v for k, v in inner.state_dict().items()}
    header = {
        "library_version": __version__,
        "method": inner.name,
        "method_options": inner.options(),
        "task": inner.task,
        "likelihood": inner.likelihood.name,
        "likelihood_options": inner.likelihood.options(),
        "network": spec_of(inner.model),
        "network_class": f"{type(inner.model).__module__}.{type(inner.model).__qualname__}",
        "dtype": dtype_name(inner.dtype),
        "input_shape": None if shape is None else list(shape),
        "output_width": None if shape is None else _output_width(inner, shape),
        "wrappers": wrappers,
        "feature_names": _feature_names(feature_names, shape),
        "standardization": None,
        "pipeline": None if pipeline is None else pipeline.to_json(),
    }
    if standardizer is not None:
        header["standardization"] = _standardization(standardizer, shape)
        tensors[_X_MEAN] = standardizer.x_mean.detach()
        tensors[_X_STD] = standardizer.x_std.detach()
    return header, tensors


def _output_width(posterior: Posterior, shape: tuple[int, ...]) -> int:
    network = posterior.network
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *shape, dtype=posterior.dtype, device=posterior.device)
            return int(network(x).shape[-1])
    finally:
        network.train(was_training)


def _feature_names(names, shape) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"feature_names must be a sequence of strings, got {names!r}.")
    names = list(names)
    if shape is not None and (len(shape) != 1 or shape[0] != len(names)):
        raise ValueError(
            f"feature_names has {len(names)} names but the model takes inputs of shape "
            f"{tuple(shape)}; pass one name per input column."
        )
    return names


def _standardization(standardizer, shape) -> dict:
    if not isinstance(standardizer, Standardizer):
        raise TypeError(
            f"standardizer must be a bayesdl.data.Standardizer, got {type(standardizer).__name__}."
        )
    width = standardizer.x_mean.numel()
    if shape is not None and (len(shape) != 1 or shape[0] != width):
        raise ValueError(
            f"the standardizer has {width} input columns but the model takes inputs of shape "
            f"{tuple(shape)}."
        )
    return {"y_mean": float(standardizer.y_mean), "y_std": float(standardizer.y_std)}


# ---------------------------------------------------------------------------------- reading
def _field(header: dict, key: str, kinds, path: str, *, optional: bool = False):
    value = header.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise ModelFileError(
            f"the header of {path!r} has a bad {key!r} entry ({value!r}); the file is damaged "
            "or was not written by bayesdl.save. Save it again from the fitted model."
        )
    return value


def _int_list(value, key: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ModelFileError(f"the header of {path!r} has a bad {key!r} entry ({value!r}).")
    return tuple(value)


def _read(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, Tensor]]:
    header, tensors = read_file(path, "model")
    return _parse(header, tensors, os.fspath(path))


def _parse(header: dict, tensors: dict[str, Tensor], path: str):
    dtype_text = _field(header, "dtype", str, path)
    if dtype_text not in _DTYPES:
        raise ModelFileError(f"{path!r} names an unknown dtype {dtype_text!r}.")
    shape = header.get("input_shape")
    shape = None if shape is None else _int_list(shape, "input_shape", path)
    wrappers = _field(header, "wrappers", list, path)
    if not all(
        isinstance(w, dict)
        and isinstance(w.get("name"), str)
        and isinstance(w.get("options"), dict)
        for w in wrappers
    ):
        raise ModelFileError(f"the header of {path!r} has a bad 'wrappers' entry ({wrappers!r}).")
    names = header.get("feature_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise ModelFileError(f"the header of {path!r} has bad feature_names ({names!r}).")
    standardizer = None
    stats = _field(header, "standardization", dict, path, optional=True)
    if stats is not None:
        y_mean, y_std = stats.get("y_mean"), stats.get("y_std")
        x_mean, x_std = tensors.pop(_X_MEAN, None), tensors.pop(_X_STD, None)
        if not (
            isinstance(y_mean, (int, float))
            and isinstance(y_std, (int, float))
            and math.isfinite(y_mean)
            and math.isfinite(y_std)
            and y_std > 0
            and x_mean is not None
            and x_std is not None
            and x_mean.ndim == x_std.ndim == 1
            and len(x_mean) == len(x_std)
        ):
            raise ModelFileError(f"{path!r} has a bad standardisation entry.")
        standardizer = Standardizer(x_mean, x_std, float(y_mean), float(y_std))
    pipeline = header.get("pipeline")
    if pipeline is not None:
        try:
            pipeline = TabularPipeline.from_json(pipeline)
        except ValueError as err:
            raise ModelFileError(f"{path!r} has a bad 'pipeline' entry: {err}") from None
    width = header.get("output_width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise ModelFileError(f"the header of {path!r} has a bad 'output_width' ({width!r}).")
    info = ModelInfo(
        method=_field(header, "method", str, path),
        method_options=_field(header, "method_options", dict, path),
        task=_field(header, "task", str, path),
        likelihood=_field(header, "likelihood", str, path),
        likelihood_options=_field(header, "likelihood_options", dict, path),
        network=_field(header, "network", dict, path, optional=True),
        network_class=_field(header, "network_class", str, path),
        dtype=_DTYPES[dtype_text],
        input_shape=shape,
        output_width=width,
        wrappers=tuple((w["name"], w["options"]) for w in wrappers),
        feature_names=None if names is None else tuple(names),
        standardizer=standardizer,
        pipeline=pipeline,
        library_version=_field(header, "library_version", str, path),
        format_version=_field(header, "format_version", int, path),
    )
    unexpected = [k for k in tensors if not k.startswith(_STATE)]
    if unexpected:
        raise ModelFileError(f"{path!r} holds tensors bayesdl does not know: {unexpected[:5]}.")
    state = {k.removeprefix(_STATE): v for k, v in tensors.items()}
    return info, state


def inspect(path: str | os.PathLike) -> ModelInfo:
    """What the model file at ``path`` holds (verified, as :func:`load` would), without
    building the posterior: method, likelihood, shapes, wrappers, feature names, standardiser."""
    return _read(path)[0]


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    map_location: torch.device | str | None = None,
) -> Posterior | PosteriorWrapper:
    """The posterior saved at ``path``, ready to predict (with its wrappers, if any).

    Parameters
    ----------
    path:
        A file written by :func:`save`.
    model:
        The module to load the weights into, for a file saved from a module of your own (build
        it as for the original fit; every tensor's shape is checked against the file). Not
        needed for networks from :mod:`bayesdl.models`, which the file describes. Its weights
        are replaced; it is moved to the file's dtype and to ``map_location``.
    map_location:
        Device of the posterior: default the given module's device, else the CPU.

    Returns
    -------
    The :class:`~bayesdl.posteriors.base.Posterior` (or its calibration / conformal wrapper).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ModelFileError
        The file is damaged, of a newer format, names a method or network this library does not
        know, or its tensors do not fit ``model``. No partly built posterior is returned.
    """
    info, state = _read(path)
    return _build(info, state, os.fspath(path), model, map_location)


def posterior_from_payload(
    header: dict,
    tensors: dict[str, Tensor],
    path: str,
    model: nn.Module | None = None,
    map_location: torch.device | str | None = None,
) -> Posterior | PosteriorWrapper:
    """The posterior of a header and tensors from :func:`model_payload`, checked as
    :func:`load` checks a model file (``path`` names the file in errors)."""
    info, state = _parse(header, tensors, path)
    return _build(info, state, path, model, map_location)


def _build(info: ModelInfo, state, path: str, model, map_location):
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if model is None and info.network is None:
        raise ModelFileError(
            f"{path!r} was saved from a module of your own ({info.network_class}), which the "
            f"file cannot rebuild: pass it, e.g. bayesdl.load(path, model=MyNet()), built as "
            "for the original fit."
        )
    try:
        cls = get_posterior(info.method)
    except ValueError as err:
        raise ModelFileError(
            f"{path!r} holds a {info.method!r} posterior, which this bayesdl does not know "
            f"({err}) It was written by bayesdl {info.library_version}; install that version or "
            "newer."
        ) from None
    # First on the meta device (no memory): the posterior the header describes must have the
    # file's tensors, shape for shape, before anything the header sizes is allocated, and its
    # wrappers must build too, so that a file refused leaves a given module as it was.
    meta = _network(info, path, "meta") if model is None else meta_copy(model).to(info.dtype)
    meta_posterior = _posterior(cls, meta, info, path)
    _check_state(meta_posterior, state, info, path)
    _wrapped(meta_posterior, info, path)
    if model is None:
        device = torch.device("cpu") if map_location is None else torch.device(map_location)
        # The checked network itself, given memory (constructing a posterior leaves its module
        # as it was); zeroed, since the file's weights come next.
        model = meta.to_empty(device=device)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.zero_()
    else:
        ref = next(model.parameters(), None)
        device = torch.device(map_location) if map_location is not None else None
        if device is None:
            device = ref.device if ref is not None else torch.device("cpu")
        model.to(device=device, dtype=info.dtype)
    posterior = _posterior(cls, model, info, path)
    state = {k: v.to(device) for k, v in state.items()}
    try:
        posterior.load_state_dict(state, assign=True)  # the tensors are this call's own
    except (ValueError, RuntimeError, TypeError) as err:
        raise ModelFileError(f"{path!r} does not fit this module: {err}") from None
    return _wrapped(posterior, info, path)


def _wrapped(posterior: Posterior, info: ModelInfo, path: str) -> Posterior | PosteriorWrapper:
    """``posterior`` in the wrappers the header lists, from the inside out."""
    result: Posterior | PosteriorWrapper = posterior
    for name, options in reversed(info.wrappers):
        if name not in _WRAPPERS:
            raise ModelFileError(
                f"{path!r} wraps the posterior in {name!r}, which this bayesdl does not know; it "
                f"was written by bayesdl {info.library_version}."
            )
        try:
            result = _WRAPPERS[name]._rewrap(result, dict(options))
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{path!r} has bad {name} options {options}: {err}") from None
    return result


def _network(info: ModelInfo, path: str, device) -> nn.Module:
    try:
        return build(info.network, dtype=info.dtype, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ModelFileError(
            f"{path!r} describes a network this bayesdl cannot build ({info.network}): "
            f"{first_line(err)}"
        ) from None


def _posterior(cls: type[Posterior], model: nn.Module, info: ModelInfo, path: str) -> Posterior:
    """The unfitted posterior the header describes, on ``model``."""
    try:
        likelihood = likelihood_from_options(info.likelihood, dict(info.likelihood_options))
    except (TypeError, ValueError) as err:
        raise ModelFileError(
            f"{path!r} names a likelihood this bayesdl cannot build: {err}"
        ) from None
    if likelihood.task != info.task:
        raise ModelFileError(
            f"{path!r} is damaged: its task {info.task!r} is not that of its likelihood "
            f"{info.likelihood!r} ({likelihood.task})."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. initialisation warnings: weights come next
            return cls._from_options(model, likelihood, dict(info.method_options))
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError, MemoryError) as err:
        raise ModelFileError(
            f"{path!r}: cannot build the {info.method} posterior on this module with the saved "
            f"options {info.method_options}: {first_line(err)}"
        ) from None


def _check_state(posterior: Posterior, state: dict[str, Tensor], info: ModelInfo, path: str):
    """The file must hold every tensor of the unfitted ``posterior`` with its shape and dtype;
    name each one that differs (tensors only a fitted posterior has are the method's to check)."""
    own = posterior.state_dict()
    missing = sorted(set(own) - set(state))
    bad = []
    for k, v in own.items():
        if k in state and (tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype):
            file, module = tuple(state[k].shape), tuple(v.shape)
            if state[k].dtype != v.dtype:
                file = f"{file} {dtype_name(state[k].dtype)}"
                module = f"{module} {dtype_name(v.dtype)}"
            bad.append(f"{k.removeprefix('network.')}: file {file}, module {module}")
    if bad or missing:
        shown = "; ".join(bad[:8]) + ("; ..." if len(bad) > 8 else "")
        if missing:
            shown += ("; " if shown else "") + f"missing from the file: {missing[:8]}"
        raise ModelFileError(
            f"{path!r} does not fit this module ({info.network_class} in the file): {shown}. "
            "Build the module with the same layers and sizes as the one that was saved."
        )
    saved = state.get(_INPUT_SHAPE_KEY)
    if saved is not None and (
        saved.dtype != torch.long or saved.ndim != 1 or tuple(saved.tolist()) != info.input_shape
    ):
        raise ModelFileError(f"{path!r} is damaged: its input shapes disagree.")
