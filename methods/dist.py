"""DIST (Huang et al. NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): relations, not probabilities.

y = softmax(z / tau) for student and teacher. Inter-class relation: 1 - the mean over the batch of the Pearson
correlation between a student row y_s[i, :] and the teacher's row y_t[i, :] (each example's ranking of the
classes). Intra-class relation: the same over the transposed batch (each class's column across the examples).
L = ce_weight CE + tau^2 (beta inter + gamma intra), the teacher frozen.

Defaults: tau 4, beta 2, gamma 2, CE weight 1: the authors' CIFAR-100 setting. Their classification code
(hunto/image_classification_sota, configs/strategies/distill/dist_cifar.yaml, read at commit 6f7a70a) sets
`ori_loss_weight: 1` (CE), `kd_loss_weight: 2` and `kd: dist_t4`, which lib/models/losses/kd_loss.py builds as
DIST(beta=1, gamma=1, tau=4): 2 (tau^2 inter + tau^2 intra) is beta = gamma = 2 here. The paper's ImageNet
values are beta = gamma = tau = 1. Pearson correlation with the authors' eps = 1e-8 in the cosine's denominator
(a constant row, e.g. a one-example batch's column, gives 0).
"""

import torch

from kdbench.losses import cross_entropy
from kdbench.method import Method

EPS = 1e-8  # the authors' cosine_similarity eps


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (centred cosine)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float):
    """(inter, intra): 1 - mean Pearson correlation over examples (rows), and over classes (columns)."""
    y_s = torch.softmax(student_logits.float() / tau, dim=1)
    y_t = torch.softmax(teacher_logits.float() / tau, dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter, intra


class DIST(Method):
    name = "dist"
    summary = "DIST: Pearson-correlation relations of softened predictions, inter-class (rows) and intra-class (columns)"
    defaults = {"tau": 4.0, "beta": 2.0, "gamma": 2.0, "ce_weight": 1.0}
    search_space = {"tau": {"low": 1.0, "high": 8.0, "log": True}, "beta": {"low": 0.5, "high": 4.0, "log": True},
                    "gamma": {"low": 0.5, "high": 4.0, "log": True}}  # what `kdbench tune` searches
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply

    @classmethod
    def check_params(cls, params):
        if params["tau"] <= 0:
            return f"tau must be positive, got {params['tau']}"
        return None

    def losses(self, batch, student, teacher):
        p = self.params
        inter, intra = dist_terms(student.logits, teacher.logits, p["tau"])
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "inter": p["tau"] ** 2 * p["beta"] * inter, "intra": p["tau"] ** 2 * p["gamma"] * intra}
