"""Rule-based built-in rewards: ``task_check``, ``arith_match``, ``chain_match``, ``format`` and ``overlong``.

Each is registered as a factory: it takes the spec's ``args`` as keyword arguments, checks
them, and returns ``fn(prompts, completions, meta, **context) -> list[float]``.
"""

from __future__ import annotations

import re

import torch

from lit_align.data.formats import lookup
from lit_align.data.tasks import ArithTask, ChainTask
from lit_align.losses import overlong_penalty
from lit_align.rewards.base import RewardError, register_reward

_MISSING = object()


@register_reward("task_check")
def task_check():
    """1.0 when the data module's own checker accepts the completion, else 0.0.

    The checker is the one held-out exact match and ``train/accuracy`` use
    (:attr:`lit_align.data.base.TextDataModule.checker`, ``checker(completion, meta, reference)``;
    for ``arith`` :meth:`~lit_align.data.tasks.ArithTask.check` with the task's own
    ``reverse_answer``), so a recipe states its task once, in the data module, and the reward
    cannot disagree with the metric. The online RL modules pass it as ``context["checker"]``;
    a module whose data has no checker (not a built-in task) refuses ``task_check`` when fitting
    starts.

    Raises (at call time):
        RewardError: the context holds no checker.
    """

    def task_check_reward(prompts: list[str], completions: list[str], meta: list[dict], *, checker=None,
                          **context) -> list[float]:
        if checker is None:
            raise RewardError("task_check: no checker in the context; it scores with the data module's checker, "
                              "which only built-in tasks have (use arith_match or your own reward for other data)")
        return [1.0 if checker(c, m, str(m.get("answer", "")) if isinstance(m, dict) else "") else 0.0
                for c, m in zip(completions, meta)]

    return task_check_reward


@register_reward("arith_match")
def arith_match(reverse_answer: bool = True, answer_key: str = "answer"):
    """1.0 when the completion states the right answer of an ``arith`` problem, else 0.0.

    The stated answer is the first integer in the completion, read with
    :meth:`lit_align.data.tasks.ArithTask.check` (digits reversed when ``reverse_answer``),
    so the reward agrees with the task's exact-match metric.

    Args:
        reverse_answer: the completion writes the answer least significant digit first.
        answer_key: key of the ground truth (an int or its decimal string) in each row's meta;
            dotted to reach nested meta, e.g. ``reward_model.ground_truth`` (verl).
    Raises (at call time):
        RewardError: a row's meta lacks ``answer_key`` or its value is not an integer.
    """
    return _answer_match("arith_match", ArithTask(reverse_answer=bool(reverse_answer)).check, answer_key)


@register_reward("chain_match")
def chain_match(answer_key: str = "answer"):
    """1.0 when the completion's final answer (its first ``answer: N``) is the right value of a
    ``chain`` problem, else 0.0, read with :meth:`lit_align.data.tasks.ChainTask.check`, so the
    reward agrees with the task's exact-match metric; the scratchpad is not scored. For chain
    rows loaded from files (with the built-in task in the data module, ``task_check`` is the same).

    Args:
        answer_key: as for ``arith_match``.
    Raises (at call time):
        RewardError: a row's meta lacks ``answer_key`` or its value is not an integer.
    """
    return _answer_match("chain_match", ChainTask().check, answer_key)


def _answer_match(name: str, check, answer_key: str):
    """The 0/1 reward ``check(completion, meta[answer_key])`` (``answer_key`` dotted for nested meta)."""
    if not isinstance(answer_key, str) or not answer_key:
        raise ValueError(f"{name}: answer_key {answer_key!r} must be a non-empty string")

    def answer_match_reward(prompts: list[str], completions: list[str], meta: list[dict], **context) -> list[float]:
        out = []
        for i, (completion, row) in enumerate(zip(completions, meta)):
            answer = lookup(row, answer_key, _MISSING)
            if answer is _MISSING:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise RewardError(f"meta has no {answer_key!r} (meta keys: {keys})", row=i)
            try:
                correct = check(completion, answer)
            except (TypeError, ValueError) as e:
                raise RewardError(f"meta[{answer_key!r}] = {answer!r} is not an integer answer", row=i) from e
            out.append(1.0 if correct else 0.0)
        return out

    answer_match_reward.__name__ = answer_match_reward.__qualname__ = f"{name}_reward"
    return answer_match_reward


@register_reward("format")
def format_reward(pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>", full_match: bool = True):
    """1.0 when the completion follows a format, else 0.0 (the format reward of DeepSeek-R1
    style recipes).

    Args:
        pattern: a regular expression, matched with ``re.DOTALL`` (``.`` spans newlines)
            against the completion stripped of surrounding whitespace.
        full_match: the whole stripped completion must match; ``False``: the pattern may
            occur anywhere in it.
    Raises:
        ValueError: ``pattern`` is not a valid regular expression.
    """
    try:
        regex = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise ValueError(f"format: invalid pattern {pattern!r}: {e}") from e
    match = regex.fullmatch if full_match else regex.search

    def format_match_reward(prompts: list[str], completions: list[str], meta: list[dict], **context) -> list[float]:
        return [1.0 if match(c.strip()) else 0.0 for c in completions]

    return format_match_reward


def _check_overlong(max_len: int, cache_len: int) -> None:
    if cache_len < 1 or cache_len >= max_len:
        raise ValueError(f"overlong: cache_len must satisfy 1 <= cache_len < max_len={max_len}, got {cache_len}")


@register_reward("overlong")
def overlong(max_len: int | None = None, cache_len: int | None = None):
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", sec. 3.4, eq. 13), computed by
    :func:`lit_align.losses.overlong_penalty` on ``context["completion_lengths"]``:
    0 up to ``max_len - cache_len`` tokens, then linear down to -1 at ``max_len``, -1 beyond.
    Add it with weight 1 to a correctness reward, as DAPO does.

    Args:
        max_len: L_max in tokens (default: the rollout's ``context["max_new_tokens"]``).
        cache_len: L_cache, the width of the punishment band, ``1 <= cache_len < max_len``
            (default: ``max_len // 5``, at least 1: DAPO's 4096 of 20480).
    Raises:
        ValueError: at construction when ``max_len`` / ``cache_len`` are given and invalid;
            at call time (reported as :class:`RewardError`) when the default ``max_len``
            makes them so.
    """
    if max_len is not None and max_len < 2:
        raise ValueError(f"overlong: max_len must be >= 2, got {max_len}")
    if cache_len is not None and cache_len < 1:
        raise ValueError(f"overlong: cache_len must be >= 1, got {cache_len}")
    if max_len is not None and cache_len is not None:
        _check_overlong(max_len, cache_len)

    def overlong_reward(prompts: list[str], completions: list[str], meta: list[dict], *,
                        completion_lengths: list[int], max_new_tokens: int | None = None, **context) -> torch.Tensor:
        limit = max_len if max_len is not None else max_new_tokens
        if limit is None:
            raise ValueError("overlong: no max_len given and no max_new_tokens in the context")
        band = cache_len if cache_len is not None else max(1, limit // 5)
        _check_overlong(limit, band)
        return overlong_penalty(torch.as_tensor(completion_lengths, dtype=torch.long), limit, band)

    return overlong_reward
