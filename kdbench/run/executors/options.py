"""An executor's engine options: from a small per-machine YAML file, overridden by the command line.

The file (`--executor-config PATH`, else `$KDBENCH_EXECUTOR_CONFIG`, else `~/.config/kdbench/executor.yaml`
when it exists) has one section per executor; never in a suite, so the same suite runs anywhere:

    slurm:
      partition: gpu
      gpus_per_job: 1
      cpus_per_job: 8
      mem_gb: 32
      time_min: 1440
      logs: /shared/kdbench-logs/slurm
    ray:
      address: auto          # an existing cluster; leave out to start a local Ray
      gpus_per_job: 0.25     # four jobs per GPU
      cpus_per_job: 2
    local:
      workers: 2             # worker processes on this machine (default: the usable cores / cpus_per_job on CPU)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from kdbench import KdbenchError

DEFAULT_CONFIG = Path("~/.config/kdbench/executor.yaml")


@dataclass
class ExecutorOptions:
    cpus_per_job: float | None = None  # CPU cores per job (and torch threads, in every executor: `threads`)
    workers: int | None = None  # local: worker processes (None: the usable cores / threads on CPU, 1 on a GPU)
    gpus_per_job: float | None = None  # Ray: fractions pack jobs on a GPU; SLURM: whole GPUs
    address: str | None = None  # Ray: an existing cluster ("auto", "ray://host:10001"); None starts a local one
    partition: str | None = None  # SLURM
    mem_gb: float | None = None  # SLURM: memory per job
    time_min: int | None = None  # SLURM: time limit per job; a job stopped by it is requeued and resumes
    logs: str | None = None  # SLURM: where each job's stdout/stderr go [default: <store>/slurm-logs]
    max_retries: int = 3  # SLURM: resubmissions of a job that died unfinished (cancelled, node lost)
    devices_per_job: int | None = None  # one job on N devices (data parallel): SLURM: N tasks on one node
    poll_s: float = 2.0  # SLURM: how often the driver looks at its jobs

    @property
    def threads(self) -> int:
        """torch threads per job: the integer part of cpus_per_job, at least 1 (one by default, in every executor)."""
        return max(1, int(self.cpus_per_job or 1))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def check_packing(jobs: int, threads: int, options: str) -> None:
    """Jobs packed on this machine never run more torch threads in total than it has cores: past that, each step
    waits for a core (a loaded machine once turned 0.36 s steps into 6 s ones). `options`: what set the packing."""
    cores = usable_cores()
    if jobs * threads > cores:
        raise KdbenchError(f"{options}: {jobs} jobs at once x {threads} torch threads each = {jobs * threads} threads "
                           f"on {cores} usable cores; lower them so that jobs x threads <= {cores}")


def _checked(section: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(ExecutorOptions)}
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in known:
            raise KdbenchError(f"{where}: unknown option '{key}'; expected one of {', '.join(known)}")
        kind = known[key].type
        try:
            if value is None:
                out[key] = None
            elif "float" in kind:
                out[key] = float(value)
            elif "int" in kind:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                out[key] = int(float(value))
            else:
                out[key] = str(value)
        except (TypeError, ValueError):
            raise KdbenchError(f"{where}: option '{key}': expected {kind.replace(' | None', '')}, "
                               f"got {value!r}") from None
        if isinstance(out[key], (int, float)) and out[key] < 0:
            raise KdbenchError(f"{where}: option '{key}': expected a non-negative number, got {value!r}")
    return out


def config_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    if os.environ.get("KDBENCH_EXECUTOR_CONFIG"):
        return Path(os.environ["KDBENCH_EXECUTOR_CONFIG"])
    default = DEFAULT_CONFIG.expanduser()
    return default if default.is_file() else None


def load_options(executor: str, config: Path | None = None, **overrides: Any) -> ExecutorOptions:
    """The options for `executor`: its section of the config file, then the command line's (non-None) values."""
    values: dict[str, Any] = {}
    path = config_path(config)
    if path is not None:
        if not path.is_file():
            raise KdbenchError(f"{path}: executor config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise KdbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict) or any(not isinstance(v, dict) for v in raw.values()):
            raise KdbenchError(f"{path}: expected a mapping of executor name to options (e.g. 'slurm: {{partition: "
                               f"gpu}}')")
        values.update(_checked(raw.get(executor) or {}, f"{path}: {executor}"))
    values.update(_checked({k: v for k, v in overrides.items() if v is not None}, "command line"))
    return ExecutorOptions(**values)
