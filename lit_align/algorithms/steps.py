"""The bookkeeping of one optimizer step, written once for every module.

Normalisation, stated once: every module writes a micro-batch's loss as its *share* of the
optimizer step's loss, the micro-batch's summed per-item loss divided by the item count of the
whole step (tokens or sequences over every micro-batch and data-parallel rank, counted before the
step starts). Summed over the step's micro-batches and ranks, the shares are the step's mean, so a
step's gradient does not depend on how its rows are split. Lightning divides an automatic
module's loss by ``accumulate_grad_batches`` and data parallelism averages gradients over ranks:
:func:`step_scale` multiplies both back.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from lit_align.distributed import data_parallel, full


def step_scale(trainer, automatic: bool) -> int:
    """What a loss share is multiplied by before backward: the number of data-parallel replicas
    (whose gradients are averaged; tensor-parallel ranks are not replicas), times the accumulation
    count that Lightning divides an automatic module's loss by (manual modules accumulate
    themselves). 1 without a trainer."""
    if trainer is None:
        return 1
    return data_parallel(trainer)[0] * (trainer.accumulate_grad_batches if automatic else 1)


def mini_batch_bounds(n: int, mini_batches: int) -> list[tuple[int, int]]:
    """``mini_batches`` contiguous ``[lo, hi)`` ranges of ``n`` rows, as equal as possible."""
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float | None, model: torch.nn.Module | None = None
                   ) -> torch.Tensor:
    """Clip the gradients of ``optimizer``'s parameters to a global norm of ``max_norm`` (``None``:
    no clipping) and return the norm *before* clipping, computed once for both.

    FSDP1 (``FullyShardedDataParallel``) computes the norm over its flat shards itself; FSDP2's
    DTensor gradients go through ``torch.nn.utils`` and the norm is the whole model's."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    limit = math.inf if max_norm is None else float(max_norm)
    if isinstance(model, FullyShardedDataParallel):
        return full(model.clip_grad_norm_(limit)).detach()
    params = params_of(optimizer)
    if not params:
        return torch.zeros(())
    norm = total_norm([p.grad for p in params])
    if max_norm is not None:
        for group in _by_mesh(params):  # one foreach kernel per mesh: DTensors of two meshes do not mix
            torch.nn.utils.clip_grads_with_norm_(group, limit, norm)
    return norm.detach()


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by DTensor device mesh (plain tensors in a group of their own)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values())


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of ``grads``, a plain tensor. DTensor gradients are reduced per device
    mesh and then combined: under FSDP2 with tensor parallelism the split layers' gradients live
    on the 2-D mesh and the rest on the data-parallel one, which one ``torch.stack`` cannot mix."""
    norms = [full(torch.nn.utils.get_total_norm(group)) for group in _by_mesh(grads)]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


class StepMetrics:
    """Reduces the metrics of a rollout's micro-batches to one value per name.

    Args:
        shares: names whose micro-batch values are shares of their step's value (the losses):
            summed, scaled by ``world`` (this rank's sum stands for all ranks') and averaged over
            the optimizer steps.
        mins, maxs: names reduced by min / max.
    Every other name is a mean over micro-batches.
    """

    def __init__(self, shares=(), mins=(), maxs=()):
        self.shares, self.mins, self.maxs = set(shares), set(mins), set(maxs)
        self.sums: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}
        self.per_step: dict[str, float] = defaultdict(float)
        self.count = self.steps = 0

    def add(self, metrics: dict) -> None:
        """One micro-batch's metrics (tensors or floats)."""
        self.count += 1
        for k, v in metrics.items():
            v = float(v)
            if k in self.mins:
                self.extremes[k] = min(self.extremes.get(k, math.inf), v)
            elif k in self.maxs:
                self.extremes[k] = max(self.extremes.get(k, -math.inf), v)
            else:
                self.sums[k] += v

    def add_step(self, metrics: dict) -> None:
        """One optimizer step's metrics (gradient norms): means over the steps."""
        self.steps += 1
        for k, v in metrics.items():
            self.per_step[k] += float(v)

    def result(self, world: int) -> dict[str, torch.Tensor]:
        steps = max(self.steps, 1)
        out = {k: torch.tensor(v * world / steps if k in self.shares else v / max(self.count, 1))
               for k, v in self.sums.items()}
        out.update({k: torch.tensor(v) for k, v in self.extremes.items()})
        out.update({k: torch.tensor(v / steps) for k, v in self.per_step.items()})
        return out
