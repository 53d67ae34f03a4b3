"""Shared pieces of the vLLM engine tests. They run in the vLLM environment
(``bash .ci/vllm_env.sh``; ``.ci/run`` runs them after the main suite) and are skipped
wherever vLLM does not import."""

import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tests.conftest import tiny_config  # noqa: E402

#: vLLM's CPU attention serves head sizes from 32 up: 64 wide, 2 heads.
VLLM_CONFIG = tiny_config(hidden_size=64, intermediate_size=128)
#: Small fixed KV cache: vLLM would otherwise reserve a share of the machine's memory.
ENGINE_ARGS = dict(kv_cache_memory_bytes=32 << 20, enforce_eager=True, max_model_len=128)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.3, only=None) -> None:
    """Move every (or each ``only``-matching) parameter by Gaussian noise: new training weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


#: Why the tests here are skipped where vLLM does not import.
SKIP_REASON = "vLLM is not importable here; make its environment with `bash .ci/vllm_env.sh` and run tests/vllm there"
