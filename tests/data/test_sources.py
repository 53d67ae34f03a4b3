"""Local sources: json, jsonl, csv and parquet give the same rows; splits from files or a held-out fraction."""

import re

import pytest

from lit_align.data import InstructionDataModule
from lit_align.data.sources import ROW_COLUMN, load_splits, task_splits
from tests.data.util import byte_tokenizer, write_rows

ROWS = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "id": f"r{i}"} for i in range(10)]
ROWS[3]["completion"] = "007"  # text that looks like a number stays as written


def write(tmp_path, fmt, rows=ROWS, stem="rows"):
    return write_rows(tmp_path / f"{stem}.{fmt}", rows)


ALL_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_every_local_format_loads_the_same_rows(tmp_path, fmt):
    path = write(tmp_path, fmt)
    for kwargs in ({"path": None, "data_files": path}, {"path": path, "data_files": None}):
        splits, sources = load_splits(**kwargs, name=None, splits=ALL_SPLITS, val_fraction=0.0, seed=0)
        assert sources == {"train": path}
        assert list(splits) == ["train"]  # one file: no validation / test split of its own
        assert splits["train"].to_list() == ROWS


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_every_local_format_encodes_the_same(tmp_path, fmt):
    dm = InstructionDataModule(data_files=write(tmp_path, fmt), max_length=64)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    train = dm.encoded["train"]
    assert [r["reference"] for r in train] == [r["completion"] for r in ROWS]
    assert [r["meta"] for r in train] == [{"id": r["id"]} for r in ROWS]
    tok = byte_tokenizer()
    assert tok.decode(train[3]["input_ids"]) == "3+3=007</s>"


