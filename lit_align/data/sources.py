"""Loading rows from a built-in task or any ``datasets`` source (hub id or local files)."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from typing import Any

import datasets

# Column holding each row's number in the source, added before a validation split is
# carved out of train (which shuffles), so error messages still point at the right row.
ROW_COLUMN = "__row__"

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


# JSON files up to this size are read once in Python before `datasets` loads them, so that a
# malformed one is reported by file, row and field (the builders' errors name neither)
CHECK_JSON_BYTES = 1 << 30


def _type_name(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float {value}"
    return type(value).__name__


def check_json_file(path: str, split: str | None = None) -> None:
    """Refuse, naming the file, row and field, a JSON/JSONL file that ``datasets`` would misread:
    empty or blank, not valid JSON (truncated), or with a column holding strings in some rows and
    numbers (``29``, ``NaN``) in others, which ``datasets`` would coerce column-wide and blame on
    row 0. Rows are counted as ``datasets`` does: non-blank lines of a JSONL file, items of a JSON array."""
    from lit_align.data.formats import DataError

    at = f"{path} [{split}]" if split else path
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: the file is empty" if not text else f"{path}: the file holds only blank lines")
    if path.endswith(".jsonl") or not text.lstrip().startswith("["):
        rows, row = [], 0
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{at} row {row} (line {line_no}): invalid JSON ({e.msg}, column {e.colno})"
                                + ("; the file looks truncated" if line_no == len(text.splitlines()) else "")) from None
            row += 1
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} (line {e.lineno}, column {e.colno}): invalid JSON ({e.msg})"
                            + ("; the file looks truncated" if e.pos >= len(text.rstrip()) - 1 else "")) from None
        if not isinstance(rows, list):
            return  # a mapping of columns or of splits: left to the builder
    strings = set()
    for row in rows:
        if isinstance(row, dict):
            strings.update(k for k, v in row.items() if isinstance(v, str))
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{at} row {i}: expected a JSON object, got {_type_name(row)}")
        for key in strings:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, bool):
                shown = _type_name(value) if isinstance(value, float) and not math.isfinite(value) \
                    else f"{_type_name(value)} {value!r}"
                raise DataError(f"{at} row {i}, field {key!r}: expected a string (as in other rows), got {shown}; "
                                "quote it in the file")


def _builder_for(files: list[str]) -> str:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    builders = {_BUILDERS.get(e) for e in exts}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"data files {files}: use one of {sorted(_BUILDERS)} (got extensions {sorted(exts)})")
    return builders.pop()


def _csv_as_text(files: list[str]) -> dict[str, Any]:
    """Builder options that read every CSV column as text, as written: ``"007"`` and ``"42"``
    stay strings (a completion is text, not a number) and an empty cell is ``""``."""
    first = files[0]
    if "*" in first:
        first = (sorted(glob.glob(first)) or [first])[0]
    with open(first, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}


# Held-out split names that may be absent: a dataset without them simply has no such split
# (or, for validation, one carved out of train with ``val_fraction``). Any other name was
# chosen by the user and must exist.
OPTIONAL_SPLITS = {"validation": "validation", "test": "test"}
_SETTING = {"train": "train_split", "validation": "val_split", "test": "test_split"}


def _file_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def load_splits(path: str | None, data_files: str | list[str] | dict[str, Any] | None, name: str | None,
                splits: dict[str, str | None], val_fraction: float, seed: int
                ) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """Load the requested splits of a dataset.

    Args:
        path: hub id, local directory, or a local data file (json/jsonl/parquet/csv).
        data_files: files for the ``json``/``csv``/``parquet`` builders; a dict maps split names to files.
        name: dataset configuration name (hub datasets).
        splits: role -> split name, roles ``train``, ``validation``, ``test``; ``None`` skips a role.
            The train split must exist, and so must a held-out split named anything but its
            default (``validation``, ``test``): a named split that is absent is an error naming
            the splits the source has. The defaults are optional.
        val_fraction: when the validation split does not exist, hold out this fraction of train.
    Returns:
        ``({role: Dataset}, {role: source})`` where each source names the split's own files
        (or the hub id / folder) for error messages; a validation split carved out of train
        has train's source. Splits carved out with ``val_fraction`` carry the source row
        numbers in ``ROW_COLUMN``.
    """
    if path is not None and os.path.isfile(path):
        data_files, path = path, None
    if data_files is not None:
        if isinstance(data_files, dict):
            by_split = {split: _file_list(v) for split, v in data_files.items()}
        else:  # the builders put every file into one "train" split
            by_split = {"train": _file_list(data_files)}
        files = [f for v in by_split.values() for f in v]
        for f in files:
            if "*" not in f and not os.path.exists(f):
                raise FileNotFoundError(f"data file {f!r} does not exist")
        source = ", ".join(files)
        split_sources = {split: ", ".join(v) for split, v in by_split.items()}
        builder = _builder_for(files)
        for split, f in ((split, f) for split, v in by_split.items() for f in v):
            if "*" in f or not os.path.isfile(f):
                continue
            if builder == "json" and os.path.getsize(f) <= CHECK_JSON_BYTES:
                check_json_file(f, split)
            elif os.path.getsize(f) == 0:
                from lit_align.data.formats import DataError

                raise DataError(f"{f}: the file is empty")
        options = _csv_as_text(files) if builder == "csv" else {}
        ds = datasets.load_dataset(builder, data_files=data_files, **options)
    elif path is not None:
        source = path
        split_sources = {}
        ds = datasets.load_dataset(path, name)
    else:
        raise ValueError("data: give `path` (hub id, folder or file), `data_files`, or a built-in `task`")
    out: dict[str, datasets.Dataset] = {}
    sources: dict[str, str] = {}
    for role, split in splits.items():
        if split is None:
            continue
        if split in ds:
            out[role], sources[role] = ds[split], split_sources.get(split, source)
        elif role == "train" or split != OPTIONAL_SPLITS.get(role):
            raise ValueError(f"{source}: no split {split!r} (data.{_SETTING.get(role, role)}); it has {list(ds)}")
    if "validation" not in out and val_fraction > 0 and "train" in out:
        train = out["train"].add_column(ROW_COLUMN, list(range(len(out["train"]))))
        parts = train.train_test_split(test_size=val_fraction, seed=seed)
        out["train"], out["validation"] = parts["train"], parts["test"]
        sources["validation"] = sources["train"]
    return out, sources


def task_splits(rows: dict[str, list[dict]]) -> dict[str, datasets.Dataset]:
    """Built-in task rows as ``datasets`` splits, so they take the same path as real data."""
    return {split: datasets.Dataset.from_list(r) for split, r in rows.items() if r}
