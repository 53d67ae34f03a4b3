"""The few facts about the process group and sharded parameters that several layers ask about."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    """A process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` reduced over data-parallel ranks (itself in a single process); never in place."""
    if initialized():
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2, ``fully_shard``)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
