"""Building Hugging Face causal language models from a hub id, a local directory or
an inline config (random init), plus the settings that go with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lit_align.models.tokenizer import build_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CausalLMSpec:
    """Which causal LM to build and how.

    Args:
        pretrained: hub id or local directory (``save_pretrained`` output) to load weights from.
        config: inline config for a randomly initialised model, e.g.
            ``{model_type: llama, hidden_size: 128, num_hidden_layers: 2, ...}``; the
            vocabulary size and special token ids are filled in from the tokenizer.
            Exactly one of ``pretrained`` and ``config`` is given.
        tokenizer: hub id, local directory or ``"byte"`` (built-in, no files). Defaults to
            ``pretrained`` when that is set, else ``"byte"``.
        dtype: parameter dtype: float32, bfloat16 or float16 (mixed precision is the
            trainer's ``precision`` setting; this is the storage dtype).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` ...
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        decoder_layer_classes: class names of the transformer blocks, the units FSDP2 shards
            the model by; default the model's ``_no_split_modules`` (set it for a family that
            does not declare them).
        trust_remote_code: passed to ``from_pretrained``.
        seed: seed of the random initialisation when ``config`` is used, so every rank
            and every run builds the same weights.
    """

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = False
    decoder_layer_classes: list[str] | None = None
    trust_remote_code: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("model: give exactly one of `pretrained` (hub id or local dir) "
                             "and `config` (inline config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config: needs a `model_type` (e.g. llama, qwen2, gpt2)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype: {self.dtype!r} is not one of {sorted(_DTYPES)}")

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.pretrained or "byte"


def router_aux_loss_coef(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase) -> float | None:
    """The weight of a mixture-of-experts model's load-balancing loss (Switch Transformer, Fedus
    et al. 2021, eq. 4: ``num_experts * sum_i f_i * P_i``) when its config asks for router logits
    (``output_router_logits: true``, set in the config or in ``extra``), else ``None``. The
    weight is the config's ``router_aux_loss_coef``; a dense model has neither field."""
    config = build_hf_config(spec, tokenizer)
    if not spec.extra.get("output_router_logits", getattr(config, "output_router_logits", False)):
        return None
    return float(spec.extra.get("router_aux_loss_coef", getattr(config, "router_aux_loss_coef", 0.0)))


def build_hf_config(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase):
    """The HF config of ``spec``: loaded, or built inline with the tokenizer's ids."""
    if spec.pretrained is not None:
        return AutoConfig.from_pretrained(spec.pretrained, trust_remote_code=spec.trust_remote_code)
    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id",
                      tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.config.vocab_size={kwargs['vocab_size']} is smaller than the tokenizer's "
                         f"{len(tokenizer)} ids")
    return AutoConfig.for_model(model_type, **kwargs)


def build_hf_model(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase, auto_class=AutoModelForCausalLM,
                   strict: bool = False, **config_overrides: Any) -> PreTrainedModel:
    """Instantiate ``spec`` through an HF auto class (weights loaded or freshly initialised).

    Args:
        auto_class: ``AutoModelForCausalLM`` or another head over the same backbone, such as
            ``AutoModelForSequenceClassification`` for reward models.
        config_overrides: config attributes set on top of the loaded or inline config
            (e.g. ``num_labels=1``).
        strict: a pretrained model must have a weight for every parameter and no other (a frozen
            model never trains a freshly initialised weight); else ``ValueError`` naming the keys.
    """
    dtype = _DTYPES[spec.dtype]
    common = dict(attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code)
    # Same seed on every rank and every run: the random init is part of the recipe, and that
    # includes weights a pretrained checkpoint lacks (a new head over a causal LM's backbone).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.pretrained is not None:
            model, info = auto_class.from_pretrained(spec.pretrained, dtype=dtype, output_loading_info=True, **common,
                                                     **config_overrides, **spec.extra)
            problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            if strict and any(problems.values()):
                found = ", ".join(f"{k.replace('_', ' ')} {v[:8]}" for k, v in problems.items() if v)
                raise ValueError(f"{spec.pretrained}: the weights do not match the {type(model).__name__} they load "
                                 f"into, {found}")
        else:
            config = build_hf_config(spec, tokenizer)
            for key, value in config_overrides.items():
                setattr(config, key, value)
            model = auto_class.from_config(config, dtype=dtype, **common)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Recompute each decoder layer's activations in the backward instead of keeping them.

    Non-reentrant (``use_reentrant=False``): gradients reach the layers' parameters even when
    their inputs need none (LoRA over frozen embeddings), and FSDP2's per-layer hooks stay
    outside the recomputed region. It applies in training mode with gradients only: generation
    (eval mode, no grad) keeps the KV cache, and a frozen model is untouched."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return model


def model_skeleton(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase,
                   auto_class=AutoModelForCausalLM) -> PreTrainedModel:
    """The module tree of ``spec`` on the meta device: its config is read (``config.json``, or
    the inline config), no weights are loaded or allocated. For checks that must fail before a
    model of billions of parameters is built: LoRA targets, FSDP2 wrap units."""
    config = build_hf_config(spec, tokenizer)
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=spec.trust_remote_code)


def build_causal_lm(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase, strict: bool = False) -> PreTrainedModel:
    """Instantiate the causal LM described by ``spec`` (weights loaded or freshly initialised;
    ``strict``: see :func:`build_hf_model`)."""
    return build_hf_model(spec, tokenizer, AutoModelForCausalLM, strict=strict)


def load_tokenizer(spec: CausalLMSpec, padding_side: str = "right") -> PreTrainedTokenizerBase:
    return build_tokenizer(spec.tokenizer_name, padding_side=padding_side, trust_remote_code=spec.trust_remote_code)


def decoder_layer_classes(model: torch.nn.Module, names: list[str] | None = None) -> set[type]:
    """Classes of the transformer blocks (used as FSDP wrap units): the classes ``names`` (class
    names), by default the ``_no_split_modules`` of the model and of every model inside it (a
    LLaVA model's language model)."""
    if names is None:
        names = set()
        for m in model.modules():
            names |= set(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in set(names)}


def check_shardable(spec: CausalLMSpec, skeleton: torch.nn.Module, source: str = "model") -> None:
    """Raise ``ValueError`` when FSDP2 would find no decoder layer to shard ``skeleton`` by (a
    model family whose ``_no_split_modules`` is empty or names classes it lacks, or a
    ``decoder_layer_classes`` setting naming none of its classes): sharding only the root would
    gather the whole model on every rank at every forward."""
    if decoder_layer_classes(skeleton, spec.decoder_layer_classes):
        return
    # the blocks of a transformer are the elements of its longest list of same-class modules
    stacks = [m for m in skeleton.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
              and len({type(c) for c in m}) == 1]
    blocks = type(max(stacks, key=len)[0]).__name__ if stacks else "MyDecoderLayer"
    declared = sorted(getattr(skeleton, "_no_split_modules", None) or [])
    given = (f"decoder_layer_classes {spec.decoder_layer_classes} match none of its classes"
             if spec.decoder_layer_classes else f"its _no_split_modules ({declared}) name no class it has")
    raise ValueError(f"{source}: FSDP2 shards per decoder layer, but for {type(skeleton).__name__} {given}; "
                     f"name the transformer block class with {source}.decoder_layer_classes, e.g. [{blocks}]")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0 (``nn.Dropout`` modules and attention dropout rates).

    RL needs it: log-probs of the same tokens must not change between the rollout's scoring
    pass and the training forward, or the first importance ratio is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return model
