"""Vanilla KD (Hinton, Vinyals, Dean 2015): L = ce_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T).

Defaults are those of the CIFAR-100 benchmark of Tian et al. (CRD): T = 4, CE weight 0.1, KD weight 0.9.
"""

from kdbench.losses import kd_terms
from kdbench.method import Method, check_ranges


class KD(Method):
    name = "kd"
    summary = "Hinton's soft targets: CE + T^2 KL(teacher || student), batchmean"
    defaults = {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    teacher_logits_only = True
    stackable = True  # losses only: its seeds may train as one stacked model
    # What `kdbench tune` searches (kdbench.config.tuning): the temperature over the range papers use, the KD weight
    search_space = {"T": {"low": 1.0, "high": 8.0, "log": True}, "kd_weight": {"low": 0.1, "high": 1.0}}

    @classmethod
    def check_params(cls, params):
        return check_ranges(params, positive=("T",), non_negative=("ce_weight", "kd_weight"))

    def losses(self, batch, student, teacher):
        p = self.params
        return kd_terms(student.logits, teacher.logits, batch.labels, p["T"], p["ce_weight"], p["kd_weight"])
