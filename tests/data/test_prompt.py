"""PromptDataModule: prompts for online RL, left-padded for generation, with references and metadata."""

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lit_align.data import DataError, PromptDataModule
from lit_align.data.tasks import ArithTask
from tests.data.util import byte_tokenizer, raises_located, write_jsonl

BATCH_KEYS = {"prompt_ids", "prompt_mask", "prompts", "references", "meta", "index", "num_label_tokens_step",
              "num_seqs_step"}
SYSTEM = {"role": "system", "content": "Answer briefly."}


def ids(text):
    return byte_tokenizer()(text, add_special_tokens=False).input_ids


def chat(messages):
    return byte_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def module(tmp_path, rows, name="rows.jsonl", **kwargs):
    kwargs.setdefault("max_length", 256)
    dm = PromptDataModule(data_files=write_jsonl(tmp_path / name, rows), **kwargs)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    return dm


def arith_module(**kwargs):
    task = ArithTask(train_size=20, val_size=5)
    dm = PromptDataModule(task=task, max_length=16, **kwargs)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    return task, dm


def test_arith_prompt_rows():
    task, dm = arith_module()
    assert dm.stats == {"data/train_rows": 20, "data/validation_rows": 5, "data/test_rows": 5}
    rows = task.rows("prompt")
    for split in ("train", "validation", "test"):
        for enc, row in zip(dm.encoded[split], rows[split], strict=True):
            assert enc["prompt_ids"] == [b + 3 for b in row["prompt"].encode()]  # verbatim: no template, no EOS
            assert enc["prompt"] == row["prompt"] and enc["reference"] == row["answer"]
            assert enc["meta"] == {"answer": row["answer"]}
            assert enc["length"] == len(row["prompt"]) and enc["num_labels"] == 1
    first = dm.encoded["train"][0]
    assert first["prompt"] == rows["train"][0]["prompt"] and first["prompt_ids"][-1] == ord("=") + 3
    prompts = {s: {r["prompt"] for r in dm.encoded[s]} for s in ("train", "validation", "test")}
    assert len(prompts["train"]) == 20 and len(prompts["validation"]) == 5 and len(prompts["test"]) == 5
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    enc = dm.encoded["validation"][0]
    assert dm.checker(task.format_answer(int(enc["reference"])), enc["meta"], enc["reference"])
    assert not dm.checker(task.format_answer(int(enc["reference"]) + 1), enc["meta"], enc["reference"])
    assert dm.group_by_length() is False


def test_prompts_of_different_lengths_are_left_padded():
    dm = PromptDataModule(task=ArithTask(), max_length=8)
    dm.tokenizer = byte_tokenizer()
    rows = [{"prompt_ids": ids(t), "prompt": t, "reference": r, "meta": {"answer": r}, "length": len(t),
             "num_labels": 1}
            for t, r in (("a", "1"), ("abc", "2"), ("ab", "3"))]
    batch = dm.collate([[r] for r in rows])
    assert batch["prompt_ids"].tolist() == [[0, 0, 100], [100, 101, 102], [0, 100, 101]]
    assert batch["prompt_mask"].tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert batch["prompt_ids"].dtype == torch.long and batch["prompt_mask"].dtype == torch.long
    assert batch["prompts"] == ["a", "abc", "ab"] and batch["references"] == ["1", "2", "3"]
    assert batch["meta"] == [{"answer": "1"}, {"answer": "2"}, {"answer": "3"}]
    assert dm.eval_collate([[r] for r in rows]).keys() == batch.keys()


