"""Resume: a job stopped at any step boundary, or killed, ends with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdbench.data import DataSpec, load_data
from kdbench.engine import EngineOptions, Interrupted, fit
from kdbench.registry import get_method
from kdbench.suite import AugmentConfig, TrainConfig
from kdbench.zoo import create_model

TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.05, schedule="step", milestones=[2])
AUG = AugmentConfig(crop_padding=4, flip=True)


def fresh_fit(data, **kw):
    torch.manual_seed(1)
    student = create_model("cifar_resnet8", 4, 3)
    teacher = create_model("cifar_resnet8", 4, 3).eval()
    method = get_method("kd")({}, student, teacher, (3, 32, 32))
    return fit(student, method, teacher, data, TRAIN, AUG, 0, EngineOptions.for_device("cpu"), **kw), student


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec("synthetic", train_size=96, test_size=32, num_classes=4, image_size=32), None,
                     torch.device("cpu"))


@pytest.mark.parametrize("stop_after", [2, 3, 5, 7])  # mid-epoch (2, 5, 7) and exactly at an epoch's end (3)
def test_stop_at_a_step_boundary_and_resume_is_bit_identical(data, stop_after):
    reference, ref_model = fresh_fit(data)
    saved, steps = {}, [0]

    def should_stop():
        steps[0] += 1
        return steps[0] == stop_after

    with pytest.raises(Interrupted):
        fresh_fit(data, checkpoint=lambda s: saved.update(state=s), should_stop=should_stop)
    resumed, model = fresh_fit(data, resume=saved["state"])
    keys = ("train_loss", "test_acc", "test_loss")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in reference.history]
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.passes == reference.passes


# ------------------------------------------------------------------------------------------ whole suites

SUITE = """
name: resumable
data: {dataset: synthetic, train_size: 192, test_size: 64, num_classes: 4, image_size: 32}
augment: {crop_padding: 4, flip: true}
teachers: [cifar_resnet14]
students: [cifar_resnet8]
methods: [baseline, kd]
seeds: [0]
train: {epochs: 3, batch_size: 32, lr: 0.05, schedule: step, milestones: [2]}
"""


def start(workdir: Path, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "KDBENCH_STORE": str(workdir / "store"), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(workdir / "suite.yaml"),
                             "--device", "cpu", *args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def suite_dir(tmp_path: Path, name: str) -> Path:
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "suite.yaml").write_text(SUITE)
    return workdir


def results(workdir: Path):
    """Per job: (status, test_acc history, train_loss history); and the number of parent runs."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resumable")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kdbench.role") == "suite"]
    jobs: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("kdbench.role") in ("teacher", "student"):
            history = {m: [(p.step, p.value) for p in sorted(client.get_metric_history(r.info.run_id, m),
                                                               key=lambda p: p.step)]
                       for m in ("test_acc", "test_loss", "train_loss")}
            jobs.setdefault(r.data.tags["kdbench.job"], []).append((r.info.status, history))
    return parents, jobs


def wait_until_training(proc, workdir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "store" / "locks").exists():
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """The uninterrupted run's results, shared by the tests below."""
    clean = suite_dir(tmp_path_factory.mktemp("resume"), "clean")
    assert start(clean).wait(timeout=600) == 0
    return results(clean)[1]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, expected):
    killed = suite_dir(tmp_path, "killed")
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = start(killed)
        wait_until_training(proc, killed)
        time.sleep(rng.uniform(0.5, 6.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    final = start(killed)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    parents, got = results(killed)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert set(got) == set(expected)
    for key, runs in got.items():
        finished = [h for status, h in runs if status == "FINISHED"]
        assert len(finished) == 1, (key, [s for s, _ in runs])  # one finished run per job, no orphans
        assert finished[0] == expected[key][0][1], key  # every epoch logged once, values bit-identical


def test_sigterm_stops_saves_marks_killed_and_resumes(tmp_path, expected):
    workdir = suite_dir(tmp_path, "term")
    proc = start(workdir)
    deadline = time.time() + 300
    while not list((workdir / "store").glob("jobs/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    parents, jobs = results(workdir)
    assert parents[0].info.status == "KILLED"
    assert any(status == "KILLED" for runs in jobs.values() for status, _ in runs)

    again = start(workdir)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "resuming" in err
    parents, got = results(workdir)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for key, runs in got.items():
        assert [s for s, _ in runs] == ["FINISHED"], key  # the killed run was continued, not replaced
        assert runs[0][1] == expected[key][0][1], key
