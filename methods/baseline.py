"""The student alone, trained with cross-entropy: the reference every method is compared to, paired by seed."""

from kdbench.losses import cross_entropy
from kdbench.method import Method


class Baseline(Method):
    name = "baseline"
    summary = "student alone, cross-entropy only"
    needs_teacher = False
    combinable = False  # one term: PCGrad would change nothing
    stackable = True  # losses only: its seeds may train as one stacked model

    def losses(self, batch, student, teacher):
        return {"ce": cross_entropy(student.logits, batch.labels)}
