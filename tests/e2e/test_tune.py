"""Equal-budget tuning (kdbench tune): a search killed mid-trial ends as an uninterrupted one, no trial can read
the test split, Ray picks what the in-process executor picks, and a bad `tune:` block is one line, exit 2."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import REPO, finished_jobs
from mlflow.tracking import MlflowClient
from rich.console import Console

import kdbench.run.context as context
from kdbench.config.load import load_suite
from kdbench.config.schema import SuiteError
from kdbench.data.batches import Split
from kdbench.plan import make_plan
from kdbench.report.tuned import write_tuned_report
from kdbench.run.executors import get_executor, load_options
from kdbench.run.executors.options import usable_cores
from kdbench.run.tune import SEARCH_SUFFIX, TUNED_SUFFIX, Search, data_plan, storage_path, tune_suite, tuned_plan
from kdbench.storage.store import ModelStore
from kdbench.tracking import Tracker

TUNING = {
    "name": "tt",
    "data": {"dataset": "synthetic", "train_size": 768, "val_size": 256, "test_size": 128, "num_classes": 10,
             "image_size": 28},
    "teachers": ["mnist_mlp_100x2"],
    "students": ["mnist_mlp_30x2"],
    "methods": ["baseline", {"kd": {"T": 1.0, "kd_weight": 0.1}}],  # a poor own setting: the search beats it
    "seeds": [0],
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.01, "schedule": "constant"},
    "tune": {"trials": 3, "seeds": [7], "batch": 2},
}


def write(tmp_path: Path, overrides: dict | None = None, name: str = "tt.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**TUNING, **(overrides or {})}, sort_keys=False))
    return path


def executor_maker(name: str, tracker: Tracker, store: ModelStore, workers: int | None = None):
    options, quiet = load_options(name, None, cpus_per_job=1, workers=workers), Console(file=io.StringIO())
    return lambda cls, plan: cls(plan, None, "cpu", tracker=tracker, console=quiet, store=store, options=options)


def tune(path: Path, executor: str = "inprocess", workers: int | None = None):
    tracker, store = Tracker(), ModelStore()
    plan = make_plan(load_suite(path), path)
    return tune_suite(plan, get_executor(executor), executor_maker(executor, tracker, store, workers), tracker, store,
                      None)


def settings(choices) -> dict[str, tuple[dict, float, int, list]]:
    return {name: (c.params, c.value, c.trial, c.values) for name, c in choices.items()}


def trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tt" + SEARCH_SUFFIX)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdbench.trial") == "true"]


def test_a_search_keeps_its_budget_tags_its_trials_and_reports_default_and_tuned(tmp_path):
    choices, outcome = tune(write(tmp_path))
    assert set(choices) == {"baseline|mnist_mlp_100x2->mnist_mlp_30x2", "kd|mnist_mlp_100x2->mnist_mlp_30x2"}
    kd = choices["kd|mnist_mlp_100x2->mnist_mlp_30x2"]
    assert len(kd.values) == 3 and set(kd.params) == {"T", "kd_weight"} and 1 <= kd.params["T"] <= 8
    assert kd.value == max(v for _, _, v in kd.values)  # the best trial on validation is chosen
    assert kd.values[0][:2] == (0, {"T": 1.0, "kd_weight": 0.1}) and kd.trial != 0  # trial 0: its own setting
    assert choices["baseline|mnist_mlp_100x2->mnist_mlp_30x2"].params == {}  # no search space: tuned on nothing
    uri = os.environ["MLFLOW_TRACKING_URI"]
    trials = trial_runs(uri)
    # the student alone's three trials are one job (nothing drawn): trained once; KD's three settings each once
    assert {r.data.tags["kdbench.method"] for r in trials} == {"baseline", "kd"} and len(trials) == 4
    assert all("val_acc" in r.data.metrics and "test_acc" not in r.data.metrics for r in trials)
    assert all(r.data.tags["kdbench.seed"] == "7" for r in trials)  # tuning seeds only
    client = MlflowClient(uri)
    reported = client.search_runs([client.get_experiment_by_name("tt" + TUNED_SUFFIX).experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run}'")
    # teacher, the student alone (default = tuned: one job, its cell under either label), KD default, KD tuned
    assert sorted(r.data.tags["kdbench.method"] for r in reported) == ["baseline", "baseline", "kd", "kd tuned"]
    tuned = next(r for r in reported if r.data.tags["kdbench.method"] == "kd tuned")
    assert float(tuned.data.params["method.T"]) == kd.params["T"] and tuned.data.tags["kdbench.seed"] == "0"
    assert "test_acc" in tuned.data.metrics and "kdbench.trial" not in tuned.data.tags  # an ordinary job

    folder = write_tuned_report(tmp_path / "tt.yaml", tmp_path / "results", uri)
    table = pd.read_csv(folder / "tuned.csv").set_index("method")
    assert table.loc["kd", "tuned_mean"] == pytest.approx(tuned.data.metrics["test_acc"])  # read back independently
    alone = next(r for r in reported if r.data.tags["kdbench.method"] == "baseline" and r.data.tags["kdbench.role"]
                 == "student")
    assert table.loc["baseline", "tuned_mean"] == table.loc["baseline", "default_mean"] == pytest.approx(
        alone.data.metrics["test_acc"])  # nothing to tune: the tuned student alone is its default job
    assert table.loc["kd", "vs_alone_mean"] == pytest.approx(tuned.data.metrics["test_acc"]
                                                             - alone.data.metrics["test_acc"])
    spread = pd.read_csv(folder / "sensitivity.csv").set_index("method")
    assert spread.loc["kd", "settings"] == 3 and spread.loc["baseline", "settings"] == 1
    assert spread.loc["kd", "val_max"] == pytest.approx(kd.value)
    assert (folder / "sensitivity.png").stat().st_size > 0 and "kd tuned" in (folder / "tuned.md").read_text()


def poisoned(load):
    """load_splits whose test split raises on any use: a trial that evaluated, counted or read it would fail."""
    class Untouchable(Split):
        def __getattribute__(self, name):
            raise AssertionError(f"the test split was read during a search ({name})")

        def __len__(self):
            raise AssertionError("the test split was read during a search (len)")

    def loading(*args, **kwargs):
        data = load(*args, **kwargs)
        return replace(data, test=Untouchable(data.test.images, data.test.labels))
    return loading


def test_no_trial_reads_the_test_split(tmp_path, monkeypatch):
    path = write(tmp_path)
    tracker, store = Tracker(), ModelStore()
    plan = data_plan(make_plan(load_suite(path), path), None)
    make = executor_maker("inprocess", tracker, store)
    search = Search(plan, get_executor("inprocess"), make, tracker, store)
    search.run_teachers(search.parent())  # teachers are ordinary jobs (their test accuracy is reported): first
    original = context.load_splits
    monkeypatch.setattr(context, "load_splits", poisoned(original))
    choices = search.run()  # every trial ran (a failed job would stop the search) with the test split poisoned
    assert len(choices) == 2 and all(len(c.values) == 3 for c in choices.values())
    # The poison bites: a reporting job (which evaluates on the test split) fails on the same data
    with pytest.raises(AssertionError, match="the test split was read"):
        make(get_executor("inprocess"), tuned_plan(plan, choices)).run()
    monkeypatch.setattr(context, "load_splits", original)


def start(suite: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdbench.cli", "tune", str(suite), "--device", "cpu"], env=env,
                            cwd=suite.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def mid_trial(db: Path) -> bool:
    """A trial's run has logged an epoch and is still running (so the kill lands inside a trial)."""
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return bool(con.execute(
                "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid join metrics m on "
                "m.run_uuid = r.run_uuid where t.key = 'kdbench.trial' and r.status = 'RUNNING' and m.key = 'val_acc' "
                "and t.value = 'true' and r.run_uuid in (select run_uuid from tags where key = 'kdbench.method' "
                "and value = 'kd')").fetchone()[0])
    except sqlite3.OperationalError:  # tables not made yet, or locked for a moment
        return False


