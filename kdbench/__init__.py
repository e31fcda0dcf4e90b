"""kdbench: a benchmark suite for knowledge distillation.

Data flows one way: suite (YAML) -> plan -> executor -> engine -> tracking (MLflow) -> report.
"""

__version__ = "0.1.0"


class KdbenchError(Exception):
    """A user error (bad suite, missing data, ...): the CLI prints its one-line message and exits 2."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by kdbench's own signal handlers; caught wherever KeyboardInterrupt is.

    A subclass on purpose: once a bare KeyboardInterrupt has crossed one of CPython's C entry points that run
    Python code, the interpreter ends the process by SIGINT at exit, even if it was caught, and the promised
    exit status 130 is lost (seen under `python -m kdbench.cli`). CPython checks for exactly that class."""


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM): the job saved its state at a step boundary and can resume."""
