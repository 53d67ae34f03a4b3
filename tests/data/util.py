"""Shared helpers for the data tests."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from lit_align.data.encode import IGNORE_INDEX
from lit_align.data.formats import DataError
from lit_align.models.tokenizer import build_tokenizer


@functools.cache
def byte_tokenizer():
    """The built-in byte tokenizer (one id per byte, eos ``</s>`` = 1, pad 0, no BOS), built once."""
    return build_tokenizer("byte")


@functools.cache
def image_tokenizer():
    """Another byte tokenizer with ``<image>`` added as one special token (id 384), built once."""
    tokenizer = build_tokenizer("byte")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids, by hand: every UTF-8 byte shifted past pad, eos and unk."""
    return [b + 3 for b in text.encode()]


def raises_located(path, row: int, field: str, problem: str, split: str = "train"):
    """``pytest.raises`` for exactly the :class:`DataError` naming ``path [split] row N, field 'x': problem``."""
    message = f"{path} [{split}] row {row}, field {field!r}: {problem}"
    return pytest.raises(DataError, match="^" + re.escape(message) + "$")


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


def write_rows(path, rows: list[dict]) -> str:
    """``rows`` written to ``path`` in the file type its suffix names: jsonl, json, csv or parquet."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(f"write_rows: no writer for {path.suffix!r}")
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
