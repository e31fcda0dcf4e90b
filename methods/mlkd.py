"""MLKD, multi-level logit distillation (Jin, Wang, Lin, CVPR 2023, code Jin-Ying/Multi-Level-Logit-Distillation):
the student's predictions aligned with the teacher's at three levels, each at several temperatures.

With P^T = softmax(z / T) (B x C) for T in the temperatures (`T` and `extra_temperatures`: 4, 3, 5, 2 and 6):
    instance = sum_T T^2 KL(p_t^T || p_s^T)               (batchmean: KD at each temperature)
    batch    = sum_T ||P_t^T P_t^T' - P_s^T P_s^T'||^2 / B  (B x B Gram matrices: how examples relate)
    class    = sum_T ||P_t^T' P_t^T - P_s^T' P_s^T||^2 / C  (C x C Gram matrices: how classes co-occur)
    L = ce_weight CE + kd_weight (m instance + m batch + m_c class),
m the fraction of the batch whose teacher confidence (max p_t at T 1) is at or below the batch median, m_c the
fraction of classes whose summed teacher probability is at or below the class median: the authors' code
multiplies these masks into losses already averaged, so they scale the terms (about 1/2) rather than select
examples; kdbench computes what the code computes.

What kdbench reproduces: the loss of the authors' weak-augmentation view, with their weights (CE 0.1, KD 0.9)
and temperatures. Not reproduced: the second, strongly augmented view (AutoAugment images through both models:
its CE and KD terms, the second student and teacher forward), and the authors' schedule (lr 0.025); the suite's
augmentation and schedule are used. Runs say so (protocol_note).
"""

import torch

from kdbench.losses import cross_entropy, kd_loss
from kdbench.method import Method, check_ranges


def below_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` at or below their median (numpy's percentile 50, as the authors' code): detached."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


def gram_gap(p_s: torch.Tensor, p_t: torch.Tensor, rows: bool) -> torch.Tensor:
    """||G_t - G_s||^2 / n: G = P P' over examples (rows=True, n = B) or P' P over classes (n = C)."""
    if rows:
        g_s, g_t, n = p_s @ p_s.t(), p_t @ p_t.t(), p_s.shape[0]
    else:
        g_s, g_t, n = p_s.t() @ p_s, p_t.t() @ p_t, p_s.shape[1]
    return ((g_t - g_s) ** 2).sum() / n


class MLKD(Method):
    name = "mlkd"
    summary = "multi-level logit KD: instance (KL), batch (B x B Gram) and class (C x C Gram) alignment at 5 temperatures"
    defaults = {"T": 4.0, "extra_temperatures": [3.0, 5.0, 2.0, 6.0], "ce_weight": 0.1, "kd_weight": 0.9}
    param_types = {"extra_temperatures": (list,)}
    protocol_note = "protocol differs: one view (the strongly augmented view is not reproduced)"
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply
    logit_terms = ("instance",)  # what a logit modifier changes: Sun et al.'s MLKD+LS standardises the KL terms only

    @classmethod
    def check_params(cls, params):
        extra = params["extra_temperatures"]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in extra):
            return f"extra_temperatures must be a list of positive numbers, got {extra!r}"
        return check_ranges(params, positive=("T",), non_negative=("ce_weight", "kd_weight"))

    def losses(self, batch, student, teacher):
        p = self.params
        zs, zt = student.logits.float(), teacher.logits.float().detach()
        with torch.no_grad():
            probs = torch.softmax(zt, dim=1)
            m, m_class = below_median(probs.max(1).values), below_median(probs.sum(0))
        instance = batch_level = class_level = 0.0
        for T in [p["T"], *p["extra_temperatures"]]:
            p_s, p_t = torch.softmax(zs / T, dim=1), torch.softmax(zt / T, dim=1)
            instance = instance + kd_loss(zs, zt, T)
            batch_level = batch_level + gram_gap(p_s, p_t, rows=True)
            class_level = class_level + gram_gap(p_s, p_t, rows=False)
        w = p["kd_weight"]
        return {"ce": p["ce_weight"] * cross_entropy(zs, batch.labels), "instance": w * m * instance,
                "batch": w * m * batch_level, "class": w * m_class * class_level}
