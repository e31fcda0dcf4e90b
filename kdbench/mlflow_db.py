"""An MLflow SQLite database's schema, checked before a command uses it: current, repaired, or refused in one line.

MLflow migrates a SQLite database step by step with alembic, and SQLite's migrations are not transactional:
a process killed during `mlflow db upgrade`, or an older kdbench killed while it created the database (before
it was created under a temporary name), leaves tables of two schema versions side by side, and every later
run fails deep inside MLflow. What is found, before anything is written:

- the schema this MLflow expects: nothing to do;
- a damaged or outdated schema, or no tables, in a database that holds no runs: repaired, by moving it aside
  (kept, never deleted) so that a new one is created; nothing is lost;
- a SQLite database that is not MLflow's: refused;
- an older MLflow's complete schema, with runs: refused, saying to back it up and run `mlflow db upgrade`;
- a newer MLflow's schema (a revision this MLflow does not know): refused, saying so;
- a half-migrated schema with runs (alembic's leftover `_alembic_tmp_*` tables, no recorded revision, or
  tables missing): refused, saying to restore the copy taken before upgrading or to move it aside.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from kdbench import KdbenchError

# A database without runs changed this recently may be one another MLflow process (`mlflow ui`, a script) is
# creating and migrating right now, without kdbench's lock: moving it aside would break that process.
SETTLE_S = 5.0
SETTLE_WAIT_S = 60.0
# Tables every MLflow schema since 1.0 has: without them a database is not a complete MLflow store.
CORE_TABLES = ("experiments", "runs", "metrics", "params", "tags", "alembic_version")
_REVISION = re.compile(r'^(down_)?revision\s*=\s*(?:"([0-9a-f]+)"|\'([0-9a-f]+)\'|None)', re.MULTILINE)


@dataclass(frozen=True)
class SchemaState:
    tables: frozenset[str]
    revision: str | None  # alembic_version's, None when the table is missing or empty
    runs: int  # rows of the runs table (0 without one)


def mlflow_revisions() -> tuple[str, frozenset[str]]:
    """The installed MLflow's head schema revision and every revision it knows, read from its migration files
    (parsed, not imported: importing alembic's script directory takes seconds)."""
    folder = Path(importlib.util.find_spec("mlflow").origin).parent / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for path in folder.glob("*.py"):
        for down, rev, rev_single in _REVISION.findall(path.read_text(errors="replace")):
            (parents if down else revisions).add(rev or rev_single)
    parents.discard("")
    heads = revisions - parents
    if len(heads) != 1:
        raise KdbenchError(f"MLflow's migration files in {folder} have {len(heads)} head revisions, not one; "
                           f"reinstall MLflow")
    return heads.pop(), frozenset(revisions)


def read_state(path: Path) -> SchemaState:
    """The tables, recorded revision and run count of the SQLite database at `path`, opened read-only."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            tables = frozenset(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            revision = (db.execute("SELECT version_num FROM alembic_version").fetchone() or (None,))[0] \
                if "alembic_version" in tables else None
            runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise KdbenchError(f"MLflow database {path} cannot be read ({exc}); point MLFLOW_TRACKING_URI at another "
                           f"store, or move it aside") from None
    return SchemaState(tables, revision, runs)


def diagnose(state: SchemaState, head: str, known: frozenset[str]) -> tuple[str, str]:
    """(kind, what is wrong): kind is "current", "empty", "foreign" (not MLflow's), "half-made", "older" or
    "newer"."""
    tables = state.tables - {"sqlite_sequence"}
    core = [t for t in CORE_TABLES if t in tables]
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not tables:
        return "empty", "no tables"
    if not core:
        return "foreign", f"tables {', '.join(sorted(tables)[:3])}{', ...' if len(tables) > 3 else ''}, none of MLflow's"
    if leftovers:
        return "half-made", f"alembic's leftover {', '.join(leftovers)}: an upgrade was killed midway"
    if len(core) < len(CORE_TABLES):
        missing = [t for t in CORE_TABLES if t not in core]
        return "half-made", f"tables {', '.join(missing)} missing: its creation or an upgrade was killed midway"
    if state.revision is None:
        return "half-made", "no schema revision recorded in alembic_version"
    if state.revision == head:
        return "current", ""
    if state.revision not in known:
        return "newer", f"schema revision {state.revision}, which MLflow {_version()} does not know"
    return "older", f"schema revision {state.revision} of an older MLflow; MLflow {_version()} needs {head}"


def _version() -> str:
    return importlib.metadata.version("mlflow")


def check_mlflow_db(path: Path, notice=None) -> None:
    """Refuse, in one line that says how to repair it, an MLflow database this MLflow cannot use; move aside one
    that holds no runs (saying so through `notice`) so that a new one is created. A missing file is fine."""
    if not path.is_file():
        return
    head, known = mlflow_revisions()
    with FileLock(str(path) + ".lock"):  # the lock kdbench.tracking creates databases under
        state, kind, what = _settled_state(path, head, known)
        if kind == "current":
            return
        if kind == "foreign":
            raise KdbenchError(f"{path} is a SQLite database but not MLflow's (it has {what}); point "
                               f"MLFLOW_TRACKING_URI at another store")
        if not state.runs:
            aside = _move_aside(path)
            if notice is not None:
                notice(f"MLflow database {path} held no runs and had {what}: moved aside to {aside.name}; a new "
                       f"one is created")
            return
    raise KdbenchError(_refusal(path, state.runs, kind, what))


def _last_change(path: Path) -> float:
    """Seconds since the database or its journal last changed (0 when it is gone)."""
    times = [p.stat().st_mtime for p in (path, path.with_name(path.name + "-journal")) if p.exists()]
    return time.time() - max(times) if times else 0.0


def _settled_state(path: Path, head: str, known: frozenset[str]) -> tuple[SchemaState, str, str]:
    """The state and diagnosis once no other process is still creating the database: an unfinished database
    without runs is read again until it has not changed for SETTLE_S seconds (or SETTLE_WAIT_S have passed)."""
    end = time.monotonic() + SETTLE_WAIT_S
    while True:
        state = read_state(path)
        kind, what = diagnose(state, head, known)
        if kind == "current" or state.runs or _last_change(path) >= SETTLE_S or time.monotonic() >= end:
            return state, kind, what
        time.sleep(0.5)


def _refusal(path: Path, runs: int, kind: str, what: str) -> str:
    uri = f"sqlite:///{path.resolve()}"
    line = f"MLflow database {path} holds {runs} runs and has {what}"
    if kind == "half-made":
        return (f"{line}: restore the copy taken before the upgrade and run `mlflow db upgrade {uri}` again, or move "
                f"it aside (mv {path} {path}.broken) to start a new database")
    if kind == "newer":
        return f"{line}: install the MLflow that wrote it, or point MLFLOW_TRACKING_URI at another store"
    return f"{line}: back it up (cp {path} {path}.bak), then upgrade it: `mlflow db upgrade {uri}`"


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    for suffix in ("-journal", "-wal", "-shm"):  # SQLite's side files belong to the database they were made for
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside
