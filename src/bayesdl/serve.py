"""A prediction service: every prediction with its uncertainty and what to do about it.

``bayesdl serve MODEL`` serves a model file over HTTP (FastAPI on uvicorn, the optional extra
``pip install 'bayesdl[serve]'``):

- ``POST /v1/predict`` with ``{"instances": [[...], ...]}`` (values in the order of the model's
  input columns) or ``{"instances": [{"column": value, ...}, ...]}``. Each answer carries the
  fields of ``bayesdl predict`` (class and probabilities, or mean and interval; aleatoric and
  epistemic), the decision (``accept`` / ``refer``, with each rule's score against its threshold)
  and the model's id.
- ``GET /v1/health`` and ``GET /v1/metadata`` (method, task, columns, calibration, rules,
  limits); the OpenAPI description at ``/docs``.

A bad request gets a 4xx JSON answer ``{"error": {"status", "message", "instance", "field"}}``
naming the instance and field; an oversized body gets 413. Requests that arrive together are
micro-batched: the requests that queued while the worker thread was predicting (up to
``max_batch`` instances; optionally waiting ``max_wait_ms`` for more) go through the posterior as
one batch, so the posterior draws run once per batch rather than once per request.

The parts without FastAPI (:class:`ModelService`: checks, encoding, prediction, the answer's
fields; :class:`MicroBatcher`) can be used by another server.
"""

import asyncio
import contextlib
import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from bayesdl._version import __version__
from bayesdl.conformal import ConformalPredictor
from bayesdl.decisions import OODGate, Referral
from bayesdl.io import inspect, load
from bayesdl.predictions import ClassificationPrediction
from bayesdl.tabular import Table, _label

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_INSTANCES",
    "DEFAULT_MAX_WAIT_MS",
    "MicroBatcher",
    "ModelService",
    "RequestError",
    "create_app",
]

# Defaults of the service's limits (``bayesdl serve`` options of the same names).
#: Most instances predicted in one batch (``--max-batch``).
DEFAULT_MAX_BATCH = 256
#: How long, in milliseconds, a batch waits for more requests after its first (``--max-wait-ms``).
DEFAULT_MAX_WAIT_MS = 0.0
#: Most instances in one request (``--max-instances``).
DEFAULT_MAX_INSTANCES = 1000
#: Largest request body in bytes (``--max-body-bytes``).
DEFAULT_MAX_BODY_BYTES = 1_000_000


