"""Ray on this machine, logging to a real MLflow tracking server (as a cluster would): the same MLflow runs and
the same numbers, bit for bit on CPU, as the in-process executor."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import finished_jobs
from rich.console import Console

from kdbench.run.executors import get_executor, load_options
from kdbench.plan import make_plan
from kdbench.config.load import load_suite


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 and a free port, with a SQLite backend: the tracking URI of a cluster."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_ray_with_an_mlflow_server_gives_the_in_process_runs_and_numbers(write_suite, mlflow_server, monkeypatch):
    pytest.importorskip("ray")
    path = write_suite({"train": {"epochs": 1, "batch_size": 64}})
    plan = make_plan(load_suite(path), path)
    quiet = Console(file=io.StringIO())
    local_uri = os.environ["MLFLOW_TRACKING_URI"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    log = io.StringIO()
    options = load_options("ray", None, cpus_per_job=1)
    remote = get_executor("ray")(plan, None, "cpu", console=Console(file=log), options=options).run()
    # Tiny data can leave a job at chance: collapsed jobs are finished runs too (marked, kept out of means).
    assert not remote.failed and len(remote.finished) + len(remote.collapsed) == 3, log.getvalue()
    assert "a local Ray" in log.getvalue() and "1 CPU and 0 GPU per job" in log.getvalue()
    on_ray = finished_jobs(mlflow_server, remote.parent_run)

    # The same suite in-process, in its own store and database: every job trained again, here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_uri)
    monkeypatch.setenv("KDBENCH_STORE", str(path.parent / "store-inprocess"))
    local = get_executor("inprocess")(plan, None, "cpu", console=quiet).run()
    assert not local.failed and local.skipped == 0
    in_process = finished_jobs(local_uri, local.parent_run)
    assert sorted(role for role, *_ in on_ray.values()) == ["student", "student", "teacher"]
    assert on_ray == in_process  # same jobs, same final accuracy and loss, bit for bit


@pytest.mark.slow  # about 70 s on 2 cores: `make test-slow` runs it (CI does)
def test_ctrl_c_on_a_ray_run_cancels_its_jobs_marks_them_killed_and_the_next_run_finishes(write_suite, tmp_path):
    """The driver answers Ctrl-C within seconds, not at the end of a wave: the running tasks are cancelled,
    their runs and the parent end KILLED, the exit code is 130, and the same command then finishes the suite."""
    pytest.importorskip("ray")
    import signal

    from mlflow.tracking import MlflowClient

    path = write_suite({"train": {"epochs": 4, "batch_size": 64}})  # a second or two an epoch
    uri = os.environ["MLFLOW_TRACKING_URI"]
    command = [sys.executable, "-m", "kdbench.cli", "run", str(path), "--device", "cpu", "--executor", "ray",
               "--cpus-per-job", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not Path(uri.removeprefix("sqlite:///")).exists() and time.time() < deadline:
        time.sleep(0.2)  # a client made before would create the database itself, racing the run's creation
    client = MlflowClient(uri)
    while time.time() < deadline and proc.poll() is None:  # wait until the teacher has logged an epoch
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if any(r.data.metrics.get("test_acc") is not None for r in runs):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    stopped = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - stopped < 60, "the driver waited for the wave instead of stopping"
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    statuses = [(r.info.run_name, r.info.status) for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "KILLED", statuses
    children = [r.info.status for r in runs if r not in parents]
    assert "KILLED" in children and "RUNNING" not in children, statuses  # the cancelled job ended, none left open

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr + again.stdout  # the killed run continues from its checkpoint
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
