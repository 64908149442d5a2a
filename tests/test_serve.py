"""The prediction service (bayesdl.serve): answers equal to ``bayesdl predict``, every bad
request a 4xx naming the instance and field, micro-batching, and a real server on 127.0.0.1
that finishes the requests in flight on SIGTERM."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

import bayesdl  # noqa: E402
from bayesdl.cli import main  # noqa: E402
from bayesdl.models import mlp  # noqa: E402
from bayesdl.posteriors import DeepEnsemble  # noqa: E402
from bayesdl.serve import MicroBatcher, ModelService, create_app  # noqa: E402

COLUMNS = ("size", "weight", "color")
COLORS = ("red", "green", "blue")


def write_data(path: Path, n: int, seed: int, *, regression: bool = False) -> Path:
    """Two numeric columns and a text column; the target is a class or a number."""
    rng = np.random.default_rng(seed)
    size, weight = rng.normal(0, 1, n), rng.normal(5, 2, n)
    color = rng.choice(COLORS, n)
    score = 1.5 * size - 0.8 * (weight - 5) + (color == "red")
    if regression:
        target = [f"{v:.5f}" for v in 10 + 2 * score + 0.5 * rng.standard_normal(n)]
    else:
        target = np.where(score + 0.5 * rng.standard_normal(n) > 0, "yes", "no")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "label"])
        writer.writerows(zip(size.round(4), weight.round(4), color, target, strict=True))
    return path


def rows_of(path: Path, k: int) -> list[list]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1 : k + 1]
    return [[float(r[0]), float(r[1]), r[2]] for r in rows]


def run(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A calibrated classifier with both rules, a plain regressor, and a model saved from
    Python without a column encoding."""
    folder = tmp_path_factory.mktemp("serve")
    train = write_data(folder / "train.csv", 300, seed=0)
    held = write_data(folder / "held.csv", 400, seed=1)
    small = ["--epochs", "20", "--members", "3", "--hidden", "16", "--quiet"]
    run("fit", str(train), "--target", "label", "--out", str(folder / "c.safetensors"), *small)
    run(
        "calibrate",
        str(folder / "c.safetensors"),
        str(held),
        "--out",
        str(folder / "classifier.safetensors"),
        "--target-risk",
        "0.2",
        "--ood-false-alarm",
        "0.1",
    )
    reg = write_data(folder / "reg.csv", 300, seed=2, regression=True)
    run(
        "fit", str(reg), "--target", "label", "--out", str(folder / "regressor.safetensors"), *small
    )
    torch.manual_seed(0)
    post = DeepEnsemble(mlp(4, 3, hidden=(8,)), "categorical", n_members=2)
    post.fit((torch.randn(64, 4), torch.randint(0, 3, (64,))), epochs=2)
    bayesdl.save(post, folder / "plain.safetensors")
    return {
        "folder": folder,
        "classifier": folder / "classifier.safetensors",
        "regressor": folder / "regressor.safetensors",
        "plain": folder / "plain.safetensors",
        "test": write_data(folder / "test.csv", 40, seed=3),
    }


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models["classifier"], max_body_bytes=20_000)) as c:
        yield c


# ------------------------------------------------------------------------------ answers
def test_answers_match_bayesdl_predict(models, client, capsys):
    rows = rows_of(models["test"], 12)
    answer = client.post("/v1/predict", json={"instances": rows})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_id"].startswith("classifier-") and len(body["predictions"]) == 12
    out = models["folder"] / "pred.csv"
    run("predict", str(models["classifier"]), str(models["test"]), "--out", str(out))
    with open(out, newline="") as f:
        expected = list(csv.DictReader(f))[:12]
    for got, want in zip(body["predictions"], expected, strict=True):
        assert got["predicted"] == want["predicted"]
        for label in ("no", "yes"):
            assert got["probabilities"][label] == pytest.approx(float(want[f"p_{label}"]), abs=1e-6)
        for key in ("confidence", "total", "aleatoric", "epistemic"):
            assert got[key] == pytest.approx(float(want[key]), abs=1e-6)
        assert "|".join(got["set"]) == want["set"]
        decision = got["decision"]
        rules = {r["rule"]: r for r in decision["reasons"]}
        assert set(rules) == {"referral", "ood_gate"}
        assert rules["referral"]["refer"] == (want["refer"] == "true")
        assert rules["ood_gate"]["refer"] == (want["hand_over"] == "true")
        assert decision["action"] == (
            "refer" if any(r["refer"] for r in rules.values()) else "accept"
        )
        for r in rules.values():
            assert r["why"] and isinstance(r["value"], float)
        assert 0 < rules["ood_gate"]["p_value"] <= 1


