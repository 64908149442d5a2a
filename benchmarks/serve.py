"""How fast does ``bayesdl serve`` answer, and how much does HTTP cost next to predicting in the
process itself?

Run from the repository root::

    python -m benchmarks.serve [--requests 400] [--instances-per-request 1] [--out DIR] [--quick]

What it does, all on this machine and on the loopback address only:

* data: a seeded synthetic classification table (numpy, seed 0): 2000 rows of 8 standard-normal
  columns ``x0 .. x7`` and a 0/1 label from a logistic model with two nonlinear terms; the first
  1500 rows train, the last 500 calibrate;
* model: ``bayesdl fit`` (a deep ensemble of 5 networks, one hidden layer of 50, at most 30
  epochs) and ``bayesdl calibrate --target-risk 0.1``, run in this process as a user types them,
  so every answer carries a referral decision (``accept`` / ``refer``);
* requests: a fixed list of ``--requests`` bodies ``{"instances": [...]}`` of
  ``--instances-per-request`` rows each, taken in turn from the 2000 rows (features only); every
  concurrency level sends the same list;
* baseline: the same requests predicted in this process, one after another, exactly as the
  server does per batch without HTTP: ``ModelService(model)``, then
  ``service.predict(service.encode(instances))`` per request (after 50 warm-up calls);
* server: the real command, ``python -m bayesdl serve MODEL --host 127.0.0.1 --port P
  --log-level warning`` (default ``--max-batch`` and ``--max-wait-ms``), as a subprocess on a
  free port, warmed up with 50 requests (8 in flight, not recorded); it is stopped (SIGTERM,
  then killed if it does not stop) whatever happens;
* load: for concurrency 1, 8 and 32, that many workers of one ``httpx.AsyncClient`` send the
  request list (each worker takes the next request when its last one is answered) and stop when
  it is done: a closed loop with a fixed amount of work, not a fixed duration. Per level: errors
  (a status other than 200, an exception, or an answer without one prediction and decision per
  instance), wall seconds, requests and instances per second, latency per request (p50, p99, in
  ms, from sending to the parsed answer), the mean micro-batch (the difference of ``GET
  /v1/health``'s ``instances`` over ``batches`` counters before and after the level), the ratio
  of the server's instances per second to the baseline's, and the largest difference between a
  served probability and the baseline's for the same instance (a deep ensemble answers an
  instance alike whatever it is batched with, up to float rounding). The load generator's own
  CPU time per level is recorded too.

The load generator shares the machine's cores with the server, so on a small machine the numbers
are a lower bound of what the server does alone (at 32 in flight httpx alone keeps about one
core busy). The server runs with its default of one torch thread (``--threads 1``: on two
cores, two threads inside a one-row prediction cost three times the CPU per request); the
in-process baseline keeps torch's default. ``--quick`` (40 requests
per level, an ensemble of 2 networks of width 8 trained for 2 epochs on 200 rows) runs in
seconds for the test suite and writes ``serve_cpu_quick.*``; its numbers say nothing about the
service. It writes ``serve_cpu.json`` and ``.md`` into ``--out`` and exits with status 1 if any
request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks._results import environment, run_bayesdl, write_results

__all__ = ["LEVELS", "QUICK", "Config", "main", "make_data", "write_markdown"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
#: Concurrency levels: how many requests are in flight at once.
LEVELS = (1, 8, 32)
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
WARMUP_REQUESTS = 50


@dataclass(frozen=True)
class Config:
    """The data and the model of one run (written into the JSON)."""

    rows: int = 2000
    calibration_rows: int = 500
    columns: int = 8
    members: int = 5
    hidden: int = 50
    epochs: int = 30
    target_risk: float = 0.1
    seed: int = 0


QUICK = Config(rows=400, calibration_rows=200, members=2, hidden=8, epochs=2)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data and model
def make_data(config: Config, folder: Path) -> tuple[Path, Path, np.ndarray]:
    """``train.csv`` and ``calibration.csv`` in ``folder`` (columns ``x0 ..``, ``label``), and
    every row's features ``(rows, columns)`` rounded as written."""
    rng = np.random.default_rng(config.seed)
    x = np.round(rng.normal(size=(config.rows, config.columns)), 4)
    weights = rng.normal(size=config.columns)
    logit = 2.0 * (x @ weights + 0.8 * np.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2])
    y = (logit + rng.logistic(size=config.rows) > 0).astype(int)
    header = [f"x{k}" for k in range(config.columns)] + ["label"]
    cut = config.rows - config.calibration_rows
    paths = (folder / "train.csv", folder / "calibration.csv")
    for path, part in zip(paths, (slice(0, cut), slice(cut, None)), strict=True):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([*row, label] for row, label in zip(x[part], y[part], strict=True))
    return paths[0], paths[1], x


