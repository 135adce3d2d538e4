"""The package: pyproject.toml as the one list of dependencies, the `dsv3-jax` console script, experiments that
import the installed package (no sys.path edits)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_console_script_is_the_module_entry_point():
    module, func = PYPROJECT["project"]["scripts"]["dsv3-jax"].split(":")
    entry = getattr(importlib.import_module(module), func)
    from dsv3_jax.__main__ import main
    assert entry is main
    with pytest.raises(SystemExit) as info:
        entry(["--help"])
    assert info.value.code == 0


def test_requirements_files_install_the_package_and_its_extras():
    """The README's commands (`pip install -r requirements*.txt`) install the package itself, so pyproject.toml
    is the only place a dependency is named."""
    extras = {"requirements.txt": "-e .", "requirements-dev.txt": "-e .[dev]", "requirements-tpu.txt": "-e .[tpu]"}
    for name, line in extras.items():
        lines = [x.strip() for x in (REPO / name).read_text().splitlines() if x.strip() and not x.startswith("#")]
        assert lines == [line], (name, lines)
    optional = PYPROJECT["project"]["optional-dependencies"]
    dev = {re.split(r"[<>=\[ ]", d)[0] for d in optional["dev"]}
    assert {"pytest", "pytest-xdist", "torch", "transformers", "tokenizers", "nbclient", "nbformat", "ipykernel"} <= dev
    assert "torch==2.13.0" in optional["dev"]
    assert optional["tpu"] == ["jax[tpu]>=0.10.2"]       # jax's own extra pins the matching libtpu


def test_experiments_import_the_package_without_path_edits():
    edits = [f"{f.name}:{n}" for f in sorted((REPO / "experiments").glob("*.py"))
             for n, line in enumerate(f.read_text().splitlines(), 1) if "sys.path" in line]
    assert not edits, edits


@pytest.mark.slow
def test_editable_install_gives_a_working_console_script(tmp_path):
    """`pip install -e .` into a fresh virtual environment (reusing this interpreter's packages, offline), then
    `dsv3-jax` from another folder: the console script runs and imports the package from the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The venv's own (older) setuptools would shadow this interpreter's, which builds pyproject projects.
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, timeout=300)
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                        "-e", str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    script = venv / "bin" / "dsv3-jax"
    p = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: dsv3-jax"), p.stderr[-2000:]
    p = subprocess.run([str(script), "params", "--preset", "tiny", "--json"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and '"preset": "tiny"' in p.stdout, p.stderr[-2000:]
    where = subprocess.run([str(py), "-c", "import dsv3_jax; print(dsv3_jax.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120).stdout.strip()
    assert Path(where).resolve() == (REPO / "dsv3_jax" / "__init__.py").resolve()


def test_subprocesses_compile_with_the_flags_users_have():
    """conftest.py turns LLVM's optimisations off for this process only: a subprocess (the CLI tests) gets the
    XLA_FLAGS this process started with, and an XLA client there reads them."""
    code = "import os, jax; jax.devices(); print(os.environ['XLA_FLAGS']); print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "--xla_backend_optimization_level=0" not in out
    assert "--xla_force_host_platform_device_count=8" in out and out[-1] == "8"
    assert "--xla_backend_optimization_level=0" not in os.environ["XLA_FLAGS"]
