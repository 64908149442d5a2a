"""benchmarks/bandits.py runs end to end (the --quick configuration, seconds, in this process)
and writes the tables it promises: every agent on mushroom and on the five wheels, relative to
the uniform agent on the same draws."""

from __future__ import annotations

import json

import pytest
from benchmarks import bandits as bench

MUSHROOMS = [
    "p,x,s,n,t,p,f,c,n,k,e,e,s,s,w,w,p,w,o,p,k,s,u",
    "e,x,s,y,t,a,f,c,b,k,e,c,s,s,w,w,p,w,o,p,n,n,g",
    "e,b,s,w,t,l,f,c,b,n,e,c,s,s,w,w,p,w,o,p,n,n,m",
    "p,x,y,w,t,p,f,c,n,n,e,e,s,s,w,w,p,w,o,p,k,s,u",
]


def test_quick_run_writes_every_agent_and_problem(tmp_path):
    data = tmp_path / "mushroom.data"
    data.write_text("\n".join(MUSHROOMS) + "\n")
    out = tmp_path / "out"
    assert bench.main(["--quick", "--workers", "1", "--out", str(out), "--data", str(data)]) == 0
    results = json.loads((out / "bandits_quick.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"mushroom"} | {f"wheel_{d}" for d in bench.DELTAS}
    assert set(summary["mushroom"]) == {*bench.AGENTS, bench.SAFE}
    for rows in summary.values():
        assert rows["Uniform"]["relative_regret"] == pytest.approx(100.0)
        for row in rows.values():
            assert row["seeds"] == 1 and row["regret"] == row["regret"]  # not NaN
    eaten = summary["mushroom"]["Uniform"]["poisonous_eaten"]
    assert 0 < eaten < 200  # the uniform agent eats about a quarter of 200 mushrooms
    text = (out / "bandits_quick.md").read_text()
    assert "## Mushroom (200 rounds)" in text and "delta 0.99" in text


def test_agents_are_built_as_named():
    ensemble = bench.make_agent("TS BootEnsemble", 2, 5, {"hidden": [8], **_NET}, seed=0)
    assert ensemble.posterior.bootstrap and ensemble.policy.value == "thompson"
    safe = bench.make_agent(bench.SAFE, 117, 2, {"hidden": [8], **_NET}, seed=0)
    assert safe.floor == 0.0 and safe.fallback == 0
    with pytest.raises(ValueError, match="unknown agent"):
        bench.make_agent("TS Magic", 2, 5, {"hidden": [8], **_NET}, seed=0)


_NET = {"refit_every": 20, "train_steps": 5, "batch_size": 16, "lr": 1e-2}
