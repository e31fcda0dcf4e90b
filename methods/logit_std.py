"""Logit standardization (Sun, Ren, Li, Wang, Cao, CVPR 2024, "Logit Standardization in Knowledge Distillation";
code sunshangquan/logit-standardization-KD): a modifier, not a method. Before the softmax of the method's logit
losses, each example's student and teacher logits are z-scored,
    Z(z) = (z - mean_c z) / (1e-7 + std_c z),
std the sample standard deviation over the classes (torch's default, divided by C - 1) and 1e-7 the authors'
guard, so that the student matches the teacher's logit relations rather than their range. The method's own
temperature becomes the base temperature: softmax(Z(z) / T). The method's cross-entropy on the labels keeps the
raw logits (as in the authors' code); MLKD's batch and class levels too (its `logit_terms`).

The authors' CIFAR-100 setting (`--logit-stand --base-temp 2 --kd-weight 9`): KD with T 2 and KD weight 9 (CE
0.1); DKD with T 2 and alpha, beta multiplied by 9; MLKD with T 2 and KD weight 9. Set them in the method's
params: `{method: kd, modify: logit_std, params: {T: 2, kd_weight: 9}}`.
"""

from kdbench.modifier import Modifier

EPS = 1e-7  # the authors' guard against a constant row


class LogitStandardization(Modifier):
    name = "logit_std"
    summary = "z-score each example's student and teacher logits before the softmax; the method's T is the base temperature"
    changes_logits = True

    def logits(self, logits, batch):
        z = logits.float()
        return (z - z.mean(dim=1, keepdim=True)) / (EPS + z.std(dim=1, keepdim=True))
