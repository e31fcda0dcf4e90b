"""FitNets (Romero et al. 2015): a student layer (guided) learns, through a small trainable regressor,
to predict a teacher layer (hint).

One-stage, the default (the CRD and DKD tables): L = ce_weight CE + hint_weight MSE(r(f_s), f_t)
(+ kd_weight KD, 0 by default), MSE averaged over every element, hint_weight 100, the regressor
trained with the student.
Two-stage (`two_stage: true`, the paper's recipe): during the first `hint_fraction` of the epochs the
student up to the guided layer and the regressor learn to predict the hint, without labels; then the
regressor is dropped and the whole student trains with KD (ce_weight CE + kd_weight T^2 KL). The paper
writes stage 1's loss 0.5 ||f_t - r(f_s)||^2, a sum over the hint's elements (8,192 for a CIFAR
ResNet's layer2): with SGD at the suite's learning rate that sum diverges in the first epoch, so stage 1
minimises the same objective scaled as the one-stage term, hint_weight x the elementwise mean (same
minimisers, a step size that the suites' schedules suit).
Layers: a stage index into the model's feature_info or a module name (forward hook); the default is
stage index 2, RepDistiller's `hint_layer = 2` (feature lists start at the stem, so index 2 is the
second stage: `layer2` of a CIFAR ResNet), or the last stage of shallower models (MLPs).
"""

import torch
from torch import nn

from kdbench import KdbenchError
from kdbench.features import feature_shape, layer_name, make_regressor
from kdbench.losses import cross_entropy, hint_mse, kd_terms
from kdbench.method import Method, check_ranges, resolve_layer, run_model

SECOND_STAGE = 2  # feature_info index of the second stage when index 0 is the stem


def default_layer(model: nn.Module) -> int:
    return min(SECOND_STAGE, len(model.feature_info) - 1)


class FitNets(Method):
    name = "fitnets"
    summary = "hint: regressor(student layer) -> teacher layer, MSE x100 (+CE); two-stage recipe as an option"
    defaults = {"hint_layer": None, "guided_layer": None, "hint_weight": 100.0, "ce_weight": 1.0, "kd_weight": 0.0,
                "T": 4.0, "two_stage": False, "hint_fraction": 0.25}
    param_types = {"hint_layer": (int, str), "guided_layer": (int, str)}
    stackable = True  # one-stage: losses only (each seed's regressor is its own); see stack_problem
    search_space = {"hint_weight": {"low": 1.0, "high": 1000.0, "log": True}}  # what `kdbench tune` searches

    @classmethod
    def check_params(cls, params):
        if params["two_stage"] and params["kd_weight"] <= 0:
            return "two_stage: stage 2 is KD: set kd_weight > 0 (the CRD values: ce_weight 0.1, kd_weight 0.9)"
        if not 0 < params["hint_fraction"] < 1:
            return f"hint_fraction must lie strictly between 0 and 1, got {params['hint_fraction']}"
        # hint_layer and guided_layer are checked against the models when the plan builds the method
        return check_ranges(params, positive=("T",), non_negative=("hint_weight", "ce_weight", "kd_weight"))

    @classmethod
    def stack_problem(cls, params):
        return "two_stage: its stage switch and stage-1 step" if params["two_stage"] else None

    @classmethod
    def check_models(cls, params, student, teacher):
        for key, model in (("guided_layer", student), ("hint_layer", teacher)):
            if params[key] is not None:
                try:
                    resolve_layer(model, params[key])
                except KdbenchError as exc:
                    return f"{key}: {exc}"
        return None

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        p = self.params
        guided = resolve_layer(student, p["guided_layer"] if p["guided_layer"] is not None else default_layer(student))
        hint = resolve_layer(teacher, p["hint_layer"] if p["hint_layer"] is not None else default_layer(teacher))
        self.student_features, self.teacher_features = [guided], [hint]
        s_shape, t_shape = feature_shape(student, guided, input_shape), feature_shape(teacher, hint, input_shape)
        self.regressor = make_regressor(s_shape, t_shape)
        self.stage = "hint" if p["two_stage"] else "one_stage"
        self.record = {"guided_layer": f"{layer_name(student, guided)} {list(s_shape[1:])}",
                       "hint_layer": f"{layer_name(teacher, hint)} {list(t_shape[1:])}",
                       "regressor": type(self.regressor[0 if len(s_shape) == 4 == len(t_shape) else 1]).__name__}

    # The stage is state outside parameters: a job resumed in stage 2 must not train stage 1 again.
    def extra_state(self):
        return {**super().extra_state(), "stage": self.stage}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        if state["stage"] == "kd" and self.stage != "kd":
            self.stage = "kd"
            self.student_features = self.teacher_features = None

    def hint_epochs(self, epochs: int) -> int:
        return min(max(1, round(self.params["hint_fraction"] * epochs)), max(epochs - 1, 1))

    def start_epoch(self, epoch, epochs, ctx):
        if self.params["two_stage"]:
            self.record["hint_epochs"] = str(self.hint_epochs(epochs))
            if epoch >= self.hint_epochs(epochs) and self.stage == "hint":
                self.stage = "kd"  # the regressor is dropped: no term uses it, so it gets no gradient
                self.student_features = self.teacher_features = None

    def step(self, batch, ctx):
        if self.stage != "hint":
            return super().step(batch, ctx)
        # Stage 1: only the student up to the guided layer runs (stop_early), so only it and the regressor learn.
        with ctx.autocast():
            f_s = self._features(ctx.student, batch.images, self.student_features[0])
            ctx.passes.student_forward += 1
            with torch.no_grad():
                f_t = self._features(ctx.teacher, batch.images, self.teacher_features[0])
            ctx.passes.teacher_forward += 1
            loss = self.params["hint_weight"] * hint_mse(self.regressor(f_s), f_t)
        ctx.update("student", loss)
        return {"hint": loss.detach()}

    @staticmethod
    def _features(model, images, layer):
        if isinstance(layer, int):
            return model.forward_intermediates(images, indices=[layer], stop_early=True, intermediates_only=True)[0]
        return run_model(model, images, [layer]).features[0]

    def losses(self, batch, student, teacher):
        p = self.params
        if self.stage == "kd":
            return kd_terms(student.logits, teacher.logits, batch.labels, p["T"], p["ce_weight"], p["kd_weight"])
        terms = {"ce": p["ce_weight"] * cross_entropy(student.logits, batch.labels),
                 "hint": p["hint_weight"] * hint_mse(self.regressor(student.features[0]), teacher.features[0])}
        if p["kd_weight"]:
            terms["kd"] = kd_terms(student.logits, teacher.logits, batch.labels, p["T"], 0.0, p["kd_weight"])["kd"]
        return terms
