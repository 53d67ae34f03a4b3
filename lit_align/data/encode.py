"""Tokenizing segments into ``input_ids`` / ``labels`` with the truncation policy."""

from __future__ import annotations

from typing import Any

from lit_align.data.formats import Segment

IGNORE_INDEX = -100
TRUNCATION = ("prompt", "drop")


class Dropped(Exception):
    """A row left out of training; ``reason`` is counted and logged."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def tokenize_segments(segments: list[Segment], tokenizer) -> tuple[list[int], list[int], int]:
    """Token ids and labels of segments tokenized one by one (so a boundary between
    segments is a token boundary), BOS first when the tokenizer adds one, EOS after
    every trained segment. Returns ``(ids, labels, start of the last trained segment)``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    last_start = 0
    for seg in segments:
        seg_ids = tokenizer(seg.text, add_special_tokens=False).input_ids if seg.text else []
        if seg.train:
            if eos not in seg_ids:
                seg_ids = seg_ids + [eos]
            last_start = len(ids)
            labels += seg_ids
        else:
            labels += [IGNORE_INDEX] * len(seg_ids)
        ids += seg_ids
    return ids, labels, last_start


def reference_text(segments: list[Segment], tokenizer) -> str:
    """The exact-match target of an example: the last trained segment's text without the EOS
    it may end with (the text a generation that stops at EOS should equal), stripped."""
    text = next(seg.text for seg in reversed(segments) if seg.train)
    eos = tokenizer.eos_token
    if eos and text.rstrip().endswith(eos):
        text = text.rstrip()[: -len(eos)]
    return text.strip()


def encode_segments(segments: list[Segment], tokenizer, max_length: int, truncation: str = "prompt",
                    reference: str | None = None) -> dict[str, Any]:
    """Token ids and labels for one example.

    Returns ``input_ids`` ``[T]``, ``labels`` ``[T]`` (``-100`` off the trained
    segments and on the first position, which nothing predicts), ``prompt_ids``
    (everything before the last trained segment: the generation prompt), and
    ``reference`` (the last trained segment's text, the exact-match target) and
    ``truncated`` (what was cut to fit: ``"prompt"`` and / or ``"response"``; empty when
    nothing was; the data module counts it).

    Every trained segment ends with EOS (appended when the text does not produce
    it). Too long: ``truncation="prompt"`` removes tokens from the start of the
    sequence up to the first label, then from the end, as TRL does, so a response cut
    at the end has no EOS; ``"drop"`` drops the row.
    Raises :class:`Dropped` when nothing is left to learn.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation: {truncation!r} is not one of {TRUNCATION}")
    ids, labels, last_start = tokenize_segments(segments, tokenizer)
    if not any(seg.train for seg in segments):
        raise Dropped("no completion")
    prompt_len = last_start
    truncated: list[str] = []
    if len(ids) > max_length:
        if truncation == "drop":
            raise Dropped("too long")
        first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        cut = min(len(ids) - max_length, max(first_label - 1, 0))  # keep one token before the first label
        ids, labels, prompt_len = ids[cut:], labels[cut:], max(prompt_len - cut, 0)
        truncated = (["prompt"] if cut else []) + (["response"] if len(ids) > max_length else [])
        ids, labels = ids[:max_length], labels[:max_length]
    labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        raise Dropped("nothing left to learn after truncation")
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_ids": ids[:prompt_len],
        "reference": reference_text(segments, tokenizer) if reference is None else reference.strip(),
        "num_labels": sum(label != IGNORE_INDEX for label in labels),
        "length": len(ids),
        "truncated": tuple(truncated),
    }
