"""Generation engines behind one interface: ``engine.generate(model, prompts, sampling) -> RolloutBatch``
(:class:`RolloutEngine`), chosen by name from :data:`ENGINES` or by import path."""

from lit_align.rollout.base import (
    ENGINES,
    EngineSpec,
    RolloutEngine,
    SamplingParams,
    build_engine,
    default_stop_ids,
    register_engine,
    resolve_engine,
)
from lit_align.rollout.batch import RolloutBatch
from lit_align.rollout.hf import (
    HFEngine,
    chunked_logprobs,
    completion_logprobs,
    completion_masks,
    decode_completions,
    hf_generate,
)
from lit_align.rollout.vllm import VLLMEngine  # registers "vllm"; vLLM itself is imported only when one is built
from lit_align.rollout.weights import policy_weights

__all__ = ["ENGINES", "EngineSpec", "default_stop_ids", "HFEngine", "RolloutBatch", "RolloutEngine", "SamplingParams",
           "build_engine", "chunked_logprobs", "completion_logprobs", "completion_masks", "decode_completions",
           "hf_generate", "policy_weights", "register_engine", "resolve_engine", "VLLMEngine"]
