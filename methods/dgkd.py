"""DGKD, densely guided KD (Son et al. ICCV 2021): the student learns from the teacher and every assistant at once.

Guides: the frozen teacher and the assistants between it and the student (largest first). Loss per step:
ce_weight CE + kd_weight sum over the kept guides g of T^2 KL(p_g^T || p_s^T) (batchmean, the sum of their KD
losses as in the paper and the authors' code). Stochastic DGKD: at each step each guide is dropped with
probability `drop_rate`, drawn from a seeded stream (kdbench.seeding: the job's seed, the epoch and the step,
so a resumed run draws the same masks); at least one guide is always kept (when every guide is drawn as
dropped, one is kept, chosen from the same stream). `drop_num: k > 0` instead drops exactly k guides per
step, chosen uniformly (the authors' code: `--drop-num`, default 1), never all. Dropped guides are not run.
Assistants: `assistants: between` (default) takes the suite's models between teacher and student in size,
largest first, at most `max_assistants` spread evenly over them (0: all of them); or a model name or a list of
names (a chain, teacher side first), as TAKD. Each assistant is itself trained by DGKD, densely guided by every
model above it in the chain (the paper's scheme), stored like a teacher and reused by every cell with the
same teacher and chain. With no assistant the student learns from the teacher alone (KD; recorded).
Assumed (the paper's CIFAR values could not be read): drop_rate 0.5, max_assistants 2, and KD's CRD weights
T 4, ce_weight 0.1, kd_weight 0.9 (the authors' code: T 5, lambda 1, an elementwise-mean KL and exactly one
guide dropped per step); runs say "protocol assumed".
Cost: one forward of every kept guide per step, counted as teacher forwards (`teacher_forward`).
"""

import torch

from kdbench.losses import cross_entropy, kd_loss
from kdbench.method import BETWEEN, Method, Needs, run_model
from kdbench.seeding import stream_seed


def kept_guides(n: int, drop_rate: float, drop_num: int, seed: int, epoch: int, step: int) -> list[int]:
    """Indices of the guides kept at this step (at least one), drawn from the seeded stream of (seed, epoch, step)."""
    gen = torch.Generator().manual_seed(stream_seed(seed, "guide_drop", epoch, step))
    if drop_num > 0:
        dropped = set(torch.randperm(n, generator=gen)[:min(drop_num, n - 1)].tolist())
        return [i for i in range(n) if i not in dropped]
    keep = (torch.rand(n, generator=gen) >= drop_rate).tolist()
    if not any(keep):
        keep[int(torch.randint(n, (1,), generator=gen))] = True
    return [i for i, k in enumerate(keep) if k]


class DGKD(Method):
    name = "dgkd"
    summary = "densely guided KD: teacher + every assistant at once, guides dropped at random (seeded), >= 1 kept"
    defaults = {"assistants": BETWEEN, "max_assistants": 2, "drop_rate": 0.5, "drop_num": 0, "T": 4.0,
                "ce_weight": 0.1, "kd_weight": 0.9}
    param_types = {"assistants": (str, list)}
    protocol_note = "protocol assumed"

    @classmethod
    def needs(cls, params):
        value = params["assistants"]
        chain = (value,) if isinstance(value, str) else tuple(value)
        return Needs(teacher="trained", assistants=chain, max_assistants=params["max_assistants"], dense=True)

    @classmethod
    def check_params(cls, params):
        from kdbench.zoo import known_models

        value = params["assistants"]
        chain = (value,) if isinstance(value, str) else tuple(value)
        if not chain or not all(isinstance(a, str) for a in chain):
            return f"assistants must be 'between', a model name or a list of model names, got {value!r}"
        if chain != (BETWEEN,):
            unknown = [a for a in chain if a not in known_models()]
            if unknown:
                return f"assistants: unknown model {unknown[0]!r} ('between' takes the suite's models between)"
        if params["max_assistants"] < 0:
            return f"max_assistants must be 0 (all) or more, got {params['max_assistants']}"
        if not 0 <= params["drop_rate"] < 1:
            return f"drop_rate must lie in [0, 1), got {params['drop_rate']}"
        if params["drop_num"] < 0:
            return f"drop_num must be 0 (use drop_rate) or more, got {params['drop_num']}"
        return None

    def guided_losses(self, labels: torch.Tensor, student_logits: torch.Tensor,
                      guide_logits: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """ce_weight CE + kd_weight * the sum of the KD losses from the kept guides."""
        p = self.params
        kd = sum(kd_loss(student_logits, g, p["T"]) for g in guide_logits)
        return {"ce": p["ce_weight"] * cross_entropy(student_logits, labels), "kd": p["kd_weight"] * kd}

    def losses(self, batch, student, teacher):  # one guide, nothing dropped: KD from the teacher
        return self.guided_losses(batch.labels, student.logits, [teacher.logits])

    def step(self, batch, ctx):
        p = self.params
        guides = ctx.guides or [ctx.teacher]
        kept = kept_guides(len(guides), p["drop_rate"], p["drop_num"], ctx.seed, batch.epoch, batch.step)
        with ctx.autocast():
            with torch.no_grad():  # frozen guides; the dropped ones are not run
                guide_logits = [run_model(guides[i], batch.images, None).logits for i in kept]
            ctx.passes.teacher_forward += len(kept)
            student_logits = run_model(ctx.student, batch.images, None).logits
            ctx.passes.student_forward += 1
            terms = self.guided_losses(batch.labels, student_logits, guide_logits)
        ctx.update("student", sum(terms.values()))
        return {k: v.detach() for k, v in terms.items()}
