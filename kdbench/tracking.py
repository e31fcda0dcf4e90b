"""MLflow: one parent run per suite run, one child run per job, params for every setting, metrics per epoch.

The embedded default is a SQLite database in the working directory (sqlite:///mlflow.db) unless
MLFLOW_TRACKING_URI names another store. Writes happen once per epoch, never per step.

The run schema is defined here, once, for the side that writes it (kdbench.run) and the side that reads it
back (kdbench.report.runs): the tags of a suite's parent run (`SuiteTags`), of a job's child run (`JobTags`),
and how a run ended (`RunEnd`: MLflow's status, the failure and collapse tags, the failure prefixes). Tag names
and values are a file format: committed stores under results/ are read back byte for byte, so never rename one.
"""

from __future__ import annotations

import os
import secrets
import platform
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kdbench import KdbenchError, __version__
from kdbench.storage.files import check_writable

SQLITE = "sqlite:///"  # the start of a SQLite tracking URI; the file's path follows
DEFAULT_URI = f"{SQLITE}mlflow.db"
PROBE_TIMEOUT_S = 5.0  # a tracking server that has not answered in this time is reported as down


# ---------------------------------------------------------------------------------------------- the run schema

TAG_PREFIX = "kdbench."  # kdbench's own tags are kdbench.<field>; MLflow's are mlflow.<field>


def tag(name: str) -> str:
    """The MLflow tag that holds kdbench's field `name` on a run."""
    return TAG_PREFIX + name


SUITE_ROLE = "suite"  # the role tag of a suite's parent run (a job's child run has its job's role)
FAILURE_TAG = tag("failure")  # why a run did not finish: the whole message (a traceback for a bug)
COLLAPSED_TAG = tag("collapsed")  # why a finished job's number means nothing (kdbench.train.engine.collapse_reason)
STATUS_TAG = tag("status")  # on such a job only, with one value:
COLLAPSED_STATUS = "collapsed"

# The start of the failure tag of a job that failed for a reason the report names (others are just "failed").
DIVERGED = "diverged: "  # its loss exploded: deterministic, so never retried
TEACHER_FAILED = "its teacher failed: "  # it never ran: the job that teaches it failed


class RunStatus:
    """A run's status as MLflow names it, and COLLAPSED: the report's status of a FINISHED run tagged collapsed."""
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    COLLAPSED = "COLLAPSED"


