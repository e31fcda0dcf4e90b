"""TTM, transformed teacher matching (Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on Transformed
Teacher Matching"): KD with the temperature on the teacher's side only.

The teacher's distribution is power-transformed, p_t^gamma / sum_c p_t,c^gamma = softmax(z_t / T) with
gamma = 1 / T, and the student is matched at temperature 1:
    L = ce_weight CE + beta mean_i KL(softmax(z_t,i / T) || softmax(z_s,i)),
summed over classes, averaged over the batch, without KD's T^2 (the student's side is not scaled).
The paper shows this is KD plus a Renyi-entropy regulariser on the student. The authors' code (zkxufo/TTM,
distiller_zoo/ttm.py) takes the exponent `ttm_l` = gamma and the weight `-b` = beta; they are chosen per pair
(the paper's appendix A.4, not read here). Defaults: the README's example run (vgg13 -> vgg8: gamma 0.1, so
T 10; beta 45; CE weight 1): "assumed" for other pairs.
"""

import torch.nn.functional as F

from kdbench.losses import cross_entropy
from kdbench.method import Method, check_ranges


def ttm_kl(student_logits, teacher_logits, T):
    """Per example KL(softmax(z_t / T) || softmax(z_s)): the transformed teacher against the untempered student."""
    log_q = F.log_softmax(student_logits.float(), dim=1)
    log_p = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)


class TTM(Method):
    name = "ttm"
    summary = "transformed teacher matching: KL(softmax(z_t / T) || softmax(z_s)), teacher tempered only, + CE"
    defaults = {"T": 10.0, "beta": 45.0, "ce_weight": 1.0}
    protocol_note = "defaults assumed (per-pair values of the paper's appendix not read)"
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply

    @classmethod
    def check_params(cls, params):
        return check_ranges(params, positive=("T",), non_negative=("beta", "ce_weight"))

    def losses(self, batch, student, teacher):
        p = self.params
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                "ttm": p["beta"] * ttm_kl(student.logits, teacher.logits, p["T"]).mean()}
