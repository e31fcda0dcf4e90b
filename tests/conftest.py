"""Shared fixtures: a temporary MLflow SQLite store and model store per test, suites written on the fly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# One thread per process: the tests run tiny models, where a second thread costs more than it gives, and
# the kdbench processes the tests start (which inherit this) run beside the test process on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests run in temporary folders: a relative data root must not change meaning when they chdir.
if os.environ.get("KDBENCH_DATA"):
    os.environ["KDBENCH_DATA"] = str(Path(os.environ["KDBENCH_DATA"]).resolve())

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """Real datasets: $KDBENCH_DATA, else ../shared/data beside the checkout; None when neither exists."""
    for candidate in (os.environ.get("KDBENCH_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_root() -> Path:
    root = shared_data()
    if root is None:
        pytest.skip("real MNIST not found (set KDBENCH_DATA)")
    return root


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """Every test gets its own MLflow database and model store, and runs in a temporary directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KDBENCH_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    yield


TINY = {
    "name": "tiny",
    "data": {"dataset": "synthetic", "train_size": 256, "test_size": 128, "num_classes": 4, "image_size": 32},
    "augment": {"crop_padding": 4, "flip": True},
    "teachers": ["cifar_resnet14"],
    "students": ["cifar_resnet8"],
    "methods": ["baseline", "kd"],
    "seeds": [0],
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "schedule": "step", "milestones": [1]},
}


@pytest.fixture
def write_suite(tmp_path):
    def write(overrides: dict | None = None, name: str = "tiny.yaml", text: str | None = None) -> Path:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        else:
            suite = {**TINY, **(overrides or {})}
            path.write_text(yaml.safe_dump({k: v for k, v in suite.items() if v is not None}, sort_keys=False))
        return path
    return write


def finished_jobs(uri: str, parent: str, experiment: str = "tiny") -> dict[str, tuple[str, float, float]]:
    """Per job key: (role, final test_acc, final train_loss) of the parent run's finished child runs."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["kdbench.job"]: (r.data.tags["kdbench.role"], r.data.metrics["test_acc"],
                                         r.data.metrics["train_loss"]) for r in runs if r.info.status == "FINISHED"}


def float64_measures(logits, labels, teacher=None) -> dict[str, float]:
    """ECE (15 equal-width bins, %), NLL, Brier and accuracy, and against a teacher's logits agreement (%) and
    KL(teacher || student), each from its textbook definition in float64: what kdbench's measures are checked by."""
    import math

    import torch

    logits = logits.double()
    n, classes = logits.shape
    p = torch.softmax(logits, 1)
    confidence, predicted = p.max(1)
    correct = (predicted == labels).double()
    ece = 0.0
    for k in range(1, 16):  # bin k holds (k-1)/15 < confidence <= k/15
        inside = (confidence > (k - 1) / 15) & (confidence <= k / 15)
        if inside.any():
            ece += inside.sum().item() / n * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    onehot = torch.nn.functional.one_hot(labels, classes).double()
    out = {"acc": correct.mean().item() * 100, "ece": ece * 100,
           "nll": -sum(math.log(p[i, labels[i]].item()) for i in range(n)) / n,
           "brier": ((p - onehot) ** 2).sum(1).mean().item()}
    if teacher is not None:
        q = torch.softmax(teacher.double(), 1)
        out["agreement"] = (q.argmax(1) == predicted).double().mean().item() * 100
        out["kl"] = sum((q[i] * (q[i].log() - p[i].log())).sum().item() for i in range(n)) / n
    return out


def slurm_missing() -> str | None:
    """Why SLURM cannot be used here (None when sinfo answers): the reason a SLURM test is skipped with."""
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo does not run ({exc}); start SLURM with scripts/slurm_setup.sh"
    if answer.returncode != 0 or not answer.stdout.strip():
        return f"sinfo does not answer ({answer.stderr.strip()[:200]}); start SLURM with scripts/slurm_setup.sh"
    return None
