"""DFA, differentiable feature aggregation (Guan et al. ECCV 2020): a searched mix of teacher layers as hints.

For each of the last `stages` stages of the student (paired with the teacher's last `stages` stages, in
order), the hint is a softmax-weighted sum of the candidate layers of the matching teacher stage: the
outputs of its blocks (a CIFAR ResNet's layer2.0, layer2.1, ...; WRN's blockN.layer.i), those shaped like
the stage's output; a stage without several blocks (an MLP layer, a VGG stage) is its own single
candidate (then nothing is searched: FitNets on several stages). The FitNets regressor (the CRD benchmark's,
`kdbench.features.make_regressor`, which FitNets uses too) maps the student stage onto it.
  L = ce_weight CE + hint_weight * mean over stages of MSE(r_m(S_m), sum_i softmax(alpha_m)_i T_{m,i})
Search (DARTS-style, bilevel), during the first ceil(search_fraction x epochs) epochs: at every step the
aggregation weights alpha take one Adam step (DARTS's architecture optimiser: betas 0.5/0.999, weight decay
`alpha_weight_decay`) on the student's cross-entropy on a validation batch after a virtual SGD step of the
student (lr `xi`) on the training loss, the exact hypergradient of that one-step unrolled objective (a
double backward; DARTS's second-order approximation without its finite differences); then the student and
the regressors take their ordinary step on the training batch with alpha fixed. Afterwards alpha is
frozen and the student trains on with the same loss (the search epochs count in the student's epochs, so
the budget is every other method's). alpha never gets a gradient from the training loss.
Validation batches come from `ctx.probe(probe_size)`: the first `probe_size` images of the validation split
(`data.val_size`, held out of the training images), cycled in batches of the training batch size, not
augmented. A suite with a search (`search_fraction > 0`) must declare `data.val_size`.
No official code was found: candidate layers, search length (assumed 5% of the epochs: 12 of 240), loss
weight (assumed 100, FitNets' CRD weight, on the mean over stages), xi (assumed 0.05, the CRD learning
rate) and alpha's learning rate (3e-4, DARTS's) are parameters; runs are labelled "protocol assumed".
Recorded: each stage's candidates (`procedure.stage<m>`) and its weights (`procedure.stage<m>.weights`, at
the start of each epoch while searching, then the frozen ones).
Cost per search step: T 1 fwd; S 3 fwd (virtual step, validation, update) and 3 bwd (the virtual step's
gradient, the hypergradient's double backward, the update); afterwards as FitNets (T 1 fwd; S 1 fwd, 1 bwd).
"""

import math

import torch
from torch import nn
from torch.func import functional_call

from kdbench.features import feature_shapes, make_regressor
from kdbench.losses import cross_entropy, hint_mse
from kdbench.method import Method, Needs, Outputs, run_model


def stage_candidates(model: nn.Module, stage: str) -> list[str]:
    """Module names of a stage's blocks (children with children of their own), looking through wrappers with a
    single child (WRN's NetworkBlock -> layer); [stage] when it has fewer than two blocks."""
    name, module = stage, model.get_submodule(stage)
    while len(children := list(module.named_children())) == 1 and list(children[0][1].children()):
        name, module = f"{name}.{children[0][0]}", children[0][1]
    blocks = [f"{name}.{c}" for c, m in module.named_children() if list(m.children())]
    return blocks if len(blocks) >= 2 else [stage]


def search_epochs(epochs: int, fraction: float) -> int:
    return min(epochs, math.ceil(epochs * fraction - 1e-9))