def test_csv_empty_cell_is_an_empty_string(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\n"",x\nNA,null\n')
    splits, _ = load_splits(None, str(path), None, ALL_SPLITS, 0.0, 0)
    assert splits["train"].to_list() == [{"prompt": "", "completion": "x"}, {"prompt": "NA", "completion": "null"}]


def test_val_fraction_splits_train_disjointly(tmp_path):
    path = write(tmp_path, "jsonl")
    splits, _ = load_splits(None, path, None, ALL_SPLITS, val_fraction=0.3, seed=0)
    train, val = splits["train"].to_list(), splits["validation"].to_list()
    assert len(train) == 7 and len(val) == 3
    assert {r[ROW_COLUMN] for r in train}.isdisjoint(r[ROW_COLUMN] for r in val)
    assert sorted(r[ROW_COLUMN] for r in train + val) == list(range(10))
    for r in train + val:  # the row number is the row's line in the file
        n = r.pop(ROW_COLUMN)
        assert r == ROWS[n]
    again, _ = load_splits(None, path, None, ALL_SPLITS, val_fraction=0.3, seed=0)
    assert again["validation"][ROW_COLUMN] == splits["validation"][ROW_COLUMN]
    other, _ = load_splits(None, path, None, ALL_SPLITS, val_fraction=0.3, seed=1)
    assert other["validation"][ROW_COLUMN] != splits["validation"][ROW_COLUMN]


def test_val_fraction_through_the_module(tmp_path):
    dm = InstructionDataModule(data_files=write(tmp_path, "jsonl"), val_fraction=0.2, max_length=64)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    train = [r["meta"]["id"] for r in dm.encoded["train"]]
    val = [r["meta"]["id"] for r in dm.encoded["validation"]]
    assert len(train) == 8 and len(val) == 2
    assert set(train).isdisjoint(val) and set(train) | set(val) == {r["id"] for r in ROWS}
    assert "test" not in dm.encoded
    assert all(set(r["meta"]) == {"id"} for r in dm.encoded["train"] + dm.encoded["validation"])
    assert dm.stats == {"data/train_rows": 8, "data/validation_rows": 2}


def test_existing_validation_split_wins_over_val_fraction(tmp_path):
    files = {"train": write(tmp_path, "jsonl", ROWS[:6], "train"),
             "validation": write(tmp_path, "jsonl", ROWS[6:8], "val"),
             "test": write(tmp_path, "jsonl", ROWS[8:], "test")}
    splits, sources = load_splits(None, files, None, ALL_SPLITS, val_fraction=0.5, seed=0)
    assert sources == files  # each split names its own file
    assert {k: v.to_list() for k, v in splits.items()} == {"train": ROWS[:6], "validation": ROWS[6:8], "test": ROWS[8:]}


def test_val_fraction_split_names_trains_source(tmp_path):
    path = write(tmp_path, "jsonl")
    _, sources = load_splits(None, path, None, ALL_SPLITS, val_fraction=0.3, seed=0)
    assert sources == {"train": path, "validation": path}


def test_a_split_list_of_files_is_named_by_its_own_files(tmp_path):
    a, b = write(tmp_path, "jsonl", ROWS[:3], "a"), write(tmp_path, "jsonl", ROWS[3:5], "b")
    test = write(tmp_path, "jsonl", ROWS[5:], "test")
    splits, sources = load_splits(None, {"train": [a, b], "test": test}, None, ALL_SPLITS, 0.0, 0)
    assert sources == {"train": f"{a}, {b}", "test": test}
    assert splits["train"].to_list() == ROWS[:5]


@pytest.mark.parametrize("role,name,setting", [("validation", "dev", "val_split"), ("test", "heldout", "test_split")])
def test_a_named_held_out_split_must_exist_but_the_defaults_are_optional(tmp_path, role, name, setting):
    path = write(tmp_path, "jsonl")
    with pytest.raises(ValueError,
                       match="^" + re.escape(f"{path}: no split {name!r} (data.{setting}); it has ['train']")):
        load_splits(None, path, None, {**ALL_SPLITS, role: name}, 0.0, 0)
    splits, _ = load_splits(None, path, None, ALL_SPLITS, 0.0, 0)  # "validation" and "test" absent: fine
    assert list(splits) == ["train"]
    splits, _ = load_splits(None, path, None, {**ALL_SPLITS, role: None}, 0.3, 0)  # null: none of its own
    assert set(splits) == {"train", "validation"}  # validation held out of train with val_fraction


def test_explicit_split_names(tmp_path):
    files = {"dev": write(tmp_path, "jsonl", ROWS[:2], "dev"), "main": write(tmp_path, "jsonl", ROWS[2:], "main")}
    dm = InstructionDataModule(data_files=files, train_split="main", val_split="dev", test_split=None, max_length=64)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert [r["meta"]["id"] for r in dm.encoded["train"]] == [f"r{i}" for i in range(2, 10)]
    assert [r["meta"]["id"] for r in dm.encoded["validation"]] == ["r0", "r1"]
    assert set(dm.encoded) == {"train", "validation"}


def test_max_eval_rows_caps_held_out_splits_only(tmp_path):
    files = {"train": write(tmp_path, "jsonl", ROWS[:6], "train"), "test": write(tmp_path, "jsonl", ROWS[6:], "test")}
    dm = InstructionDataModule(data_files=files, max_eval_rows=3, max_length=64)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert len(dm.encoded["train"]) == 6
    assert [r["meta"]["id"] for r in dm.encoded["test"]] == ["r6", "r7", "r8"]


def test_a_folder_of_split_files(tmp_path):
    write(tmp_path, "jsonl", ROWS[:7], "train")
    write(tmp_path, "jsonl", ROWS[7:], "test")
    splits, sources = load_splits(str(tmp_path), None, None, ALL_SPLITS, 0.0, 0)
    assert sources == {"train": str(tmp_path), "test": str(tmp_path)}
    assert {k: v.to_list() for k, v in splits.items()} == {"train": ROWS[:7], "test": ROWS[7:]}


def test_missing_train_split_and_mixed_extensions(tmp_path):
    path = write(tmp_path, "jsonl")
    with pytest.raises(ValueError,
                       match="^" + re.escape(f"{path}: no split 'main' (data.train_split); it has ['train']")):
        load_splits(None, path, None, {"train": "main"}, 0.0, 0)
    other = write(tmp_path, "csv")
    with pytest.raises(ValueError, match="use one of"):
        load_splits(None, [path, other], None, ALL_SPLITS, 0.0, 0)
    txt = tmp_path / "rows.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match=r"got extensions \['\.txt'\]"):
        load_splits(None, str(txt), None, ALL_SPLITS, 0.0, 0)


def test_task_splits_skip_empty_splits():
    splits = task_splits({"train": ROWS[:2], "validation": [], "test": ROWS[2:3]})
    assert {k: v.to_list() for k, v in splits.items()} == {"train": ROWS[:2], "test": ROWS[2:3]}


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("prompt,completion\n1+0=,01\n".encode("utf-8-sig"))
    splits, _ = load_splits(None, str(path), None, ALL_SPLITS, 0.0, 0)
    assert splits["train"].to_list() == [{"prompt": "1+0=", "completion": "01"}]