def fit_model(config: Config, train: Path, calibration: Path, folder: Path) -> tuple[Path, str]:
    """The calibrated model file (fit, then calibrate with a referral rule) and calibrate's
    report."""
    model, calibrated = folder / "model.safetensors", folder / "calibrated.safetensors"
    run_bayesdl(
        "fit", str(train), "--target", "label", "--out", str(model), "--quiet",
        "--members", str(config.members), "--hidden", str(config.hidden),
        "--epochs", str(config.epochs), "--seed", str(config.seed),
    )  # fmt: skip
    report = run_bayesdl(
        "calibrate", str(model), str(calibration), "--out", str(calibrated),
        "--target-risk", str(config.target_risk),
    )  # fmt: skip
    return calibrated, report


def make_requests(x: np.ndarray, n_requests: int, per_request: int) -> list[list[list[float]]]:
    """``n_requests`` lists of ``per_request`` rows, taken in turn (cycling) from ``x``."""
    order = np.arange(n_requests * per_request) % len(x)
    return [x[order[k * per_request : (k + 1) * per_request]].tolist() for k in range(n_requests)]


# ----------------------------------------------------------------------------- measuring
def _percentiles_ms(seconds: list[float]) -> dict:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(np.mean(seconds) * 1000.0)}


def in_process(model: Path, requests: list) -> tuple[dict, list[list[dict]]]:
    """The baseline: each request's instances encoded and predicted in this process, one request
    after another; its figures and answers."""
    from bayesdl.serve import ModelService

    service = ModelService(model)
    for instances in requests[:WARMUP_REQUESTS]:
        service.predict(service.encode(instances))
    answers, latencies = [], []
    start = time.perf_counter()
    for instances in requests:
        t0 = time.perf_counter()
        answers.append(service.predict(service.encode(instances)))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    n_instances = sum(len(r) for r in requests)
    figures = {
        "requests": len(requests),
        "instances": n_instances,
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "instances_per_s": n_instances / wall,
        "latency_ms": _percentiles_ms(latencies),
    }
    return figures, answers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, log_path: Path):
    """``bayesdl serve`` on a free loopback port, up and healthy: yields ``(base URL,
    command)``; always stopped on the way out (SIGTERM, then killed after a timeout)."""
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "bayesdl", "serve", str(model), "--host", HOST,
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {server.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {STARTUP_TIMEOUT_S:g} s")
            time.sleep(0.2)
        yield url, command
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _answer_ok(response, n_instances: int) -> bool:
    """A 200 with one prediction, carrying a decision, per instance."""
    if response.status_code != 200:
        return False
    predictions = response.json().get("predictions")
    return (
        isinstance(predictions, list)
        and len(predictions) == n_instances
        and all("decision" in p for p in predictions)
    )


async def load_level(url: str, requests: list, concurrency: int) -> dict:
    """Send every request with ``concurrency`` in flight; the level's figures and answers
    (``None`` for a failed request)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    answers: list = [None] * len(requests)
    errors: list[str] = []
    queue = iter(range(len(requests)))

    async def worker(client: httpx.AsyncClient) -> None:
        for k in queue:  # the workers share one iterator: each takes the next request
            t0 = time.perf_counter()
            try:
                response = await client.post("/v1/predict", json={"instances": requests[k]})
                ok = _answer_ok(response, len(requests[k]))
            except (httpx.HTTPError, ValueError) as err:
                errors.append(f"request {k}: {type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - t0)
            if ok:
                answers[k] = response.json()["predictions"]
            else:
                errors.append(f"request {k}: status {response.status_code}: {response.text[:200]}")

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        before = (await client.get("/v1/health")).json()
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = (await client.get("/v1/health")).json()
    n_instances = sum(len(r) for r in requests)
    batches = after["batches"] - before["batches"]
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "instances": n_instances,
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": wall,
        "client_cpu_s": cpu,
        "requests_per_s": len(requests) / wall,
        "instances_per_s": n_instances / wall,
        "latency_ms": _percentiles_ms(latencies) if latencies else None,
        "health_before": {k: before[k] for k in ("batches", "instances", "requests")},
        "health_after": {k: after[k] for k in ("batches", "instances", "requests")},
        "mean_batch": (after["instances"] - before["instances"]) / batches if batches else None,
        "answers": answers,
    }


def _max_difference(served: list, baseline: list) -> float | None:
    """The largest absolute difference between served and baseline class probabilities, over
    the requests answered; None when none was."""
    gaps = [
        abs(s["probabilities"][c] - b["probabilities"][c])
        for got, want in zip(served, baseline, strict=True)
        if got is not None
        for s, b in zip(got, want, strict=True)
        for c in b["probabilities"]
    ]
    return max(gaps) if gaps else None


# ----------------------------------------------------------------------------- results
def write_markdown(results: dict, path: Path) -> None:
    """The table of one run, with what was measured and how."""
    base, model, env = results["in_process"], results["model"], results["environment"]
    lines = [
        "# bayesdl serve under load, on the loopback address",
        "",
        f"{results['date']}; {env['cpus']} CPUs, torch {env['torch']}, Python {env['python']}, "
        f"FastAPI {env['fastapi']}, uvicorn {env['uvicorn']}, httpx {env['httpx']}. Server: "
        f"`{results['server']['command']}` (max batch {results['server']['max_batch']}, max "
        f"wait {results['server']['max_wait_ms']:g} ms, {results['server']['torch_threads']} "
        f"torch thread(s), its default); the in-process baseline keeps torch's default of "
        f"{env['threads']} thread(s).",
        "",
        f"Model: {model['description']}. {results['requests_per_level']} requests per level of "
        f"{results['instances_per_request']} instance(s) each, the same list at every level; "
        "each level sends them all with that many requests in flight (httpx.AsyncClient, in "
        "one process on the same machine as the server) and stops. Latency is per request, "
        "from sending to the parsed answer. Mean batch: instances per micro-batch, from the "
        "server's /v1/health counters. Ratio: the server's instances per second over those of "
        "the in-process baseline (`ModelService.predict(encode(instances))` per request, "
        "sequentially, no HTTP).",
        "",
        "| level | requests | errors | req/s | p50 ms | p99 ms | mean batch "
        "| ratio to in-process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| in-process (sequential) | {base['requests']} | 0 | {base['requests_per_s']:.1f} | "
        f"{base['latency_ms']['p50']:.2f} | {base['latency_ms']['p99']:.2f} | "
        f"{results['instances_per_request']} | 1.00 |",
    ]
    for level in results["levels"]:
        latency = level["latency_ms"]
        p50, p99 = (f"{latency['p50']:.2f}", f"{latency['p99']:.2f}") if latency else ("-", "-")
        batch = "-" if level["mean_batch"] is None else f"{level['mean_batch']:.2f}"
        lines.append(
            f"| {level['concurrency']} | {level['requests']} | {level['errors']} | "
            f"{level['requests_per_s']:.1f} | {p50} | {p99} | {batch} | {level['ratio']:.2f} |"
        )
    gap = results["max_probability_difference"]
    busy = ", ".join(
        f"{level['concurrency']}: {level['client_cpu_s'] / level['wall_s']:.0%}"
        for level in results["levels"]
    )
    lines += [
        "",
        "CPU time of the load generator (this process: httpx and asyncio) over the wall time, "
        f"per level: {busy} of one core; the server shares the same {env['cpus']} cores.",
        "",
        "Largest difference between a served probability and the in-process one for the same "
        f"instance, over all levels: {'-' if gap is None else f'{gap:.2g}'}. Share of answers "
        f"referred: {results['referred_share']:.1%}. Total run: "
        f"{results['seconds']['total']:.0f} s (fitting {results['seconds']['fit']:.0f} s).",
        "",
    ]
    path.write_text("\n".join(lines))


def _versions() -> dict:
    import fastapi
    import httpx
    import uvicorn

    return {
        "cpus": os.cpu_count(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0, or 1 when any request failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="per level (default 400)")
    parser.add_argument("--instances-per-request", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny model, 40 requests per level")
    args = parser.parse_args(argv)
    n_requests = args.requests if args.requests is not None else 40 if args.quick else 400
    if n_requests < 1 or args.instances_per_request < 1:
        parser.error("--requests and --instances-per-request must be at least 1")
    config = QUICK if args.quick else Config()
    start = time.perf_counter()
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "environment": {**environment(), **_versions()},
        "config": asdict(config),
        "requests_per_level": n_requests,
        "instances_per_request": args.instances_per_request,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, calibration, x = make_data(config, folder)
        model, report = fit_model(config, train, calibration, folder)
        fitted = time.perf_counter()
        _log(f"fitted and calibrated in {fitted - start:.1f} s")
        results["model"] = {
            "description": (
                f"deep ensemble of {config.members} networks {config.columns} -> "
                f"{config.hidden} -> 2 (at most {config.epochs} epochs) on "
                f"{config.rows - config.calibration_rows} synthetic rows, calibrated on "
                f"{config.calibration_rows} with a referral rule at target risk "
                f"{config.target_risk:g}"
            ),
            "calibration_report": [
                line for line in report.splitlines() if not line.startswith("model written")
            ],
        }
        requests = make_requests(x, n_requests, args.instances_per_request)
        base, base_answers = in_process(model, requests)
        results["in_process"] = base
        _log(f"in process: {base['instances_per_s']:.1f} instances/s")
        levels = []
        with running_server(model, folder / "server.log") as (url, command):
            import httpx

            metadata = httpx.get(f"{url}/v1/metadata", timeout=REQUEST_TIMEOUT_S).json()
            results["model"]["model_id"] = metadata["model_id"]
            results["server"] = {
                "command": " ".join(command[2:]).replace(str(model), model.name),
                "max_batch": metadata["max_batch"],
                "max_wait_ms": metadata["max_wait_ms"],
                "torch_threads": metadata["torch_threads"],
            }
            asyncio.run(load_level(url, requests[:WARMUP_REQUESTS], 8))  # warm-up, not recorded
            for concurrency in LEVELS:
                level = asyncio.run(load_level(url, requests, concurrency))
                level["ratio"] = level["instances_per_s"] / base["instances_per_s"]
                level["max_probability_difference"] = _max_difference(
                    level.pop("answers"), base_answers
                )
                levels.append(level)
                latency = level["latency_ms"] or {"p50": math.nan, "p99": math.nan}
                _log(
                    f"concurrency {concurrency}: {level['requests_per_s']:.1f} req/s, p50 "
                    f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, mean batch "
                    f"{level['mean_batch'] or math.nan:.2f}, {level['errors']} errors"
                )
    results["levels"] = levels
    gaps = [g for level in levels if (g := level["max_probability_difference"]) is not None]
    results["max_probability_difference"] = max(gaps) if gaps else None
    actions = [p["decision"]["action"] for answer in base_answers for p in answer]
    results["referred_share"] = actions.count("refer") / len(actions)
    results["seconds"] = {"total": time.perf_counter() - start, "fit": fitted - start}
    stem = "serve_cpu_quick" if args.quick else "serve_cpu"
    write_results(results, args.out, stem, write_markdown, _log)
    return 1 if any(level["errors"] for level in levels) else 0


if __name__ == "__main__":
    raise SystemExit(main())
