"""The authors' reduction of TAKD's and DGKD's code: a modifier that divides the method's logit terms by the
number of classes, which turns a KL term summed over classes and averaged over the batch (the definition, what
kdbench computes) into PyTorch's `nn.KLDivLoss()` at its default reduction, the mean over every element.

TAKD's official code (imirzadeh/Teacher-Assistant-Knowledge-Distillation, train.py) and DGKD's (wonchulSon/DGKD,
train.py) compute `nn.KLDivLoss()(log_softmax(z_s / T), softmax(z_t / T))`, so their `lambda T^2 KL` term has an
effective weight lambda / C (C = 100 on CIFAR-100): their published numbers come from that. A paper suite
reproduces their protocol with `{method: takd, modify: kl_mean}` (and the same for its KD row); kdbench's
methods themselves follow the definition.
"""

from kdbench.modifier import Modifier


class KLMean(Modifier):
    name = "kl_mean"
    summary = "the logit terms divided by the classes: nn.KLDivLoss()'s default mean, as TAKD's and DGKD's code"
    changes_terms = True

    def terms(self, terms, student, batch):
        classes = student.logits.shape[1]
        return {k: v / classes for k, v in terms.items()}
