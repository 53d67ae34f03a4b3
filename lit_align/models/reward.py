"""Reward models: a causal LM's backbone with a scalar head (HF ``*ForSequenceClassification``
with ``num_labels=1``), scored at each sequence's last real token.

The reward model of InstructGPT (Ouyang et al. 2022, sec. 3.5): the SFT model with its
unembedding replaced by a linear layer that outputs one scalar for a (prompt, response)
sequence, trained on pairwise comparisons (Bradley-Terry, see
:func:`lit_align.losses.bradley_terry_loss`).
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_align.models.causal_lm import _DTYPES, CausalLMSpec, build_hf_model
from lit_align.models.lora import LoraSpec, apply_lora
from lit_align.models.tokenizer import build_tokenizer


def build_reward_model(spec: CausalLMSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """``AutoModelForSequenceClassification`` with one output built from ``spec``.

    ``spec.pretrained`` may hold a causal LM (an SFT export, a hub model): its backbone is
    loaded and the scalar head is initialised from ``spec.seed``; or a reward-model export,
    whose head is loaded too. An inline ``spec.config`` builds a random model.
    """
    if spec.config is not None and spec.config.get("num_labels", 1) != 1:
        raise ValueError(f"model.config.num_labels={spec.config['num_labels']}: a reward model has one output")
    model = build_hf_model(spec, tokenizer, AutoModelForSequenceClassification, num_labels=1)
    if reward_head(model).out_features != 1:
        raise ValueError(f"{type(model).__name__} from {spec.pretrained!r} has {reward_head(model).out_features} "
                         "outputs, not 1")
    # HF's own pooling (used by `model(...)` outside lit_align) finds the last token that is
    # not pad_token_id and refuses batches without one; give it the tokenizer's pad.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The scalar head: ``score`` in decoder-only ``*ForSequenceClassification`` classes (with
    LoRA, peft's wrapper of it, whose forward is the trained copy's)."""
    head = getattr(model, "score", None)
    if not isinstance(getattr(head, "original_module", head), torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear `score` head; reward models need a decoder-only "
                         "*ForSequenceClassification class (llama, qwen2, mistral, gpt2, ...)")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of each row's last attended token (``attention_mask`` ``[B, T]``)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("sequence_scores: a row of attention_mask is all zeros (an empty sequence)")
    return (positions * (attention_mask != 0)).argmax(-1)


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each sequence: the head's output at its last non-pad token.

    Args:
        model: a ``*ForSequenceClassification`` model with one label (see :func:`build_reward_model`).
        input_ids: ``[B, T]`` token ids, right-padded (left padding works too: positions are
            counted from the mask, so a rollout's left-padded prompt scores like an unpadded one).
        attention_mask: ``[B, T]``, 1 on real tokens; the last 1 of a row marks where it is scored.
    Returns:
        ``[B]`` scores r(x, y) in the model's dtype.

    HF's own pooling looks for the last token different from ``pad_token_id``, which fails
    when pad equals EOS (the sequence's own final EOS would be skipped); the attention mask
    is unambiguous. The head's per-token output ``[B, T, 1]`` is read with a forward hook
    during the model's own forward rather than by calling backbone and head separately:
    under FSDP / FSDP2 only the root forward gathers the root's sharded parameters
    (embeddings, final norm, head).
    """
    index = last_token_index(attention_mask)
    per_token = token_scores(model, input_ids, attention_mask)
    return per_token.gather(1, index.to(per_token.device)[:, None]).squeeze(1)


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head's output at every position, ``[B, T]``: a reward model's score of each
    prefix, or a critic's value of each state (PPO). Position ids follow the attention mask."""
    # 0, 1, 2, ... on real tokens wherever the padding is (equal to the default for right padding)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    captured: list[torch.Tensor] = []
    handle = reward_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return captured[-1].squeeze(-1)


# plain containers Lightning puts into a checkpoint's hyper-parameters
_SAFE_CONTAINERS = ("lightning.fabric.utilities.data.AttributeDict", "jsonargparse._namespace.Namespace")


def load_checkpoint_safely(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint: tensors and plain data only,
    so a checkpoint from elsewhere cannot run code when it is read. The globals it may name are the
    settings dataclasses of ``lit_align`` (the module's init arguments in ``hyper_parameters``) and
    Lightning's plain hyper-parameter containers; any other is refused by name."""
    import dataclasses
    import importlib

    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed, refused = [], []
    for name in needed:
        module, _, attr = name.rpartition(".")
        obj = None
        if name.startswith("lit_align.") or name in _SAFE_CONTAINERS:
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                obj = None
        if obj is not None and (dataclasses.is_dataclass(obj) or name in _SAFE_CONTAINERS):
            allowed.append(obj)
        else:
            refused.append(name)
    if refused:
        raise ValueError(f"load_reward_model: {path} needs objects that loading with weights_only=True does not "
                         f"allow: {refused}; export the reward model with save_pretrained (an HF directory) instead")
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_reward_model(path: str, dtype: str | None = None, padding_side: str = "right", tokenizer: str | None = None
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trained reward model and its tokenizer, in eval mode, from either

    - an HF export directory (``RewardModel.export_hf`` / ``save_pretrained``), or
    - a Lightning ``.ckpt`` of :class:`~lit_align.RewardModel`: the model is rebuilt from the
      checkpoint's ``hyper_parameters["model"]`` (a :class:`CausalLMSpec`, so its tokenizer
      source must still be readable) and its ``state_dict`` loaded.

    Args:
        dtype: ``float32`` / ``bfloat16`` / ``float16`` to cast to (``None``: as stored).
        padding_side: of the returned tokenizer.
        tokenizer: load the tokenizer from here instead (a hub id, a directory or ``"byte"``):
            for an export whose tokenizer files name a class this transformers lacks.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"load_reward_model: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"load_reward_model: {path} is a directory without config.json: not an HF export "
                             "(a sharded Lightning checkpoint must be consolidated to one .ckpt file first)")
        config = AutoConfig.from_pretrained(path)
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
            raise ValueError(f"load_reward_model: {path} holds {archs or 'an unnamed architecture'} with "
                             f"num_labels={config.num_labels}, not a reward model (a *ForSequenceClassification "
                             "with one label); to start a reward model from a causal LM, train RewardModel on it")
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):  # a missing score head would score with its random init
            raise ValueError(f"load_reward_model: {path}: the weights do not match {type(model).__name__}, "
                             + ", ".join(f"{k.replace('_', ' ')} {v[:8]}" for k, v in problems.items() if v))
        tokenizer = build_tokenizer(tokenizer or path, padding_side=padding_side)
    elif os.path.isfile(path):
        checkpoint = load_checkpoint_safely(path)
        hparams = checkpoint.get("hyper_parameters", {})
        spec = hparams.get("model")
        # A module built by LightningCLI stores its init arguments as plain dicts, one built in
        # Python the CausalLMSpec itself.
        if isinstance(spec, dict):
            spec = CausalLMSpec(**spec)
        class_path = hparams.get("_class_path", "RewardModel")
        not_rm = ValueError(f"load_reward_model: {path} is not a checkpoint of lit_align.RewardModel "
                            f"(class {class_path!r}, model spec {type(spec).__name__})")
        if not isinstance(spec, CausalLMSpec) or not class_path.endswith("RewardModel"):
            raise not_rm
        tokenizer = build_tokenizer(tokenizer or spec.tokenizer_name, padding_side=padding_side,
                                    trust_remote_code=spec.trust_remote_code)
        model = build_reward_model(spec, tokenizer)
        lora = hparams.get("lora")
        if isinstance(lora, dict):
            lora = LoraSpec(**lora)
        if lora is not None:  # the checkpoint holds base + adapter weights under peft's names
            model = apply_lora(model, lora, task_type="SEQ_CLS")
        # The LightningModule holds the HF model as `self.model`: its keys carry a "model." prefix.
        state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # e.g. a causal LM's lm_head where the scalar head should be
            raise not_rm from e
        if lora is not None:
            model = model.merge_and_unload()
    else:
        raise FileNotFoundError(f"load_reward_model: {path} is neither an HF export directory nor a .ckpt file")
    if dtype is not None:
        model = model.to(_DTYPES[dtype])
    return model.eval(), tokenizer
