"""A wheel of kdbench, installed non-editable into a fresh environment, has its built-in methods and runs a suite.

The built-in methods live in the top-level methods/ folder; pyproject.toml installs them as
kdbench.builtin_methods. The fresh environment borrows the dependencies (torch, timm, mlflow) from the
environment running the tests through a .pth file, so nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import TINY

from conftest import REPO


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages (a mapped folder rules out `find`): a new subpackage must be listed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "kdbench").rglob("__init__.py")}
    assert on_disk | {"kdbench.builtin_methods"} == listed


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow  # about 30 s on 2 idle cores: a wheel build, an install, two kdbench processes with MLflow
def test_wheel_installed_elsewhere_has_the_builtin_methods_and_runs(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("kdbench", "methods"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)])
    wheel, = (tmp_path / "dist").glob("kdbench-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # Installed before the dependencies are borrowed: pip would otherwise see the test environment's kdbench
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)])
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"  # no methods/ folder here, and not the repository
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KDBENCH_METHODS")}
    kdbench = str(venv / "bin" / "kdbench")
    where = run([str(python), "-c", "import kdbench; print(kdbench.__file__)"], cwd=elsewhere, env=env).stdout
    assert where.startswith(site), where  # the installed copy, not the checkout

    listed = run([kdbench, "methods"], cwd=elsewhere, env={**env, "COLUMNS": "200"}).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}  # piped: plain text, a method a line
    assert {"baseline", "kd", "fitnets", "rco", "takd", "prokt", "dkd"} <= names, listed

    suite = {**TINY, "data": {**TINY["data"], "train_size": 64, "test_size": 32},
             "train": {"epochs": 1, "batch_size": 32}}
    (elsewhere / "tiny.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    done = run([kdbench, "run", "tiny.yaml", "--device", "cpu"], cwd=elsewhere, env=env)
    # 64 images for one epoch may leave a job at chance: collapsed jobs count beside the finished ones.
    counts = re.search(r"(\d+) jobs finished, 0 failed(?:, (\d+) collapsed)?", done.stderr)
    assert counts and int(counts[1]) + int(counts[2] or 0) == 3, done.stderr
