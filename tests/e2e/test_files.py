"""Where things live and what survives attack: the model store's listing and clean-up, tracking stores that
cannot work, kills while files are written, crafted checkpoints, stale reports, stale teachers, signals."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from kdbench.cli import main
from kdbench.plan import make_plan
from kdbench.storage.files import CorruptFile, checked_load, load_checkpoint
from kdbench.storage.store import ModelStore
from kdbench.config.load import load_suite
from kdbench.tracking import JobTags, SuiteTags, Tracker

from conftest import REPO
SMALL = {"data": {"dataset": "synthetic", "train_size": 64, "test_size": 32, "num_classes": 4, "image_size": 32},
         "train": {"epochs": 1, "batch_size": 32}}


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """One empty MLflow database for the whole session: creating one takes seconds (its migrations)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{path}")
    return path


@pytest.fixture
def mlflow_db(template_db) -> Path:
    """This test's MLflow database (conftest's path), as a copy of the template."""
    path = Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):])
    shutil.copyfile(template_db, path)
    return path


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def parents(suite="tiny"):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(suite)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdbench.role") == "suite"]


# ---------------------------------------------------------------------------------------------- the store

def test_store_list_gc_and_a_truncated_meta_json(write_suite, monkeypatch, capsys, tmp_path, mlflow_db):
    path = write_suite(SMALL)
    store = ModelStore(tmp_path / "elsewhere")
    code, err, _ = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu", "--store", str(store.root))
    assert code == 0, err
    assert not (tmp_path / "store").exists()  # --store, not $KDBENCH_STORE
    (teacher,) = [e for e in store.entries() if e.kind == "model"]
    assert (teacher.model, teacher.role) == ("cifar_resnet14", "teacher")

    # A truncated meta.json: detected, moved aside, retrained; the parent run ends, never left RUNNING.
    meta = store.folder(teacher.key) / "meta.json"
    meta.write_text(meta.read_text()[:40])
    code, err, _ = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu", "--store", str(store.root),
                           "--fresh")
    assert code == 0, err
    assert "corrupted" in err and "meta.json" in err and "retraining it" in err
    assert all(p.info.status == "FINISHED" for p in parents())
    store.verify(teacher.key)

    # An entry no run refers to (a model of a suite deleted since), beside the referenced teacher.
    shutil.copytree(store.folder(teacher.key), store.root / "0123456789abcdef")
    code, err, out = run_cli(monkeypatch, capsys, "store", "list", "--store", str(store.root))
    assert code == 0, err
    assert teacher.key in out and "0123456789abcdef" in out and "cifar_resnet14" in out and "total" in out
    code, err, out = run_cli(monkeypatch, capsys, "store", "gc", "--store", str(store.root))
    assert code == 0 and "dry run" in err
    listed = {tuple(line.split()[:2]) for line in lines(out)[2:]}
    assert listed == {("0123456789abcdef", "model"), (teacher.key, "corrupt")}, out  # not the teacher in use
    assert (store.root / "0123456789abcdef").is_dir() and (store.root / "corrupt").is_dir()  # nothing removed
    code, err, out = run_cli(monkeypatch, capsys, "store", "gc", "--store", str(store.root), "--yes")
    assert code == 0 and "removed 2 entries" in err, err
    assert not (store.root / "0123456789abcdef").exists() and not list((store.root / "corrupt").iterdir())
    assert store.has(teacher.key)  # referenced by the runs: kept
    store.verify(teacher.key)


def test_store_gc_refuses_without_the_runs_it_must_check(monkeypatch, capsys, tmp_path):
    (tmp_path / "s" / "0123456789abcdef").mkdir(parents=True)
    code, err, _ = run_cli(monkeypatch, capsys, "store", "gc", "--store", str(tmp_path / "s"), "--yes")
    assert code == 2 and len(lines(err)) == 1 and "no MLflow store" in err
    assert (tmp_path / "s" / "0123456789abcdef").is_dir()


# ---------------------------------------------------------------------------------------------- tracking

def test_a_tracking_server_that_does_not_answer_is_one_line_at_once(write_suite, monkeypatch, capsys):
    path = write_suite(SMALL)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.monotonic()
    code, err, _ = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    assert time.monotonic() - start < 30
    assert code == 2 and len(lines(err)) == 1 and "http://127.0.0.1:9 does not answer" in err, err
    assert not ModelStore().root.exists()


