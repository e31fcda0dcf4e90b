"""Local worker processes, the default executor: two workers give the numbers of one (the in-process executor) bit for
bit, a student starts only once its teacher (here: its assistant, in the same wave) is stored, Ctrl-C of the whole
process group stops a two-worker run with 130 and the same command resumes it to the same numbers, and more torch
threads than cores are refused in one line. Workers fork from a server started early: they take the driver's
environment, and a driver killed outright leaves none behind.

Real `kdbench run` processes on a teacher -> assistant -> student chain of tiny CIFAR ResNets on synthetic data.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, finished_jobs
from mlflow.tracking import MlflowClient

from kdbench import KdbenchError
from kdbench.config.load import load_suite
from kdbench.plan import make_plan
from kdbench.run.executors import ExecutorOptions, get_executor
from kdbench.run.executors.local import WorkerPool
from kdbench.run.executors.options import usable_cores
from kdbench.run.worker_start import start_early
from kdbench.storage.store import ModelStore

# The teacher, then in one wave an assistant, a KD student and the TAKD student the assistant teaches.
CHAIN = {**TINY, "teachers": ["cifar_resnet20"], "students": ["cifar_resnet8"],
         "methods": ["kd", {"method": "takd", "params": {"assistants": "cifar_resnet14"}}]}


def command(suite: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kdbench.cli", "run", str(suite), "--device", "cpu", *args]


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, "KDBENCH_STORE": str(root / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def kdbench(root: Path, suite: Path, *args: str) -> str:
    """`kdbench run` in its own store and MLflow database under `root`; returns the parent run id."""
    root.mkdir(exist_ok=True)
    done = subprocess.run(command(suite, *args), cwd=root, env=environment(root), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"parent run (\w+)", done.stderr).group(1)


def numbers(root: Path, parent: str) -> dict:
    """Per job: role, final test accuracy and training loss; per stored model (teacher, assistant): its weights."""
    store = ModelStore(root / "store")
    return {"jobs": finished_jobs(f"sqlite:///{root / 'mlflow.db'}", parent),
            "weights": {e.key: store.load_final(e.key) for e in store.entries() if e.kind == "model"}}


def assert_same(a: dict, b: dict) -> None:
    assert a["jobs"] == b["jobs"] and len(a["jobs"]) == 4  # keys, accuracies and losses, bit for bit
    assert a["weights"].keys() == b["weights"].keys() and len(a["weights"]) == 2
    for key, state in a["weights"].items():
        assert all(torch.equal(state[name], b["weights"][key][name]) for name in state), key


def runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("tiny").experiment_id])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CHAIN, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one_worker(suite, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("one")
    return numbers(root, kdbench(root, suite, "--workers", "1"))


@pytest.mark.skipif(usable_cores() < 2, reason="two workers need two cores (the oversubscription guard)")
def test_two_workers_give_one_workers_numbers_and_students_wait_for_their_teacher(suite, one_worker, tmp_path):
    parent = kdbench(tmp_path, suite, "--workers", "2")
    assert_same(numbers(tmp_path, parent), one_worker)
    children = [r for r in runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == parent]
    by_key = {r.data.tags["kdbench.job"]: r for r in children}
    (student,) = [r for r in children if r.data.params.get("assistant_job")]
    assistant = by_key[student.data.params["assistant_job"]]
    teacher = next(r for r in children if r.data.tags["kdbench.role"] == "teacher")
    assert assistant.data.tags["kdbench.role"] == "assistant"
    # The assistant's run ends after its model is stored: the TAKD student started after that, in the same wave.
    assert assistant.info.end_time <= student.info.start_time
    assert all(teacher.info.end_time <= r.info.start_time for r in children if r is not teacher)


@pytest.mark.skipif(usable_cores() < 2, reason="two workers need two cores (the oversubscription guard)")
@pytest.mark.slow  # about 30-60 s on 2 cores: `make test-slow` runs it (CI does)
def test_ctrl_c_stops_two_workers_with_130_and_the_same_command_resumes_to_the_same_numbers(suite, one_worker,
                                                                                              tmp_path):
    args = command(suite, "--workers", "2")
    proc = subprocess.Popen(args, cwd=tmp_path, env=environment(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a job's first epoch checkpointed: stopped in its second
        if list((tmp_path / "store").glob("jobs/*/checkpoint.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the driver and its workers alike
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command again to resume" in err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]  # a clean stop, nothing else
    stopped = runs(tmp_path)
    parents = [r for r in stopped if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    children = [r.info.status for r in stopped if r not in parents]
    assert "KILLED" in children and "RUNNING" not in children, children  # stopped at a step, none left open

    again = subprocess.run(args, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and f"parent run {parents[0].info.run_id}" in again.stderr
    assert_same(numbers(tmp_path, parents[0].info.run_id), one_worker)


def test_more_torch_threads_than_cores_is_refused_in_one_line(write_suite):
    cores = usable_cores()
    plan = make_plan(load_suite(write_suite()), write_suite())
    local = get_executor("local")
    with pytest.raises(KdbenchError) as err:
        local(plan, None, "cpu", options=ExecutorOptions(workers=cores + 1))
    assert str(err.value) == (f"--workers {cores + 1} with --cpus-per-job 1: {cores + 1} jobs at once x 1 torch "
                              f"threads each = {cores + 1} threads on {cores} usable cores; lower them so that "
                              f"jobs x threads <= {cores}")
    with pytest.raises(KdbenchError, match=f"--cpus-per-job {cores + 1}: 1 jobs at once x {cores + 1} torch"):
        local(plan, None, "cpu", options=ExecutorOptions(cpus_per_job=cores + 1))  # one worker, too wide
    assert local(plan, None, "cpu").size == cores  # the default: a one-thread job per core
    with pytest.raises(KdbenchError, match=r"--executor ray --cpus-per-job 0.5 \(a local Ray\): "
                                           f"{2 * cores} jobs at once"):
        get_executor("ray")(plan, None, "cpu", options=ExecutorOptions(cpus_per_job=0.5))


def test_the_command_line_refuses_oversubscription_with_exit_2_before_anything_is_written(write_suite, tmp_path):
    cores = usable_cores()
    done = subprocess.run(command(write_suite(), "--workers", str(cores + 1)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"kdbench: error: --workers {cores + 1} with --cpus-per-job 1: {cores + 1} jobs at once x 1 torch threads "
        f"each = {cores + 1} threads on {cores} usable cores; lower them so that jobs x threads <= {cores}"]
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()
    wrong = subprocess.run(command(write_suite(), "--executor", "ray", "--workers", "2"), capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 2 and "--workers: only the local executor runs worker processes" in wrong.stderr


@pytest.mark.skipif(usable_cores() < 2, reason="two workers need two cores (the oversubscription guard)")
@pytest.mark.slow  # about 45 s on 2 cores: `make test-slow` runs it (CI does)
def test_a_stack_of_seeds_goes_to_one_worker_and_gives_one_workers_numbers(tmp_path):
    """stack_seeds: the seeds of a cell train as one model, so they go to one worker together; sent one by one, the
    other worker found them claimed and waited, as for another kdbench process."""
    path = tmp_path / "stacked.yaml"
    path.write_text(yaml.safe_dump({**TINY, "methods": ["baseline", "kd"], "seeds": [0, 1, 2], "stack_seeds": True},
                                   sort_keys=False))
    one, two = tmp_path / "one", tmp_path / "two"
    expected = finished_jobs(f"sqlite:///{one / 'mlflow.db'}", kdbench(one, path, "--workers", "1"))
    two.mkdir()
    done = subprocess.run(command(path, "--workers", "2"), cwd=two, env=environment(two), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "waiting for another kdbench process" not in done.stderr and done.stderr.count("(stacked)") == 6
    parent = re.search(r"parent run (\w+)", done.stderr).group(1)
    assert finished_jobs(f"sqlite:///{two / 'mlflow.db'}", parent) == expected and len(expected) == 7


@pytest.mark.skipif(usable_cores() < 2, reason="two workers need two cores (the oversubscription guard)")
@pytest.mark.slow  # about 40 s each on 2 cores: `make test-slow` runs them (CI does)
@pytest.mark.parametrize("methods", [["kd"], ["kd", "takd"]], ids=["kd", "kd-and-auto-takd"])
def test_a_student_starts_once_its_own_teacher_is_done_while_a_slower_teacher_still_trains(tmp_path, methods):
    """Every job but the students of an "auto" assistant goes out at once: the worker that trained the small
    teacher goes on with its student instead of idling until the large teacher is done (before, one "auto" TAKD
    in the suite held every student back until the whole first wave had ended)."""
    path = tmp_path / "two_teachers.yaml"
    val = {"val_size": 64} if "takd" in methods else {}  # an "auto" assistant is chosen on validation
    path.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "train_size": 512, **val},
                                    "teachers": ["cifar_resnet56", "cifar_resnet14"], "methods": methods,
                                    "train": {**TINY["train"], "epochs": 1, "milestones": []},
                                    "teacher": {"train": {"epochs": 2}}}, sort_keys=False))
    parent = kdbench(tmp_path, path, "--workers", "2")
    children = [r for r in runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == parent]
    teacher = {r.data.tags["kdbench.teacher"]: r for r in children if r.data.tags["kdbench.role"] == "teacher"}
    (student,) = [r for r in children if r.data.tags["kdbench.pair"] == "cifar_resnet14->cifar_resnet8"
                  and r.data.tags["kdbench.method"] == "kd"]
    assert teacher["cifar_resnet14"].info.end_time <= student.info.start_time < teacher["cifar_resnet56"].info.end_time
    if "takd" in methods:  # the students of an assistant (and it) went out once the first wave was done
        chosen = [r for r in children if " via " in r.info.run_name or r.data.tags["kdbench.role"] == "assistant"]
        assert len(chosen) == 2 and all(r.info.status == "FINISHED" for r in chosen), [r.info.run_name for r in chosen]
        assert min(r.info.start_time for r in chosen) >= max(t.info.end_time for t in teacher.values())


def test_a_worker_has_the_drivers_environment_of_when_its_pool_starts(monkeypatch):
    """The workers fork from a server started early (`start_early`, as `kdbench run` does first thing), whose own
    environment is that of its start; each worker takes the driver's of when the pool starts, as a spawned one."""
    start_early(["run", "suite.yaml"])
    monkeypatch.setenv("KDBENCH_PROBE", "set after the server started")
    pool = WorkerPool(1, 1)
    try:
        assert pool.executor.submit(os.getenv, "KDBENCH_PROBE").result(timeout=120) == "set after the server started"
    finally:
        pool.executor.shutdown()


