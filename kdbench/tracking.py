"""MLflow: one parent run per suite run, one child run per job, params for every setting, metrics per epoch.

The embedded default is a SQLite database in the working directory (sqlite:///mlflow.db) unless
MLFLOW_TRACKING_URI names another store. Writes happen once per epoch, never per step.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from kdbench import KdbenchError, __version__
from kdbench.storage.files import check_writable

DEFAULT_URI = "sqlite:///mlflow.db"
TAG = "kdbench."  # prefix of kdbench's own tags
PROBE_TIMEOUT_S = 5.0  # a tracking server that has not answered in this time is reported as down


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_tracking(uri: str | None = None) -> None:
    """Fail in one line, at start-up, on a tracking store that cannot work: a server that does not answer within
    a few seconds (MLflow itself retries for minutes), or a SQLite database or folder that cannot be written.
    Creates nothing."""

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: whatever it said, MLflow's own calls will say more
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            raise KdbenchError(f"MLflow tracking server {uri} does not answer ({reason} within {PROBE_TIMEOUT_S:.0f} s); "
                               f"start it, or point MLFLOW_TRACKING_URI at a running one") from None
        return
    path = sqlite_path(uri)
    if path is None:
        return
    check_writable(path.parent if str(path.parent) else Path("."), "MLflow database folder")
    if path.exists():
        try:  # opened for writing (nothing written): fails on a read-only file, for root too (immutable, ro mount)
            with open(path, "r+b") as f:
                header = f.read(16)
        except OSError as exc:
            raise KdbenchError(f"MLflow database {path} cannot be written ({exc.strerror or exc}); make it writable, "
                               f"or point MLFLOW_TRACKING_URI at another store") from None
        if header and header != b"SQLite format 3\x00":
            raise KdbenchError(f"MLflow database {path} is not a SQLite database; point MLFLOW_TRACKING_URI at "
                               f"another store")


def create_sqlite_store(path: Path) -> None:
    """Create and migrate a new MLflow SQLite database under a temporary name, then rename it into place: a kill
    at any moment leaves no database or a complete one, never a half-migrated one on which every run fails."""
    from mlflow.tracking import MlflowClient

    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        client = MlflowClient(f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # creates the schema
        engine = getattr(client._tracking_client.store, "engine", None)
        if engine is not None:
            engine.dispose()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def code_version() -> dict[str, str]:
    """kdbench's version, and the git commit (with a dirty flag) when running from a checkout."""
    repo = Path(__file__).resolve().parents[1]
    out = {"kdbench_version": __version__}
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["git_commit"] = head.stdout.strip()
            out["git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def environment(device: str) -> dict[str, str]:
    import timm
    import torch

    env = {"torch_version": torch.__version__, "timm_version": timm.__version__, "python_version":
           platform.python_version(), "device": device, "cuda_version": str(torch.version.cuda)}
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    return env


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)
    return out


class Tracker:
    """The only module that talks to MLflow while training."""
    def __init__(self, uri: str | None = None):
        import mlflow
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        path = sqlite_path(self.uri)
        if path is not None:
            # Creating the SQLite schema races when two processes do it at once: one creates, the other waits.
            with FileLock(str(path) + ".lock"):
                for leftover in path.parent.glob(f".{path.name}.creating-*"):
                    leftover.unlink(missing_ok=True)  # of a creator killed midway (a live one holds this lock)
                if not path.exists():
                    create_sqlite_store(path)
                self.client = MlflowClient(self.uri)
                self.client.search_experiments(max_results=1)
        else:
            self.client = MlflowClient(self.uri)

    def experiment(self, suite_name: str) -> str:
        found = self.client.get_experiment_by_name(suite_name)
        return found.experiment_id if found else self.client.create_experiment(suite_name)

    def find_suite_run(self, suite_name: str, plan_hash: str):
        """The latest parent run of this exact plan, or None."""
        found = self.client.get_experiment_by_name(suite_name)
        if found is None:
            return None
        runs = self.client.search_runs([found.experiment_id], filter_string=f"tags.`{TAG}plan` = '{plan_hash}' and "
                                       f"tags.`{TAG}role` = 'suite'", order_by=["attributes.start_time DESC"],
                                       max_results=1)
        return runs[0] if runs else None

    def finished_identities(self, suite_name: str) -> dict[str, set[str]]:
        """Identity -> job keys of this suite's finished job runs (any parent run): what a rerun compares against."""
        found = self.client.get_experiment_by_name(suite_name)
        out: dict[str, set[str]] = {}
        token = None
        while found is not None:
            page = self.client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                           max_results=1000, page_token=token)
            for run in page:
                identity = run.data.tags.get(f"{TAG}identity")
                if identity:
                    out.setdefault(identity, set()).add(run.data.tags.get(f"{TAG}job", ""))
            token = page.token
            if not token:
                break
        return out

    def job_run(self, parent_id: str, job_key: str):
        """This parent run's child run for a job, or None."""
        exp = self.client.get_run(parent_id).info.experiment_id
        runs = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                       f"tags.`{TAG}job` = '{job_key}'", order_by=["attributes.start_time DESC"])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        return (finished or runs or [None])[0]

    def finished_jobs(self, parent_id: str) -> dict[str, str]:
        """Job key -> why it collapsed ("" if it did not), for every finished child run of this parent run."""
        exp = self.client.get_run(parent_id).info.experiment_id
        out: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                           "attributes.status = 'FINISHED'", max_results=1000, page_token=token)
            out.update({r.data.tags.get(f"{TAG}job", ""): r.data.tags.get(f"{TAG}collapsed", "") for r in page})
            token = page.token
            if not token:
                return out

    def last_step(self, run_id: str, metric: str = "test_acc") -> int:
        history = self.client.get_metric_history(run_id, metric)
        return max((m.step for m in history), default=0)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def start_suite(self, suite_name: str, suite_path: str, tags: dict[str, str], params: dict[str, str]) -> str:
        exp = self.experiment(suite_name)
        run = self.client.create_run(exp, run_name=f"{suite_name} {time.strftime('%Y-%m-%d %H:%M:%S')}", tags={
            f"{TAG}suite": suite_name, f"{TAG}role": "suite", f"{TAG}suite_file": suite_path, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_job(self, parent_id: str, name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        exp = self.client.get_run(parent_id).info.experiment_id
        run = self.client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent_id, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def end(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        if reason:
            self.set_tags(run_id, {f"{TAG}failure": reason[:5000]})
        elif status == "FINISHED" and f"{TAG}failure" in self.client.get_run(run_id).data.tags:
            # Finished after a resume: the failure of an earlier attempt no longer describes this run.
            self.client.delete_tag(run_id, f"{TAG}failure")
        self.client.set_terminated(run_id, status)


def referenced_keys(uri: str | None = None) -> set[str]:
    """Every tag and param value of every run in the tracking store, deleted runs included: a superset of the
    job keys runs refer to (their own job, their teacher, assistant and reference jobs), for `kdbench store gc`.
    Refuses a store that does not exist, rather than calling every model unreferenced."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise KdbenchError(f"no MLflow store at {path} (MLFLOW_TRACKING_URI={uri}): without it no run can be checked, "
                           f"so nothing is removed; point MLFLOW_TRACKING_URI at the store your runs are in")
    if path is None:
        check_tracking(uri)
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    keys: set[str] = set()
    token = None
    while experiments:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        for run in page:
            keys.update(run.data.tags.values())
            keys.update(run.data.params.values())
        token = page.token
        if not token:
            break
    return keys
