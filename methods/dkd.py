"""DKD, Decoupled KD (Zhao et al. 2022): KD split into a target-class term and a non-target-class term.

L = ce_weight CE + w(epoch) (alpha TCKD + beta NCKD), both at temperature T and scaled by T^2:
TCKD = KL(b_t || b_s) over the binary distribution [p(target), 1 - p(target)];
NCKD = KL(q_t || q_s) over the softmax of the non-target classes only.
w rises linearly to 1 over the first `warmup` epochs. Defaults: alpha 1, beta 8 (2 for resnet56->resnet20
and resnet110->resnet32, 6 for vgg13->vgg8, vgg13->MobileNetV2 and the WRN-40-2 pairs), T 4, warm-up 20.
"""

import torch
import torch.nn.functional as F

from kdbench.losses import cross_entropy
from kdbench.method import Method, check_ranges


def dkd_terms(student_logits, teacher_logits, labels, T):
    """(TCKD, NCKD), each T^2 KL summed over classes and averaged over the batch."""
    zs, zt = student_logits.float() / T, teacher_logits.float() / T
    target = F.one_hot(labels, zs.shape[1]).bool()
    mask = 1000.0 * target  # pushes the target out of a softmax; finite, as -inf would give NaN gradients

    def binary(z):  # log [p(target), 1 - p(target)], both from log-sum-exps: exact and stable
        lse = z.logsumexp(1)
        return torch.stack([z[target] - lse, (z - mask).logsumexp(1) - lse], 1)

    tckd = F.kl_div(binary(zs), binary(zt), reduction="batchmean", log_target=True)
    nckd = F.kl_div(F.log_softmax(zs - mask, 1), F.log_softmax(zt - mask, 1), reduction="batchmean", log_target=True)
    return tckd * T**2, nckd * T**2


class DKD(Method):
    name = "dkd"
    summary = "decoupled KD: alpha TCKD + beta NCKD (target / non-target KL), warmed up, + CE"
    defaults = {"alpha": 1.0, "beta": 8.0, "T": 4.0, "ce_weight": 1.0, "warmup": 20}
    epoch_params = ("warmup",)  # --epochs scales the warm-up with the schedule
    search_space = {"alpha": {"low": 0.5, "high": 2.0}, "beta": {"low": 1.0, "high": 10.0, "log": True},
                    "T": {"low": 1.0, "high": 8.0, "log": True}}  # what `kdbench tune` searches
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply

    @classmethod
    def check_params(cls, params):
        return check_ranges(params, positive=("T",), non_negative=("alpha", "beta", "ce_weight", "warmup"))

    def losses(self, batch, student, teacher):
        p = self.params
        tckd, nckd = dkd_terms(student.logits, teacher.logits, batch.labels, p["T"])
        ramp = min((batch.epoch + 1) / p["warmup"], 1.0) if p["warmup"] else 1.0
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "tckd": ramp * p["alpha"] * tckd, "nckd": ramp * p["beta"] * nckd}