class RequestError(ValueError):
    """A request the service refuses: HTTP ``status`` (4xx), a message, and where it is."""

    def __init__(
        self, status: int, message: str, *, instance: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.instance = instance
        self.field = field

    def to_json(self) -> dict:
        """The answer's body: ``{"error": {"status", "message", "instance", "field"}}``."""
        return {
            "error": {
                "status": self.status,
                "message": self.message,
                "instance": self.instance,
                "field": self.field,
            }
        }


# ---------------------------------------------------------------------------- the service
class ModelService:
    """One model file, loaded once and read only: checks requests, predicts, answers.

    Parameters
    ----------
    path:
        A model file from ``bayesdl fit`` / ``calibrate`` (with its column encoding), or one
        saved from Python with :func:`bayesdl.save` of a network from :mod:`bayesdl.models`
        (then an instance is a list of numbers of the input's size).
    samples:
        Posterior draws per prediction (default: the method's own).
    seed:
        Seed of the draws. Every batch draws from the same seed, so weight-space methods (deep
        ensembles, VI, SWAG, Laplace) give an instance the same answer whatever it is batched
        with; MC dropout's masks are drawn per instance and differ between batchings.
    level:
        Regression: level of the central intervals of an uncalibrated model (default 0.9); a
        calibrated model's conformal intervals keep their ``1 - alpha``.
    max_instances:
        Most instances in one request.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        samples: int | None = None,
        seed: int = 0,
        level: float | None = None,
        max_instances: int = DEFAULT_MAX_INSTANCES,
    ) -> None:
        from bayesdl.commands import _check_samples, _wrapper

        self.path = Path(path)
        self.info = inspect(path)
        self.posterior = load(path)
        _check_samples(self.posterior, samples)
        self.pipeline = self.info.pipeline
        self.samples = samples
        self.seed = seed
        self.level = level
        self.max_instances = max_instances
        self.classification = self.info.task == "classification"
        self.conformal = _wrapper(self.posterior, ConformalPredictor)
        self.referral = _wrapper(self.posterior, Referral)
        self.gate = _wrapper(self.posterior, OODGate)
        with open(path, "rb") as f:
            digest = xxhash.xxh3_64(f.read()).hexdigest()
        #: ``"<file stem>-<first 12 hex digits of the file's XXH3 hash>"``: changes with the file.
        self.model_id = f"{self.path.stem}-{digest[:12]}"
        if self.pipeline is not None:
            self.columns = list(self.pipeline.input_columns)
            self.kinds = {c.name: c for c in self.pipeline.columns}
            self.classes = list(self.pipeline.classes or [])
        else:
            shape = self.info.input_shape
            if shape is None:
                raise ValueError(f"{str(path)!r} holds a posterior that was never fitted.")
            self.columns = (
                list(self.info.feature_names)
                if self.info.feature_names and len(shape) == 1
                else [f"x{i}" for i in range(math.prod(shape))]
            )
            self.kinds = {}
            self.classes = [str(k) for k in range(self.info.output_width or 0)]
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> list:
        """The instances of a request body (JSON), checked for shape; a
        :class:`RequestError` otherwise."""

        def refuse_constant(name: str):
            raise RequestError(
                400, f"the body holds {name}, which is not JSON; send finite numbers only."
            )

        try:
            doc = json.loads(body, parse_constant=refuse_constant)
        except RequestError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}.") from None
        return self._instances(doc)

    def _instances(self, doc: Any) -> list:
        from pydantic import ValidationError

        try:
            request = _request_model().model_validate(doc)
        except ValidationError as err:
            raise _from_pydantic(err, instance_index=None) from None
        instances = request.instances
        if len(instances) > self.max_instances:
            raise RequestError(
                413,
                f"{len(instances)} instances; this server takes at most {self.max_instances} "
                "per request (bayesdl serve --max-instances): split the request.",
            )
        return instances

    def encode(self, instances: list) -> Tensor:
        """Checked instances -> the model's inputs ``(N, ...)``; a :class:`RequestError` (422)
        naming the instance and field of the first bad value."""
        from pydantic import ValidationError

        rows = []
        for i, instance in enumerate(instances):
            try:
                if isinstance(instance, dict):
                    values = _OBJECT.validate_python(instance)
                elif isinstance(instance, list):
                    values = _ROW.validate_python(instance)
                else:
                    raise RequestError(
                        422,
                        "expected a list of values in the order of the model's columns, or an "
                        f"object {{column: value}}; got {type(instance).__name__}.",
                        instance=i,
                    )
            except ValidationError as err:
                raise _from_pydantic(err, instance_index=i, columns=self.columns) from None
            rows.append(self._row(i, values))
        if self.pipeline is not None:
            table = Table(
                {
                    name: np.asarray([r[k] for r in rows], dtype=_dtype(self.kinds[name]))
                    for k, name in enumerate(self.columns)
                },
                "<request>",
            )
            x = self.pipeline.transform(table, dtype=self.info.dtype)
        else:
            x = torch.tensor(rows, dtype=self.info.dtype)
        bad = (~torch.isfinite(x)).reshape(len(rows), -1).nonzero()
        if len(bad):  # finite in JSON, but beyond the weights' float type once encoded
            i, k = int(bad[0, 0]), int(bad[0, 1])
            field = self.columns[k] if self.pipeline is None else self._column_of(k)
            raise RequestError(
                422,
                f"number too large: out of the model's {str(self.info.dtype).split('.')[-1]} "
                "range once standardised.",
                instance=i,
                field=field,
            )
        return x.reshape(len(rows), *self.info.input_shape)

    def _column_of(self, feature: int) -> str:
        """The input column of encoded feature ``feature``."""
        for column in self.pipeline.columns:
            if feature < column.width:
                return column.name
            feature -= column.width
        raise IndexError(feature)

    def _row(self, i: int, values) -> list:
        if isinstance(values, dict):
            if self.pipeline is None:
                raise RequestError(
                    422,
                    "this model has no column names (it was saved from Python without a "
                    f"pipeline); send a list of {len(self.columns)} numbers.",
                    instance=i,
                )
            missing = [c for c in self.columns if c not in values]
            if missing:
                raise RequestError(
                    422,
                    f"missing column(s) {', '.join(map(repr, missing[:5]))}; the model needs "
                    f"{', '.join(self.columns)}.",
                    instance=i,
                    field=missing[0],
                )
            values = [values[c] for c in self.columns]
        elif len(values) != len(self.columns):
            raise RequestError(
                422,
                f"{len(values)} values; the model needs {len(self.columns)}, in this order: "
                f"{', '.join(self.columns[:20])}{' ...' if len(self.columns) > 20 else ''}.",
                instance=i,
            )
        return [self._value(i, name, v) for name, v in zip(self.columns, values, strict=True)]

    def _value(self, i: int, name: str, value):
        column = self.kinds.get(name)
        if value is None:
            raise RequestError(422, "missing value (null); send a value.", instance=i, field=name)
        if column is not None and column.kind == "categorical":
            label = value if isinstance(value, str) else _label(float(value))
            if label not in column.categories:
                shown = ", ".join(column.categories[:12])
                more = " ..." if len(column.categories) > 12 else ""
                raise RequestError(
                    422,
                    f"category {label!r} was not seen in training (known: {shown}{more}).",
                    instance=i,
                    field=name,
                )
            return label
        if isinstance(value, str):
            raise RequestError(
                422, f"text {value!r} in a numeric field; send a number.", instance=i, field=name
            )
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if math.isinf(number) and not isinstance(value, float):
            raise RequestError(422, "number too large for a float.", instance=i, field=name)
        if not math.isfinite(number):
            raise RequestError(422, "infinite value; send a finite number.", instance=i, field=name)
        return number

    # ------------------------------------------------------------------ predicting
    def predict(self, x: Tensor) -> list[dict]:
        """The answer of each row of the inputs ``x`` ``(N, ...)``: prediction and decision."""
        from bayesdl.commands import _in_units, _intervals, _sets

        generator = torch.Generator().manual_seed(self.seed)
        with self._lock, torch.no_grad():  # one batch at a time through the posterior
            pred = self.posterior.predict(x, self.samples, generator=generator)
            decisions = [
                (rule, rule.decide(pred)) for rule in (self.referral, self.gate) if rule is not None
            ]
            if isinstance(pred, ClassificationPrediction):
                sets = (
                    _sets(pred, self.conformal, generator).tolist()
                    if self.conformal is not None
                    else None
                )
                fields = self._classification(pred, sets)
            else:
                units = _in_units(pred, self.pipeline) if self.pipeline is not None else pred
                lower, upper, level, kind = _intervals(units, self.conformal, self.level)
                fields = _regression(units, lower, upper, level, kind)
        for k, answer in enumerate(fields):
            reasons = [_reason(rule, d, k) for rule, d in decisions]
            answer["decision"] = {
                "action": "refer" if any(r["refer"] for r in reasons) else "accept",
                "reasons": reasons,
            }
        return fields

    def _classification(self, pred: ClassificationPrediction, sets) -> list[dict]:
        probs = pred.probs.double().tolist()
        labels = pred.label.tolist()
        conf, total = pred.confidence.double().tolist(), pred.total.double().tolist()
        alea, epi = pred.aleatoric.double().tolist(), pred.epistemic.double().tolist()
        out = []
        for k in range(len(probs)):
            answer = {
                "predicted": self.classes[labels[k]],
                "probabilities": dict(zip(self.classes, probs[k], strict=True)),
                "confidence": conf[k],
                "total": total[k],
                "aleatoric": alea[k],
                "epistemic": epi[k],
            }
            if sets is not None:
                answer["set"] = [c for c, m in zip(self.classes, sets[k], strict=True) if m]
            out.append(answer)
        return out

    # ------------------------------------------------------------------ describing
    def metadata(self) -> dict:
        """What ``GET /v1/metadata`` answers: the model, its columns, calibration and rules."""
        from bayesdl.commands import _wrapper_summary

        info, pipeline = self.info, self.pipeline
        doc: dict = {
            "model_id": self.model_id,
            "model_file": self.path.name,
            "method": info.method,
            "method_options": info.method_options,
            "task": info.task,
            "likelihood": info.likelihood,
            "written_by": info.library_version,
            "served_by": __version__,
            "columns": [
                (
                    {"name": c.name, "kind": "numeric"}
                    if c.kind == "numeric"
                    else {"name": c.name, "kind": "categorical", "categories": list(c.categories)}
                )
                for c in pipeline.columns
            ]
            if pipeline is not None
            else [{"name": name, "kind": "numeric"} for name in self.columns],
            "wrappers": [_wrapper_summary(name, options) for name, options in info.wrappers],
            "samples": self.samples,
            "max_instances": self.max_instances,
        }
        if self.classification:
            doc["classes"] = self.classes
        elif pipeline is not None:
            doc["target"] = {
                "name": pipeline.target,
                "mean": pipeline.y_mean,
                "std": pipeline.y_std,
            }
        if pipeline is not None:
            doc["target_name"] = pipeline.target
        return doc


def _dtype(column) -> object:
    return np.float64 if column.kind == "numeric" else object


def _regression(units, lower: Tensor, upper: Tensor, level: float, kind: str) -> list[dict]:
    mean, lo, hi = units.mean.double().tolist(), lower.double().tolist(), upper.double().tolist()
    alea = units.aleatoric.double().sqrt().tolist()
    epi = units.epistemic.double().sqrt().tolist()
    return [
        {
            "mean": mean[k],
            "lower": lo[k],
            "upper": hi[k],
            "level": level,
            "interval": kind,
            "aleatoric_std": alea[k],
            "epistemic_std": epi[k],
        }
        for k in range(len(mean))
    ]


def _reason(rule, decision, k: int) -> dict:
    """One rule's verdict on case ``k``: its score against its threshold, and why."""
    score_name = rule.score if isinstance(rule.score, str) else json.dumps(rule.score)
    value = float(decision.score[k])
    refer = bool(decision.refer[k])
    threshold = decision.threshold if math.isfinite(decision.threshold) else None
    reason: dict = {
        "rule": decision.rule,
        "score": score_name,
        "value": value,
        "threshold": threshold,
        "refer": refer,
    }
    if decision.rule == "ood_gate":
        p = float(decision.p_value[k])
        reason["p_value"] = p
        reason["why"] = (
            f"unlike the calibration inputs: p-value {p:.3g} <= false-alarm rate "
            f"{rule.false_alarm:g}"
            if refer
            else f"like the calibration inputs: p-value {p:.3g} > {rule.false_alarm:g}"
        )
    elif threshold is None:
        reason["why"] = "no threshold was certified at calibration: every case is referred"
    else:
        sign = ">" if refer else "<="
        reason["why"] = f"{score_name} {value:.4g} {sign} threshold {threshold:.4g}"
    return reason


# ---------------------------------------------------------------------------- pydantic parts
_MODELS: dict = {}


def _request_model():
    """The request's pydantic model (built on first use: pydantic is imported lazily)."""
    if "request" not in _MODELS:
        from pydantic import BaseModel, ConfigDict, Field

        class PredictRequest(BaseModel):
            """``{"instances": [...]}``: rows as lists of values in the order of the model's
            columns, or as objects ``{column: value}``."""

            model_config = ConfigDict(extra="forbid")
            instances: list[Any] = Field(min_length=1)

        _MODELS["request"] = PredictRequest
    return _MODELS["request"]


class _LazyAdapter:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._adapter = None

    def validate_python(self, value):
        if self._adapter is None:
            from typing import Union

            from pydantic import StrictFloat, StrictInt, StrictStr, TypeAdapter

            scalar = Union[StrictInt, StrictFloat, StrictStr, None]  # noqa: UP007
            self._adapter = TypeAdapter(list[scalar] if self.kind == "row" else dict[str, scalar])
        return self._adapter.validate_python(value)


_ROW = _LazyAdapter("row")
_OBJECT = _LazyAdapter("object")


def _from_pydantic(err, *, instance_index: int | None, columns: list[str] | None = None):
    """A pydantic ValidationError as one :class:`RequestError` (422) naming where."""
    first = err.errors()[0]
    loc = list(first.get("loc", ()))
    instance = instance_index
    field = None
    if instance_index is None and loc[:1] == ["instances"] and len(loc) > 1:
        instance = loc[1] if isinstance(loc[1], int) else None
        loc = loc[2:]
    elif instance_index is None and loc:
        field = str(loc[0])
        loc = []
    # Union members add tags such as "int" / "str"; the first other entry is the position.
    position = next((p for p in loc if isinstance(p, int)), None)
    key = next((p for p in loc if isinstance(p, str) and p not in _UNION_TAGS), None)
    if position is not None and columns is not None and position < len(columns):
        field = columns[position]
    elif key is not None:
        field = key
    kind = first.get("type", "")
    message = first.get("msg", "invalid value")
    if kind == "missing" and field == "instances":
        message = 'missing "instances": send {"instances": [[...], ...]}'
    elif kind == "extra_forbidden":
        message = f'unknown key {field!r}; the body holds only "instances"'
    elif kind == "too_short" and field == "instances":
        message = "no instances: send at least one"
    elif kind == "model_type" or (instance is None and field is None):
        message = 'expected a JSON object {"instances": [...]}'
    elif field == "instances":
        message = "expected a list of instances"
    elif instance is not None:
        got = type(first.get("input")).__name__
        got = {"dict": "an object", "list": "a list", "bool": "true/false"}.get(got, got)
        message = f"expected a number (or text for a categorical column), got {got}"
    return RequestError(422, message, instance=instance, field=field)


_UNION_TAGS = {"int", "float", "str", "none", "list[...]", "dict[str,...]", "function-after"}


# ---------------------------------------------------------------------------- batching
class MicroBatcher:
    """Collects the instances of concurrent requests into batches for one worker thread.

    A batch takes every request waiting when the worker is free, up to ``max_batch`` instances;
    with ``max_wait_ms > 0`` it also waits that long after its first request for more. A
    request larger than ``max_batch`` runs as a batch of its own. The posterior runs in one
    worker thread, off the event loop, so requests that arrive while it predicts queue up and
    form the next batch: under load batches grow by themselves, and an idle server answers at
    once (the default ``max_wait_ms = 0``).
    """

    def __init__(
        self,
        service: ModelService,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}."
            )
        self.service = service
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches = 0
        self.instances = 0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bayesdl-predict")

    async def predict(self, x: Tensor) -> list[dict]:
        """The answers for the inputs ``x`` ``(N, ...)``, predicted with whatever else arrived."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            size = len(batch[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    item = (
                        queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(queue.get(), timeout)
                    )
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if size + len(item[0]) > self.max_batch:
                    await self._flush(batch, loop)  # the newcomer starts the next batch
                    batch, size = [item], len(item[0])
                    deadline = loop.time() + self.max_wait
                    continue
                batch.append(item)
                size += len(item[0])
            await self._flush(batch, loop)

    async def _flush(self, batch: list, loop) -> None:
        try:  # anything failing here reaches the requests of this batch, none is left waiting
            x = torch.cat([item[0] for item in batch]) if len(batch) > 1 else batch[0][0]
            answers = await loop.run_in_executor(self._executor, self.service.predict, x)
        except Exception as err:  # the requests of this batch get the error, the server lives
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        self.batches += 1
        self.instances += len(x)
        start = 0
        for inputs, future in batch:
            n = len(inputs)
            if not future.done():
                future.set_result(answers[start : start + n])
            start += n

    def close(self) -> None:
        """Stop the worker task and thread."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)


