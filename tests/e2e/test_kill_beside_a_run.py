"""SIGKILL of `kdbench store gc --yes` and of `kdbench report` while a run writes to the same store and MLflow
database: the run finishes, the store and the database stay usable, and the command run again completes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdbench.storage.store import SPECIAL, ModelStore

FAKES, FILES = 20, 200  # unreferenced entries for gc to remove, files in each: removing one takes a while


def kdbench(*args: str, cwd: Path, wait: bool = True):
    command = [sys.executable, "-m", "kdbench.cli", *args]
    if wait:
        return subprocess.run(command, cwd=cwd, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=cwd, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fake_entry(store: Path, i: int) -> Path:
    """A complete stored model (its files' hashes in meta.json) that no run refers to."""
    folder = store / f"{i:016x}"
    (folder / "route").mkdir(parents=True)
    route = {}
    for epoch in range(1, FILES + 1):
        name = f"route/epoch_{epoch:04d}.pt"
        (folder / name).write_bytes(b"%d" % epoch)
        route[str(epoch)] = {"file": name, "sha256": hashlib.sha256(b"%d" % epoch).hexdigest()}
    (folder / "model.pt").write_bytes(b"model")
    meta = {"key": folder.name, "model_sha256": hashlib.sha256(b"model").hexdigest(), "route": route,
            "metrics": {}, "config": {"model": "cifar_resnet8", "role": "teacher"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def intact(folder: Path) -> bool:
    return folder.is_dir() and len(list((folder / "route").iterdir())) == FILES and (folder / "meta.json").is_file()


def wait_for(condition, timeout: float = 300, poll: float = 0.002) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(poll)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.mark.slow  # about 43 s on 2 cores: `make test-slow` runs it (CI does), keeping `make test` under 8 min
def test_sigkill_during_store_gc_beside_a_run(tmp_path, write_suite):
    store = Path(os.environ["KDBENCH_STORE"])
    fakes = [fake_entry(store, i) for i in range(FAKES)]  # keys 000...: listed, and removed, first
    suite = write_suite({"train": {"epochs": 2, "batch_size": 64, "milestones": [1]}})
    run = kdbench("run", str(suite), "--device", "cpu", cwd=tmp_path, wait=False)
    wait_for(lambda: (store / "jobs").is_dir())  # the run trains its teacher, so MLflow names it
    gc = kdbench("store", "gc", "--yes", cwd=tmp_path, wait=False)
    wait_for(lambda: not all(intact(f) for f in fakes))  # gc has begun removing
    gc.send_signal(signal.SIGKILL)
    assert gc.wait(timeout=60) == -signal.SIGKILL
    code, err = finish(run)
    assert code == 0 and " 0 failed" in err, err
    # Nothing half-removed under a real name: each entry is whole (its files match meta.json) or gone.
    model_store = ModelStore(store)
    for folder in store.iterdir():
        if folder.name not in SPECIAL:
            model_store.verify(folder.name)
    assert any(not f.exists() for f in fakes)
    listing = kdbench("store", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    again = kdbench("store", "gc", "--yes", cwd=tmp_path)
    assert again.returncode == 0 and "removed" in again.stderr, again.stderr
    assert not any(f.exists() for f in fakes) and not any((store / "trash").glob("*"))
    rerun = kdbench("run", str(suite), "--device", "cpu", cwd=tmp_path)
    assert rerun.returncode == 0 and "nothing to do" in rerun.stderr, rerun.stderr  # every job already finished


@pytest.mark.slow  # about 31 s on 2 cores: `make test-slow` runs it (CI does), keeping `make test` under 8 min
def test_sigkill_during_report_beside_a_run(tmp_path, write_suite):
    suite = write_suite({"train": {"epochs": 4, "batch_size": 64, "milestones": [2]}})
    run = kdbench("run", str(suite), "--device", "cpu", cwd=tmp_path, wait=False)

    def first_job_done() -> bool:
        if not (tmp_path / "mlflow.db").exists():
            return False  # a client made earlier would create the database itself, racing the run's creation
        client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("tiny")
        return experiment is not None and bool(client.search_runs(
            [experiment.experiment_id], "tags.`kdbench.role` = 'teacher' and attributes.status = 'FINISHED'"))

    wait_for(first_job_done, poll=0.5)
    report = kdbench("report", str(suite), cwd=tmp_path, wait=False)
    results = tmp_path / "results" / "tiny"
    wait_for(lambda: results.is_dir() or report.poll() is not None, poll=0.001)  # writing its files
    report.send_signal(signal.SIGKILL)
    report.wait(timeout=60)
    code, err = finish(run)
    assert code == 0 and " 0 failed" in err, err
    db = sqlite3.connect(tmp_path / "mlflow.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    again = kdbench("report", str(suite), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    text = (results / "report.md").read_text()
    assert text.startswith("# tiny") and "Regenerate: `kdbench report" in text and "kd" in text
    for name in ("comparison.csv", "runs.csv", "cost.csv"):
        assert (results / name).read_text().endswith("\n")
