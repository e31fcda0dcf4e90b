"""The model store: trained models by content hash, so a second suite reuses them.

Layout: <store>/<key>/model.pt (final weights), route/epoch_NNNN.pt (checkpoints along the run, with
BatchNorm statistics, for RCO), meta.json (config and final metrics; written last, so a folder
without it was never finished). Files are written to a temporary name and renamed: a crash never
leaves a half-written model under a real name. Each file's sha256 is kept in meta.json and checked on load.
"""

from __future__ import annotations
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
import torch
from kdbench.storage.files import (CorruptFile, _UMASK, atomic_save, atomic_write_text, checked_load, folder_mtime,
                                   folder_size, sha256)
from kdbench.storage.claims import Claim


STORE_ENV = "KDBENCH_STORE"
DEFAULT_STORE = "kdbench-store"


def default_store() -> Path:
    """`--store`, else $KDBENCH_STORE, else ./kdbench-store (the CLI's --store sets the variable)."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)
os.umask(_UMASK)  # read once: mkstemp makes files private (0600); what is written here gets the usual mode


SPECIAL = ("jobs", "locks", "corrupt", "trash")  # the store's own folders; every other folder is a model entry


@dataclass(frozen=True)
class Entry:
    """One thing the store holds: a model (complete, or partial while or after training), a resumable
    checkpoint of an unfinished job, or a corrupted entry moved aside."""
    key: str
    kind: str  # "model", "partial", "checkpoint", "corrupt", "trash" (a removal that was interrupted)
    model: str
    role: str
    size: int  # bytes
    mtime: float
    path: Path


class Workers:
    """The processes working on one parent run, each holding a lock file while it works: the parent's final
    status is set by the last one to leave, never while another still trains."""

    def __init__(self, store: "ModelStore", parent: str, guard: Path):
        from filelock import FileLock

        self.folder = store.root / "locks" / f"workers-{parent}"
        self.guard = FileLock(str(guard))  # serialises leaving: two workers leaving at once never both stay silent
        self.mine = FileLock(str(self.folder / f"{os.getpid()}-{time.monotonic_ns()}.lock"))

    def __enter__(self) -> "Workers":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mine.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.mine.is_locked:
            self.mine.release()
            Path(self.mine.lock_file).unlink(missing_ok=True)

    def leave(self) -> bool:
        """Stop counting this process; True if no other process still works on the parent run."""
        from filelock import FileLock, Timeout

        with self.guard:
            self.__exit__()
            for path in self.folder.glob("*.lock"):
                other = FileLock(str(path))
                try:
                    other.acquire(timeout=0)
                except Timeout:
                    return False
                other.release()
                path.unlink(missing_ok=True)  # a worker that died without leaving
            return True


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_store()

    def folder(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.folder(key) / "meta.json").is_file()

    def verify(self, key: str) -> None:
        """Raise CorruptFile unless the stored model and its route checkpoints match their recorded hashes."""
        meta = self.meta(key)
        try:
            files = [("model.pt", meta["model_sha256"])] + [(r["file"], r["sha256"]) for r in meta["route"].values()]
        except (KeyError, TypeError, AttributeError):
            raise CorruptFile(f"{self.folder(key) / 'meta.json'}: its route record is malformed") from None
        for name, digest in files:
            path = self.folder(key) / name
            if not path.is_file() or sha256(path) != digest:
                raise CorruptFile(f"{path}: stored model is missing, truncated or altered (content hash mismatch)")

    def quarantine(self, key: str) -> Path:
        """Move a corrupted entry aside (kept for inspection, never used again); returns where it went."""
        target = self.root / "corrupt" / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder(key), target)
        return target

    def checkpoint_path(self, key: str) -> Path:
        """Where a job's resumable training state lives while it is unfinished."""
        return self.root / "jobs" / key / "checkpoint.pt"

    def drop_checkpoint(self, key: str) -> None:
        """A finished (or diverged) job's resumable state, deleted with its folder: no empty jobs/<key>/ stays."""
        path = self.checkpoint_path(key)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # gone already, or not empty: something else is in it, left alone
            pass

    def lock_path(self, name: str) -> Path:
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def claim_path(self, key: str) -> Path:
        """The job's claim (kdbench.claims): who trains it now, and their last heartbeat."""
        return self.root / "locks" / f"{key}.claim"

    def workers(self, parent: str, guard: str) -> Workers:
        return Workers(self, parent, self.lock_path(guard))

    def meta(self, key: str) -> dict[str, Any]:
        path = self.folder(key) / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptFile(f"{path}: truncated or not JSON") from None
        if not isinstance(meta, dict) or not {"model_sha256", "route", "metrics"} <= meta.keys():
            raise CorruptFile(f"{path}: not a complete model record")
        return meta

    def save_route(self, key: str, epoch: int, state_dict: dict[str, torch.Tensor]) -> tuple[str, str]:
        """Keep the model as it is after `epoch` (1-based); returns (relative file name, sha256)."""
        name = f"route/epoch_{epoch:04d}.pt"
        return name, atomic_save(state_dict, self.folder(key) / name)

    def save_final(self, key: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                   route: dict[int, tuple[str, str]]) -> None:
        digest = atomic_save(state_dict, self.folder(key) / "model.pt")
        meta = {**meta, "key": key, "model_sha256": digest,
                "route": {str(e): {"file": f, "sha256": h} for e, (f, h) in sorted(route.items())}}
        atomic_write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), self.folder(key) / "meta.json")

    def load_final(self, key: str) -> dict[str, torch.Tensor]:
        return checked_load(self.folder(key) / "model.pt", self.meta(key)["model_sha256"])

    def route(self, key: str) -> dict[int, Path]:
        """Route checkpoints by epoch (1-based), the final model included as the last."""
        meta = self.meta(key)
        return {int(e): self.folder(key) / r["file"] for e, r in meta["route"].items()}

    def load_route(self, key: str, epoch: int) -> dict[str, torch.Tensor]:
        entry = self.meta(key)["route"][str(epoch)]
        return checked_load(self.folder(key) / entry["file"], entry["sha256"])

    # -------------------------------------------------------------------------------- listing, clean-up

    def entries(self) -> list[Entry]:
        """Everything the store holds, in a stable order: models, partial models, checkpoints, corrupted entries."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in SPECIAL):
            model, role, kind = "?", "?", "partial"
            if (path / "meta.json").is_file():
                try:
                    config = self.meta(path.name).get("config", {})
                    model, role, kind = config.get("model", "?"), config.get("role", "teacher"), "model"
                except CorruptFile:
                    kind = "corrupt"
            out.append(Entry(path.name, kind, model, role, folder_size(path), folder_mtime(path), path))
        out.sort(key=lambda e: e.kind != "model")  # stable: complete models first, each group by key
        jobs = self.root / "jobs"
        for path in sorted(jobs.iterdir()) if jobs.is_dir() else []:
            out.append(Entry(path.name, "checkpoint", "", "", folder_size(path), folder_mtime(path), path))
        for kind in ("corrupt", "trash"):
            folder = self.root / kind
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                out.append(Entry(path.name.rsplit("-", 2)[0], kind, "", "", folder_size(path), folder_mtime(path),
                                 path))
        return out

    def unreferenced(self, referenced: set[str]) -> list[Entry]:
        """What no reference keeps: models and checkpoints whose key is not in `referenced`, every corrupted
        entry (moved aside, never used again) and what an interrupted removal left in trash/."""
        return [e for e in self.entries() if e.kind in ("corrupt", "trash") or e.key not in referenced]

    def remove(self, entry: Entry) -> bool:
        """Delete an entry unless a worker holds its job's claim right now (it is being trained or used).

        The entry is first renamed into trash/ (one atomic step), then deleted there: a kill at any moment leaves
        it whole under its name or gone from it, never half-deleted where a run would find it."""
        if entry.kind == "trash":
            shutil.rmtree(entry.path, ignore_errors=True)
            return True
        claim = Claim(self.claim_path(entry.key))
        if not claim.acquire():  # held while deleting: no worker starts the job meanwhile
            return False
        try:
            trash = self.root / "trash" / f"{entry.path.name}-{os.getpid()}-{time.monotonic_ns()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(entry.path, trash)
            except FileNotFoundError:  # removed meanwhile by another gc
                return True
        finally:
            claim.release()
        if trash.is_dir():
            shutil.rmtree(trash)
        else:
            trash.unlink(missing_ok=True)
        return True
