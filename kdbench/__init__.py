"""kdbench: a benchmark suite for knowledge distillation.

Data flows one way: suite (YAML) -> plan -> executor -> engine -> tracking (MLflow) -> report.
"""

__version__ = "0.1.0"


class KdbenchError(Exception):
    """A user error (bad suite, missing data, ...): the CLI prints its one-line message and exits 2."""
