"""WTTM, weighted transformed teacher matching (Zheng & Yang, ICLR 2024): TTM with a sample-adaptive weight.

Each example's TTM term is weighted by the power sum of the teacher's probabilities,
    w_i = sum_c p_t,c(i)^gamma,  gamma = 1 / T,
which is 1 for a one-hot teacher and largest, C^(1 - gamma), for a uniform one: smoother teachers count more.
    L = ce_weight CE + beta mean_i w_i KL(softmax(z_t,i / T) || softmax(z_s,i)),
the mean over the batch of the weighted terms (not divided by the weights' sum), no T^2. As the authors' code
(zkxufo/TTM, distiller_zoo/wttm.py): p_t at temperature 1 raised to gamma, the weight its normaliser; the teacher
is frozen, so the weight carries no gradient. Per-pair gamma and beta are in the paper's appendix A.4 (not read);
defaults: gamma 0.2 (T 5) and weight 4, the README's WTTM example (there beside CRD): "assumed".
"""

import torch
import torch.nn.functional as F

from kdbench.losses import cross_entropy
from kdbench.method import Method, check_ranges


def wttm_terms(student_logits, teacher_logits, T):
    """(w, KL) per example: w = sum_c p_t,c^(1/T), KL(softmax(z_t / T) || softmax(z_s))."""
    log_pt = F.log_softmax(teacher_logits.float(), dim=1)
    weight = torch.logsumexp(log_pt / T, dim=1).exp()  # sum_c exp(log p_c / T), computed in log space
    log_q = F.log_softmax(student_logits.float(), dim=1)
    log_p = F.log_softmax(teacher_logits.float() / T, dim=1)  # = p_t^(1/T) normalised
    return weight, F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)


class WTTM(Method):
    name = "wttm"
    summary = "weighted TTM: each example's TTM term weighted by sum_c p_t^(1/T) (smoother teachers weigh more), + CE"
    defaults = {"T": 5.0, "beta": 4.0, "ce_weight": 1.0}
    protocol_note = "defaults assumed (per-pair values of the paper's appendix not read)"
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply

    @classmethod
    def check_params(cls, params):
        return check_ranges(params, positive=("T",), non_negative=("beta", "ce_weight"))

    def losses(self, batch, student, teacher):
        p = self.params
        weight, kl = wttm_terms(student.logits, teacher.logits, p["T"])
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "wttm": p["beta"] * (weight * kl).mean()}
