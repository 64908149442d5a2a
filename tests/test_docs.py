"""The documentation site builds with ``mkdocs build --strict``, every Python snippet of its pages
runs, and every public name has a docstring and a place in the API reference.

Fences in ``docs/*.md``: a ```` ```python ```` block runs, in order, in one namespace per page
(as the README's snippets do in tests/test_readme.py). A ```` ```py ```` block is Python that is
shown and not run here (the example scripts, included whole, which tests/test_examples.py and
tests/test_example_referral.py run). ```` ```console ````, ```` ```shell ````, ```` ```bash ````
and ```` ```json ```` blocks are not Python.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

import bayesdl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python\n" in p.read_text())
HAS_MKDOCS = all(
    importlib.util.find_spec(name) is not None
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
)
needs_mkdocs = pytest.mark.skipif(
    not HAS_MKDOCS,
    reason="mkdocs, mkdocs-material and mkdocstrings[python] are not installed "
    "(pip install -e '.[docs]')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for the tests below."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@needs_mkdocs
def test_site_builds_strict(site):
    assert (site / "index.html").exists() and (site / "reference" / "index.html").exists()
    for page in DOCS.glob("*.md"):
        assert (site / page.stem / "index.html").exists() or page.stem == "index", page.name


# What each page's snippets leave behind, checked after they ran (names of their namespace).
def _predictions(ns):
    assert ns["pred"].mean.shape == (8,) and (ns["lower"] < ns["upper"]).all()
    assert isinstance(ns["history"], bayesdl.History)
    assert ns["gap"].abs().max() < 1e-5 and ns["cls_pred"].probs.shape == (8, 3)
    assert ns["outputs"].shape == (5, 8, 2) and "13" in ns["message"]


def _deep_ensembles(ns):
    assert ns["ens_pred"].epistemic.shape == (8,)
    assert len(ns["grid_history"].member_best_epochs) == 3
    assert len(ns["picked"].selection.chosen) >= 1


def _mc_dropout(ns):
    assert ns["draws"].shape == (200, 8, 2) and ns["mc_pred"].epistemic.shape == (8,)


def _mean_field_vi(ns):
    assert ns["vi_pred"].mean.shape == (8,) and len(ns["report"].rows) >= 2
    assert ns["rows_equal"] == (False, True) and ns["local"].shape == (3, 2, 2)


def _swag(ns):
    assert ns["swag"].n_collected == 15 and ns["multi_pred"].mean.shape == (8,)


def _sgmcmc(ns):
    assert ns["chain"].n_collected == 20 and ns["mcmc_pred"].mean.shape == (8,)
    assert (ns["mcmc_pred"].epistemic > 0).all() and ns["cyclical"].n_collected == 12


def _ivon(ns):
    assert ns["ivon_pred"].mean.shape == (8,) and (ns["ivon_pred"].epistemic > 0).all()
    assert ns["ivon"].sigma.shape == ns["ivon"].mu.shape


def _laplace(ns):
    ratio = ns["la_pred"].epistemic.mean() / ns["moments"].epistemic.mean()
    assert 0.5 < float(ratio) < 2.0  # 200 output draws against the closed form


def _metrics(ns):
    # the OOD inputs are far from the data: the ensemble should be clearly more unsure there
    assert float(ns["auroc"]) > 0.9
    assert all(torch.isfinite(v) for v in ns["scores"].values())


def _calibration(ns):
    assert 0.7 <= float(ns["coverage"]) <= 1.0 and torch.isfinite(ns["crps"])
    assert ns["bands_again"].lower.shape == (200,)


def _decisions(ns):
    # a certified referral that decides some cases, a gate that hands over most far-away
    # inputs, and both rules back from the model file
    assert ns["referral"].certified and 0 < ns["decision"].coverage <= 1
    assert ns["referral"].summary()["min_cases"] == 22
    assert ns["handed_over"] > 0.5
    rules = [r.wrapper_name for r in ns["decision_rules"](ns["triage"])]
    assert rules == ["ood_gate", "referral"]


def _saving(ns):
    info = ns["info"]
    assert (info.method, info.input_shape, info.output_width) == ("deep_ensemble", (13,), 2)
    assert [name for name, _ in info.wrappers] == ["conformal", "calibration"]
    assert torch.equal(
        ns["tab_again"].predict(ns["x"][:8]).mean, ns["tab"].predict(ns["x"][:8]).mean
    )
    assert ns["header"]["method"] == "deep_ensemble" and ns["header"]["network"]["hidden"] == [50]
    assert tuple(ns["first_layer"].shape) == (3, 50, 13) and "damaged" in ns["problem"]
    first, again = ns["first"].state_dict(), ns["again"].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in first.items())


def _cli(ns):
    assert (ns["low"] < ns["high"]).all() and set(ns["parts"]) == {
        "total",
        "aleatoric",
        "epistemic",
    }


def _bandits(ns):
    # Thompson sampling well below the uniform agent; safe mode and a saved agent as promised
    assert 0 < ns["relative"] < 60
    assert ns["safe_or_fallback"] and ns["same"]


def _distributed(ns):
    # two processes write the weights one process writes, up to float32 round-off
    assert 0 <= ns["gap"] < 1e-5


CHECKS = {
    "predictions": _predictions,
    "deep-ensembles": _deep_ensembles,
    "mc-dropout": _mc_dropout,
    "mean-field-vi": _mean_field_vi,
    "swag": _swag,
    "sgmcmc": _sgmcmc,
    "ivon": _ivon,
    "laplace": _laplace,
    "metrics": _metrics,
    "calibration": _calibration,
    "decisions": _decisions,
    "saving": _saving,
    "cli": _cli,
    "bandits": _bandits,
    "distributed": _distributed,
}


def test_every_page_with_snippets_is_checked():
    assert {p.stem for p in PAGES} == set(CHECKS)


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() in the snippets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; several threads only contend on a shared machine
    try:
        namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    CHECKS[page.stem](namespace)


def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name in ``bayesdl.__all__`` and in the ``__all__`` of every
    public submodule (``bayesdl.<name>`` without a leading underscore)."""
    modules = ["bayesdl"] + [
        f"bayesdl.{m.name}"
        for m in pkgutil.iter_modules(bayesdl.__path__)
        if not m.name.startswith("_")
    ]
    return [
        (module, name)
        for module in modules
        for name in importlib.import_module(module).__all__
        if not (name.startswith("__") and name.endswith("__"))  # __version__: a string
    ]


def _inventory(site: Path) -> set[str]:
    data = (site / "objects.inv").read_bytes()
    lines = zlib.decompress(data.split(b"zlib.\n", 1)[1]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines}


@needs_mkdocs
def test_every_public_name_has_a_docstring_and_a_reference_entry(site):
    import griffe

    extensions = griffe.load_extensions(f"{DOCS / '_ext' / 'griffe_sphinx.py'}:SphinxToMarkdown")
    package = griffe.load(
        "bayesdl", search_paths=[str(ROOT / "src")], extensions=extensions, resolve_aliases=True
    )
    inventory = _inventory(site)
    names = public_names()
    assert len(names) > 150
    undocumented, missing = [], []
    for module, name in names:
        path = f"{module}.{name}"
        obj = package[path.removeprefix("bayesdl.")]
        if not (obj.final_target if obj.is_alias else obj).docstring:
            undocumented.append(path)
        if path not in inventory:
            missing.append(path)
    assert not undocumented, f"public names without a docstring: {undocumented}"
    assert not missing, f"public names missing from the API reference (docs/reference): {missing}"
