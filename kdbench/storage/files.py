"""Files written so that a crash never leaves half of one: atomic writes, content hashes,
the checkpoint format (a hash line, then a weights-only torch payload).
"""

from __future__ import annotations
import hashlib
import json
import io
import os
import tempfile
from pathlib import Path
from typing import Any
import torch
from kdbench import KdbenchError


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


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def folder_mtime(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*") if p.is_file()])


def content_hash(config: dict[str, Any]) -> str:
    """A job's key: the sha256 of its configuration as canonical JSON, first 16 hex digits."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
