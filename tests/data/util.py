"""Shared helpers for the data tests."""

from __future__ import annotations

import json
import os

from lit_align.data.encode import IGNORE_INDEX
from lit_align.models.tokenizer import build_tokenizer

_TOKENIZER = None


def byte_tokenizer():
    """The built-in byte tokenizer (one id per byte, eos ``</s>`` = 1, pad 0, no BOS), built once."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer("byte")
    return _TOKENIZER


def label_spans(enc: dict) -> list[list[int]]:
    """Runs of consecutive labelled positions, as token ids."""
    spans, current = [], []
    for label in enc["labels"]:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


def labelled_texts(enc: dict, tokenizer) -> list[str]:
    """The decoded text of each run of labelled tokens (special tokens kept)."""
    return [tokenizer.decode(span) for span in label_spans(enc)]


def unlabelled_text(enc: dict, tokenizer) -> str:
    """The decoded text of every position without a label (the first position included)."""
    return tokenizer.decode([t for t, label in zip(enc["input_ids"], enc["labels"]) if label == IGNORE_INDEX])


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return os.fspath(path)


def encoded_module(tmp_path, rows: list[dict], name: str = "data.jsonl", cls=None, **kwargs):
    """A data module (default InstructionDataModule) over ``rows`` written to a jsonl file, set
    up with the byte tokenizer."""
    from lit_align.data import InstructionDataModule

    path = write_jsonl(tmp_path / name, rows)
    kwargs.setdefault("max_length", 256)
    dm = (cls or InstructionDataModule)(data_files=path, **kwargs)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    return dm
