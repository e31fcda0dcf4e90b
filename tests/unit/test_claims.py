"""Claims across machines: a dead or silent worker's claim expires and is taken over; a live one is respected;
a worker whose claim was taken over finds out and stops without finishing the job."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading
import time

from rich.console import Console

from kdbench.storage.claims import Claim
from kdbench.run.executors import get_executor
from kdbench.run.job import HELD, run_job
from kdbench.plan import make_plan
from kdbench.config.load import load_suite


def held_by(path, host, pid, heartbeat, slurm_job=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "slurm_job": slurm_job, "token": "theirs",
                                "heartbeat": heartbeat}))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_dead_local_process_claim_is_taken_over_at_once(tmp_path):
    path = tmp_path / "locks" / "job.claim"
    held_by(path, socket.gethostname(), dead_pid(), time.time())  # fresh heartbeat, but its process is gone
    claim = Claim(path, ttl=600)
    assert claim.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    claim.release()
    assert not path.exists()


def test_a_live_claim_is_respected_here_and_from_another_host(tmp_path):
    path = tmp_path / "locks" / "job.claim"
    held_by(path, socket.gethostname(), os.getppid(), time.time())  # a live process on this host
    assert not Claim(path, ttl=600).acquire()
    held_by(path, "node-elsewhere", 1, time.time() - 60)  # another host, heard from a minute ago
    assert not Claim(path, ttl=600).acquire()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_a_silent_claim_from_another_host_expires_after_the_lease(tmp_path):
    path = tmp_path / "locks" / "job.claim"
    held_by(path, "node-lost", 1, time.time() - 601)  # a node lost ten minutes ago: no heartbeat since
    claim = Claim(path, ttl=600)
    assert claim.acquire()
    claim.release()


def test_a_requeued_slurm_job_takes_over_its_own_claim(tmp_path, monkeypatch):
    path = tmp_path / "locks" / "job.claim"
    held_by(path, "node-a", 1, time.time(), slurm_job="77_3")  # the same array task, before its requeue
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    claim = Claim(path, ttl=600)
    assert claim.acquire()
    claim.release()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # another task of the same array: not its claim
    held_by(path, "node-a", 1, time.time(), slurm_job="77_3")
    assert not Claim(path, ttl=600).acquire()


def test_heartbeats_keep_a_claim_and_an_owner_taken_over_finds_out(tmp_path):
    path = tmp_path / "locks" / "job.claim"
    mine = Claim(path, ttl=0.5)  # beats every 0.1 s
    assert mine.acquire()
    first = json.loads(path.read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads(path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads(path.read_text())["heartbeat"] > first  # renewed by the thread
    held_by(path, "node-b", 1, time.time())  # someone took it over while we were stalled
    assert not mine.renew() and mine.lost
    mine.release()
    assert json.loads(path.read_text())["host"] == "node-b"  # their claim is left alone


def test_a_job_another_live_worker_holds_is_not_run(write_suite, tmp_path):
    path = write_suite({"train": {"epochs": 1, "batch_size": 64}})
    plan = make_plan(load_suite(path), path)
    executor = get_executor("inprocess")(plan, None, "cpu", console=Console(file=io.StringIO()))
    teacher = plan.jobs[0]
    held_by(executor.store.claim_path(teacher.key), "node-elsewhere", 1, time.time())

    class FirstWaveOnly(type(executor)):
        def run_waves(self, outcome):
            result = run_job(self.plan, teacher, self.ctx)
            assert result.status == HELD
            outcome.record(result)

    runner = FirstWaveOnly(plan, None, "cpu", console=Console(file=io.StringIO()))
    outcome = runner.run()
    assert outcome.finished == [] and not outcome.failed
    assert not executor.store.has(teacher.key) and not executor.store.checkpoint_path(teacher.key).exists()


def test_a_worker_whose_claim_is_taken_over_stops_the_job_unfinished(write_suite, monkeypatch):
    monkeypatch.setenv("KDBENCH_CLAIM_TTL", "0.5")  # heartbeats every 0.1 s
    path = write_suite({"data": {"dataset": "synthetic", "train_size": 1024, "test_size": 128, "num_classes": 4,
                                 "image_size": 32}, "train": {"epochs": 3, "batch_size": 64}})
    plan = make_plan(load_suite(path), path)
    teacher = plan.jobs[0]

    class TakenOver(get_executor("inprocess")):
        def run_waves(self, outcome):
            def thief():  # another worker takes the claim over once the first epoch is saved
                while not self.store.checkpoint_path(teacher.key).exists():
                    time.sleep(0.01)
                held_by(self.store.claim_path(teacher.key), "node-b", 1, time.time() + 3600)
            taker = threading.Thread(target=thief)
            taker.start()
            self.result = run_job(self.plan, teacher, self.ctx)
            taker.join()

    runner = TakenOver(plan, None, "cpu", console=Console(file=io.StringIO()))
    runner.run()
    assert runner.result.status == HELD
    assert not runner.store.has(teacher.key)  # not finished: the new owner finishes it
    assert json.loads(runner.store.claim_path(teacher.key).read_text())["host"] == "node-b"