def test_objects_and_lists_give_the_same_answers(models, client):
    rows = rows_of(models["test"], 5)
    objects = [dict(zip(COLUMNS, r, strict=True)) | {"id": k} for k, r in enumerate(rows)]
    a = client.post("/v1/predict", json={"instances": rows}).json()
    b = client.post("/v1/predict", json={"instances": objects}).json()
    assert a == b


def test_regression_answers_carry_intervals(models):
    with TestClient(create_app(models["regressor"])) as c:
        rows = rows_of(models["test"], 4)
        body = c.post("/v1/predict", json={"instances": rows}).json()
        meta = c.get("/v1/metadata").json()
    assert meta["task"] == "regression" and meta["target"]["name"] == "label"
    for p in body["predictions"]:
        assert p["lower"] < p["mean"] < p["upper"]
        assert p["level"] == 0.9 and p["interval"] == "predictive mixture"
        assert p["aleatoric_std"] > 0 and p["epistemic_std"] >= 0
        assert p["decision"] == {"action": "accept", "reasons": []}


def test_a_model_without_columns_takes_numbers(models):
    service = ModelService(models["plain"])
    x = torch.randn(3, 4)
    with TestClient(create_app(service)) as c:
        body = c.post("/v1/predict", json={"instances": x.tolist()}).json()
        bad = c.post("/v1/predict", json={"instances": [{"x0": 1.0}]})
    probs = bayesdl.load(models["plain"]).predict(x).probs
    got = torch.tensor([[p["probabilities"][k] for k in "012"] for p in body["predictions"]])
    torch.testing.assert_close(got.double(), probs.double(), atol=1e-6, rtol=0)
    assert bad.status_code == 422 and "no column names" in bad.json()["error"]["message"]


def test_health_metadata_and_openapi(client):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["model_id"].startswith("classifier-")
    meta = client.get("/v1/metadata").json()
    assert meta["method"] == "deep_ensemble" and meta["task"] == "classification"
    assert meta["classes"] == ["no", "yes"]
    assert [c["name"] for c in meta["columns"]] == list(COLUMNS)
    assert meta["columns"][2]["categories"] == sorted(COLORS)
    assert [w["name"] for w in meta["wrappers"]] == [
        "ood_gate",
        "referral",
        "conformal",
        "calibration",
    ]
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/health" in spec["paths"]
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------ bad requests
GOOD = [0.5, 5.0, "red"]


