"""ProKT (Shi, Song, Zhou, Li, Li, "Follow Your Path", ECML-PKDD 2021): teacher and student trained
together; at every step the teacher takes one step toward the labels while staying close to the
student (a local target the student can reach), then the student follows the updated teacher.

Per batch, with separate optimisers (temperature 1, gradient norms clipped at `clip_grad_norm`):
1. teacher step: student in eval mode, its logits detached; teacher in train mode;
   L_T = (1 - lambda) CE(y, z_t) + lambda KL(p_s || p_t)   (dual: CE + beta (KL - eps), then
   beta <- max(0, beta + eta (KL - eps)), the projected dual ascent of the authors' code);
2. student step: the *updated* teacher in eval mode, its logits detached; student in train mode;
   L_S = KL(p_t' || p_s), no cross-entropy.
The teacher starts from random initialisation (default) or from a stored checkpoint of the suite's
teacher (`teacher_init: checkpoint`, `teacher_epoch`: a route epoch, 0 for the converged teacher).
The paper's image protocol could not be read: results are labelled "protocol assumed".
"""

import torch

from kdbench.losses import cross_entropy, kl_div
from kdbench.method import Method, Needs, check_ranges


class ProKT(Method):
    name = "prokt"
    summary = "teacher trained with the student: teacher step (CE + lambda KL(s||t)), then student step KL(t'||s)"
    defaults = {"lambda": 0.3, "clip_grad_norm": 1.0, "teacher_init": "random", "teacher_epoch": 0, "dual": False,
                "eps": 1.0, "eta": 0.001, "beta0": 1.0, "zero_init_heads": False}
    trains_teacher = True
    teacher_epoch_params = ("teacher_epoch",)  # a route epoch of the teacher's run: --epochs scales it
    protocol_note = "protocol assumed"
    combinable = False  # its own step(): the student update is one KL term, so PCGrad would change nothing

    @classmethod
    def needs(cls, params):
        return Needs(teacher=params["teacher_init"], teacher_epoch=params["teacher_epoch"])

    @classmethod
    def check_params(cls, params):
        if params["teacher_init"] not in ("random", "checkpoint"):
            return f"teacher_init must be 'random' or 'checkpoint', got {params['teacher_init']!r}"
        if not 0 <= params["lambda"] <= 1:
            return f"lambda must lie in [0, 1], got {params['lambda']}"
        if params["teacher_epoch"] < 0:
            return f"teacher_epoch must be a route epoch or 0 (the final teacher), got {params['teacher_epoch']}"
        return check_ranges(params, positive=("clip_grad_norm",), non_negative=("eps", "eta", "beta0"))

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        self.register_buffer("beta", torch.tensor(float(self.params["beta0"])))  # the dual variable
        if self.params["zero_init_heads"]:  # the authors' text code: fresh heads start at zero
            for model in (student, teacher) if self.params["teacher_init"] == "random" else (student,):
                for p in model.get_classifier().parameters():
                    torch.nn.init.zeros_(p)

    def step(self, batch, ctx):
        p = self.params
        x, y = batch.images, batch.labels
        # 1. Teacher step: the student's distribution is a fixed target.
        ctx.student.eval()
        with torch.no_grad(), ctx.autocast():
            z_s = ctx.student(x)
        ctx.student.train()
        with ctx.autocast():
            z_t = ctx.teacher(x)
        ctx.passes.student_forward += 1
        ctx.passes.teacher_forward += 1
        ce = cross_entropy(z_t, y)
        kl_st = kl_div(z_s, z_t)  # KL(p_s || p_t), gradient into the teacher only
        if p["dual"]:
            teacher_terms = {"teacher_ce": ce, "teacher_kl": self.beta * (kl_st - p["eps"])}
        else:
            teacher_terms = {"teacher_ce": (1 - p["lambda"]) * ce, "teacher_kl": p["lambda"] * kl_st}
        ctx.update("teacher", sum(teacher_terms.values()), clip_grad_norm=p["clip_grad_norm"])
        if p["dual"]:  # projected dual ascent, on the device (no sync)
            self.beta.copy_(torch.clamp(self.beta + p["eta"] * (kl_st.detach() - p["eps"]), min=0))
        # 2. Student step toward the updated teacher: its output is the local target.
        ctx.teacher.eval()
        with torch.no_grad(), ctx.autocast():
            z_t_new = ctx.teacher(x)
        ctx.teacher.train()
        with ctx.autocast():
            z_s_new = ctx.student(x)
        ctx.passes.teacher_forward += 1
        ctx.passes.student_forward += 1
        student_kl = kl_div(z_t_new, z_s_new)  # KL(p_t' || p_s), no cross-entropy
        ctx.update("student", student_kl, clip_grad_norm=p["clip_grad_norm"])
        return {**{k: v.detach() for k, v in teacher_terms.items()}, "student_kl": student_kl.detach()}
