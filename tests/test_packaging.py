"""The package as a user installs it: a wheel builds from the source tree, holds the package (with
``py.typed``) and nothing else, and installed into a fresh virtual environment it imports and its
command runs from a folder outside the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import bayesdl

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out, tree = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("tree")
    # A copy of what a source distribution holds, so the build leaves nothing in the checkout.
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    # No build isolation: the build backend is the one installed here, nothing is downloaded.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(tree))  # fmt: skip
    (path,) = out.glob("bayesdl-*.whl")
    return path


def test_the_wheel_holds_the_package_its_version_and_py_typed(wheel):
    assert wheel.name.startswith(f"bayesdl-{bayesdl.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bayesdl/py.typed" in names and "bayesdl/__init__.py" in names
    assert "bayesdl/report/__init__.py" in names and "bayesdl/metrics/__init__.py" in names
    # only the package and its metadata: no tests, benchmarks or examples
    assert {name.split("/")[0] for name in names} == {
        "bayesdl",
        f"bayesdl-{bayesdl.__version__}.dist-info",
    }
    metadata = (
        zipfile.ZipFile(wheel).read(f"bayesdl-{bayesdl.__version__}.dist-info/METADATA").decode()
    )
    assert (
        f"Version: {bayesdl.__version__}" in metadata
        and "License-Expression: Apache-2.0" in metadata
    )
    assert f"bayesdl-{bayesdl.__version__}.dist-info/licenses/LICENSE" in names
    assert "Provides-Extra: serve" in metadata and "Requires-Dist: torch" in metadata
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(f"bayesdl-{bayesdl.__version__}.dist-info/entry_points.txt")
        .decode()
    )
    assert "bayesdl = bayesdl.cli:main" in entry_points


def test_the_wheel_installs_into_a_fresh_venv_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    if not python.exists():  # Windows layout
        python = venv / "Scripts" / "python.exe"
    # The dependencies (torch is large) come from this environment through a .pth file; bayesdl
    # itself only from the wheel: pip installs it without its dependencies, from no index.
    site = Path(
        _run(
            str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_paths()["purelib"])
    (site / "_deps.pth").write_text(f"{ours}\n")
    _run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run(
        str(python),
        "-c",
        "import bayesdl; print(bayesdl.__version__); print(bayesdl.__file__)",
        cwd=elsewhere,
    )
    version, location = done.stdout.split()
    assert version == bayesdl.__version__
    assert Path(location).is_relative_to(site), location  # the wheel's copy, not the source tree
    assert (Path(location).parent / "py.typed").exists()
    methods = _run(str(python), "-m", "bayesdl", "methods", cwd=elsewhere).stdout
    assert "deep_ensemble" in methods and "laplace" in methods
