"""The model store: trained models by content hash, so a second suite reuses them.

Layout: <store>/<key>/model.pt (final weights), route/epoch_NNNN.pt (checkpoints along the run, with
BatchNorm statistics, for RCO), meta.json (config and final metrics; written last, so a folder
without it was never finished). Files are written to a temporary name and renamed: a crash never
leaves a half-written model under a real name. Each file's sha256 is kept in meta.json and checked on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdbench import KdbenchError


STORE_ENV = "KDBENCH_STORE"
DEFAULT_STORE = "kdbench-store"


def default_store() -> Path:
    """`--store`, else $KDBENCH_STORE, else ./kdbench-store (the CLI's --store sets the variable)."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


class CorruptFile(KdbenchError):
    pass


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def check_writable(folder: Path, what: str) -> None:
    """One line naming `folder` unless files can be created in it (or, if it does not exist yet, in the folder
    that would hold it). Tries for real: permission bits say nothing to root, nor about a read-only mount."""
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(f"{probe_in} is not a folder")
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=".kdbench-write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise KdbenchError(f"{what} {folder} cannot be written ({reason}); make it writable or choose another "
                           f"location") from None


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp makes files private (0600); what is written here gets the usual mode


def atomic_write(path: Path, *chunks: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: a kill at any moment leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _serialized(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: Path) -> str:
    """torch.save, atomically; returns the file's sha256."""
    payload = _serialized(obj)
    atomic_write(path, payload)
    return hashlib.sha256(payload).hexdigest()


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """A training checkpoint in one self-verifying file: a line with the payload's sha256, then the payload."""
    payload = _serialized(state)
    atomic_write(path, hashlib.sha256(payload).hexdigest().encode() + b"\n", payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    digest, _, payload = raw.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptFile(f"{path}: checkpoint is truncated or altered (content hash mismatch)")
    try:  # plain data only: a crafted pickle must not run code, even with a matching hash
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFile(f"{path}: checkpoint cannot be read ({type(exc).__name__})") from None


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, text.encode())


def checked_load(path: Path, expected_sha256: str | None) -> Any:
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise CorruptFile(f"{path}: content hash does not match the one recorded when it was saved; the file is "
                          f"corrupted: delete its folder {path.parent} to retrain it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFile(f"{path}: cannot be read ({type(exc).__name__}); delete it to retrain") from None


SPECIAL = ("jobs", "locks", "corrupt")  # the store's own folders; every other folder is a model entry


@dataclass(frozen=True)
class Entry:
    """One thing the store holds: a model (complete, or partial while or after training), a resumable
    checkpoint of an unfinished job, or a corrupted entry moved aside."""
    key: str
    kind: str  # "model", "partial", "checkpoint", "corrupt"
    model: str
    role: str
    size: int  # bytes
    mtime: float
    path: Path


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def folder_mtime(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*") if p.is_file()])


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
        """Everything the store holds, in a stable order (models, then checkpoints, then corrupted entries)."""
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
        jobs = self.root / "jobs"
        for path in sorted(jobs.iterdir()) if jobs.is_dir() else []:
            out.append(Entry(path.name, "checkpoint", "", "", folder_size(path), folder_mtime(path), path))
        corrupt = self.root / "corrupt"
        for path in sorted(corrupt.iterdir()) if corrupt.is_dir() else []:
            out.append(Entry(path.name.rsplit("-", 2)[0], "corrupt", "", "", folder_size(path), folder_mtime(path),
                             path))
        return out

    def unreferenced(self, referenced: set[str]) -> list[Entry]:
        """What no reference keeps: models and checkpoints whose key is not in `referenced`, and every corrupted
        entry (moved aside, never used again)."""
        return [e for e in self.entries() if e.kind == "corrupt" or e.key not in referenced]

    def remove(self, entry: Entry) -> bool:
        """Delete an entry unless a worker holds its job's claim right now (it is being trained or used)."""
        from kdbench.claims import Claim  # claims write through this module

        claim = Claim(self.claim_path(entry.key))
        if not claim.acquire():  # held while deleting: no worker starts the job meanwhile
            return False
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink(missing_ok=True)
        finally:
            claim.release()
        return True
