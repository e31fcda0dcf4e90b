"""A report's files as artifacts of the suite's parent run: the MLflow UI, where users look first, shows the
tables, figures and report.md beside the runs they come from.

Only the files this report wrote are logged (written since it started: atomic writes give every one a new
modification time), never a README or a database that shares the folder, nor a figure an earlier report left.
A store whose artifact location cannot be written (a committed store made on another machine) costs the report
nothing: the files are on disk, and one line says why MLflow does not have them.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACT_PATH = "report"  # the folder of the parent run's artifacts that holds them
# File times come from the kernel's coarse clock, a few milliseconds behind time.time_ns(): a file written just
# after the report started may carry an earlier time. A second of slack covers it.
CLOCK_SLACK_NS = 1_000_000_000


def written_since(folder: Path, started_ns: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_mtime_ns >= started_ns - CLOCK_SLACK_NS)


def log_report(client, run_id: str, folder: Path, started_ns: int, notice=None) -> list[Path]:
    """Log the report files in `folder` written since `started_ns` under the run's report/ artifacts; returns them."""
    from mlflow.exceptions import MlflowException

    files = written_since(folder, started_ns)
    try:
        for path in files:
            client.log_artifact(run_id, str(path), ARTIFACT_PATH)
    except (OSError, MlflowException) as exc:
        if notice is not None:
            where = client.get_run(run_id).info.artifact_uri
            notice(f"the report is in {folder}/ but not in MLflow: its artifacts ({where}) cannot be written "
                   f"({getattr(exc, 'strerror', None) or exc})")
        return []
    return files
