"""Where a suite's jobs run. Each backend is one small file: a subclass of `base.Executor` with `run_jobs`.

One job's life (claim, resume, MLflow, store) is `kdbench.jobrun.run_job`, the same for every backend.
"""

from __future__ import annotations

from kdbench import KdbenchError
from kdbench.run.executors.base import Executor, Outcome
from kdbench.run.executors.options import ExecutorOptions, load_options

BACKENDS = {"local": "kdbench.run.executors.local:LocalExecutor",
            "inprocess": "kdbench.run.executors.inprocess:InProcessExecutor",
            "ray": "kdbench.run.executors.ray:RayExecutor",
            "slurm": "kdbench.run.executors.slurm:SlurmExecutor"}


def get_executor(name: str) -> type[Executor]:
    """The executor class named `name`, imported only when asked for (a backend may need an optional package)."""
    import importlib

    if name not in BACKENDS:
        raise KdbenchError(f"--executor: expected one of {', '.join(BACKENDS)}, got '{name}'")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "Executor", "ExecutorOptions", "Outcome", "get_executor", "load_options"]
