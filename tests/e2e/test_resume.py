"""Resume: a job stopped at any step boundary, or killed, ends with exactly the numbers of an uninterrupted run."""

from __future__ import annotations

import functools
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

from kdbench.data.spec import DataSpec
from kdbench.data.load import load_data
from kdbench import Interrupted
from kdbench.train.engine import EngineOptions, Hooks, Provided, fit
from kdbench.method import TeacherRoute
from kdbench.modifier import modify
from kdbench.registry import get_method, get_modifier, methods
from kdbench.config.schema import AugmentConfig, TrainConfig
from kdbench.zoo import create_model

# Every registered method, found at collection time: a new method is covered without editing this test. Variants
# add the procedures that keep state across epochs (stages), with parameters that give each stage two epochs.
STAGED = {"rco": {"anchors": 3}, "fitnets": {"two_stage": True, "ce_weight": 0.1, "kd_weight": 0.9,
                                              "hint_fraction": 1 / 3},
          "eskd": {"teacher_fraction": 0.3, "kd_until": 0.5}}  # an early route checkpoint; CE alone from epoch 3
# Modifiers (kdbench.modifier) on a logit method: CTKD's learned temperature is state, its curriculum a schedule.
MODIFIED = {"kd+logit_std": ("logit_std", {}), "dkd+ctkd": ("ctkd", {"curriculum_epochs": 4})}
VARIANTS = {**{name: (name, STAGED.get(name, {})) for name in methods()},
            "rco_greedy": ("rco", {**STAGED["rco"], "choice": "greedy"}), "fitnets_one_stage": ("fitnets", {}),
            **{label: (label.split("+")[0], {}) for label in MODIFIED}}
EPOCHS, STEPS = 6, 3  # stages of two epochs: [0, 2), [2, 4), [4, 6)
BATCH, SIZE = 8, 8  # tiny: 9 variants x 6 runs each must stay cheap
TRAIN = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=0.05, schedule="step", milestones=[4])
AUG = AugmentConfig(crop_padding=1, flip=True)
ROUTE = [2, 4, 6]  # the teacher's route checkpoints; the last is the converged teacher
# Where each interrupted run stops, as (0-based epoch, steps done in it); STEPS + 1: after the epoch's end.
STOPS = [(1, 2),  # inside stage 1, in its second epoch (RCO's anchor, FitNets' hint stage: not set by a stage start)
         (1, STEPS + 1),  # across a stage boundary: resumed at the start of stage 2
         (3, 1),  # inside stage 2, in its second epoch
         (4, STEPS)]  # after the last step of an epoch, before its end (evaluation, checkpoint)


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec("synthetic", train_size=STEPS * BATCH + 8, val_size=8, test_size=16, num_classes=4,
                              image_size=SIZE), None, torch.device("cpu"))


def model(seed: int):
    torch.manual_seed(seed)
    return create_model("cifar_resnet8", 4, 3)


@functools.cache
def teacher_route() -> dict[int, dict[str, torch.Tensor]]:
    """Stand-ins for a trained teacher's route checkpoints: distinct models (what matters is which one teaches)."""
    return {e: model(100 + e).state_dict() for e in ROUTE}


def fresh_fit(variant: str, data, **kw):
    """Everything built as the executor builds it for a (resumed) job: fresh student, method, and the teacher its
    needs say (the converged teacher when one is stored: whatever a method changed in it is gone)."""
    name, params = VARIANTS[variant]
    cls = get_method(name)
    params = {**cls.defaults, **params}
    needs = cls.needs(params)
    route_states = teacher_route()
    route = TeacherRoute(ROUTE, lambda e: route_states[e]) if needs.route else None
    teacher = None
    if needs.teacher == "random":
        teacher = model(7)
    elif needs.teacher != "none":
        teacher = model(0)
        teacher.load_state_dict(route_states[needs.teacher_epoch or ROUTE[-1]])
    student = model(1)
    method = cls(params, student, teacher, (3, SIZE, SIZE))
    if variant in MODIFIED:
        name, modifier_params = MODIFIED[variant]
        method = modify(method, get_modifier(name)(modifier_params))
    result = fit(student, method, teacher, data, TRAIN, AUG, 0, EngineOptions.for_device("cpu"),
                 provided=Provided(route=route), **kw)
    return result, student, teacher, method


def stop_at(epoch: int, calls: int, resumed_from: dict | None):
    """should_stop for the engine's calls (after every step, and once at every epoch's end), counted from the
    start of the job: a resumed run goes on counting where its checkpoint was written."""
    count = [0 if resumed_from is None else resumed_from["epoch"] * (STEPS + 1) + resumed_from["batch"]]
    target = epoch * (STEPS + 1) + calls

    def should_stop():
        count[0] += 1
        return count[0] == target
    return should_stop


def comparable(history):
    return [{k: v for k, v in h.items() if k not in ("epoch_time", "images_per_sec")} for h in history]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_method_stopped_mid_epoch_and_across_stages_resumes_bit_identical(variant, data):
    reference, ref_student, ref_teacher, ref_method = fresh_fit(variant, data)
    assert len(reference.history) == EPOCHS and "val_acc" in reference.history[-1]
    state = None
    for epoch, calls in STOPS:
        saved = {}
        with pytest.raises(Interrupted):
            fresh_fit(variant, data, resume=state, hooks=Hooks(checkpoint=lambda s: saved.update(state=s),
                                                                should_stop=stop_at(epoch, calls, state)))
        state = saved["state"]
        assert (state["epoch"], state["batch"]) == ((epoch + 1, 0) if calls > STEPS else (epoch, calls))
    resumed, student, teacher, method = fresh_fit(variant, data, resume=state)
    assert comparable(resumed.history) == comparable(reference.history)
    for a, b in zip(student.state_dict().values(), ref_student.state_dict().values()):
        assert torch.equal(a, b)
    if teacher is not None and method.trains_teacher:
        for a, b in zip(teacher.state_dict().values(), ref_teacher.state_dict().values()):
            assert torch.equal(a, b)
    assert resumed.passes == reference.passes
    assert method.record == ref_method.record


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
