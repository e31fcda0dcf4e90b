"""MLflow -> pandas: a suite's parent run and one row per child run, read back by the run schema
of kdbench.tracking.
"""

from __future__ import annotations
import math
import pandas as pd
from kdbench import KdbenchError
from kdbench.tracking import (DIVERGED, SUITE_ROLE, TEACHER_FAILED, JobTags, RunEnd, RunStatus, SuiteTags,
                              check_store_exists, tag, tracking_uri)


PASSES = ("teacher_forward", "teacher_backward", "student_forward", "student_backward")
# The measures beyond accuracy (kdbench.train.measures), test split, last epoch; nan where a run did not log one.
MEASURES = ("agreement", "kl", "ece", "nll", "brier")
RUN_COLUMNS = ["run_id", "role", "method", "method_name", "teacher", "student", "pair", "seed", "status", "reason",
               "failure", "protocol", "reused", "method_hash", "epochs", "test_acc", "wall_time", "images_per_sec",
               *PASSES, *(f"test_{m}" for m in MEASURES), "start_time"]


# ---------------------------------------------------------------------------------------------- MLflow

def open_client(uri: str | None = None):
    """An MlflowClient on an existing store: a report never creates an empty database by looking for one."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    check_store_exists(uri, "run the suite first, or point MLFLOW_TRACKING_URI at the store that has it")
    return MlflowClient(uri)


def find_parent(client, suite_name: str, run_id: str | None = None, plan_hash: str | None = None,
                notice=None):
    """The suite's parent run: the given one; else the latest run of the suite as it is now (`plan_hash`, the
    plan's data-free hash), else the latest run of any version of it. `notice(line)` hears which run was taken
    and why whenever that is not simply the latest run of the suite as it is."""
    from mlflow.exceptions import MlflowException

    notice = notice or (lambda line: None)
    where = client.tracking_uri
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise KdbenchError(f"--run {run_id}: no such run in {where}") from None
        role = run.data.tags.get(tag("role"))
        if role != SUITE_ROLE:
            raise KdbenchError(f"--run {run_id}: not a suite's parent run (its role is {role or 'unset'}); "
                               f"pass the parent run's id")
        if (ran := SuiteTags.from_tags(run.data.tags).suite) != suite_name:
            raise KdbenchError(f"--run {run_id}: a run of suite '{ran}', not of '{suite_name}'")
        if plan_hash and plan_of(run) != plan_hash:
            notice(f"reporting run {run_id} as asked; it ran another version of the suite (or other --methods, "
                   f"--seeds, --epochs) than the suite file is now")
        return run
    exp = client.get_experiment_by_name(suite_name)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tag('role')}` = '{SUITE_ROLE}'",
        order_by=["attributes.start_time DESC"], max_results=1000)
    if not runs:
        raise KdbenchError(f"suite '{suite_name}' has no runs in {where}: run it first (kdbench run SUITE)")
    if plan_hash is None:
        return runs[0]
    matching = [r for r in runs if plan_of(r) == plan_hash]
    if not matching:
        notice(f"no run of suite '{suite_name}' as its file is now (plan {plan_hash}); reporting the latest run "
               f"{runs[0].info.run_id} (plan {plan_of(runs[0]) or 'unknown'}), of another version of the suite, made "
               f"with --methods, --seeds or --epochs, or by a kdbench with other job keys (before the jobs' runtime "
               f"entered them): run the suite again, or pass --run to choose")
        return runs[0]
    if matching[0] is not runs[0]:
        notice(f"reporting run {matching[0].info.run_id}, the latest of the suite as its file is now; the newer run "
               f"{runs[0].info.run_id} ran another version of it (pass --run to report that one)")
    return matching[0]


def plan_of(parent) -> str:
    """The data-free plan hash a parent run was made with (older runs: their plan hash)."""
    return SuiteTags.from_tags(parent.data.tags).report_plan


def failure_reason(status: str, failure: str) -> str:
    """Why a run has no number, in a word or two (the full message is in the run's kdbench.failure tag)."""
    if status == RunStatus.FINISHED:
        return ""
    if status == RunStatus.COLLAPSED:
        return "collapsed"
    if status == RunStatus.FAILED:
        if failure.startswith(DIVERGED):
            return "diverged"
        if failure.startswith(TEACHER_FAILED):
            return "teacher failed"
        return "failed"
    return {RunStatus.KILLED: "killed", RunStatus.RUNNING: "running",
            RunStatus.SCHEDULED: "running"}.get(status, status.lower())


def run_record(client, run) -> dict:
    job, ended, metrics = JobTags.from_tags(run.data.tags), RunEnd.of(run), run.data.metrics
    finished = ended.status == RunStatus.FINISHED
    # A finished run that collapsed (chance accuracy, a loss that never fell) has no number: shown as a dash
    # with its reason, as a failed run is, and never part of a mean.
    status = ended.report_status
    history = client.get_metric_history(run.info.run_id, "test_acc") if finished else []
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_sec")] if finished else []
    failure = ended.why
    return {
        "run_id": run.info.run_id, "role": job.role, "method": job.method, "method_name": job.method_name,
        "teacher": job.teacher, "student": job.student, "pair": job.pair, "seed": job.seed, "status": status,
        "reason": failure_reason(status, failure),
        "failure": failure.strip().splitlines()[-1] if failure else "",  # a traceback's last line says what
        "protocol": job.protocol, "reused": job.reused,
        "method_hash": run.data.params.get("method_hash", ""),
        "epochs": max((m.step for m in history), default=math.nan),
        # The headline: the test accuracy of the last epoch (the latest step), never the best epoch.
        "test_acc": max(history, key=lambda m: (m.step, m.timestamp)).value if history else math.nan,
        "wall_time": metrics.get("wall_time", math.nan),
        "images_per_sec": sum(rates) / len(rates) if rates else math.nan,
        **{p: metrics.get(p, math.nan) for p in PASSES},
        # test_loss has always been the NLL: runs logged before test_nll existed keep that number.
        **{f"test_{m}": metrics.get(f"test_{m}", metrics.get("test_loss", math.nan) if m == "nll" else math.nan)
           for m in MEASURES},
        "start_time": run.info.start_time,
    }


def load_runs(client, parent) -> pd.DataFrame:
    """One row per child run of `parent`, in a stable order."""
    records, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        records += [run_record(client, r) for r in page]
        token = page.token
        if not token:
            break
    runs = pd.DataFrame(records, columns=RUN_COLUMNS)
    return runs.sort_values(["role", "method", "teacher", "student", "seed", "start_time", "run_id"],
                            kind="stable").reset_index(drop=True)
