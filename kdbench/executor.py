"""The default executor under its historical name: `Executor` is `kdbench.executors.inprocess.InProcessExecutor`."""

from kdbench.executors.base import Outcome
from kdbench.executors.inprocess import InProcessExecutor as Executor
from kdbench.jobrun import DIVERGED

__all__ = ["DIVERGED", "Executor", "Outcome"]