@dataclass(frozen=True)
class SuiteTags:
    """The tags of a suite's parent run: which suite and plan it ran, and on what code and machine."""
    suite: str
    suite_file: str = ""
    plan: str = ""  # the plan's hash (with the data's fingerprint): the run `kdbench run` continues
    suite_plan: str = ""  # the data-free plan hash: what `kdbench report` matches the suite file with
    env: Mapping[str, str] = field(default_factory=dict)  # code and machine: git_commit, device, torch_version...

    def to_tags(self) -> dict[str, str]:
        return {tag("suite"): self.suite, tag("role"): SUITE_ROLE, tag("suite_file"): self.suite_file,
                **{tag(k): v for k, v in self.env.items()}, tag("plan"): self.plan, tag("suite_plan"): self.suite_plan}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "SuiteTags":
        mine = {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        named = {f.name: mine.pop(f.name, "") for f in fields(cls) if f.name != "env"}
        for other in ("role", "failure"):
            mine.pop(other, None)
        return cls(**named, env=mine)

    @property
    def report_plan(self) -> str:
        """The hash `kdbench report` matches the suite file with (a run of an older kdbench has only its plan's)."""
        return self.suite_plan or self.plan


# Tuning (kdbench.run.tune): where a search and its tuned runs live, and how a tuned entry is labelled.
SEARCH_SUFFIX = ".tune"  # the tuning parent's experiment, <suite>.tune: the trials' runs are its children
TUNED_SUFFIX = ".tuned"  # the experiment of the tuned settings' reporting runs, <suite>.tuned
TUNED_LABEL = " tuned"  # a method's label at its tuned setting: "kd tuned" beside "kd"
TUNING_TAG = tag("tuning")  # on the tuning parent: "search"


WRITTEN_WHEN_SET = ("assistant", "protocol", "reused", "trial")  # the job tags a run without them does not have


@dataclass(frozen=True)
class JobTags:
    """The tags of a job's child run, set when it starts: what the job is. A run of an older kdbench may lack some
    (read back as empty)."""
    suite: str = ""
    role: str = ""  # teacher, reference, assistant or student
    student: str = ""  # the student model ("" on a teacher's or reference run: its model is `teacher`)
    teacher: str = ""  # the teacher model ("" for the student alone)
    method: str = ""  # the method's label in the suite
    method_name: str = ""  # the registered method
    seed: int = -1
    job: str = ""  # the job key
    pair: str = ""  # teacher->student ("" for runs every pair shares: the student alone)
    identity: str = ""  # the job's key without its method's code: which runs a method edit retrains
    assistant: str = ""  # the assistant chain "a > b" (TAKD, DGKD); written only when there is one
    protocol: str = ""  # the method's protocol note (e.g. "protocol assumed"); written only when there is one
    reused: bool = False  # a stored model reported, not trained in this run; written only when true
    trial: bool = False  # a tuning trial (validation only, under a tuning parent); written only when true

    def to_tags(self) -> dict[str, str]:
        return {tag(f.name): "true" if value is True else str(value) for f in fields(self)
                if (value := getattr(self, f.name)) or f.name not in WRITTEN_WHEN_SET}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "JobTags":
        texts = {f.name: tags.get(tag(f.name), "") for f in fields(cls) if f.name not in ("seed", "reused", "trial")}
        return cls(**texts, seed=int(tags.get(tag("seed"), "-1")), reused=tags.get(tag("reused"), "") == "true",
                   trial=tags.get(tag("trial"), "") == "true")


@dataclass(frozen=True)
class LayoutTags:
    """How a job's batch was laid out over several devices (kdbench.run.devices), set when it trains on them; a run
    on one device has none. A global batch or learning rate that silently changes with the number of GPUs is a
    frequent source of numbers that cannot be reproduced: these say what it was."""
    devices: int
    global_batch: int  # train.batch_size: the batch a step's gradient is the mean over
    per_device_batch: int
    lr_scaling: str  # how the learning rate follows the number of devices (it does not)
    batchnorm: str  # which images BatchNorm's statistics are taken over

    def to_tags(self) -> dict[str, str]:
        return {tag(f.name): str(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: MLflow's status, and why it has no number when it has none."""
    status: str  # a RunStatus, as MLflow has it
    failure: str = ""  # FAILURE_TAG: why it did not finish
    collapsed: str = ""  # COLLAPSED_TAG: why its number means nothing, though it finished

    @classmethod
    def of(cls, run) -> "RunEnd":
        tags = run.data.tags
        return cls(run.info.status, tags.get(FAILURE_TAG, ""), tags.get(COLLAPSED_TAG, ""))

    @property
    def diverged(self) -> bool:
        return self.status == RunStatus.FAILED and self.failure.startswith(DIVERGED)

    @property
    def report_status(self) -> str:
        """MLflow's status, but COLLAPSED for a finished run that collapsed: it has no number, as a failed run."""
        return RunStatus.COLLAPSED if self.status == RunStatus.FINISHED and self.collapsed else self.status

    @property
    def why(self) -> str:
        """The whole message of why the run has no number ("" when it has one)."""
        return self.failure or self.collapsed


# ---------------------------------------------------------------------------------------------- the tracking store

def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI; None for any other store (a server)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def sqlite_uri(path: Path) -> str:
    return f"{SQLITE}{path}"


def absolute_uri(uri: str) -> str:
    """A relative SQLite tracking URI made absolute, so it names the same file from a worker's folder."""
    path = sqlite_path(uri)
    return sqlite_uri(path.resolve()) if path is not None and not path.is_absolute() else uri


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


def check_store_exists(uri: str, hint: str) -> None:
    """For a reader: fail in one line, ending with `hint`, on a SQLite store that does not exist (reading would
    create an empty one) or a server that does not answer. Creates nothing."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise KdbenchError(f"no MLflow store at {path} (MLFLOW_TRACKING_URI={uri}): {hint}")
    if path is None:
        check_tracking(uri)  # a server that does not answer: one line now, not minutes of retries


def create_sqlite_store(path: Path) -> None:
    """Create and migrate a new MLflow SQLite database under a temporary name, then link it into place: a kill
    at any moment leaves no database or a complete one, never a half-migrated one on which every run fails."""
    from mlflow.tracking import MlflowClient

    # pid and a random part: two hosts sharing the folder (SLURM nodes) may have processes of the same pid
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        client = MlflowClient(sqlite_uri(tmp))
        client.search_experiments(max_results=1)  # creates the schema
        engine = getattr(client._tracking_client.store, "engine", None)
        if engine is not None:
            engine.dispose()
        try:  # a link, not a rename: never replace a database another MLflow process created meanwhile
            os.link(tmp, path)
        except FileExistsError:
            pass
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


LOCK_WAIT_S = 600  # how long a SQLite write waits in all for other writers before the job fails


class WaitingOnLocks:
    """An MlflowClient whose calls wait out SQLite's "database is locked": with several workers writing to one
    database file, a writer that holds the lock may be descheduled on a loaded machine for longer than SQLite's
    5-second busy timeout, and a job must not fail for that. A locked call has been rolled back: it is retried."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def waiting(*args, **kwargs):
            deadline, pause = time.monotonic() + LOCK_WAIT_S, 0.2
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if "database is locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        return waiting


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
                self.client = WaitingOnLocks(MlflowClient(self.uri))
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
        mine = f"tags.`{tag('plan')}` = '{plan_hash}' and tags.`{tag('role')}` = '{SUITE_ROLE}'"
        runs = self.client.search_runs([found.experiment_id], filter_string=mine,
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def finished_identities(self, suite_name: str) -> dict[str, set[str]]:
        """Identity -> job keys of this suite's finished job runs (any parent run): what a rerun compares against."""
        found = self.client.get_experiment_by_name(suite_name)
        out: dict[str, set[str]] = {}
        token = None
        while found is not None:
            page = self.client.search_runs([found.experiment_id],
                                           filter_string=f"attributes.status = '{RunStatus.FINISHED}'",
                                           max_results=1000, page_token=token)
            for run in page:
                job = JobTags.from_tags(run.data.tags)
                if job.identity:
                    out.setdefault(job.identity, set()).add(job.job)
            token = page.token
            if not token:
                break
        return out

    def job_run(self, parent_id: str, job_key: str):
        """This parent run's child run for a job, or None."""
        exp = self.client.get_run(parent_id).info.experiment_id
        runs = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                       f"tags.`{tag('job')}` = '{job_key}'", order_by=["attributes.start_time DESC"])
        finished = [r for r in runs if r.info.status == RunStatus.FINISHED]
        return (finished or runs or [None])[0]

    def finished_jobs(self, parent_id: str) -> dict[str, str]:
        """Job key -> why it collapsed ("" if it did not), for every finished child run of this parent run."""
        exp = self.client.get_run(parent_id).info.experiment_id
        out: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                           f"attributes.status = '{RunStatus.FINISHED}'", max_results=1000, page_token=token)
            out.update({r.data.tags.get(tag("job"), ""): r.data.tags.get(COLLAPSED_TAG, "") for r in page})
            token = page.token
            if not token:
                return out

    def last_step(self, run_id: str, metric: str = "test_acc") -> int:
        history = self.client.get_metric_history(run_id, metric)
        return max((m.step for m in history), default=0)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RunStatus.RUNNING)

    def start_suite(self, tags: SuiteTags, params: dict[str, str]) -> str:
        exp = self.experiment(tags.suite)
        run = self.client.create_run(exp, run_name=f"{tags.suite} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                     tags=tags.to_tags())
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_job(self, parent_id: str, name: str, tags: JobTags, params: dict[str, str]) -> str:
        exp = self.client.get_run(parent_id).info.experiment_id
        run = self.client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent_id, **tags.to_tags()})
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

    def collapsed(self, run_id: str, why: str) -> None:
        """Tag a finished job whose number means nothing (it is shown as a dash with `why`, never averaged)."""
        self.set_tags(run_id, {STATUS_TAG: COLLAPSED_STATUS, COLLAPSED_TAG: why})

    def end(self, run_id: str, status: str = RunStatus.FINISHED, reason: str | None = None) -> None:
        if reason:
            self.set_tags(run_id, {FAILURE_TAG: reason[:5000]})
        elif status == RunStatus.FINISHED and FAILURE_TAG in self.client.get_run(run_id).data.tags:
            # Finished after a resume: the failure of an earlier attempt no longer describes this run.
            self.client.delete_tag(run_id, FAILURE_TAG)
        self.client.set_terminated(run_id, status)


def referenced_keys(uri: str | None = None) -> set[str]:
    """Every tag and param value of every run in the tracking store, deleted runs included: a superset of the
    job keys runs refer to (their own job, their teacher, assistant and reference jobs), for `kdbench store gc`.
    Refuses a store that does not exist, rather than calling every model unreferenced."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    check_store_exists(uri, "without it no run can be checked, so nothing is removed; point MLFLOW_TRACKING_URI at "
                            "the store your runs are in")
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
