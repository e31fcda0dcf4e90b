"""CTKD, curriculum temperature (Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation"; code
zhengli97/CTKD): a modifier, not a method. The method's temperature becomes a learnable one,
    T = t_start + t_range sigmoid(theta),   theta a scalar parameter (init 1: T starts at about 15.6),
trained with the student's optimiser through a gradient-reversal layer: the forward pass is the identity, the
backward pass multiplies theta's gradient by -lambda, so the temperature ascends the distillation loss (makes
the task harder) while the student descends it. lambda follows a cosine curriculum over the first
`curriculum_epochs` epochs (counted from 1, as the authors' loop):
    lambda(e) = lambda_min + (lambda_max - lambda_min) (1 - cos(pi min(e, L) / L)) / 2.
The loss keeps the method's form with T replaced, T^2 factors included (gradients reach theta through both).
Defaults: the authors' CIFAR script (global temperature, t_start 1, t_end 20, cosine decay from 0 to -1 over 10
loops, i.e. lambda from 0 to 1 over 10 epochs). The temperature is logged each epoch as `ctkd_T`.
"""

import math

import torch
from torch import nn

from kdbench.modifier import Modifier


class _Reverse(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by -lambda (Ganin & Lempitsky's reversal layer)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


class CurriculumTemperature(Modifier):
    name = "ctkd"
    summary = "learnable temperature trained adversarially (gradient reversal), lambda on a cosine curriculum"
    defaults = {"t_start": 1.0, "t_range": 20.0, "init": 1.0, "lambda_min": 0.0, "lambda_max": 1.0,
                "curriculum_epochs": 10}
    changes_temperature = True
    epoch_params = ("curriculum_epochs",)  # --epochs scales the curriculum with the schedule

    @classmethod
    def check_params(cls, params):
        if not params["t_start"] > 0 or not params["t_range"] >= 0:
            return f"t_start must be positive and t_range at least 0, got {params['t_start']}, {params['t_range']}"
        if not 0 <= params["lambda_min"] <= params["lambda_max"]:
            return f"need 0 <= lambda_min <= lambda_max, got {params['lambda_min']}, {params['lambda_max']}"
        if params["curriculum_epochs"] < 1:
            return f"curriculum_epochs must be at least 1, got {params['curriculum_epochs']}"
        return None

    def __init__(self, params):
        super().__init__(params)
        self.theta = nn.Parameter(torch.tensor(float(self.params["init"])))

    def reversal(self, epoch: int) -> float:
        """lambda during 1-based `epoch`: the cosine curriculum from lambda_min to lambda_max."""
        p, length = self.params, self.params["curriculum_epochs"]
        done = (1 - math.cos(math.pi * min(epoch, length) / length)) / 2
        return p["lambda_min"] + (p["lambda_max"] - p["lambda_min"]) * done

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        return self.params["t_start"] + self.params["t_range"] * torch.sigmoid(theta)

    def temperature(self, base, batch):
        return self.value(_Reverse.apply(self.theta, self.reversal(batch.epoch + 1)))

    def epoch_metrics(self):
        return {"ctkd_T": self.value(self.theta.detach()).item()}
