"""Generation engines behind one interface: ``engine.generate(model, prompts, sampling) -> RolloutBatch``."""

from lit_align.rollout.batch import RolloutBatch
from lit_align.rollout.hf import (HFEngine, SamplingParams, chunked_logprobs, completion_logprobs, completion_masks,
                                  decode_completions, hf_generate)

__all__ = ["HFEngine", "RolloutBatch", "SamplingParams", "chunked_logprobs", "completion_logprobs", "completion_masks",
           "decode_completions", "hf_generate"]
