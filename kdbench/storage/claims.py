"""A job's claim: a lease file in the store that works across machines sharing one filesystem.

A flock dies with its process on one machine, but on NFS and cluster filesystems a lock held by a lost node may
never be released. So a claim is a small file `<store>/locks/<key>.claim` with its owner (host, pid, SLURM job)
and a heartbeat time that a thread renews every `ttl / 5` seconds. Another worker takes the claim over when

- the owner is on this host and its process is gone (a cancelled or crashed worker: at once), or
- the owner is the same SLURM job, requeued (on another node, after preemption: at once), or
- the heartbeat is older than `ttl` (a lost node: after `ttl`, default 10 minutes, `KDBENCH_CLAIM_TTL` seconds).

An owner whose claim was taken over (it stalled longer than `ttl`) sees it at its next heartbeat and stops the
job without finishing it, so a job is never trained twice to completion; a finished job is recorded in MLflow
and the store, and is skipped by every later claimant. Creating and taking over claims goes through a flock
held for milliseconds, so two takers never both win.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from filelock import FileLock

from kdbench.storage.files import atomic_write_text

DEFAULT_TTL_S = 600.0


def claim_ttl() -> float:
    return float(os.environ.get("KDBENCH_CLAIM_TTL", DEFAULT_TTL_S))


def _slurm_job() -> str:
    """This process's SLURM job (array task included), stable across requeues; empty outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Claim:
    """One job's lease. `acquire()` -> bool; `lost` turns true when another worker took it over."""

    def __init__(self, path: Path, ttl: float | None = None):
        self.path = path
        self.ttl = claim_ttl() if ttl is None else ttl
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": _slurm_job(),
                      "token": uuid.uuid4().hex}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # gone, or torn by a crash mid-write: nobody's
            return None

    def stale(self, held: dict | None, now: float | None = None) -> bool:
        """Whether `held` (a claim's content) no longer protects its job."""
        if held is None:
            return True
        if held.get("host") == self.owner["host"] and not _alive(int(held.get("pid", -1))):
            return True
        if held.get("slurm_job") and held.get("slurm_job") == self.owner["slurm_job"]:
            return True  # our own SLURM job, requeued: its earlier life is over
        return (now or time.time()) - float(held.get("heartbeat", 0)) > self.ttl

    def _write(self) -> None:
        atomic_write_text(json.dumps({**self.owner, "heartbeat": time.time()}), self.path)

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):  # held for milliseconds: create-or-take-over is one step
            held = self.holder()
            if held is not None and held.get("token") != self.owner["token"] and not self.stale(held):
                return False
            self._write()
        self._thread = threading.Thread(target=self._beat, name=f"claim {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def renew(self) -> bool:
        """Renew the heartbeat; False (and `lost`) when another worker has taken the claim over."""
        with FileLock(str(self.path) + ".lock"):
            held = self.holder()
            if held is None or held.get("token") != self.owner["token"]:
                self.lost = True
                return False
            self._write()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            if not self.renew():
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with FileLock(str(self.path) + ".lock"):
            held = self.holder()
            if held is not None and held.get("token") == self.owner["token"]:
                self.path.unlink(missing_ok=True)

    def wait_free(self, poll_s: float = 1.0) -> None:
        """Block until nobody holds a live claim on this job (another kdbench process finished or died)."""
        while not self.stale(self.holder()):
            time.sleep(poll_s)
