"""One job on several devices (data parallel): the process group, and what training does differently on it.

Every process holds the whole model and trains on its part of every batch (kdbench.data.shard). So that the
numbers are those of one device at the same global batch, whatever the number of devices:
- the gradients are averaged over the devices after every backward (a hook on each parameter: the mean of
  the devices' gradients, as DistributedDataParallel computes it, but at the parameters, so that it holds
  for whatever a method does: features by forward_intermediates, two models trained (ProKT), several
  backward passes before a step). With the devices' parts of a batch of equal size, as every full batch
  is (the global batch must split evenly), that is the gradient of the whole batch's mean loss;
- BatchNorm takes its batch statistics over the whole batch (all the devices' parts): `synchronise_batchnorm`
  (torch's SyncBatchNorm refuses CPU tensors; this one runs on any device and backend);
- the first device's weights are sent to the others before training starts, as DDP does;
- evaluation sums the devices' counts and losses, and each step's loss terms are averaged over the devices;
- a stop request (Ctrl-C, SIGTERM, a lost claim) on any device stops every device at the same step.
On one device (no group started) every function here leaves things as they are.

Collectives that carry numbers go over the default group (NCCL on GPUs, gloo on CPUs); stop requests and the
first device's instructions go over a second, gloo group on the host, so asking never waits for a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from kdbench import KdbenchError
from kdbench.data.shard import Shard

# Between two jobs the other devices wait for the first one's next instruction, which can take as long as
# the first device's work outside training (waiting for a job another kdbench process holds): no real limit.
INSTRUCTION_TIMEOUT = timedelta(days=30)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # inside a job: every device does the same work between collectives


@dataclass(frozen=True)
class DeviceGroup:
    """This process's place in the data-parallel job: `rank` of `world` processes, `local_rank` on its machine."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def leads(self) -> bool:
        """The first process is the one that writes (MLflow, the model store, checkpoints)."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)


_GROUP: DeviceGroup | None = None
_CONTROL: Any = None  # the gloo group for stop requests and instructions


def current() -> DeviceGroup | None:
    """This process's data-parallel group; None when it trains alone (the usual case)."""
    return _GROUP


def launched_world() -> int:
    """How many processes a launcher (torchrun, a SLURM multi-task job) started for this job: WORLD_SIZE, else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise KdbenchError(f"WORLD_SIZE: expected a number of processes, got {os.environ['WORLD_SIZE']!r}") from None


def start(device_type: str) -> DeviceGroup:
    """Join the job's process group from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL for CUDA devices, gloo otherwise; CUDA processes take the GPU of their local rank."""
    global _GROUP, _CONTROL
    if _GROUP is not None:
        return _GROUP
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise KdbenchError(f"one job on several devices: the launcher's environment lacks {exc} (start it with "
                           f"`kdbench run --devices N` or torchrun)") from None
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    _CONTROL = dist.new_group(backend="gloo", timeout=INSTRUCTION_TIMEOUT)
    _GROUP = DeviceGroup(rank, world, local_rank, backend)
    return _GROUP


def stop() -> None:
    """Leave the process group (at the end of the command)."""
    global _GROUP, _CONTROL
    if _GROUP is not None and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = _CONTROL = None


# ---------------------------------------------------------------------------------------------------- host messages