class DFA(Method):
    name = "dfa"
    summary = "hints = softmax-weighted teacher blocks per stage, weights searched on validation (DARTS), then frozen"
    defaults = {"stages": 3, "hint_weight": 100.0, "ce_weight": 1.0, "search_fraction": 0.05, "xi": 0.05,
                "alpha_lr": 3e-4, "alpha_weight_decay": 1e-3, "probe_size": 5000}
    protocol_note = "protocol assumed"

    @classmethod
    def needs(cls, params):
        return Needs(choice="search_fraction > 0 (its aggregation search)" if params["search_fraction"] > 0 else "")

    @classmethod
    def check_params(cls, params):
        if params["stages"] < 1:
            return f"stages must be at least 1, got {params['stages']}"
        if not 0 <= params["search_fraction"] <= 1:
            return f"search_fraction must lie in [0, 1], got {params['search_fraction']}"
        if params["probe_size"] < 1:
            return f"probe_size must be at least 1, got {params['probe_size']}"
        return None

    def __init__(self, params, student, teacher, input_shape):
        super().__init__(params, student, teacher, input_shape)
        k = min(self.params["stages"], len(student.feature_info), len(teacher.feature_info))
        s_stages = list(range(len(student.feature_info) - k, len(student.feature_info)))
        t_stages = list(range(len(teacher.feature_info) - k, len(teacher.feature_info)))
        self.student_features = s_stages
        t_names = [n for t in t_stages for n in stage_candidates(teacher, teacher.feature_info[t]["module"])]
        t_shapes = dict(zip(t_names, feature_shapes(teacher, t_names, input_shape)))
        s_shapes = feature_shapes(student, s_stages, input_shape)
        self.candidates: list[list[str]] = []
        for m, t in enumerate(t_stages):
            names = stage_candidates(teacher, teacher.feature_info[t]["module"])
            names = [n for n in names if t_shapes[n] == t_shapes[names[-1]]]  # shaped like the stage's output
            self.candidates.append(names)
            self.record[f"stage{m + 1}"] = (f"student {student.feature_info[s_stages[m]]['module']} "
                                            f"<- teacher {', '.join(names)}")
        self.teacher_features = [n for names in self.candidates for n in names]
        self.regressors = nn.ModuleList(make_regressor(s_shapes[m], t_shapes[names[-1]])
                                        for m, names in enumerate(self.candidates))
        self.alpha = nn.ParameterList(nn.Parameter(torch.zeros(len(names))) for names in self.candidates)
        # Adam's moments for alpha, as buffers: they travel in the method's state_dict (checkpoints, resume)
        for m, names in enumerate(self.candidates):
            self.register_buffer(f"alpha_avg{m}", torch.zeros(len(names)))
            self.register_buffer(f"alpha_sq{m}", torch.zeros(len(names)))
        self.register_buffer("alpha_steps", torch.zeros(()))
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None  # the probe images, fetched once per process
        self.searchable = any(len(names) > 1 for names in self.candidates)  # one candidate per stage: nothing to mix

    @torch.no_grad()
    def alpha_step(self, grads: list[torch.Tensor]) -> None:
        """DARTS's architecture optimiser: Adam, betas (0.5, 0.999), L2 weight decay (torch.optim.Adam's rule)."""
        b1, b2, lr, wd = 0.5, 0.999, self.params["alpha_lr"], self.params["alpha_weight_decay"]
        self.alpha_steps += 1
        for m, (a, g) in enumerate(zip(self.alpha, grads)):
            g = g + wd * a
            avg, sq = getattr(self, f"alpha_avg{m}"), getattr(self, f"alpha_sq{m}")
            avg.mul_(b1).add_(g, alpha=1 - b1)
            sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            a.sub_(lr * (avg / (1 - b1 ** self.alpha_steps)) / ((sq / (1 - b2 ** self.alpha_steps)).sqrt() + 1e-8))

    def weights(self, detach: bool = True) -> list[torch.Tensor]:
        return [torch.softmax(a.detach() if detach else a, 0) for a in self.alpha]

    def grouped(self, features: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        out, i = [], 0
        for names in self.candidates:
            out.append(features[i:i + len(names)])
            i += len(names)
        return out

    def terms(self, labels, student: Outputs, teacher_groups, weights) -> dict[str, torch.Tensor]:
        p = self.params
        hints = [sum(w * f.float() for w, f in zip(ws, group)) for ws, group in zip(weights, teacher_groups)]
        mses = [hint_mse(r(s), h) for r, s, h in zip(self.regressors, student.features, hints)]
        return {"ce": p["ce_weight"] * cross_entropy(student.logits, labels),
                "hint": p["hint_weight"] * sum(mses) / len(mses)}

    def losses(self, batch, student, teacher):
        return self.terms(batch.labels, student, self.grouped(teacher.features), self.weights())

    def start_epoch(self, epoch, epochs, ctx):
        searched = search_epochs(epochs, self.params["search_fraction"])
        if not self.searchable:
            self.record["search"] = "none: one candidate layer per teacher stage"
            return
        state = "searching" if epoch < searched else f"frozen after epoch {searched}"
        for m, (names, w) in enumerate(zip(self.candidates, self.weights())):  # one small sync per epoch
            self.record[f"stage{m + 1}.weights"] = ", ".join(f"{n}:{v:.4f}" for n, v in zip(names, w.tolist()))
        self.record["search"] = f"{searched} of {epochs} epochs; {state}"

    def validation_batch(self, batch, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        if self._val is None:
            self._val = ctx.probe(self.params["probe_size"])
        images, labels = self._val
        size = batch.images.shape[0]
        start = (batch.step * size) % len(images)
        return images[start:start + size], labels[start:start + size]

    def search_step(self, batch, teacher_groups, ctx) -> None:
        """One Adam step of alpha on the validation CE after a virtual SGD step of the student (exact hypergradient)."""
        student, xi = ctx.student, self.params["xi"]
        names, params = zip(*student.named_parameters())
        buffers = {n: b.clone() for n, b in student.named_buffers()}  # the virtual step leaves BatchNorm stats alone
        with ctx.autocast():
            train_terms = self.terms(batch.labels, run_model(student, batch.images, self.student_features),
                                     teacher_groups, self.weights(detach=False))
        grads = torch.autograd.grad(sum(train_terms.values()), params, create_graph=True, allow_unused=True)
        virtual = {n: p if g is None else p - xi * g for n, p, g in zip(names, params, grads)}
        images, labels = self.validation_batch(batch, ctx)
        with ctx.autocast():
            logits = functional_call(student, {**virtual, **{n: b.clone() for n, b in buffers.items()}}, (images,))
        hypergrads = torch.autograd.grad(cross_entropy(logits, labels), list(self.alpha), allow_unused=True)
        with torch.no_grad():  # only now: the graph above saved these statistics
            for n, b in student.named_buffers():
                b.copy_(buffers[n])
        self.alpha_step([torch.zeros_like(a) if g is None else g for a, g in zip(self.alpha, hypergrads)])
        ctx.passes.student_forward += 2
        ctx.passes.student_backward += 2

    def step(self, batch, ctx):
        with ctx.autocast(), torch.no_grad():
            teacher_groups = self.grouped(run_model(ctx.teacher, batch.images, self.teacher_features).features)
        ctx.passes.teacher_forward += 1
        if self.searchable and batch.epoch < search_epochs(batch.epochs, self.params["search_fraction"]):
            self.search_step(batch, teacher_groups, ctx)
        with ctx.autocast():
            student_out = run_model(ctx.student, batch.images, self.student_features)
            terms = self.terms(batch.labels, student_out, teacher_groups, self.weights())
        ctx.passes.student_forward += 1
        ctx.update("student", sum(terms.values()))
        return {k: v.detach() for k, v in terms.items()}
