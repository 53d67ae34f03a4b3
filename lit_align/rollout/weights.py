"""The live weights of a training policy, one full tensor at a time, in the names of its Hugging
Face checkpoint: what an inference engine with its own copy of the weights (vLLM) loads before a
rollout. Works on a plain or DDP model, on FSDP2-sharded parameters (DTensors, gathered one at a
time, never the whole model at once on a rank) and on a peft LoRA policy (adapters merged)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lit_align.models import is_peft
from lit_align.models.lora import find_peft


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: a DTensor's shards are all-gathered (a collective: every
    rank of its mesh calls it in the same order), a plain tensor is returned as is."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _check_strategy(model: torch.nn.Module) -> None:
    for module in model.modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel":
            raise ValueError("policy weights: FSDP (v1) flattens parameters and cannot hand them out one at a "
                             "time; use FSDP2 (configs/strategy/fsdp2.yaml), DDP or a single device")
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError("policy weights: DeepSpeed ZeRO-3 partitioned parameters are not supported; use FSDP2, "
                         "DDP or a single device")


def _lora_classes():
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    return LoraLinear, LoraLayer, ModulesToSaveWrapper


def _active(adapters) -> list[str]:
    return [adapters] if isinstance(adapters, str) else list(adapters)


def _merged_lora(module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``W + scaling * B A`` (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D) of
    each active adapter, as peft's ``merge_and_unload`` computes it (Hu et al. 2021, eq. 3)."""
    base = module.get_base_layer()
    weight = _full(base.weight)
    if not module.merged and not module.disable_adapters:
        for name in _active(module.active_adapters):
            if name not in module.lora_A:
                continue
            if module.use_dora.get(name, False) or getattr(module, "lora_bias", {}).get(name, False):
                raise ValueError(f"policy weights: {prefix.rstrip('.')}: merging DoRA or LoRA-bias adapters is not "
                                 "supported")
            a, b = _full(module.lora_A[name].weight), _full(module.lora_B[name].weight)
            delta = (b.float() @ a.float()) * module.scaling[name]
            weight = (weight.float() + (delta.T if module.fan_in_fan_out else delta)).to(weight.dtype)
    yield prefix + "weight", weight
    if getattr(base, "bias", None) is not None:
        yield prefix + "bias", _full(base.bias)


def _walk(module: torch.nn.Module, prefix: str, lora) -> Iterator[tuple[str, torch.Tensor]]:
    if lora is not None and is_peft(module):  # a peft model inside another (a LLaVA model's LM)
        yield from _walk(module.base_model.model, prefix, lora)
        return
    if lora is not None:
        lora_linear, lora_layer, to_save = lora
        if isinstance(module, lora_linear):
            yield from _merged_lora(module, prefix)
            return
        if isinstance(module, lora_layer):
            raise ValueError(f"policy weights: {prefix.rstrip('.')}: merging {type(module).__name__} adapters is not "
                             "supported (only adapters on linear layers)")
        if isinstance(module, to_save):
            active = _active(module.active_adapters) if not module.disable_adapters else []
            inner = module.modules_to_save[active[0]] if active else module.original_module
            yield from _walk(inner, prefix, lora)
            return
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, _full(param)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", lora)


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter of ``model`` as its HF checkpoint names it
    (``model.layers.0.self_attn.q_proj.weight`` ...), full (unsharded), one at a time.

    Lazy: each tensor is gathered when the consumer asks for it, so an engine that loads as it
    iterates never holds more than the layer it is loading. Collective under FSDP2: every rank
    iterates the whole generator in step. A peft policy (or a model holding one, such as a
    LLaVA model whose language model has adapters) yields its merged weights (base +
    active adapters; ``modules_to_save`` copies in place of the originals) under the base
    model's names; the policy itself is not changed. Buffers are not included (an inference
    engine computes its own rotary tables and masks). A tied parameter comes under each of its
    names, as in a state dict (input embeddings and LM head): vLLM's in-place reload of a tied
    model leaves its weights unchanged without the LM head's entry.

    Raises ``ValueError`` for FSDP (v1) and DeepSpeed ZeRO-3 parameters, and for adapters other
    than LoRA on linear layers."""
    _check_strategy(model)
    lora = _lora_classes() if find_peft(model) is not None else None
    with torch.no_grad():
        yield from _walk(model, "", lora)
