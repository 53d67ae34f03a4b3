"""Tensor parallelism for the decoder layers of Llama-style families (Megatron-LM, Shoeybi et al.
2019, sec. 3): in each layer the query, key, value, gate and up projections are split by output
features (column-wise), the attention output and down projections by input features (row-wise),
so a layer needs one all-reduce after attention and one after the MLP. Heads split across the
tensor-parallel ranks; embeddings, norms and the LM head stay whole (FSDP2 shards them over the
data-parallel dimension). Applied with ``torch.distributed.tensor.parallel.parallelize_module``."""

from __future__ import annotations

import torch

#: Submodule of a decoder layer -> how it is split: the layout of Llama, Mistral, Qwen2, Qwen3.
TP_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}


def check_tensor_parallel(skeleton: torch.nn.Module, layer_classes: set[type], size: int, source: str) -> None:
    """Raise ``ValueError`` when ``size``-way tensor parallelism cannot split ``skeleton`` (a
    meta-device model): a decoder layer without the projections of :data:`TP_PLAN`, or a head
    count, key-value head count or MLP width that ``size`` does not divide."""
    layers = [m for m in skeleton.modules() if type(m) in layer_classes]
    if not layers:
        raise ValueError(f"{source}: tensor parallelism found no decoder layer to split")
    names = {n for n, _ in layers[0].named_modules()}
    missing = [k for k in TP_PLAN if k not in names]
    if missing:
        raise ValueError(f"{source}: tensor_parallel_size {size}: the tensor-parallel plan splits Llama-style "
                         f"layers (q/k/v/o and gate/up/down projections); {type(layers[0]).__name__} lacks "
                         f"{missing}; use tensor_parallel_size 1")
    config = getattr(skeleton, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and value % size:
            raise ValueError(f"{source}: tensor_parallel_size {size} does not divide the model's {key} ({value}): "
                             "each rank holds an equal share of the heads and of the MLP")


def apply_tensor_parallel(model: torch.nn.Module, mesh, layer_classes: set[type]) -> None:
    """Split every decoder layer of ``model`` (classes ``layer_classes``) over the 1-D
    tensor-parallel ``mesh`` by :data:`TP_PLAN`, in place. Inputs and outputs of a layer stay plain
    replicated tensors, so everything around the layers (embeddings, norms, LM head, the loss) runs
    unchanged; inside attention each rank computes its own heads (the HF attention infers the local
    head count from the projections' width)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[kind]() for name, kind in TP_PLAN.items()}
    for module in model.modules():
        if type(module) in layer_classes:
            parallelize_module(module, mesh, plan)