def immutable(path: Path):
    """Make `path` unwritable even for root (chattr +i); returns how to undo it, or skips where impossible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        return lambda: path.chmod(mode)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a path read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("what", ["store folder", "database", "database folder"])
def test_a_read_only_store_or_database_is_one_line_naming_it(write_suite, monkeypatch, capsys, tmp_path, what,
                                                            template_db):
    path = write_suite(SMALL)
    target = {"store folder": tmp_path / "store", "database": tmp_path / "db" / "mlflow.db",
              "database folder": tmp_path / "db"}[what]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    (tmp_path / "store").mkdir()
    (tmp_path / "db").mkdir()
    if what == "database":
        shutil.copyfile(template_db, target)  # an existing database
    undo = immutable(target)
    try:
        code, err, _ = run_cli(monkeypatch, capsys, "run", str(path), "--device", "cpu")
    finally:
        undo()
    assert code == 2 and len(lines(err)) == 1 and str(target) in err and "cannot be written" in err, err


CREATE = "import sys; from kdbench.tracking import Tracker; Tracker(sys.argv[1])"


@pytest.mark.parametrize("delay", [0.05, 0.5, 2.0])
def test_a_kill_while_mlflow_creates_its_database_leaves_none_or_a_working_one(tmp_path, delay):
    db = tmp_path / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", CREATE, f"sqlite:///{db}"], env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not (db.exists() or list(tmp_path.glob(".mlflow.db.creating-*"))) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if db.exists():  # then it must work: a run can be created and read back
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.create_experiment("after-kill")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "x", 1.0)
        assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
        Tracker(f"sqlite:///{db}")
        assert not list(tmp_path.glob(".mlflow.db.creating-*"))  # a killed attempt's leftovers are cleared


def test_a_finished_run_keeps_no_failure_of_an_earlier_attempt(mlflow_db):
    tracker = Tracker()
    parent = tracker.start_suite(SuiteTags("s", "s.yaml"), {})
    run = tracker.start_job(parent, "job", JobTags(), {})
    tracker.end(run, "KILLED", "interrupted: run the same command again to resume")
    tracker.reopen(run)
    tracker.end(run, "FINISHED")
    assert "kdbench.failure" not in tracker.client.get_run(run).data.tags


# ---------------------------------------------------------------------------------------------- files

def test_every_report_file_is_replaced_atomically(tmp_path):
    """Written in place, a file keeps its inode (and a kill midway leaves it truncated under its real name);
    written to a temporary name and renamed, it gets a new one."""
    from kdbench.report.write import write_report

    quickstart = REPO / "results" / "quickstart"
    if not (quickstart / "mlflow.db").is_file():
        pytest.skip("results/quickstart/mlflow.db not present")
    suite, uri = REPO / "suites" / "quickstart.yaml", f"sqlite:///{quickstart / 'mlflow.db'}"
    folder = write_report(suite, tmp_path, uri=uri)
    before = {p.name: p.stat().st_ino for p in folder.iterdir()}
    assert len(before) >= 10
    keep = [os.link(p, tmp_path / f"old-{p.name}") for p in folder.iterdir()]  # noqa: F841 (inodes stay in use)
    write_report(suite, tmp_path, uri=uri)
    after = {p.name: p.stat().st_ino for p in folder.iterdir() if not p.name.startswith(".")}
    assert sorted(after) == sorted(before)  # and no temporary file left behind
    assert [name for name in before if after[name] == before[name]] == []


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def crafted(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "evil": Payload(str(marker))}, buffer)
    return buffer.getvalue()


def test_a_crafted_checkpoint_never_runs_code(tmp_path):
    import hashlib

    marker = tmp_path / "pwned"
    payload = crafted(marker)
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "probe"))))
    assert (tmp_path / "probe").exists()  # the payload does run code when unpickled plainly
    # A resumable checkpoint with a matching hash line: the hash proves integrity, not harmlessness.
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CorruptFile, match="cannot be read"):
        load_checkpoint(checkpoint)
    # A stored model (or a teacher checkpoint a user downloaded) whose recorded hash matches.
    model = tmp_path / "model.pt"
    model.write_bytes(payload)
    with pytest.raises(CorruptFile):
        checked_load(model, hashlib.sha256(payload).hexdigest())
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- staleness

def test_report_takes_the_run_of_the_suite_as_it_is_now(write_suite, mlflow_db):
    from kdbench.report.runs import find_parent, open_client

    path = write_suite(SMALL)
    plan = make_plan(load_suite(path), path)
    tracker = Tracker()
    matching = tracker.start_suite(SuiteTags("tiny", str(path), plan.plan_hash, plan.data_free_hash), {})
    time.sleep(0.01)
    newer = tracker.start_suite(SuiteTags("tiny", str(path), "0" * 16, "0" * 16), {})
    heard: list[str] = []
    client = open_client()
    assert find_parent(client, "tiny", None, plan.data_free_hash, heard.append).info.run_id == matching
    assert len(heard) == 1 and newer in heard[0]
    # Nothing of the suite as it is now: the latest run, and a line that says so.
    changed = make_plan(load_suite(write_suite({**SMALL, "seeds": [3]})), path)
    heard.clear()
    assert find_parent(client, "tiny", None, changed.data_free_hash, heard.append).info.run_id == newer
    assert len(heard) == 1 and "no run of suite 'tiny' as its file is now" in heard[0]


def test_every_teacher_setting_that_changes_what_is_stored_is_in_its_key(write_suite):
    def teacher_key(route_every):
        path = write_suite({**SMALL, "methods": ["rco"], "teacher": {"route_every": route_every}})
        return next(j.key for j in make_plan(load_suite(path), path).jobs if j.role == "teacher")

    assert teacher_key(1) != teacher_key(2)


def test_teachers_are_keyed_by_the_data_they_learn_from(tmp_path, write_suite, monkeypatch):
    """Images damaged on disk (no checksum files) and then fixed: the fingerprint, and the teacher key, follow."""
    from PIL import Image

    from kdbench.data.spec import DataSpec
    from kdbench.data.load import data_fingerprint, load_data

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (60 * i, 100 if cls == "a" else 200, 30)).save(root / split / cls / f"{i}.png")
    spec = DataSpec("imagefolder", path=str(root), num_classes=2, image_size=8)
    first = load_data(spec, None, "cpu").fingerprint
    assert first and data_fingerprint(spec, None) == first
    assert list((tmp_path / "cache" / "fingerprints").iterdir())  # computed once, then read back
    damaged = root / "train" / "a" / "1.png"
    Image.new("RGB", (8, 8), (255, 0, 255)).save(damaged)
    second = load_data(spec, None, "cpu").fingerprint
    assert second != first

    path = write_suite({**SMALL, "data": {"dataset": "imagefolder", "path": str(root), "num_classes": 2,
                                          "image_size": 8}})
    plan = make_plan(load_suite(path), path)
    keys = [{j.role: j.key for j in plan.for_data(fp).jobs}["teacher"] for fp in (first, second)]
    assert keys[0] != keys[1]
    assert plan.for_data(first).data_free_hash == plan.plan_hash  # what the report matches does not move


# ---------------------------------------------------------------------------------------------- signals

def start(workdir: Path, suite: Path, log: str, *args):
    env = {**os.environ, "COLUMNS": "200"}
    out = open(workdir / log, "w")
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", "run", str(suite), "--device", "cpu", *args],
                            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# Importing torch, reading the suite, opening the store: no handler of the executor's yet. Before `Stopped`,
# a signal that landed while a C extension ran Python code ended the process by SIGINT (-2) instead of 130.
@pytest.mark.parametrize("sig,delay", [(signal.SIGTERM, 1.0), (signal.SIGINT, 2.0), (signal.SIGTERM, 3.0)])
def test_a_signal_during_start_up_exits_130_with_one_line(write_suite, tmp_path, sig, delay):
    path = write_suite(SMALL)
    proc = start(tmp_path, path, "log")
    time.sleep(delay)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    assert lines((tmp_path / "log").read_text()) == ["kdbench: interrupted; run the same command again to resume"]


def test_a_signal_while_the_workers_server_starts_exits_130_with_one_line(monkeypatch, capsys):
    """`kdbench run` starts the local workers' server before its own imports; a signal landing there (seen in CI on
    a loaded machine: exit 1 and a traceback) is the same one line and 130."""
    monkeypatch.setattr(forkserver, "ensure_running", lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", "suite.yaml"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(BaseException) as ended:  # a Stopped that escaped would be a KeyboardInterrupt
            main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert isinstance(ended.value, SystemExit) and ended.value.code == 130, repr(ended.value)
    assert lines(capsys.readouterr().err) == ["kdbench: interrupted; run the same command again to resume"]


def test_sigterm_while_waiting_for_another_process_stops_at_once_and_leaves_the_parent_to_it(write_suite,
                                                                                               tmp_path, mlflow_db):
    from kdbench.storage.claims import Claim

    path = write_suite({**SMALL, "train": {"epochs": 400, "batch_size": 32}, "methods": ["baseline"]})
    teacher = next(j for j in make_plan(load_suite(path), path).jobs if j.role == "teacher")
    first = start(tmp_path, path, "first")

    def training() -> bool:
        claim = Claim(ModelStore().claim_path(teacher.key))
        return not claim.stale(claim.holder())

    try:
        wait_for(training)
        second = start(tmp_path, path, "second")
        wait_for(lambda: "waiting for another kdbench process" in (tmp_path / "second").read_text())
        sent = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=90) == 130, (tmp_path / "second").read_text()
        print(f"second process exited {time.monotonic() - sent:.1f} s after SIGTERM")
        assert first.poll() is None  # the other process still trains ...
        (parent,) = parents()
        assert parent.info.status == "RUNNING"  # ... and the shared parent run is left to it
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 130, (tmp_path / "first").read_text()
        (parent,) = parents()
        assert parent.info.status == "KILLED"  # the last worker ended it
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