@pytest.mark.parametrize(
    ("body", "status", "instance", "field", "fragment"),
    [
        ({"instances": [GOOD, [0.5, 5.0]]}, 422, 1, None, "2 values; the model needs 3"),
        ({"instances": [[0.5, "heavy", "red"]]}, 422, 0, "weight", "text 'heavy' in a numeric"),
        ({"instances": [[0.5, None, "red"]]}, 422, 0, "weight", "missing value"),
        ({"instances": [[0.5, 5.0, "purple"]]}, 422, 0, "color", "'purple' was not seen"),
        ({"instances": [[True, 5.0, "red"]]}, 422, 0, "size", "got true/false"),
        ({"instances": [[[1], 5.0, "red"]]}, 422, 0, "size", "got a list"),
        ({"instances": [GOOD, {"size": 1.0}]}, 422, 1, "weight", "missing column"),
        ({"instances": [GOOD, 7]}, 422, 1, None, "expected a list of values"),
        ({"instances": []}, 422, None, "instances", "no instances"),
        ({"instances": "all"}, 422, None, "instances", "list of instances"),
        ({"rows": [GOOD]}, 422, None, "instances", 'missing "instances"'),
        ({"instances": [GOOD], "extra": 1}, 422, None, "extra", "unknown key"),
        ([GOOD], 422, None, None, "JSON object"),
    ],
)
def test_bad_requests_get_a_4xx_naming_instance_and_field(
    client, body, status, instance, field, fragment
):
    answer = client.post("/v1/predict", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["status"] == status and fragment in error["message"], error
    assert error["instance"] == instance and error["field"] == field, error


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"instances": [[NaN, 5.0, "red"]]}', "NaN"),
        (b'{"instances": [[Infinity, 5, "red"]]}', "Infinity"),
        (b'{"instances": [[0.5, 5.0, "red"]', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "empty body"),
    ],
)
def test_bodies_that_are_not_json_get_400(client, raw, fragment):
    answer = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (b'{"instances": [[0.5, 1e999, "red"]]}', "weight", "infinite"),
        (b'{"instances": [[1e308, 5, "red"]]}', "size", "too large"),
        (b'{"instances": [[0.5, 1' + b"0" * 400 + b', "red"]]}', "weight", "too large"),
    ],
)
def test_numbers_out_of_range_get_422(client, raw, field, fragment):
    answer = client.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
    error = answer.json()["error"]
    assert answer.status_code == 422 and fragment in error["message"], error
    assert error["instance"] == 0 and error["field"] == field


def test_limits_give_413(models):
    service = ModelService(models["classifier"], max_instances=3)
    with TestClient(create_app(service, max_body_bytes=300)) as c:
        many = c.post("/v1/predict", json={"instances": [GOOD] * 4})
        big = c.post("/v1/predict", json={"instances": [GOOD] * 3, "pad": "x" * 400})
        ok = c.post("/v1/predict", json={"instances": [GOOD] * 3})
    assert many.status_code == 413 and "at most 3" in many.json()["error"]["message"]
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]
    assert ok.status_code == 200


def test_other_routes_and_methods_get_json_4xx(client):
    assert client.get("/v1/nothing").status_code == 404
    answer = client.get("/v1/predict")
    assert answer.status_code == 405 and answer.json()["error"]["status"] == 405


def malformed_bodies(n: int, seed: int) -> list[bytes]:
    """Random wrong bodies: broken JSON, wrong shapes and types, odd values."""
    rng = random.Random(seed)
    atoms = [None, True, 0, -1, 1e308, 2**70, "", "red", "x" * 50, [], {}, [[]], 0.5, "NaN"]

    def value(depth: int = 0):
        r = rng.random()
        if depth < 3 and r < 0.2:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 3 and r < 0.3:
            return {rng.choice(["size", "color", "instances", "k"]): value(depth + 1)}
        return rng.choice(atoms)

    bodies = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # a good body cut short, or with a byte changed
            good = json.dumps({"instances": [GOOD, GOOD]}).encode()
            cut = rng.randrange(len(good))
            bodies.append(good[:cut] if rng.random() < 0.5 else good[:cut] + b"\x00" + good[cut:])
        elif kind == 1:  # random bytes
            bodies.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))))
        elif kind == 2:  # a row with one wrong value
            row = list(GOOD)
            row[rng.randrange(3)] = value()
            bodies.append(json.dumps({"instances": [GOOD, row]}).encode())
        elif kind == 3:  # wrong widths
            bodies.append(
                json.dumps(
                    {"instances": [GOOD[: rng.randrange(3)] + [1.0] * rng.randrange(2)]}
                ).encode()
            )
        elif kind == 4:  # wrong envelope
            bodies.append(json.dumps(value()).encode())
        else:  # objects with wrong or missing keys
            obj = {rng.choice([*COLUMNS, "other"]): value() for _ in range(rng.randrange(4))}
            bodies.append(json.dumps({"instances": [obj]}).encode())
    return bodies


