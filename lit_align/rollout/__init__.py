"""Generation engines behind one interface."""

from lit_align.rollout.hf import SamplingParams, decode_completions, hf_generate

__all__ = ["SamplingParams", "decode_completions", "hf_generate"]
