"""Reward functions loaded by import path (``tests.rewards.custom:<name>``) in test_rewards.py."""

import torch


def keyword_count(prompts, completions, meta, *, word="yes", scale=1.0, **context):
    """``scale`` times the occurrences of ``word`` in each completion."""
    return [scale * c.count(word) for c in completions]


class LengthReward:
    """``per_char`` times the completion's length in characters, as a tensor."""

    def __init__(self, per_char: float = 0.1):
        self.per_char = per_char
        self.devices = []

    def setup(self, device):
        self.devices.append(device)

    def __call__(self, prompts, completions, meta, **context):
        return torch.tensor([self.per_char * len(c) for c in completions])


def broken(prompts, completions, meta, *, mode, **context):
    """Misbehaves on completions containing "bad" in the way ``mode`` names."""
    out = []
    for c in completions:
        bad = "bad" in c
        if mode == "raise" and bad:
            raise KeyError("boom")
        if mode == "nan":
            out.append(float("nan") if bad else 1.0)
        elif mode == "string":
            out.append("high" if bad else 1.0)
        else:
            out.append(1.0)
    if mode == "short":
        return out[:-1]
    if mode == "matrix":
        return torch.ones(len(out), 2)
    if mode == "none":
        return None
    return out


def no_context(prompts, completions, meta):
    return [0.0] * len(completions)


class NotCallable:
    pass


NOT_CALLABLE = 3
