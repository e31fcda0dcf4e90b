"""How a method's named loss terms become the student's update: summed (the default), or PCGrad.

PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), across the loss terms of one method:
each term's gradient g_i on the parameters shared by two or more terms; for each term i, for every other
term j in a random order with g_i . g_j < 0, g_i <- g_i - (g_i . g_j / |g_j|^2) g_j (the original g_j);
the update is the sum of the projected gradients, and a parameter reached by one term only keeps that
term's gradient. A suite chooses it per method entry (`combine: pcgrad`); the engine applies it to every
student update that arrives as named terms, so any loss-only method (and any plugin) gets it unchanged.
"""

from __future__ import annotations

import torch

from kdbench.seeding import stream_seed
from kdbench.train.parallel import average_term_gradients

COMBINES = ("sum", "pcgrad")


def pcgrad(grads_by_term: dict[str, list[torch.Tensor | None]], generator: torch.Generator
           ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The PCGrad combination, per parameter, and the Gram matrix of the terms' gradients on the shared parameters.

    grads_by_term: term -> its gradient on each parameter (None where the term does not reach it), the
    parameters in the same order for every term. The random order of the other terms is drawn, for each term,
    from `generator` (a CPU generator: no device sync). Each projected g_i stays in the span of the original
    gradients, g_i = sum_k A[i, k] g_k, so the sequential projections need only the n x n Gram matrix
    (float64); the test g_i . g_j < 0 is a torch.where on the device, never a host sync.
    """
    rows = list(grads_by_term.values())
    n, n_params = len(rows), len(rows[0])
    reached = [[row[p] is not None for row in rows] for p in range(n_params)]
    shared = [p for p in range(n_params) if sum(reached[p]) >= 2]
    some = next((g for row in rows for g in row if g is not None), None)
    if some is None:  # no term reaches any parameter
        return [None] * n_params, torch.zeros(n, n, dtype=torch.float64)
    device = some.device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    if shared:
        flat = torch.stack([torch.cat([(row[p] if row[p] is not None else torch.zeros_like(
            next(r[p] for r in rows if r[p] is not None))).reshape(-1).double() for p in shared]) for row in rows])
        gram = flat @ flat.T
    coef = torch.eye(n, dtype=torch.float64, device=device)  # row i: projected g_i in the basis of the original g_k
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            dot = coef[i] @ gram[:, j]  # (projected g_i) . g_j
            coef[i, j] -= torch.where(dot < 0, dot / gram[j, j].clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    weights = coef.sum(0).float()  # the sum of the projected gradients = sum_k weights[k] g_k
    combined: list[torch.Tensor | None] = []
    for p in range(n_params):
        present = [(k, row[p]) for k, row in enumerate(rows) if row[p] is not None]
        if not present:
            combined.append(None)
        elif len(present) == 1:  # one term only: its gradient, untouched
            combined.append(present[0][1])
        else:
            combined.append(sum(weights[k] * g for k, g in present))
    return combined, gram


class PCGrad:
    """The engine's side of `combine: pcgrad`: one backward per term, `pcgrad()`, the result set as the
    parameters' gradients; per epoch, the fraction of term pairs in conflict and their cosines.

    Statistics are summed on the device (no per-step host sync) and read once per epoch. The random order
    of a step comes from a generator seeded by (seed, epoch, step), so a resumed run draws the same orders.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.sums: dict[str, torch.Tensor] = {}  # metric name -> sum over the epoch's updates (device)
        self.counts: dict[str, int] = {}  # metric name -> number of values summed

    def backward(self, terms: dict[str, torch.Tensor], params: list[torch.nn.Parameter], epoch: int,
                 step: int) -> int:
        """Set `params`' .grad to the PCGrad combination of the terms' gradients; returns the backward passes made."""
        # A term that cannot reach any parameter (a constant, a zero weight folded away) has no gradient: skip it.
        live = {k: v for k, v in terms.items() if v.requires_grad}
        grads: dict[str, list[torch.Tensor | None]] = {}
        for index, (name, term) in enumerate(live.items()):
            got = torch.autograd.grad(term, params, retain_graph=index < len(live) - 1, allow_unused=True)
            # cloned: under a compiled step replayed as CUDA graphs, the next term's backward may reuse this memory
            grads[name] = average_term_gradients([g.clone() if g is not None else None for g in got])
        if not grads:
            return 0
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "pcgrad", epoch, step))
        combined, gram = pcgrad(grads, generator)
        for p, g in zip(params, combined):
            p.grad = g
        self._count(list(grads), gram)
        return len(grads)

    def _count(self, names: list[str], gram: torch.Tensor) -> None:
        pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
        if not pairs:
            return
        dots = torch.stack([gram[a, b] for a, b in pairs])  # scalar indexing: views, no host round trip
        norms = torch.stack([gram[a, a] * gram[b, b] for a, b in pairs]).clamp_min(0).sqrt()
        # a term with a zero gradient on the shared parameters: cosine 0, never a conflict
        cos = torch.where(norms > 0, dots / norms.clamp_min(1e-300), 0.0)
        self._add("pcgrad_conflict", (dots < 0).double().sum(), len(pairs))
        self._add("pcgrad_cosine", cos.sum(), len(pairs))
        for (a, b), c in zip(pairs, cos):
            self._add(f"pcgrad_cosine.{names[a]}.{names[b]}", c, 1)

    def _add(self, key: str, value: torch.Tensor, count: int) -> None:
        self.sums[key] = self.sums.get(key, 0) + value
        self.counts[key] = self.counts.get(key, 0) + count

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's means (one host read), and a fresh start for the next epoch."""
        out = {k: (v / self.counts[k]).item() for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
