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

import pytest
from conftest import finished_jobs
from rich.console import Console

from kdbench.executors import get_executor, load_options
from kdbench.plan import make_plan
from kdbench.suite import load_suite


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
