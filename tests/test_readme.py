"""Every Python snippet of the README runs, in order, in one namespace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    pred = namespace["pred"]
    assert pred.mean.shape == (8,)
    assert (namespace["lower"] < namespace["upper"]).all()
    # the OOD inputs are far from the data: the ensemble should be clearly more unsure there
    assert float(namespace["auroc"]) > 0.9
    # the decisions section: a certified referral that decides some cases, a gate that hands
    # over most far-away inputs, and both rules back from the model file
    assert namespace["referral"].certified and 0 < namespace["decision"].coverage <= 1
    assert namespace["handed_over"] > 0.5
    assert [r.wrapper_name for r in namespace["decision_rules"](namespace["triage"])] == [
        "ood_gate",
        "referral",
    ]
    # the bandit section: Thompson sampling well below the uniform agent's regret
    assert 0 < namespace["bandit_relative"] < 75


def test_readme_shell_recipe_runs(tmp_path, monkeypatch, capsys):
    """The README's shell block, line by line, on a data file with a 'diagnosis' column."""
    import csv
    import shlex

    import numpy as np

    from bayesdl.cli import main

    (block,) = re.findall(r"```shell\n(.*?)```", README.read_text(), flags=re.DOTALL)
    rng = np.random.default_rng(0)
    n = 600
    age, marker = rng.uniform(20, 80, n), rng.standard_normal(n)
    clinic = rng.choice(["north", "south", "east"], n)
    logit = 0.08 * (age - 50) + 2.0 * marker + (clinic == "east")
    diagnosis = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "malignant", "benign")
    monkeypatch.chdir(tmp_path)
    with open("data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["age", "marker", "clinic", "diagnosis"])
        writer.writerows(zip(age.round(1), marker.round(4), clinic, diagnosis, strict=True))
    commands = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands][:2] == [["bayesdl", "split"], ["bayesdl", "fit"]]
    for command in commands:
        assert main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "task: classification" in out and "referral:" in out
    header = next(csv.reader(open("predictions.csv")))
    assert header[:3] == ["predicted", "p_benign", "p_malignant"] and header[-1] == "refer"
    assert sum(1 for _ in open("predictions.csv")) == 1 + 120
    page = Path("report.html").read_text()
    assert page.count("<img") >= 3 and "http://" not in page.replace("http://www.w3.org", "")

    # The service section: the README's curl body, sent to the model the recipe made.
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from bayesdl.serve import create_app

    (curl,) = re.findall(r"-d '(.*?)'", README.read_text())
    (served,) = re.findall(r"bayesdl serve (\S+)", README.read_text())
    assert fastapi is not None and Path(served).exists()
    with TestClient(create_app(served)) as client:
        answer = client.post("/v1/predict", json=json.loads(curl))
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["predicted"] for p in predictions] == ["malignant", "benign"]
    for p in predictions:
        assert p["decision"]["action"] in ("accept", "refer")
        assert [r["rule"] for r in p["decision"]["reasons"]] == ["referral"]
