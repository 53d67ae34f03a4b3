"""The few facts about the process group and sharded parameters that several layers ask about."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    """A process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


#: The process group of the data-parallel replicas when it is not the whole world (a device mesh
#: with a tensor-parallel dimension: the ranks of one tensor-parallel group hold the same rows).
_DATA_PARALLEL_GROUP = None


def tensor_parallel_size(mesh) -> int:
    """The size of ``mesh``'s ``tensor_parallel`` dimension (ModelParallelStrategy's); 1 without one."""
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1


def use_device_mesh(mesh) -> None:
    """Take the ``data_parallel`` dimension of ``mesh`` (ModelParallelStrategy's) as the group
    :func:`all_reduce` sums over; ``None``, or a mesh without tensor parallelism: the world."""
    global _DATA_PARALLEL_GROUP
    _DATA_PARALLEL_GROUP = mesh["data_parallel"].get_group() if tensor_parallel_size(mesh) > 1 else None


def data_parallel(trainer) -> tuple[int, int]:
    """``(size, rank)`` of the data-parallel replicas: the world, or the ``data_parallel``
    dimension of the module's device mesh (tensor-parallel ranks share their replica's rows)."""
    if trainer is None:
        return 1, 0
    module = getattr(trainer, "lightning_module", None)
    mesh = getattr(module, "_device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel"].size(), mesh["data_parallel"].get_local_rank()
    return getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` reduced over data-parallel ranks (itself in a single process); never in place."""
    if initialized():
        value = value.clone()
        dist.all_reduce(value, op=op, group=_DATA_PARALLEL_GROUP)
    return value


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensor shards (FSDP2, ``fully_shard``)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
