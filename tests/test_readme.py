"""Every Python snippet of the README runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

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
