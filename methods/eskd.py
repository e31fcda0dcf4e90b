"""Early-stopped teacher (Cho & Hariharan ICCV 2019, "On the efficacy of knowledge distillation").

Larger, more accurate teachers often teach worse; a teacher whose training was stopped early teaches better.
Two knobs, each a parameter:
- the teacher is one of the stored teacher's route checkpoints (the model store keeps them every
  `teacher.route_every` epochs; the teacher is never retrained): `teacher_epoch: E` names a route epoch, or,
  with `teacher_epoch: 0` (default), `teacher_fraction: f` takes the route checkpoint nearest to f of the
  teacher's run (ties: the earlier). f = 1 is the converged teacher, i.e. plain KD.
- `kd_until: u`: the KD term is used for the first floor(u x epochs) epochs of the student's run, then the
  student trains with cross-entropy alone (weight 1) and the teacher is not run at all (no forward counted).
  u = 1 (default) keeps KD to the end.
The loss while KD is on is the KD loss of section 1: ce_weight CE + kd_weight T^2 KL(p_t^T || p_s^T), batchmean.
Assumed (the paper's CIFAR schedule could not be read): teacher_fraction 0.5 (for the CRD protocol's 240 teacher
epochs, route epoch 120: before the first learning-rate decay) and kd_until 1; runs say "protocol assumed".
The chosen checkpoint and the KD cut-off are recorded (`procedure.teacher_epoch`, `procedure.kd_epochs`).
"""

import math

from kdbench import KdbenchError
from kdbench.losses import cross_entropy, kd_terms
from kdbench.method import Method


def nearest_route_epoch(route_epochs: list[int], fraction: float) -> int:
    """The route checkpoint nearest to `fraction` of the teacher's run (ties: the earlier one)."""
    target = route_epochs[-1] * fraction
    return min(route_epochs, key=lambda e: (abs(e - target), e))


def kd_epochs(epochs: int, kd_until: float) -> int:
    """How many of the student's first epochs keep the KD term."""
    return math.floor(epochs * kd_until + 1e-9)


class ESKD(Method):
    name = "eskd"
    summary = "KD from an early route checkpoint of the teacher; optionally CE only after kd_until of the epochs"
    defaults = {"teacher_fraction": 0.5, "teacher_epoch": 0, "kd_until": 1.0, "T": 4.0, "ce_weight": 0.1,
                "kd_weight": 0.9}
    needs_route = True
    protocol_note = "protocol assumed"

    @classmethod
    def check_params(cls, params):
        if not 0 < params["teacher_fraction"] <= 1:
            return f"teacher_fraction must lie in (0, 1], got {params['teacher_fraction']}"
        if params["teacher_epoch"] < 0:
            return f"teacher_epoch must be a route epoch, or 0 to use teacher_fraction, got {params['teacher_epoch']}"
        if not 0 <= params["kd_until"] <= 1:
            return f"kd_until must lie in [0, 1], got {params['kd_until']}"
        return None

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        self.loaded_epoch: int | None = None  # the route epoch the teacher holds (loaded again after a resume)

    def start_epoch(self, epoch, epochs, ctx):
        self.record["kd_epochs"] = str(kd_epochs(epochs, self.params["kd_until"]))
        self.hold_early_teacher(ctx)

    def resumed(self, ctx):
        self.hold_early_teacher(ctx)

    def hold_early_teacher(self, ctx) -> None:
        """Load the chosen route checkpoint into the teacher, once per run (again in a resumed process)."""
        if self.loaded_epoch is not None:
            return
        p, route = self.params, ctx.route
        if route is None or not route.epochs:
            raise KdbenchError("eskd: the teacher has no route checkpoints (it was loaded, not trained by kdbench); "
                               "an early-stopped teacher needs a teacher trained with `route_every`")
        chosen = p["teacher_epoch"] or nearest_route_epoch(route.epochs, p["teacher_fraction"])
        if chosen not in route.epochs:
            raise KdbenchError(f"eskd: teacher_epoch {chosen}: the stored teacher has route checkpoints at epochs "
                               f"{route.epochs}")
        ctx.teacher.load_state_dict(route.load(chosen))
        self.loaded_epoch = chosen
        self.record["teacher_epoch"] = str(chosen)
        self.record["teacher_route"] = f"route epoch {chosen} of {route.epochs[-1]}"

    def step(self, batch, ctx):
        # Decided from the batch alone (no state): a run resumed in the middle of an epoch decides the same way.
        if batch.epoch < kd_epochs(batch.epochs, self.params["kd_until"]):
            self.hold_early_teacher(ctx)
            return super().step(batch, ctx)
        with ctx.autocast():  # KD switched off: the student alone, the teacher not run
            logits = ctx.student(batch.images)
        ctx.passes.student_forward += 1
        ce = cross_entropy(logits, batch.labels)
        ctx.update("student", ce)
        return {"ce": ce.detach(), "kd": ce.detach() * 0}

    def losses(self, batch, student, teacher):
        p = self.params
        return kd_terms(student.logits, teacher.logits, batch.labels, p["T"], p["ce_weight"], p["kd_weight"])
