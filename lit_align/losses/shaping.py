"""Reward shaping terms."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13).

    Args:
        lengths: ``[B]`` response lengths in tokens.
        max_len: L_max, the generation limit.
        cache_len: L_cache, the width of the soft band before ``max_len``.
    Returns:
        ``[B]`` float penalty: 0 for |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache
        inside the band (linear from 0 to -1); -1 for |y| > L_max.
    """
    if cache_len <= 0 or cache_len > max_len:
        raise ValueError(f"overlong_penalty: cache_len must be in (0, max_len={max_len}], got {cache_len}")
    lengths = lengths.float()
    start = max_len - cache_len
    return ((start - lengths) / cache_len).clamp(min=-1.0, max=0.0)
