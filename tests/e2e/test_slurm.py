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
import torch
import yaml
from conftest import finished_jobs, slurm_missing
from rich.console import Console

from kdbench.run.executors import get_executor
from kdbench.plan import make_plan
from kdbench.config.load import load_suite
from kdbench.zoo import create_model


pytestmark = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))


def running(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.slow  # about 50 s on 2 cores: `make test-slow` runs it (CI does)
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


@pytest.mark.slow
def test_one_job_as_a_two_task_slurm_job_trains_as_torchrun_does(tmp_path):
    """`--executor slurm --devices 2`: each job a 2-task SLURM job (gloo on the CPU), with the numbers, bit for bit,
    of the same suite under torchrun on two processes."""
    from test_devices import SUITE, image_folder, job_runs, numbers  # the suite and data of the torchrun tests

    image_folder(tmp_path / "data" / "tree")
    torch.manual_seed(3)
    torch.save(create_model("cifar_resnet14", 3, 3).state_dict(), tmp_path / "teacher.pt")
    suite = tmp_path / "devices.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    env = {**os.environ, "KDBENCH_DATA": str(tmp_path / "data"), "KDBENCH_CACHE": str(tmp_path / "cache"),
           "KDBENCH_DATA_WORKERS": "0", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    results = {}
    for name, options in (("torchrun", []), ("slurm", ["--executor", "slurm", "--cpus-per-job", "1",
                                                        "--time-min", "30"])):
        uri = f"sqlite:///{tmp_path / name}.db"
        done = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--device", "cpu",
                               "--devices", "2", *options], cwd=tmp_path, capture_output=True, text=True,
                              timeout=1200, env={**env, "MLFLOW_TRACKING_URI": uri,
                                                 "KDBENCH_STORE": str(tmp_path / name)})
        assert done.returncode == 0, done.stderr[-3000:]
        runs, count = job_runs(uri)
        assert count == 3 and all(r.data.tags["kdbench.devices"] == "2" for r in runs.values())
        results[name] = {role: numbers(uri, run) for role, run in runs.items()}
    assert results["slurm"] == results["torchrun"]
