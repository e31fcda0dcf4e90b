"""Tang et al. 2020 ("Understanding and Improving Knowledge Distillation"): the factors of KD isolated with
synthetic teacher distributions built from the real teacher's p_t^T, each used in place of p_t^T in the KD
loss of section 1: L = ce_weight CE + kd_weight T^2 KL(q || p_s^T), batchmean.

- `tang_smooth` (label smoothing matched to the teacher): q = (1 - eps) onehot(y) + eps / C, eps = the
  teacher's mean non-target mass on the batch, mean_i (1 - p_t^T(y_i)). Taken literally from the reference's
  formula: q's own non-target mass is then eps (C - 1) / C, not eps.
- `tang_confidence` (example re-weighting without the class geometry): q(y) = p_t^T(y), the remaining
  1 - p_t^T(y) spread uniformly over the other C - 1 classes.
- `tang_topk` (the partial teacher, their proposed improvement): the teacher's k largest probabilities kept
  (whether or not they include y), the remaining mass spread uniformly over the other C - k classes.
  k = 3 is assumed (the paper's value could not be read), so its runs say "protocol assumed".

Together with `kd` they separate label smoothing, example re-weighting and the geometry of the teacher's
logits. Defaults are KD's (CRD): T 4, ce_weight 0.1, kd_weight 0.9. The synthetic targets are built from
the detached teacher at temperature T; no gradient ever reaches the teacher.
"""

import torch
import torch.nn.functional as F

from kdbench import KdbenchError
from kdbench.losses import cross_entropy
from kdbench.method import Method


def soft_target_kd(student_logits: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(q || p_s^T) for a given target distribution q (rows sum to 1), summed over classes, batchmean."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, target, reduction="batchmean") * T**2  # xlogy: classes with q = 0 add nothing


def smooth_target(teacher_logits: torch.Tensor, labels: torch.Tensor, T: float) -> torch.Tensor:
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    eps = 1 - p_t.gather(1, labels[:, None]).mean()
    onehot = F.one_hot(labels, p_t.shape[1]).float()
    return (1 - eps) * onehot + eps / p_t.shape[1]


def confidence_target(teacher_logits: torch.Tensor, labels: torch.Tensor, T: float) -> torch.Tensor:
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    p_y = p_t.gather(1, labels[:, None])
    onehot = F.one_hot(labels, p_t.shape[1]).float()
    return onehot * p_y + (1 - onehot) * (1 - p_y) / (p_t.shape[1] - 1)


def topk_target(teacher_logits: torch.Tensor, k: int, T: float) -> torch.Tensor:
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    top = torch.zeros_like(p_t, dtype=torch.bool).scatter_(1, p_t.topk(k, dim=1).indices, True)
    kept = torch.where(top, p_t, 0.0)
    rest = (1 - kept.sum(1, keepdim=True)) / (p_t.shape[1] - k)
    return torch.where(top, p_t, rest)


class _Tang(Method):
    defaults = {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    teacher_logits_only = True  # reads only the frozen teacher's logits: shared teacher outputs apply

    def target(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, batch, student, teacher):
        p = self.params
        q = self.target(teacher.logits, batch.labels)
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "kd": p["kd_weight"] * soft_target_kd(student.logits, q, p["T"])}


class TangSmooth(_Tang):
    name = "tang_smooth"
    summary = "Tang et al.: KD toward uniform label smoothing, eps = the teacher's mean non-target mass"

    def target(self, teacher_logits, labels):
        return smooth_target(teacher_logits, labels, self.params["T"])


class TangConfidence(_Tang):
    name = "tang_confidence"
    summary = "Tang et al.: KD toward the teacher's target probability, the rest uniform"

    def target(self, teacher_logits, labels):
        return confidence_target(teacher_logits, labels, self.params["T"])


class TangTopK(_Tang):
    name = "tang_topk"
    summary = "Tang et al.'s partial teacher: KD toward the teacher's top-k probabilities, the rest uniform"
    defaults = {**_Tang.defaults, "k": 3}
    protocol_note = "protocol assumed"  # k = 3: the paper's value could not be read

    @classmethod
    def check_params(cls, params):
        if params["k"] < 1:
            return f"k must be at least 1, got {params['k']}"
        return None

    def losses(self, batch, student, teacher):
        if not self.params["k"] < teacher.logits.shape[1]:
            raise KdbenchError(f"tang_topk: k = {self.params['k']} must be below the number of classes "
                             f"({teacher.logits.shape[1]})")
        return super().losses(batch, student, teacher)

    def target(self, teacher_logits, labels):
        return topk_target(teacher_logits, self.params["k"], self.params["T"])
