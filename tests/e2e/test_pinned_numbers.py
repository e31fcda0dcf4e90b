"""A fresh run of a small suite gives the job keys and numbers pinned before the package was reshaped.

tests/e2e/pinned/expected.json was written by the code before the reshape (commit ff27abf), one torch thread:
job key -> role, method, seed, last-epoch test and validation accuracy, training loss. A refactor that changes
a key (a hash input moved) or a number (an operation reordered) fails here, with the job it changed. The keys were
renewed once when the jobs' runtime (device kind, torch threads) entered them; every number stayed as pinned.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdbench.cli import main

HERE = Path(__file__).parent / "pinned"


def test_a_fresh_run_reproduces_the_pinned_keys_and_numbers(tmp_path, monkeypatch):
    shutil.copy(HERE / "suite.yaml", tmp_path / "suite.yaml")
    monkeypatch.setattr(sys, "argv", ["kdbench", "run", str(tmp_path / "suite.yaml"), "--device", "cpu"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pinned")
    got = {}
    for run in client.search_runs([exp.experiment_id]):
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get("kdbench.role") == "suite":
            continue
        got[tags["kdbench.job"]] = {"role": tags["kdbench.role"], "method": tags["kdbench.method"],
                                    "seed": int(tags["kdbench.seed"]), "test_acc": metrics["test_acc"],
                                    "val_acc": metrics["val_acc"], "train_loss": metrics["train_loss"]}
    expected = json.loads((HERE / "expected.json").read_text())
    assert sorted(got) == sorted(expected), "job keys changed"
    for key, want in expected.items():
        assert got[key] == want, f"job {key} ({want['role']} {want['method']} seed {want['seed']}) changed"