# ---------------------------------------------------------------------------- the app
def create_app(
    service: ModelService | str | os.PathLike,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
):
    """The FastAPI application serving ``service`` (or the model file at that path).

    Needs the optional extra ``bayesdl[serve]`` (FastAPI; uvicorn to run it).
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError as err:
        raise ImportError(
            "bayesdl serve needs FastAPI and uvicorn: pip install 'bayesdl[serve]'."
        ) from err
    if not isinstance(service, ModelService):
        service = ModelService(service)
    batcher = MicroBatcher(service, max_batch=max_batch, max_wait_ms=max_wait_ms)
    started = time.time()
    counts = {"requests": 0, "refused": 0, "failed": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):  # uvicorn runs it; on SIGTERM requests in flight finish first
        yield
        batcher.close()

    app = FastAPI(
        lifespan=lifespan,
        title="bayesdl",
        version=__version__,
        summary="Predictions with their uncertainty, and the decision to accept or refer.",
    )
    app.state.service = service
    app.state.batcher = batcher

    def error(exc: RequestError) -> JSONResponse:
        counts["refused"] += 1
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # 404, 405, ...
        return error(RequestError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()))
        return error(RequestError(422, first.get("msg", "invalid request"), field=field))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        counts["failed"] += 1
        return JSONResponse(
            RequestError(500, f"internal error: {type(exc).__name__}: {exc}").to_json(),
            status_code=500,
        )

    schema = _request_model().model_json_schema()
    example_row = [
        0.0 if c.get("kind") == "numeric" else c["categories"][0]
        for c in service.metadata()["columns"]
    ]
    schema["example"] = {"instances": [example_row]}

    @app.post(
        "/v1/predict",
        summary="Predict, with uncertainty and a decision, for each instance",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
    )
    async def predict(request: Request):
        counts["requests"] += 1
        try:
            body = await _read_body(request, max_body_bytes)
            x = service.encode(service.parse(body))
        except RequestError as exc:
            return error(exc)
        except ValueError as exc:  # the pipeline's own checks (DataError)
            return error(RequestError(422, str(exc)))
        answers = await batcher.predict(x)
        # A JSONResponse of plain values: FastAPI's encoder would walk every number again.
        return JSONResponse({"model_id": service.model_id, "predictions": answers})

    @app.get("/v1/health", summary="Whether the service is up, with counts")
    async def health():
        return {
            "status": "ok",
            "model_id": service.model_id,
            "uptime_s": time.time() - started,
            **counts,
            "batches": batcher.batches,
            "instances": batcher.instances,
        }

    @app.get("/v1/metadata", summary="The model: method, task, columns, calibration, rules")
    async def metadata():
        return {
            **service.metadata(),
            "max_batch": batcher.max_batch,
            "max_wait_ms": batcher.max_wait * 1000.0,
            "max_body_bytes": max_body_bytes,
            "torch_threads": torch.get_num_threads(),
        }

    return app


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 beyond ``limit`` bytes (by its declared length, or as it
    streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length {declared!r} is not a number.") from None
        if size > limit:
            raise RequestError(
                413,
                f"the body has {size} bytes; this server takes at most {limit} "
                "(bayesdl serve --max-body-bytes): send fewer instances per request.",
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413,
                f"the body exceeds {limit} bytes (bayesdl serve --max-body-bytes): send fewer "
                "instances per request.",
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, 'empty body: send {"instances": [[...], ...]} as JSON.')
    return body


# ---------------------------------------------------------------------------- the command
def add_parser(subparsers, make_parser) -> None:
    """Add ``serve`` to the command line's ``subparsers`` (``make_parser`` is the commands'
    one-line-error parser factory)."""
    from bayesdl.commands import _nonnegative_int, _open_fraction, _positive_int

    serve = make_parser(
        subparsers,
        "serve",
        "serve a model file over HTTP: predictions with uncertainty and the decision",
        "POST /v1/predict, GET /v1/health, GET /v1/metadata, OpenAPI at /docs (FastAPI on "
        "uvicorn: pip install 'bayesdl[serve]'). SIGTERM or Ctrl-C stops it once the requests "
        "in flight are answered.",
    )
    serve.add_argument("model", metavar="MODEL", help="model file")
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=_nonnegative_int, default=8000, help="default 8000")
    serve.add_argument(
        "--max-batch",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH,
        help=f"most instances predicted as one batch (default {DEFAULT_MAX_BATCH})",
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="how long a batch waits for more requests after its first "
        f"(default {DEFAULT_MAX_WAIT_MS:g})",
    )
    serve.add_argument(
        "--max-instances",
        type=_positive_int,
        default=DEFAULT_MAX_INSTANCES,
        help=f"most instances per request (default {DEFAULT_MAX_INSTANCES})",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--samples", type=_positive_int, default=None, help="posterior draws per prediction"
    )
    serve.add_argument(
        "--level",
        type=_open_fraction,
        default=None,
        help="regression: level of an uncalibrated model's intervals (default 0.9)",
    )
    serve.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed of the posterior draws (default 0)"
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads for a prediction (default 1: under concurrent requests the "
        "micro-batches use the cores better than threads inside one small batch)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default info)",
    )


def serve_command(args) -> int:
    """``bayesdl serve``: load the model (a bad file stops here, with one line), then run."""
    from bayesdl.commands import CommandError

    try:
        import uvicorn
    except ImportError:
        raise CommandError(
            "bayesdl serve needs FastAPI and uvicorn: pip install 'bayesdl[serve]'."
        ) from None
    torch.set_num_threads(args.threads)
    service = ModelService(
        args.model,
        samples=args.samples,
        seed=args.seed,
        level=args.level,
        max_instances=args.max_instances,
    )
    app = create_app(
        service,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
    )
    print(
        f"serving {args.model} ({service.info.method}, {service.info.task}, id "
        f"{service.model_id}) at http://{args.host}:{args.port}/v1/predict; docs at /docs",
        flush=True,
    )
    # uvicorn answers SIGTERM by finishing the requests in flight, then raises the signal again
    # with the handler it found: ours notes it, so a graceful stop exits 0 instead of dying by it.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print("stopped by SIGTERM after answering the requests in flight", flush=True)
    return 0
