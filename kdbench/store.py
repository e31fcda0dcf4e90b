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
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdbench import KdbenchError


def default_store() -> Path:
    return Path(os.environ.get("KDBENCH_STORE", "kdbench-store"))


class CorruptFile(KdbenchError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, *chunks: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: a kill at any moment leaves the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
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
        files = [("model.pt", meta["model_sha256"])] + [(r["file"], r["sha256"]) for r in meta["route"].values()]
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

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.folder(key) / "meta.json").read_text())

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
