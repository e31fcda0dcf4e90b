"""Measures beyond accuracy, summed on the device during the evaluation pass (one host sync at its end).

Against the labels: expected calibration error (15 equal-width confidence bins, in %), negative log-likelihood
(nats) and the Brier score (sum over classes of the squared error of the probabilities, 0 to 2). Against the
teacher's outputs on the same images: top-1 agreement (%) and KL(teacher || student) at T = 1 (nats).

Written here rather than taken from torchmetrics: its calibration error keeps every confidence until the end
and adds a dependency, while equal-width bins are three sums per bin.
"""

from __future__ import annotations

import torch
from torch import nn

ECE_BINS = 15
LABEL_MEASURES = ("ece", "nll", "brier")
TEACHER_MEASURES = ("agreement", "kl")


class EvalTotals:
    """Sums of one evaluation pass over a split; `add` per batch (no host sync), `results` once at the end."""

    def __init__(self, device: torch.device, with_teacher: bool):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.nll = zero.clone()
        self.brier = zero.clone()
        # Per confidence bin (k-1)/15 < confidence <= k/15: images, their summed confidence, the correct ones.
        self.bin_confidence = torch.zeros(ECE_BINS, dtype=torch.float64, device=device)
        self.bin_correct = torch.zeros(ECE_BINS, dtype=torch.float64, device=device)
        self.with_teacher = with_teacher
        self.agree = torch.zeros((), dtype=torch.int64, device=device)
        self.kl = zero.clone()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """A batch's float32 logits (and the teacher's on the same images, when measuring against it)."""
        predicted = logits.argmax(1)
        hits = predicted == labels
        self.correct += hits.sum()
        # The loss as it always was (its numbers are in every stored run): the summed cross-entropy is the NLL.
        self.nll += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        log_probs = torch.log_softmax(logits, 1)
        probs = log_probs.exp()
        truth = probs.gather(1, labels[:, None]).squeeze(1)
        self.brier += ((probs * probs).sum(1) - 2 * truth + 1).double().sum()
        confidence = probs.gather(1, predicted[:, None]).squeeze(1).double()
        bins = (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
        self.bin_confidence.index_add_(0, bins, confidence)
        self.bin_correct.index_add_(0, bins, hits.double())
        if teacher_logits is not None:
            teacher = teacher_logits.float()
            self.agree += (predicted == teacher.argmax(1)).sum()
            self.kl += nn.functional.kl_div(log_probs, torch.log_softmax(teacher, 1), log_target=True,
                                            reduction="sum").double()

    def sums(self) -> list[torch.Tensor]:
        """Every sum this pass keeps: each adds up over parts of a split (one job on several devices)."""
        return [self.correct, self.nll, self.brier, self.bin_confidence, self.bin_correct, self.agree, self.kl]

    def results(self, n: int) -> dict[str, float]:
        """acc and loss as before; ece, nll, brier; agreement and kl where a teacher's outputs were given."""
        ece = (self.bin_correct - self.bin_confidence).abs().sum()
        sums = torch.stack([self.correct.double(), self.nll, ece, self.brier, self.agree.double(), self.kl])
        correct, nll, ece, brier, agree, kl = sums.tolist()  # the pass's one host sync
        out = {"acc": int(correct) / n * 100, "loss": nll / n, "ece": ece / n * 100, "nll": nll / n,
               "brier": brier / n}
        if self.with_teacher:
            out.update({"agreement": int(agree) / n * 100, "kl": kl / n})
        return out
