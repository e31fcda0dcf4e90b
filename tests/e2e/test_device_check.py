"""scripts/device_check.py, the prepared GPU check: its tiny CPU mode runs every step, so it is never broken."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

SCRIPT = REPO / "scripts" / "device_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a minute and a half of CPU: `make test-slow` runs it (CI does)
def test_tiny_check_runs_every_step_and_returns_at_most_eight_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--tiny", "--out", str(out), "--work", str(work),
                           "--budget", "1500"], capture_output=True, text=True, cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert proc.returncode == 0, (statuses, proc.stdout[-3000:])
    assert list(statuses) == ["env", "data", "tests", "bench-64", "run", "report"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-64.json", "bench-64.md", "devcheck.tar.gz", "report.md", "summary.json", "summary.md"]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # what a device call returns
    assert "| kdbench |" in (out / "bench-64.md").read_text()
    # Tiny data may leave the students at chance: collapsed runs count beside the finished ones.
    note = next(s["note"] for s in summary["steps"] if s["name"] == "run")
    counts = re.search(r"(\d+) jobs finished, 0 failed(?:, (\d+) collapsed)?", note)
    assert counts and int(counts[1]) + int(counts[2] or 0) == 3, note
    with tarfile.open(out / "devcheck.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"devcheck/mlflow.db", "devcheck/run.log", "devcheck/tests.log"} <= names
    assert not any(n.startswith(("devcheck/cache/", "devcheck/store/")) for n in names)
    runs = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()])
    assert sum(r.info.status == "FINISHED" for r in runs) == 4  # the suite and its 3 jobs
    assert summary_printed_last(proc.stdout)


def summary_printed_last(stdout: str) -> bool:
    """The device tool returns the output's tail: the table must be there."""
    return "# kdbench device check" in stdout[-4000:] and "| report | ok |" in stdout


def test_a_failing_or_slow_step_does_not_stop_the_others(tmp_path, monkeypatch):
    dc = load_script()
    py = sys.executable
    steps = [dc.Step("fails", [py, "-c", "import sys; sys.exit(3)"], 30, "exits 3"),
             dc.Step("hangs", [py, "-c", "import time; time.sleep(60)"], 1, "sleeps"),
             dc.Step("works", [py, "-c", "print('fine')"], 30, "prints")]
    monkeypatch.setattr(dc, "plan_steps", lambda args, work, data: steps)
    args = Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), data=str(tmp_path / "none.zip"),
                     tiny=True, budget=120, steps=None)
    assert dc.run(args) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("fails", "failed (3)"), ("hangs", "timeout (1 s)"), ("works", "ok")]
    assert summary["steps"][2]["note"] == "fine"


def test_subset_zip_takes_the_first_images_of_each_class_and_split(tmp_path):
    dc = load_script()
    dc.tiny_zip(tmp_path / "full.zip", classes=3, train=5, test=2)
    n = dc.subset_zip(tmp_path / "full.zip", tmp_path / "sub.zip", train_per_class=2, test_per_class=1)
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        names = zf.namelist()
    assert n == len(names) == 3 * 2 + 3 * 1
    assert "cifar10/train/class1/0001.jpg" in names and "cifar10/train/class1/0002.jpg" not in names
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zipfile.ZipFile(tmp_path / "sub.zip").infolist())
