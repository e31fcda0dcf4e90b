"""SLURM through submitit, against the real single-node SLURM that scripts/slurm_setup.sh starts: a job cancelled
with scancel while it trains is submitted again, resumes from its checkpoint, and the suite ends with the numbers
of an uninterrupted in-process run."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finished_jobs, slurm_missing
from rich.console import Console

from kdbench.run.executors import get_executor
from kdbench.plan import make_plan
from kdbench.config.load import load_suite


pytestmark = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))


def running(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return out.stdout.split()


def test_a_job_cancelled_by_scancel_resumes_and_the_suite_matches_in_process(write_suite, tmp_path, monkeypatch):
    suite = write_suite({"name": "tinyslurm", "train": {"epochs": 3, "batch_size": 32, "lr": 0.05,
                                                       "schedule": "step", "milestones": [2]}})
    plan = make_plan(load_suite(suite), suite)
    teacher = plan.jobs[0]
    store = tmp_path / "store"
    env = {**os.environ, "COLUMNS": "200"}
    driver = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--device", "cpu",
                               "--executor", "slurm", "--cpus-per-job", "1", "--time-min", "30"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Cancel the teacher's SLURM job once it has a checkpoint (an epoch done) and is still training.
        checkpoint = store / "jobs" / teacher.key / "checkpoint.pt"
        deadline = time.time() + 600  # a minute when idle; a loaded machine imports torch slowly
        while not checkpoint.exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        ids = running("kdbench-tinyslurm")
        if not (checkpoint.exists() and len(ids) == 1):
            driver.kill()
            pytest.fail(f"the teacher did not start training under SLURM (jobs {ids}):\n{driver.communicate()[1]}")
        subprocess.run(["scancel", ids[0]], check=True)
        out, err = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
            subprocess.run(["scancel", "-n", "kdbench-tinyslurm"])
    assert driver.returncode == 0, err
    assert re.search(r"resubmitting it", err), err
    logs = Path(re.search(r"slurm: job logs in (\S+)/", err).group(1))
    assert logs == store.resolve() / "slurm-logs" / "tinyslurm" and any(logs.glob("*_log.out"))
    uri = os.environ["MLFLOW_TRACKING_URI"]
    parent = re.search(r"parent run (\w+)", err).group(1)
    on_slurm = finished_jobs(uri, parent, "tinyslurm")

    # The same suite in-process, uninterrupted, in its own store and database.
    monkeypatch.setenv("KDBENCH_STORE", str(tmp_path / "store-inprocess"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'inprocess.db'}")
    local = get_executor("inprocess")(plan, None, "cpu", console=Console(file=io.StringIO())).run()
    in_process = finished_jobs(os.environ["MLFLOW_TRACKING_URI"], local.parent_run, "tinyslurm")
    assert len(on_slurm) == 3 and on_slurm == in_process  # the resumed teacher and its students, bit for bit
