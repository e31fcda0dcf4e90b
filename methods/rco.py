"""RCO, Route-Constrained Optimisation (Jin et al., ICCV 2019): the student follows the teacher's route.

The teacher's own training run kept checkpoints along its route (the model store has them; RCO never
retrains the teacher). `anchors` of them are chosen, the last being the converged teacher; the student
trains in as many consecutive stages and in stage i is distilled (the KD loss) from anchor i. Its total
epochs are the job's, the same as the KD baseline's, split by `split` (default: equally).
Anchor choice: "equal" (EEIS, the default): the checkpoints closest to equal epoch intervals of the
teacher's run; "greedy" (GSS): at each stage start, the furthest later checkpoint whose KD loss for
the current student, on the first `probe_size` validation images (data.val_size), stays under
`gss_threshold` (the next checkpoint when none does); the last stage always uses the final teacher.
The paper's anchor count, split and threshold could not be read: they are parameters, and each
stage's anchor is recorded. The anchor is state outside the parameters: it is checkpointed, and a
job resumed inside a stage reloads it into the teacher.
"""

from dataclasses import replace

import torch

from kdbench import KdbenchError
from kdbench.losses import kd_loss, kd_terms
from kdbench.method import Method, check_ranges, run_model


def equal_interval_anchors(route_epochs: list[int], n: int) -> list[int]:
    """For each of n anchors, the route checkpoint nearest to (i + 1) / n of the teacher's run (ties: earlier)."""
    last = route_epochs[-1]
    return [min(route_epochs, key=lambda e: (abs(e - last * (i + 1) / n), e)) for i in range(n)]


def stage_bounds(epochs: int, weights: list[float]) -> list[int]:
    """Start epochs of the stages, plus `epochs` at the end: stage i runs over [bounds[i], bounds[i + 1]).

    Rounded down, so that with fewer epochs than stages the early stages are the empty ones: the last
    stage, with the converged teacher, always has at least one epoch.
    """
    total, acc, bounds = sum(weights), 0.0, [0]
    for w in weights:
        acc += w
        bounds.append(int(epochs * acc / total + 1e-9))
    return bounds


class RCO(Method):
    name = "rco"
    summary = "KD from the teacher's route checkpoints, one anchor per stage (equal-interval or greedy)"
    defaults = {"anchors": 4, "choice": "equal", "split": None, "T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9,
                "gss_threshold": 1.0, "probe_size": 512}
    param_types = {"split": (list,)}
    needs_route = True

    @classmethod
    def check_params(cls, params):
        if params["anchors"] < 1:
            return f"anchors must be at least 1, got {params['anchors']}"
        if params["choice"] not in ("equal", "greedy"):
            return f"choice must be 'equal' or 'greedy', got {params['choice']!r}"
        split = params["split"]
        if split is not None and (len(split) != params["anchors"] or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in split)):
            return f"split must list {params['anchors']} positive numbers (one weight per stage), got {split!r}"
        return check_ranges(params, positive=("T", "gss_threshold", "probe_size"), non_negative=("ce_weight", "kd_weight"))

    @classmethod
    def needs(cls, params):
        return replace(super().needs(params), choice="choice 'greedy'" if params["choice"] == "greedy" else "")

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        self.anchor_epoch: int | None = None  # the anchor being distilled from (it is in the teacher)

    # The anchor is state outside parameters: a job resumed inside a stage must distil from that stage's anchor,
    # not from the final teacher it was built with.
    def extra_state(self):
        return {**super().extra_state(), "anchor_epoch": self.anchor_epoch}

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.anchor_epoch = state["anchor_epoch"]

    def resumed(self, ctx):
        if self.anchor_epoch is not None:
            ctx.teacher.load_state_dict(ctx.route.load(self.anchor_epoch))

    def start_epoch(self, epoch, epochs, ctx):
        p = self.params
        n = p["anchors"]
        bounds = stage_bounds(epochs, p["split"] or [1] * n)
        # Stages that start now; an empty stage (fewer epochs than stages) is skipped but recorded.
        for i in (i for i in range(n) if bounds[i] == epoch):
            if bounds[i + 1] == bounds[i]:
                self.record[f"stage{i + 1}"] = "empty: 0 epochs"
                continue
            route = ctx.route
            if route is None or not route.epochs:
                raise KdbenchError("rco: the teacher has no route checkpoints (it was loaded, not trained by "
                                   "kdbench); RCO needs a teacher trained with `route_every`")
            anchor = self.choose(i, route, ctx)
            ctx.teacher.load_state_dict(route.load(anchor))
            self.anchor_epoch = anchor
            self.record[f"stage{i + 1}"] = f"anchor epoch {anchor} of {route.epochs[-1]}, " \
                                           f"student epochs {bounds[i] + 1}-{bounds[i + 1]}"
            self.record[f"stage{i + 1}.anchor_epoch"] = str(anchor)

    def choose(self, stage: int, route, ctx) -> int:
        n = self.params["anchors"]
        if self.params["choice"] == "equal":
            return equal_interval_anchors(route.epochs, n)[stage]
        later = [e for e in route.epochs if self.anchor_epoch is None or e > self.anchor_epoch]
        if stage == n - 1 or not later:
            return route.epochs[-1]
        losses = self.probe_losses(later, route, ctx)
        under = [e for e in later if losses[e] <= self.params["gss_threshold"]]
        chosen = under[-1] if under else later[0]
        self.record[f"stage{stage + 1}.gss_losses"] = ", ".join(f"{e}:{losses[e]:.4g}" for e in later)
        return chosen

    @torch.no_grad()
    def probe_losses(self, candidates: list[int], route, ctx) -> dict[int, float]:
        """The current student's KD loss against each candidate checkpoint, on the probe images (one sync each)."""
        images, _ = ctx.probe(self.params["probe_size"])
        was_training = ctx.student.training
        ctx.student.eval()
        with ctx.autocast():
            student_logits = run_model(ctx.student, images, None).logits
        ctx.student.train(was_training)
        ctx.passes.student_forward += 1
        out = {}
        for e in candidates:
            ctx.teacher.load_state_dict(route.load(e))
            with ctx.autocast():
                teacher_logits = run_model(ctx.teacher, images, None).logits
            ctx.passes.teacher_forward += 1
            out[e] = kd_loss(student_logits, teacher_logits, self.params["T"]).item()
        return out

    def losses(self, batch, student, teacher):
        p = self.params
        return kd_terms(student.logits, teacher.logits, batch.labels, p["T"], p["ce_weight"], p["kd_weight"])
