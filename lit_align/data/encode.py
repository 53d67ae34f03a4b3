"""Tokenizing segments into ``input_ids`` / ``labels`` with the truncation policy."""

from __future__ import annotations

from typing import Any

from lit_align.data.formats import Segment
from lit_align.models.tokenizer import end_of_turn_ids

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


def leading_bos(ids: list[int], tokenizer) -> int:
    """1 when ``ids`` starts with the tokenizer's BOS (added by the tokenizer or written by the
    chat template), else 0: the tokens a left truncation keeps in front of what it cuts."""
    bos = tokenizer.bos_token_id
    return int(bos is not None and bool(ids) and ids[0] == bos)


def _turn_ended(seg: Segment, seg_ids: list[int], tokenizer) -> bool:
    """Whether a trained segment already ends its turn: it holds the EOS, or it came from the
    chat template and holds the template's end-of-turn token. A templated turn of a template
    that ends turns without a special token still needs the EOS, or nothing teaches the model
    to stop."""
    if tokenizer.eos_token_id in seg_ids:
        return True
    return seg.templated and any(i in seg_ids for i in end_of_turn_ids(tokenizer))


def tokenize_segments(segments: list[Segment], tokenizer) -> tuple[list[int], list[int], int]:
    """Token ids and labels of segments tokenized one by one (so a boundary between
    segments is a token boundary). Returns ``(ids, labels, start of the last trained segment)``.

    BOS comes first once: the tokenizer's, when it adds one and the text does not already
    start with it (a chat template such as Llama 3's writes ``<|begin_of_text|>`` itself).
    A trained segment that does not end its turn gets the EOS appended: a plain (not
    templated) segment without the EOS, or a templated one whose template ends turns with
    no special token; a templated turn ending with the template's end-of-turn token
    (:func:`~lit_align.models.tokenizer.end_of_turn_ids`: ``<|im_end|>``, ``<|eot_id|>``)
    keeps exactly what the template wrote."""
    eos = tokenizer.eos_token_id
    pieces = [tokenizer(seg.text, add_special_tokens=False).input_ids if seg.text else [] for seg in segments]
    written = leading_bos(next((p for p in pieces if p), []), tokenizer)
    ids: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) and not written else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    last_start = 0
    for seg, seg_ids in zip(segments, pieces):
        if seg.train:
            if not _turn_ended(seg, seg_ids, tokenizer):
                seg_ids = seg_ids + [eos]
            last_start = len(ids)
            labels += seg_ids
        else:
            labels += [IGNORE_INDEX] * len(seg_ids)
        ids += seg_ids
    return ids, labels, last_start


def stop_texts(segment: Segment, tokenizer) -> list[str]:
    """The texts a generation of ``segment`` stops at: the EOS, and for a chat-templated
    segment the template's end-of-turn tokens."""
    ids = [tokenizer.eos_token_id] + (end_of_turn_ids(tokenizer) if segment.templated else [])
    return [t for t in dict.fromkeys(tokenizer.convert_ids_to_tokens(ids)) if t]


def reference_text(segments: list[Segment], tokenizer) -> str:
    """The exact-match target of an example: the last trained segment's text up to its first
    stop (the EOS, and for a chat-templated turn the end-of-turn token such as ``<|im_end|>``
    or ``<|eot_id|>``: :func:`stop_texts`), stripped. It is what a generation that stops at
    those tokens decodes to."""
    segment = next(seg for seg in reversed(segments) if seg.train)
    text = segment.text
    for stop in stop_texts(segment, tokenizer):
        text = text.split(stop, 1)[0]
    return text.strip()


def encode_segments(segments: list[Segment], tokenizer, max_length: int, truncation: str = "prompt",
                    reference: str | None = None) -> dict[str, Any]:
    """Token ids and labels for one example.

    Returns ``input_ids`` ``[T]``, ``labels`` ``[T]`` (``-100`` off the trained
    segments and on the first position, which nothing predicts), ``prompt_ids``
    (everything before the last trained segment: the generation prompt), and
    ``reference`` (the last trained segment's text, the exact-match target:
    :func:`reference_text`), ``truncated`` (what was cut to fit: ``"prompt"`` and / or
    ``"response"``; empty when nothing was; the data module counts it) and ``templated``
    (whether a segment was rendered with the chat template; the data module records it).

    Every trained segment ends its turn (:func:`tokenize_segments`: the EOS is appended to
    one that does not). Too long: ``truncation="prompt"`` removes tokens from the start of
    the sequence up to the first label, after a leading BOS (kept: the model was trained to
    see it first), then from the end, as TRL does, so a response cut at the end has no EOS;
    ``"drop"`` drops the row.
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
        keep = min(leading_bos(ids, tokenizer), first_label)
        cut = min(len(ids) - max_length, max(first_label - 1, 0))  # keep one token (BOS or not) before the first label
        ids, labels = ids[:keep] + ids[keep + cut:], labels[:keep] + labels[keep + cut:]
        prompt_len = max(prompt_len - cut, 0)
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
        "templated": any(seg.templated for seg in segments),
    }