def test_a_fuzz_of_malformed_bodies_gets_only_4xx_and_leaves_the_server_healthy(client):
    statuses = []
    for body in malformed_bodies(300, seed=0):
        answer = client.post(
            "/v1/predict", content=body, headers={"content-type": "application/json"}
        )
        statuses.append(answer.status_code)
        if answer.status_code != 200:
            assert "error" in answer.json(), body
    assert all(s == 200 or 400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert sum(400 <= s < 500 for s in statuses) > 250  # the fuzz is mostly bad bodies
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["failed"] == 0
    assert client.post("/v1/predict", json={"instances": [GOOD]}).status_code == 200


# ------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_are_micro_batched_and_answer_as_alone(models):
    service = ModelService(models["classifier"])
    app = create_app(service, max_batch=64, max_wait_ms=50)
    rows = rows_of(models["test"], 20)
    alone = [service.predict(service.encode([r]))[0] for r in rows]

    async def together():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answers = await asyncio.gather(
                *(c.post("/v1/predict", json={"instances": [r]}) for r in rows)
            )
            health = (await c.get("/v1/health")).json()
        return [a.json()["predictions"][0] for a in answers], health

    got, health = asyncio.run(together())
    assert health["instances"] == 20 and health["batches"] < 20  # batched, not one by one
    for a, b in zip(got, alone, strict=True):
        assert (
            a["predicted"] == b["predicted"] and a["decision"]["action"] == b["decision"]["action"]
        )
        for label in ("no", "yes"):
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-6)
        assert a["epistemic"] == pytest.approx(b["epistemic"], abs=1e-6)


def test_two_threads_give_the_answers_of_one(models):
    service = ModelService(models["classifier"])
    x = service.encode(rows_of(models["test"], 40))
    once = service.predict(x)
    results: dict = {}

    def work(k: int) -> None:
        results[k] = [service.predict(x) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        for answers in results[k]:
            assert answers == once


def test_the_batcher_refuses_bad_limits(models):
    service = ModelService(models["plain"])
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(service, max_batch=0)


# ------------------------------------------------------------------------------ the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bayesdl", "serve", str(model), "--port", str(port), *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not come up within 60 s")


def test_real_server_answers_and_finishes_requests_in_flight_on_sigterm(models):
    # A long batching window keeps the request in flight when SIGTERM arrives.
    proc, url = start_server(
        models["classifier"], "--max-wait-ms", "1500", "--log-level", "warning"
    )
    try:
        # Malformed bodies over real HTTP: only 4xx, and the server stays healthy.
        with httpx.Client(base_url=url, timeout=30) as c:
            for body in malformed_bodies(100, seed=1):
                status = c.post("/v1/predict", content=body).status_code
                assert status == 200 or 400 <= status < 500, (status, body)
            assert c.get("/v1/health").json()["failed"] == 0
        answers = []

        def ask() -> None:
            answers.append(httpx.post(f"{url}/v1/predict", json={"instances": [GOOD]}, timeout=30))

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        asker.join(30)
        # a graceful stop: the request in flight is answered, then the server exits 0
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read().decode()
        assert "stopped by SIGTERM after answering the requests in flight" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(answers) == 1 and answers[0].status_code == 200
    assert answers[0].json()["predictions"][0]["decision"]["action"] in ("accept", "refer")


def test_serve_refuses_a_bad_model_file_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    done = subprocess.run(
        [sys.executable, "-m", "bayesdl", "serve", str(bad), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("bayesdl: error: ")
        and "bad.safetensors" in lines[0]
    )


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [("--threads", "0", "expected a positive integer"), ("--max-batch", "x", "positive integer")],
)
def test_serve_refuses_bad_options_with_one_line(models, capsys, option, value, fragment):
    with pytest.raises(SystemExit) as stop:
        main(["serve", str(models["plain"]), option, value])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesdl: error: ") and fragment in lines[0]
