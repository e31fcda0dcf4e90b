"""kdbench.tracking without a training run: the run schema (the tag names and values a run writes are a file
format, read back from committed stores, so they are pinned here as literal strings, and what is written reads
back as it was) and tracking URIs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kdbench import KdbenchError
from kdbench.report.runs import failure_reason
from kdbench.tracking import (DIVERGED, TEACHER_FAILED, JobTags, RunEnd, RunStatus, SuiteTags, absolute_uri,
                              check_store_exists, sqlite_path)

STUDENT = JobTags(suite="s", role="student", student="mlp_small", teacher="mlp_big", method="kd T4",
                  method_name="kd", seed=0, job="k" * 16, pair="mlp_big->mlp_small", identity="i" * 16)


def test_a_job_writes_the_tags_it_always_wrote():
    assert STUDENT.to_tags() == {
        "kdbench.suite": "s", "kdbench.role": "student", "kdbench.student": "mlp_small", "kdbench.teacher": "mlp_big",
        "kdbench.method": "kd T4", "kdbench.method_name": "kd", "kdbench.seed": "0", "kdbench.job": "k" * 16,
        "kdbench.pair": "mlp_big->mlp_small", "kdbench.identity": "i" * 16}


def test_optional_job_tags_are_written_only_when_set_and_every_tag_reads_back():
    full = JobTags(**{**STUDENT.__dict__, "assistant": "a > b", "protocol": "protocol assumed", "reused": True,
                      "trial": True})
    tags = full.to_tags()
    assert {k: tags[k] for k in set(tags) - set(STUDENT.to_tags())} == {
        "kdbench.assistant": "a > b", "kdbench.protocol": "protocol assumed", "kdbench.reused": "true",
        "kdbench.trial": "true"}
    assert JobTags.from_tags(tags) == full and JobTags.from_tags(STUDENT.to_tags()) == STUDENT
    assert JobTags.from_tags({}) == JobTags(seed=-1)  # a run of an older kdbench: every field empty


def test_a_suite_run_writes_its_tags_and_reads_its_environment_back():
    tags = SuiteTags("s", "suites/s.yaml", "p" * 16, "d" * 16, {"device": "cpu", "git_commit": "abc"}).to_tags()
    assert tags == {"kdbench.suite": "s", "kdbench.role": "suite", "kdbench.suite_file": "suites/s.yaml",
                    "kdbench.device": "cpu", "kdbench.git_commit": "abc", "kdbench.plan": "p" * 16,
                    "kdbench.suite_plan": "d" * 16}
    back = SuiteTags.from_tags({**tags, "kdbench.failure": "Traceback", "mlflow.runName": "s 2024"})
    assert back.env == {"device": "cpu", "git_commit": "abc"} and back.report_plan == "d" * 16
    assert SuiteTags.from_tags({"kdbench.plan": "p" * 16}).report_plan == "p" * 16  # an older kdbench's run


def run(status: str, **tags: str):
    return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(tags=tags))


def test_how_a_run_ended_reads_back_from_its_status_and_tags():
    collapsed = RunEnd.of(run("FINISHED", **{"kdbench.collapsed": "collapsed: at chance",
                                             "kdbench.status": "collapsed"}))
    assert collapsed.report_status == RunStatus.COLLAPSED == "COLLAPSED" and collapsed.why == "collapsed: at chance"
    assert RunEnd.of(run("FINISHED")).report_status == "FINISHED" and RunEnd.of(run("FINISHED")).why == ""
    diverged = RunEnd.of(run("FAILED", **{"kdbench.failure": "diverged: training loss 1e5"}))
    assert diverged.diverged and not RunEnd.of(run("KILLED", **{"kdbench.failure": "diverged: x"})).diverged
    assert failure_reason(diverged.report_status, diverged.why) == "diverged"
    assert failure_reason("FAILED", f"{TEACHER_FAILED}{DIVERGED}x") == "teacher failed"
    assert (DIVERGED, TEACHER_FAILED) == ("diverged: ", "its teacher failed: ")


def test_a_relative_sqlite_uri_is_made_absolute_and_any_other_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///runs/mlflow.db") == Path("runs/mlflow.db") and sqlite_path("http://h:5000") is None
    assert absolute_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    for uri in ("sqlite:////abs/mlflow.db", "http://h:5000", "file:///tmp/mlruns"):
        assert absolute_uri(uri) == uri


def test_a_reader_refuses_a_store_that_is_not_there_and_creates_none(tmp_path):
    missing = tmp_path / "none.db"
    with pytest.raises(KdbenchError, match=f"^no MLflow store at {missing} .*: run it first$"):
        check_store_exists(f"sqlite:///{missing}", "run it first")
    assert not missing.exists()


HELD_S = 23  # past MLflow's SQLite busy timeout (PRAGMA busy_timeout = 20000)


@pytest.mark.slow  # holds the lock 23 s: `make test-slow` runs it (CI does)
def test_a_write_waits_for_another_writer_that_holds_the_sqlite_lock_past_mlflows_busy_timeout(tmp_path):
    """Seen on a loaded 2-core machine with two Ray workers: a job failed with "database is locked" because the
    other worker held the lock for over the 20-second busy timeout MLflow gives SQLite. The tracker waits it out."""
    import sqlite3
    import threading
    import time

    from kdbench.tracking import Tracker, sqlite_uri

    path = tmp_path / "mlflow.db"
    tracker = Tracker(sqlite_uri(path))
    run = tracker.client.create_run(tracker.experiment("locks")).info.run_id
    locked = threading.Event()

    def hold():
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(HELD_S)
        holder.execute("COMMIT")

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(timeout=30)
    start = time.monotonic()
    tracker.log_metrics(run, {"test_acc": 50.0}, step=1)
    waited = time.monotonic() - start
    thread.join()
    assert waited > HELD_S - 1  # it did meet the lock, past MLflow's timeout
    assert tracker.client.get_run(run).data.metrics["test_acc"] == 50.0
