"""Loading rows from a built-in task or any ``datasets`` source (hub id or local files)."""

from __future__ import annotations

import csv
import glob
import os
from typing import Any

import datasets

# Column holding each row's number in the source, added before a validation split is
# carved out of train (which shuffles), so error messages still point at the right row.
ROW_COLUMN = "__row__"

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


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
