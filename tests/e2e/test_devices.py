"""One job on two devices: two processes with the gloo backend on the CPU.

The engine on two devices computes what it computes on one at the same global batch: in float64 the weights agree
to round-off in the order of additions; in float32 the two-device run is as close to that exact result as the
one-device run is. `kdbench run --devices 2` (torchrun) writes only from its first process, records the batch's
layout, and a run stopped by SIGTERM, started again, SIGKILLed with its processes and started again ends bit for bit
as an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from mlflow.tracking import MlflowClient
from PIL import Image
from rich.console import Console

from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.run.executors import get_executor
from kdbench.storage.store import ModelStore
from kdbench.zoo import create_model

WORKER = Path(__file__).with_name("gloo_worker.py")
pytestmark = pytest.mark.slow  # processes that import torch, timm and MLflow on a 2-core machine: minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """gloo_worker.py alone, and as the two processes of a gloo group, at the same time; what each rank 0 saved."""
    folder = tmp_path_factory.mktemp("gloo")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(folder / name), str(world), str(rank), str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
             for name, world, rank in (("one.pt", 1, 0), ("two.pt", 2, 0), ("two-1.pt", 2, 1))]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    return torch.load(folder / "one.pt", weights_only=False), torch.load(folder / "two.pt", weights_only=False)


VARIANTS = ["baseline", "kd", "kd+pcgrad", "prokt", "fitnets_two_stage", "rco"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_devices_compute_what_one_does(engine_runs, variant):
    one, two = engine_runs
    parts = ["student", "teacher"] if "teacher" in one[("float64", variant)] else ["student"]
    for part in parts:  # float64: the same arithmetic (measured: at most 1e-13, FitNets' two stages)
        assert largest_difference(one[("float64", variant)][part], two[("float64", variant)][part]) < 1e-10
    exact = one[("float64", variant)]["student"]
    alone, shared = one[("float32", variant)]["student"], two[("float32", variant)]["student"]
    # float32: round-off grows with training (PCGrad's projections flip with it, FitNets' hints amplify it: 2.5e-3
    # and 0.5 between one and two devices), but two devices stay as close to the exact result as one device does
    assert largest_difference(shared, exact) <= 4 * largest_difference(alone, exact) + 1e-6
    for alone_epoch, shared_epoch in zip(one[("float64", variant)]["history"], two[("float64", variant)]["history"]):
        assert alone_epoch["test_acc"] == shared_epoch["test_acc"]
        assert abs(alone_epoch["train_loss"] - shared_epoch["train_loss"]) < 1e-6  # the engine sums in float32


def test_a_method_whose_devices_drift_apart_is_stopped_at_its_first_step(engine_runs):
    one, two = engine_runs
    for dtype in ("float32", "float64"):
        assert "error" not in one[(dtype, "dfa")]  # alone it trains
        error = two[(dtype, "dfa")]["error"]  # its search steps on each device's own hypergradients
        assert error.startswith("dfa: after 1 step(s) the devices' copies of method.alpha")
        assert "cannot train on several devices" in error and "\n" not in error


# ---------------------------------------------------------------------------------------------- the command

def image_folder(root: Path) -> None:
    """3 classes of 16x16 images: a smooth colour field per class, plus noise (learnable in a few epochs)."""
    rng = np.random.default_rng(0)
    fields = rng.integers(40, 215, (3, 4, 4, 3))
    for split, n in (("train", 40), ("test", 12)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                image = np.kron(fields[c], np.ones((4, 4, 1))) + rng.normal(0, 30, (16, 16, 3))
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / split / f"c{c}" / f"{i:02d}.png")


SUITE = {"name": "devices", "data": {"dataset": "imagefolder", "path": "tree", "num_classes": 3, "image_size": 16,
                                     "loader": "stream"},
         "augment": {"crop_padding": 2, "flip": True}, "teachers": ["cifar_resnet14"], "students": ["cifar_resnet8"],
         "methods": ["kd"], "seeds": [0],
         "train": {"epochs": 3, "batch_size": 8, "lr": 0.01, "schedule": "step", "milestones": [2]},
         # a teacher as loaded (evaluated, not trained): the student's 45 steps are what is compared
         "teacher": {"source": "checkpoint", "checkpoints": {"cifar_resnet14": "teacher.pt"},
                     "train": {"epochs": 0, "milestones": []}}}


@pytest.fixture
def command(tmp_path):
    image_folder(tmp_path / "data" / "tree")
    torch.manual_seed(3)
    torch.save(create_model("cifar_resnet14", 3, 3).state_dict(), tmp_path / "teacher.pt")
    suite = tmp_path / "devices.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    env = {**os.environ, "KDBENCH_DATA": str(tmp_path / "data"), "KDBENCH_CACHE": str(tmp_path / "cache"),
           "KDBENCH_DATA_WORKERS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def start(name: str) -> tuple[subprocess.Popen, str]:
        uri = f"sqlite:///{tmp_path / name}.db"
        return subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--device", "cpu",
                                 "--devices", "2"], env={**env, "MLFLOW_TRACKING_URI": uri,
                                                         "KDBENCH_STORE": str(tmp_path / name)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), uri
    return suite, start


def descendants(pid: int) -> list[int]:
    """The processes `pid` started (torchrun's workers), and theirs, from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [p for child in map(int, children) for p in (*descendants(child), child)]


def job_runs(uri: str) -> dict:
    """The suite's child runs by role, and how many runs there are in all."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("devices").experiment_id])
    return {r.data.tags["kdbench.role"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}, len(runs)


def numbers(uri: str, run) -> dict[str, list[float]]:
    """Every metric of a run epoch by epoch, timings left out."""
    client = MlflowClient(uri)
    return {k: [m.value for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics
            if k not in ("epoch_time", "images_per_sec", "wall_time")}


def test_kdbench_run_on_two_devices_writes_once_and_resumes_from_a_stop_or_a_kill(command, tmp_path, monkeypatch):
    suite, start = command
    whole, uri = start("whole")
    out, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, out[-3000:]
    runs, count = job_runs(uri)
    assert count == 3 and set(runs) == {"teacher", "student"}  # the first process alone writes: a run per job
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["kdbench.devices"] == "2"
        assert (run.data.tags["kdbench.global_batch"], run.data.tags["kdbench.per_device_batch"]) == ("8", "4")
        assert run.data.tags["kdbench.lr_scaling"].startswith("none")
    uninterrupted = {role: numbers(uri, run) for role, run in runs.items()}
    assert len(uninterrupted["student"]["test_loss"]) == 3

    stopped, uri = start("stopped")  # SIGTERM to torchrun once the student's first epoch is saved
    deadline = time.time() + 600
    while not list((tmp_path / "stopped" / "jobs").glob("*/checkpoint.pt")) and stopped.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=300)
    assert stopped.returncode != 0 and "kdbench: interrupted (stopped " in out, out[-3000:]
    assert job_runs(uri)[0]["student"].info.status == "KILLED"
    # resumed, then SIGKILLed with its processes as soon as it saves the next epoch's checkpoint (a crash: no one
    # saves or says anything; the claim's owner is gone)
    checkpoint = next((tmp_path / "stopped" / "jobs").glob("*/checkpoint.pt"))
    saved = checkpoint.stat().st_mtime_ns
    crashed, uri = start("stopped")
    deadline = time.time() + 600
    while crashed.poll() is None and checkpoint.exists() and checkpoint.stat().st_mtime_ns == saved \
            and time.time() < deadline:
        time.sleep(0.02)
    assert crashed.poll() is None, crashed.communicate()[0][-3000:]  # killed before the job ended
    for pid in [*descendants(crashed.pid), crashed.pid]:  # the workers, then torchrun
        os.kill(pid, signal.SIGKILL)
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    assert job_runs(uri)[0]["student"].info.status == "RUNNING"  # nothing could say it ended
    resumed, uri = start("stopped")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0 and "resuming kd cifar_resnet8" in out, out[-3000:]
    runs, count = job_runs(uri)
    assert count == 3 and all(r.info.status == "FINISHED" for r in runs.values())  # resumed in the same runs
    # bit for bit the uninterrupted run's numbers, epoch by epoch
    assert {role: numbers(uri, run) for role, run in runs.items()} == uninterrupted

    # the same suite on one device (in this process): the same jobs, and float32 round-off apart the same numbers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'one'}.db")
    monkeypatch.setenv("KDBENCH_DATA_WORKERS", "0")
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    plan = make_plan(load_suite(suite), suite)
    get_executor("inprocess")(plan, tmp_path / "data", "cpu", console=Console(file=io.StringIO()),
                              store=ModelStore(tmp_path / "one")).run()
    runs, _ = job_runs(f"sqlite:///{tmp_path / 'one'}.db")
    assert {r.data.tags["kdbench.job"] for r in runs.values()} == \
        {r.data.tags["kdbench.job"] for r in job_runs(uri)[0].values()}  # the device count is not in a job's key
    one = numbers(f"sqlite:///{tmp_path / 'one'}.db", runs["student"])
    # measured: the same test accuracy every epoch, losses at most 1.1e-7 apart (float32 sums in another order)
    for metric in ("train_loss", "test_loss", "test_acc"):
        for a, b in zip(one[metric], uninterrupted["student"][metric]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (metric, one[metric], uninterrupted["student"][metric])
