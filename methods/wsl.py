"""Weighted soft labels (Zhou et al., ICLR 2021, "Rethinking Soft Labels for Knowledge Distillation: A
Bias-Variance Tradeoff Perspective"): the KD term of each example weighted by how well the teacher does on
it compared with the student.

w_i = 1 - exp(-CE_s,i / CE_t,i), with the student's and the teacher's cross-entropy on the hard label at
T = 1, detached (a weight, not a path for gradients); L = ce_weight CE + alpha T^2 mean_i(w_i KL_i(p_t^T || p_s^T)).
Defaults: the authors' stated CIFAR settings, T = 4, alpha = 2.25 (their CIFAR code was never released).
As in their ImageNet code, the ratio's denominator is CE_t + 1e-7 (a teacher with CE_t = 0 gives w = 1, not NaN).
Their code writes the soft term as the cross-entropy to p_t^T; KL differs from it by the teacher's entropy,
a constant, so the gradients are the same.
"""

import torch
import torch.nn.functional as F

from kdbench.losses import cross_entropy
from kdbench.method import Method

EPS = 1e-7  # the authors' guard on the teacher's cross-entropy


def wsl_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example weight 1 - exp(-CE_s / CE_t) at T = 1, detached."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.detach().float(), labels, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.detach().float(), labels, reduction="none")
        return 1 - torch.exp(-ce_s / (ce_t + EPS))


class WSL(Method):
    name = "wsl"
    summary = "weighted soft labels: per-example KD weight 1 - exp(-CE_s / CE_t) (detached), + CE"
    defaults = {"T": 4.0, "alpha": 2.25, "ce_weight": 1.0}
    search_space = {"T": {"low": 1.0, "high": 8.0, "log": True}, "alpha": {"low": 0.5, "high": 4.0, "log": True}}
    teacher_logits_only = True  # reads only the frozen teacher's logits: shared teacher outputs apply

    def losses(self, batch, student, teacher):
        p, T = self.params, self.params["T"]
        w = wsl_weights(student.logits, teacher.logits, batch.labels)
        log_p_s = F.log_softmax(student.logits.float() / T, dim=1)
        log_p_t = F.log_softmax(teacher.logits.detach().float() / T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)  # KL_i(p_t^T || p_s^T)
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "wsl": p["alpha"] * T**2 * (w * kl).mean()}