def processes() -> dict[int, int]:
    """pid -> parent pid of every live process (from /proc; a zombie is not live)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if state != "Z":
            parents[int(stat.parent.name)] = int(parent)
    return parents


def descendants(pid: int) -> set[int]:
    """Every live process under `pid`: the forkserver, its workers, multiprocessing's resource tracker."""
    parents = processes()
    found, new = set(), {pid}
    while new:
        new = {p for p, parent in parents.items() if parent in new} - found
        found |= new
    return found


@pytest.mark.skipif(usable_cores() < 2 or not Path("/proc").is_dir(), reason="two workers, and /proc to find them")
@pytest.mark.slow  # about 30 s on 2 cores: `make test-slow` runs it (CI does)
def test_a_driver_killed_outright_leaves_no_worker_behind_and_no_run_open(suite, tmp_path):
    """SIGKILL of the driver alone: its workers' parent is the forkserver, which outlives the driver while they live,
    so each watches the driver itself; it stops its job at the next step (run KILLED) and leaves, and so does the
    server."""
    proc = subprocess.Popen(command(suite, "--workers", "2"), cwd=tmp_path, env=environment(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a job's first epoch checkpointed: killed in its second
        if list((tmp_path / "store").glob("jobs/*/checkpoint.pt")):
            break
        time.sleep(0.05)
    below = descendants(proc.pid)
    assert proc.poll() is None and len(below) >= 3, below  # the server and two workers (and a resource tracker)
    proc.kill()
    proc.wait()
    deadline = time.time() + 90
    while time.time() < deadline and below & processes().keys():
        time.sleep(0.2)
    assert not below & processes().keys(), f"left behind: {below & processes().keys()}"
    children = [r.info.status for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    assert "KILLED" in children and "RUNNING" not in children, children
