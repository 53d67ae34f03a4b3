"""Model building: HF causal LMs, tokenizers, heads, vision towers."""

from lit_align.models.causal_lm import (
    CausalLMSpec,
    build_causal_lm,
    build_hf_config,
    build_hf_model,
    disable_dropout,
    load_tokenizer,
)
from lit_align.models.llava import IMAGE_TOKEN, LlavaModel, add_image_token, load_llava, save_llava
from lit_align.models.lora import LoraSpec, apply_lora, is_peft, merged_copy
from lit_align.models.reward import build_reward_model, load_reward_model, sequence_scores, token_scores
from lit_align.models.tokenizer import BYTE_TOKENIZER, build_tokenizer
from lit_align.models.vision import VisionTower, VisionTowerSpec, build_projector

__all__ = ["LoraSpec", "apply_lora", "is_peft", "merged_copy", "CausalLMSpec", "build_causal_lm", "disable_dropout",
           "build_hf_config", "build_hf_model", "load_tokenizer", "BYTE_TOKENIZER", "build_tokenizer",
           "build_reward_model", "load_reward_model", "sequence_scores", "token_scores", "IMAGE_TOKEN", "LlavaModel",
           "add_image_token", "load_llava", "save_llava", "VisionTower", "VisionTowerSpec", "build_projector"]
