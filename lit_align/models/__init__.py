"""Model building: HF causal LMs, tokenizers, heads, vision towers."""

from lit_align.models.causal_lm import CausalLMSpec, build_causal_lm, build_hf_config, load_tokenizer
from lit_align.models.tokenizer import BYTE_TOKENIZER, build_tokenizer

__all__ = ["CausalLMSpec", "build_causal_lm", "build_hf_config", "load_tokenizer", "BYTE_TOKENIZER", "build_tokenizer"]
