"""Loss functions shared by the method plugins. Each has a float64 golden test in tests/unit/test_losses.py."""

import torch
import torch.nn.functional as F


def kl_div(target_logits: torch.Tensor, trained_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_target || p_trained) at temperature T, summed over classes and averaged over the batch.

    "batchmean", never elementwise "mean": the latter also divides by the number of classes (a known bug
    in two public codebases). Computed in float32 even under bf16 autocast.
    """
    log_q = F.log_softmax(trained_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: T^2 * KL(p_t^T || p_s^T); T^2 keeps its gradient scale independent of T."""
    return kl_div(teacher_logits, student_logits, temperature) * temperature**2


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float,
             ce_weight: float, kd_weight: float) -> dict[str, torch.Tensor]:
    """The vanilla KD objective as named terms: ce_weight * CE + kd_weight * T^2 KL(p_t^T || p_s^T).

    Shared by every method whose arrow is an ordinary KD run (KD, RCO's stages, TAKD's chain).
    """
    return {"ce": ce_weight * cross_entropy(student_logits, labels),
            "kd": kd_weight * kd_loss(student_logits, teacher_logits, T)}


def hint_mse(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """FitNets' one-stage hint loss (CRD benchmark): squared error averaged over every element."""
    return F.mse_loss(regressed.float(), hint.float(), reduction="mean")