@pytest.mark.slow  # about 30-60 s on 2 cores: `make test-slow` runs it (CI does)
def test_a_search_killed_mid_trial_resumes_to_the_uninterrupted_choice_and_numbers(tmp_path, monkeypatch):
    expected, expected_outcome = tune(write(tmp_path))
    expected_numbers = finished_jobs(os.environ["MLFLOW_TRACKING_URI"], expected_outcome.parent_run,
                                     "tt" + TUNED_SUFFIX)

    killed = tmp_path / "killed"
    killed.mkdir()
    suite, db = write(killed), killed / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "KDBENCH_STORE": str(killed / "store"),
           "PYTHONPATH": str(REPO)}
    proc = start(suite, env)
    deadline = time.time() + 300
    while not mid_trial(db):
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study_db = storage_path(f"sqlite:///{db}", ModelStore(killed / "store"), "tt")
    asked = optuna.load_study(study_name="kd|mnist_mlp_100x2->mnist_mlp_30x2", storage=f"sqlite:///{study_db}")
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in asked.trials)  # killed with a trial untold

    final = subprocess.run([sys.executable, "-m", "kdbench.cli", "tune", str(suite), "--device", "cpu"], env=env,
                           cwd=killed, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("KDBENCH_STORE", env["KDBENCH_STORE"])
    resumed, outcome = tune(suite)  # everything done: the same choices read back, nothing trained again
    assert outcome.skipped == len(outcome.finished)
    assert settings(resumed) == settings(expected)
    assert finished_jobs(env["MLFLOW_TRACKING_URI"], outcome.parent_run, "tt" + TUNED_SUFFIX) == expected_numbers


@pytest.mark.slow  # about 30-60 s on 2 cores: `make test-slow` runs it (CI does)
def test_ray_picks_the_in_process_setting(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    expected, _ = tune(write(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ray.db'}")
    monkeypatch.setenv("KDBENCH_STORE", str(tmp_path / "ray-store"))
    on_ray, outcome = tune(write(tmp_path), "ray")
    assert not outcome.failed
    assert settings(on_ray) == settings(expected)


@pytest.mark.skipif(usable_cores() < 2, reason="two workers need two cores (the oversubscription guard)")
def test_local_workers_pick_the_in_process_setting_with_the_same_numbers(tmp_path, monkeypatch):
    """`kdbench tune`'s default: trials side by side in worker processes (kept from batch to batch)."""
    expected, expected_outcome = tune(write(tmp_path))
    expected_numbers = finished_jobs(os.environ["MLFLOW_TRACKING_URI"], expected_outcome.parent_run,
                                     "tt" + TUNED_SUFFIX)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'local.db'}")
    monkeypatch.setenv("KDBENCH_STORE", str(tmp_path / "local-store"))
    local, outcome = tune(write(tmp_path), "local", workers=2)
    assert not outcome.failed and settings(local) == settings(expected)
    assert finished_jobs(os.environ["MLFLOW_TRACKING_URI"], outcome.parent_run, "tt" + TUNED_SUFFIX) == \
        expected_numbers


@pytest.mark.parametrize("tune_block, expected", [
    ({"trials": 0, "seeds": [7]}, "field 'tune.trials': expected greater than 0"),
    ({"trials": 2, "seeds": [0]}, "field 'tune.seeds': expected seeds apart from the reporting seeds, 0 is both"),
    ({"trials": 2, "seeds": [7], "search_space": {"kd": {"T": {"low": 0.0, "high": 2.0}}}},
     "field 'tune.search_space.kd.T': the search range [0.0, 2.0] leaves what method 'kd' accepts: T must be "
     "positive"),
    ({"trials": 2, "seeds": [7], "search_space": {"kd": {"tau": {"low": 1.0, "high": 2.0}}}},
     "field 'tune.search_space.kd.tau': method 'kd' has no parameter 'tau'"),
    ({"trials": 2, "seeds": [7], "search_space": {"dkd": {}}}, "field 'tune.search_space.dkd': expected a method"),
    ({"trials": 2, "seeds": [7], "sampler": "grid"}, "field 'tune.sampler'"),
    ({"trials": 2, "seeds": [7], "pairs": ["mnist_mlp_100x2", "nope"]}, "field 'tune.pairs'"),
])
def test_a_bad_tune_block_is_refused_in_one_line_naming_its_field(tmp_path, tune_block, expected):
    with pytest.raises(SuiteError) as refused:
        load_suite(write(tmp_path, {"tune": tune_block}))
    assert str(refused.value).startswith(f"{tmp_path / 'tt.yaml'}: ") and expected in str(refused.value)
    assert "\n" not in str(refused.value)


def test_kdbench_tune_on_a_bad_block_exits_2_with_one_line_and_writes_nothing(tmp_path):
    path = write(tmp_path, {"tune": {"trials": 0, "seeds": [7]}})
    done = subprocess.run([sys.executable, "-m", "kdbench.cli", "tune", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "field 'tune.trials': expected greater than 0" in lines[0], done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()
    assert not list(tmp_path.glob("*.optuna.db"))


def test_tuning_needs_a_validation_split(tmp_path):
    data = {**TUNING["data"]}
    del data["val_size"]
    with pytest.raises(SuiteError, match="field 'tune': the search chooses on validation accuracy: set data.val_size"):
        load_suite(write(tmp_path, {"data": data}))