def test_eval_loader_has_the_training_keys(tmp_path):
    rows = [{"prompt": "x" * n, "answer": str(n)} for n in (1, 3, 2)]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows)}
    dm = PromptDataModule(data_files=files, eval_batch_size=2, max_length=8)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [set(b) for b in batches] == [BATCH_KEYS, BATCH_KEYS]
    x = ord("x") + 3
    assert batches[0]["prompt_ids"].tolist() == [[0, 0, x], [x, x, x]]
    assert batches[0]["prompt_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batches[0]["prompts"] == ["x", "xxx"] and batches[0]["references"] == ["1", "3"]
    assert batches[1]["prompt_ids"].tolist() == [[x, x]] and batches[1]["meta"] == [{"answer": "2"}]
    assert dm.test_dataloader() == []


def test_train_loader_yields_micro_batch_size_prompts():
    _, dm = arith_module(micro_batch_size=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(set(b) == BATCH_KEYS for b in batches)
    assert [b["prompt_ids"].shape for b in batches] == [torch.Size([4, 6])] * 5  # 2-digit sums: `ab+cd=`
    assert all(b["num_seqs_step"].item() == 4 and b["num_label_tokens_step"].item() == 4 for b in batches)
    seen = [p for b in batches for p in b["prompts"]]
    assert sorted(seen) == sorted(r["prompt"] for r in dm.encoded["train"])  # each prompt once per epoch


MULTI = [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "and 3+5?"}]


def test_message_prompts_use_the_chat_template_with_the_generation_prompt(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+2?"}], "answer": "3"}, {"prompt": MULTI, "answer": "8"}]
    dm = module(tmp_path, rows)
    one, multi = dm.encoded["train"]
    assert one["prompt"] == chat(rows[0]["prompt"]) == "<|user|>\n1+2?\n<|assistant|>\n"
    assert one["prompt_ids"] == ids(one["prompt"]) and 1 not in one["prompt_ids"]
    assert multi["prompt"] == chat(MULTI) and multi["prompt"].endswith("<|user|>\nand 3+5?\n<|assistant|>\n")
    assert multi["prompt_ids"] == ids(multi["prompt"]) and multi["length"] == len(multi["prompt_ids"])
    assert one["meta"] == {"answer": "3"} and multi["reference"] == "8"


def test_system_prompt_and_string_prompts_under_the_template(tmp_path):
    user = {"role": "user", "content": "1+2?"}
    dm = module(tmp_path, [{"prompt": [user], "answer": "3"}, {"prompt": [SYSTEM, user], "answer": "3"}],
                system_prompt="Be terse.")
    assert [r["prompt"] for r in dm.encoded["train"]] == [
        chat([{"role": "system", "content": "Be terse."}, user]), chat([SYSTEM, user])]
    for kwargs in ({"format": "messages"}, {"chat_template": True}):
        dm = module(tmp_path, [{"prompt": "1+2?", "answer": "3"}], **kwargs)
        assert dm.encoded["train"][0]["prompt"] == chat([user])
    dm = module(tmp_path, [{"prompt": "1+2?", "answer": "3"}])
    assert dm.encoded["train"][0]["prompt"] == "1+2?"  # strings stay raw by default


VERL = [
    {"data_source": "arith", "prompt": [{"role": "user", "content": f"{i}+2="}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": str(i + 2)}, "extra_info": {"split": "train", "index": i}}
    for i in range(3)
]


def test_verl_style_rows_with_a_nested_ground_truth(tmp_path):
    dm = module(tmp_path, VERL, answer_key="reward_model.ground_truth")
    enc = dm.encoded["train"][1]
    assert enc["reference"] == "3" and enc["prompt"] == chat(VERL[1]["prompt"])
    assert enc["meta"] == {"data_source": "arith", "ability": "math",
                           "reward_model": {"style": "rule", "ground_truth": "3"},
                           "extra_info": {"split": "train", "index": 1}, "answer": "3"}
    batch = dm.collate([[r] for r in dm.encoded["train"]])
    assert batch["references"] == ["2", "3", "4"]
    assert [m["reward_model"]["ground_truth"] for m in batch["meta"]] == ["2", "3", "4"]


def test_no_answer_key_means_no_reference(tmp_path):
    dm = module(tmp_path, [{"prompt": "hi", "id": 7}], answer_key=None)
    enc = dm.encoded["train"][0]
    assert enc["reference"] == "" and enc["meta"] == {"id": 7}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_sources(tmp_path, fmt):
    rows = [{"question": f"{i}+{i}=", "solution": 2 * i, "id": f"r{i}"} for i in range(4)]
    path = tmp_path / f"rows.{fmt}"
    (pd.DataFrame(rows).to_csv(path, index=False) if fmt == "csv" else pd.DataFrame(rows).to_parquet(path))
    dm = PromptDataModule(path=str(path), columns={"prompt": "question"}, answer_key="solution", max_length=16)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    enc = dm.encoded["train"][3]
    assert enc["prompt_ids"] == ids("3+3=") and enc["reference"] == "6"
    answer = "6" if fmt == "csv" else 6  # csv cells are text; parquet keeps the integer
    assert enc["meta"] == {"solution": answer, "id": "r3", "answer": answer}


def test_truncation_keeps_the_end_of_a_string_prompt(tmp_path):
    dm = module(tmp_path, [{"prompt": "abcdefghij", "answer": "1"}, {"prompt": "abcd", "answer": "2"}], max_length=4)
    long, short = dm.encoded["train"]
    assert long["prompt_ids"] == ids("ghij") and long["prompt"] == "ghij" and long["length"] == 4
    assert short["prompt_ids"] == ids("abcd")
    assert dm.stats == {"data/train_truncated_prompt": 1, "data/train_rows": 2}


def test_truncation_of_message_prompts_drops_whole_leading_turns_first(tmp_path):
    kept = [SYSTEM, MULTI[3]]
    limit = len(ids(chat(kept)))
    assert len(ids(chat(MULTI))) > limit
    dm = module(tmp_path, [{"prompt": MULTI, "answer": "8"}], max_length=limit)
    enc = dm.encoded["train"][0]
    assert enc["prompt"] == chat(kept) and enc["prompt_ids"] == ids(chat(kept))
    # Too long even with the last user turn alone: tokens go from the left, the generation prompt stays.
    with pytest.warns(UserWarning, match="1 of 1 prompts"):
        dm = module(tmp_path, [{"prompt": MULTI, "answer": "8"}], max_length=17)
    enc = dm.encoded["train"][0]
    assert enc["prompt_ids"] == ids("5?\n<|assistant|>\n") and enc["prompt"] == "5?\n<|assistant|>\n"
    assert dm.stats["data/train_truncated_prompt"] == 1


def test_drop_truncation_counts_the_dropped_prompts(tmp_path):
    rows = [{"prompt": "x" * n, "answer": str(n)} for n in (2, 9, 4, 12)]
    dm = module(tmp_path, rows, max_length=4, truncation="drop")
    assert [r["prompt"] for r in dm.encoded["train"]] == ["xx", "xxxx"]
    assert dm.stats == {"data/train_dropped_too_long": 2, "data/train_rows": 2}


def test_extra_prompts_are_deterministic_per_step_and_round():
    _, dm = arith_module()
    a = dm.extra_prompts(step=3, round=0, n=6)
    assert set(a) == {"prompt_ids", "prompt_mask", "prompts", "references", "meta", "index"}
    assert a["prompt_ids"].shape == (6, 6) and len(set(a["prompts"])) == 6  # distinct within a draw
    _, resumed = arith_module()  # a fresh module, as after a restart, draws the same prompts
    b = resumed.extra_prompts(step=3, round=0, n=6)
    assert a["prompts"] == b["prompts"] and torch.equal(a["prompt_ids"], b["prompt_ids"])
    assert dm.extra_prompts(step=3, round=1, n=6)["prompts"] != a["prompts"]
    assert dm.extra_prompts(step=4, round=0, n=6)["prompts"] != a["prompts"]
    dm.trainer = SimpleNamespace(global_rank=1)
    assert dm.extra_prompts(step=3, round=0, n=6)["prompts"] != a["prompts"]
    dm.trainer = None
    every = dm.extra_prompts(step=0, round=0, n=25)["prompts"]  # more than the 20 training prompts
    assert len(every) == 25 and set(every) == {r["prompt"] for r in dm.encoded["train"]}
    train = {r["prompt"]: r["reference"] for r in dm.encoded["train"]}
    assert a["references"] == [train[p] for p in a["prompts"]]


# -- errors ------------------------------------------------------------------------
GOOD = {"prompt": "1+1=", "answer": "2"}
GOOD_CHAT = {"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}


def raises_at_row_2(tmp_path, good, bad, field, problem, **kwargs):
    """Four rows, the third bad: setup fails with the full location of the problem."""
    with raises_located(tmp_path / "rows.jsonl", 2, field, problem):
        module(tmp_path, [good, good, bad, good], **kwargs)


@pytest.mark.parametrize("bad,field,problem", [
    ({"answer": "2"}, "prompt", "missing (null)"),
    ({"prompt": "", "answer": "2"}, "prompt", "is empty"),
    ({"prompt": " \n", "answer": "2"}, "prompt", "is empty"),
    ({"prompt": "1+1=", "answer": None}, "answer", "no reference answer (the value is null or missing)"),
])
def test_string_prompt_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, GOOD, bad, field, problem)


def test_wrong_prompt_type(tmp_path):
    raises_at_row_2(tmp_path, GOOD, GOOD_CHAT, "prompt", "expected a string like the split's first row, got list")
    raises_at_row_2(tmp_path, GOOD_CHAT, GOOD, "prompt", "expected a list of turns like the split's first row, got str")
    raises_at_row_2(tmp_path, GOOD, GOOD_CHAT, "prompt", "expected a string, got list", format="string")
    path = str(tmp_path / "rows.jsonl")
    # (read before datasets would coerce the column: the number is reported as found in the file)
    with pytest.raises(DataError, match=re.escape(f"{path} [train] row 0, field 'prompt': expected a string (as in"
                                                  " other rows), got int 5; quote it in the file")):
        module(tmp_path, [{"prompt": 5, "answer": "2"}, GOOD])


@pytest.mark.parametrize("bad,field,problem", [
    ([], "prompt", "expected a non-empty list of turns"),
    ([{"role": "user"}], "prompt[0]", "each turn needs 'role' and 'content'"),
    ([{"role": "bot", "content": "hi"}], "prompt[0].role",
     "unknown role 'bot' (allowed: system, user, assistant, tool)"),
    ([{"role": "user", "content": 5}], "prompt[0].content", "expected a string, got int"),
    ([{"role": "system", "content": ""}, {"role": "user", "content": " "}], "prompt", "is empty"),
])
def test_message_prompt_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, GOOD_CHAT, {"prompt": bad, "answer": "2"}, field, problem)


def test_null_nested_answer(tmp_path):
    field, problem = "reward_model.ground_truth", "no reference answer (the value is null or missing)"
    for bad in ({"style": "rule"}, None):
        raises_at_row_2(tmp_path, VERL[0], {**VERL[1], "reward_model": bad}, field, problem,
                        answer_key="reward_model.ground_truth")


def test_prompt_column_missing_from_every_row(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path} [train] row 0, field 'question': missing column"
                                                  " (columns: ['answer', 'prompt'])")):
        module(tmp_path, [GOOD] * 2, columns={"prompt": "question"})


@pytest.mark.parametrize("answer_key", ["solution", "reward_model.truth", "data_source.x"])
def test_answer_column_missing_from_the_dataset(tmp_path, answer_key):
    path = str(tmp_path / "rows.jsonl")
    message = (f"{path} [train]: no answer column {answer_key!r} (columns: ['data_source', 'prompt', 'ability',"
               " 'reward_model', 'extra_info'])")
    with pytest.raises(DataError, match="^" + re.escape(message)):
        module(tmp_path, VERL, answer_key=answer_key)


def test_template_settings_checked_per_split(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path} [train]: the prompts are lists of turns, which need the"
                                                  " chat template (chat_template: false)")):
        module(tmp_path, [GOOD_CHAT], chat_template=False)
    with pytest.raises(DataError, match=re.escape(f"{path} [train]: system_prompt needs chat-templated prompts")):
        module(tmp_path, [GOOD], system_prompt="Be terse.")


@pytest.mark.parametrize("kwargs,message", [
    ({"format": "chat"}, "data.format: 'chat' is not one of ('auto', 'string', 'messages')"),
    ({"columns": {"answer": "x"}}, "data.columns: unknown keys ['answer'] (known: ['prompt'])"),
    ({"answer_key": ""}, "data.answer_key: give a column name, or null for no reference answer"),
    ({"format": "messages", "chat_template": False}, "data: format 'messages' needs the chat template"),
    ({"format": "string", "system_prompt": "x"}, "data: system_prompt needs chat-templated prompts"),
    ({"truncation": "end"}, "data.truncation: 'end' is not one of ('prompt', 'drop')"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PromptDataModule(task=ArithTask(), **kwargs)


def test_extra_prompts_before_setup():
    with pytest.raises(RuntimeError, match="call setup"):
        PromptDataModule(task=ArithTask()).extra_prompts(0, 0, 2)
