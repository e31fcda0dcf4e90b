"""An MLflow database this MLflow cannot use, found before any command uses it (kdbench.mlflow_db).

The databases are real ones (created and migrated by MLflow), then set back as an older MLflow, a killed
upgrade or a newer MLflow leaves them: an older schema revision in alembic_version, alembic's
`_alembic_tmp_<table>` left beside the table a batch migration was rebuilding, a revision this MLflow lacks.
Today's MLflow ends each of these in a traceback; kdbench refuses in one line that says how to repair the
database, and leaves it untouched, or, when it holds no runs, moves it aside and starts a new one.
"""

import hashlib
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.mlflow_db import SETTLE_S, mlflow_revisions
from kdbench.tracking import create_sqlite_store


def database(path: Path, runs: int, revision: str | None = None, leftover: str | None = None) -> str:
    """A real MLflow database at `path` with `runs` runs, then given `revision` and a leftover table; its sha256.
    Made under another name: MLflow caches a store per URI in the process, and kdbench makes the new one there."""
    made = path.with_name("made.db")
    create_sqlite_store(made)
    client = MlflowClient(f"sqlite:///{made}")
    if runs:
        experiment = client.create_experiment("earlier")
        for _ in range(runs):
            client.set_terminated(client.create_run(experiment).info.run_id)
    client._tracking_client.store.engine.dispose()
    db = sqlite3.connect(made)
    if revision is not None:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    if leftover is not None:  # what a batch migration killed after copying rows, before the rename, leaves
        db.execute(f"CREATE TABLE _alembic_tmp_{leftover} AS SELECT * FROM {leftover}")
    db.commit()
    db.close()
    os.replace(made, path)
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # left by a process that ended an hour ago
    return hashlib.sha256(path.read_bytes()).hexdigest()


def older_revision() -> str:
    head, known = mlflow_revisions()
    return sorted(known - {head})[0]


def kdbench(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()  # MLflow's log lines from making the database
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code or 0, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


COMMANDS = {"run": ["run", "{suite}", "--device", "cpu"], "report": ["report", "{suite}"],
            "store gc": ["store", "gc", "--yes"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind, expected", [
    ("older", "of an older MLflow; MLflow"),
    ("half-migrated", "alembic's leftover _alembic_tmp_runs: an upgrade was killed midway"),
    ("newer", "which MLflow"),
])
def test_a_database_this_mlflow_cannot_use_is_refused_in_one_line_and_left_untouched(
        kind, expected, command, monkeypatch, capsys, tmp_path, write_suite):
    path = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    revision = "ffffffffffff" if kind == "newer" else older_revision()
    digest = database(path, runs=3, revision=revision, leftover="runs" if kind == "half-migrated" else None)
    suite = write_suite()
    code, lines = kdbench(monkeypatch, capsys, *(a.format(suite=suite) for a in COMMANDS[command]))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"kdbench: error: MLflow database {path} holds 3 runs and has ") and expected in lines[0]
    how = {"older": "then upgrade it: `mlflow db upgrade sqlite:///", "newer": "install the MLflow that wrote it",
           "half-migrated": "restore the copy taken before the upgrade"}[kind]
    assert how in lines[0], lines[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "store").exists() and not (tmp_path / "results").exists()


def test_a_half_migrated_database_without_runs_is_moved_aside_and_the_run_works(monkeypatch, capsys, tmp_path,
                                                                                 write_suite):
    """An older kdbench killed while it created the database (it created it in place then) leaves it half made
    and empty of runs: nothing is lost by starting a new one, and the old file is kept beside it."""
    path = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    digest = database(path, runs=0, revision=older_revision(), leftover="experiments")
    code, lines = kdbench(monkeypatch, capsys, "run", str(write_suite()), "--device", "cpu")
    assert code == 0, lines
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mlflow.db.broken-")]
    assert len(aside) == 1 and hashlib.sha256(aside[0].read_bytes()).hexdigest() == digest
    assert any(f"MLflow database {path} held no runs and had alembic's leftover _alembic_tmp_experiments" in line
               and f"moved aside to {aside[0].name}" in line for line in lines), lines
    client = MlflowClient(f"sqlite:///{path}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # the suite run, its teacher, 2 students


def test_a_database_another_process_is_creating_now_is_waited_for_not_moved_aside(monkeypatch, capsys, tmp_path,
                                                                                  write_suite):
    """`mlflow ui` or a script creating the database (without kdbench's lock) while a run starts: the run sees it
    half made and empty, waits until it stops changing, and uses it once its creator has finished."""
    path = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    database(path, runs=0, leftover="experiments")
    os.utime(path)  # changed just now: its creator is still at work

    def finish_creating():
        time.sleep(SETTLE_S / 2)
        db = sqlite3.connect(path)
        db.execute("DROP TABLE _alembic_tmp_experiments")
        db.commit()
        db.close()

    creator = threading.Thread(target=finish_creating)
    creator.start()
    code, lines = kdbench(monkeypatch, capsys, "run", str(write_suite()), "--device", "cpu")
    creator.join()
    assert code == 0, lines
    assert not any(p.name.startswith("mlflow.db.broken-") for p in tmp_path.iterdir())
    assert not any("moved aside" in line for line in lines), lines


def test_a_sqlite_file_that_is_not_mlflows_is_refused(monkeypatch, capsys, tmp_path, write_suite):
    path = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER)")
    db.commit()
    db.close()
    code, lines = kdbench(monkeypatch, capsys, "run", str(write_suite()), "--device", "cpu")
    assert code == 2 and lines == [f"kdbench: error: {path} is a SQLite database but not MLflow's (it has tables "
                                   f"invoices, none of MLflow's); point MLFLOW_TRACKING_URI at another store"]