def agreed(local: Callable[[], bool]) -> Callable[[], bool]:
    """A stop predicate every device answers alike: true on all as soon as `local` is true on any. Asked once per
    step by every device (the engine asks at the same points everywhere)."""
    if _GROUP is None:
        return local

    def ask() -> bool:
        flag = torch.tensor([int(bool(local()))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CONTROL)
        return bool(flag.item())

    return ask


def send(message: Any) -> None:
    """The first device's instruction to the others (picklable); they get it from `receive()`."""
    dist.broadcast_object_list([message], src=0, group=_CONTROL)


def receive() -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


# ---------------------------------------------------------------------------------------------------- the numbers

def _shared(split: Any) -> bool:
    """Whether each device holds only its part of `split`'s batches (kdbench.data.shard, kdbench.data.stream)."""
    return _GROUP is not None and getattr(split, "shard", None) is not None


def sum_over_devices(split: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` summed over the devices when each device read only its part of `split` (else as they are)."""
    if _shared(split):
        for t in tensors:
            dist.all_reduce(t)
    return tensors


def mean_over_devices(split: Any, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's loss terms averaged over the devices (one small collective, no host sync): the whole batch's mean
    where the devices' parts are of equal size. Summed so, every device logs, checks and saves the same totals, and
    an epoch resumed in its middle adds up to what an uninterrupted one does, bit for bit."""
    if not _shared(split) or not terms:
        return terms
    names = sorted(terms)
    stacked = torch.stack([terms[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    stacked /= _GROUP.world
    return {k: stacked[i] for i, k in enumerate(names)}


def average_gradients(parameters: list[nn.Parameter]) -> list[Any]:
    """After every backward, each parameter's gradient becomes the mean of the devices' (hooks; their handles)."""
    world = _GROUP.world

    def average(p: torch.Tensor) -> None:
        p.grad.div_(world)
        dist.all_reduce(p.grad)

    unique = {id(p): p for p in parameters if p.requires_grad}
    return [p.register_post_accumulate_grad_hook(average) for p in unique.values()]


def average_term_gradients(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients a caller computed itself (torch.autograd.grad: PCGrad's per-term gradients), averaged over the
    devices (on one device: unchanged)."""
    if _GROUP is None:
        return grads
    for g in grads:
        if g is not None:
            g.div_(_GROUP.world)
            dist.all_reduce(g)
    return grads


def broadcast_weights(modules: list[nn.Module]) -> None:
    """The first device's parameters and buffers, copied to every other device."""
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            with torch.no_grad():
                dist.broadcast(tensor.data, src=0)


def states_differ(modules: dict[str, nn.Module]) -> list[str]:
    """The tensors (parameters, buffers) whose values are not the same on every device: each tensor's float64 sum,
    its smallest and largest over the devices compared. Every device applies the same averaged update to the same
    weights, so they agree bit for bit unless something (a method's own state) was drawn from one device's images."""
    names, sums = [], []
    for owner, module in modules.items():
        for name, tensor in module.state_dict().items():
            if torch.is_tensor(tensor) and tensor.numel() and not tensor.is_complex():
                names.append(f"{owner}.{name}")
                sums.append(torch.nan_to_num(tensor.detach().double().sum(), nan=0.0))
    if not sums:
        return []
    high = torch.stack(sums)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return [name for name, differs in zip(names, (high != low).tolist()) if differs]


# ---------------------------------------------------------------------------------------------------- BatchNorm

class _SumOverDevices(torch.autograd.Function):
    """A sum over the devices that autograd goes through: the gradient of each device's input is the sum of the
    devices' output gradients (each device's loss depends on every device's part of the statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _batch_norm_over_devices(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with the statistics of the whole batch: mean, then the centred sum of squares,
    each summed over the devices (two small collectives, differentiable), in float32 at least."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16 autocast: statistics in float32
    count = x32.new_tensor([x32.numel() / x32.shape[1]])
    sums = _SumOverDevices.apply(torch.cat([x32.sum(dims), count]))
    n = sums[-1]
    mean = sums[:-1] / n
    centred = x32 - mean.view(shape)
    var = _SumOverDevices.apply((centred * centred).sum(dims)) / n
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * n / (n - 1).clamp_min(1)  # no host sync: n stays on the device
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training or _GROUP is None:  # running statistics, or alone: torch's own BatchNorm
        return self._local_forward(x)
    return self._after(_batch_norm_over_devices(self, x))


def _synced(base: type) -> type:
    return type(f"WholeBatch{base.__name__}", (base,), {
        "forward": _forward, "_local_forward": base.forward, "_after": lambda self, y: y,
        "__module__": __name__, "__doc__": f"{base.__name__} with statistics over every device's part of the batch"})


WholeBatchBatchNorm1d = _synced(nn.BatchNorm1d)
WholeBatchBatchNorm2d = _synced(nn.BatchNorm2d)
WholeBatchBatchNorm3d = _synced(nn.BatchNorm3d)
_SYNCED = {nn.BatchNorm1d: WholeBatchBatchNorm1d, nn.BatchNorm2d: WholeBatchBatchNorm2d,
           nn.BatchNorm3d: WholeBatchBatchNorm3d}
try:  # timm's BatchNorm with its activation (EfficientNets, MobileNets): normalise, then its dropout and activation
    from timm.layers import BatchNormAct2d

    WholeBatchBatchNormAct2d = _synced(BatchNormAct2d)
    WholeBatchBatchNormAct2d._after = lambda self, y: self.act(self.drop(y))
    _SYNCED[BatchNormAct2d] = WholeBatchBatchNormAct2d
except ImportError:  # pragma: no cover - timm always has it
    pass


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` takes its training statistics over the whole batch (every device's part). The
    layers keep their objects, parameters and state_dict keys (their class is swapped), so what refers to them
    (a method's hooks) still does. A BatchNorm subclass of unknown behaviour is refused, not approximated."""
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or type(layer) in _SYNCED.values():
            continue
        synced = _SYNCED.get(type(layer))
        if synced is None:
            raise KdbenchError(f"one job on several devices: {type(layer).__name__} at '{name}' is a BatchNorm "
                               f"kdbench cannot share among devices; train this model on one device")
        layer.__class__ = synced
    return module
