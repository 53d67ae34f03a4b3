"""Bad rows raise DataError naming the file, the split, the row and the field."""

import re
import warnings

import pytest

from lit_align.data import DataError, InstructionDataModule
from lit_align.data.formats import Where
from tests.data.util import byte_tokenizer, encoded_module, raises_located, write_jsonl

PC = {"prompt": "1+1=", "completion": "2"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
ALPACA = {"instruction": "Say hi.", "input": "", "output": "hi"}


def raises_at_row_2(tmp_path, good, bad, field, problem, **kwargs):
    """Four rows, the third bad: setup fails with the full location of the problem."""
    with raises_located(tmp_path / "rows.jsonl", 2, field, problem):
        encoded_module(tmp_path, [good, good, bad, good], name="rows.jsonl", **kwargs)


@pytest.mark.parametrize("bad,field,problem", [
    ({"prompt": "1+1="}, "completion", "expected a string, got NoneType"),
    ({"prompt": "1+1=", "completion": ""}, "completion", "is empty"),
    ({"prompt": "1+1=", "completion": "  \n"}, "completion", "is empty"),
    ({"prompt": "1+1=", "completion": None}, "completion", "expected a string, got NoneType"),
])
def test_prompt_completion_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, PC, bad, field, problem)


def test_column_missing_from_every_row(tmp_path):
    rows = [{"prompt": "a", "answer": "b"}] * 3
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path} [train] row 0, field 'completion': missing column")):
        encoded_module(tmp_path, rows, name="rows.jsonl", format="prompt_completion")


def test_undetectable_format_names_the_file_split_and_columns(tmp_path):
    path = str(tmp_path / "data.jsonl")
    message = f"{path} [train]: cannot tell the data format from columns ['question', 'answer']"
    with pytest.raises(DataError, match="^" + re.escape(message)):
        encoded_module(tmp_path, [{"question": "a", "answer": "b"}])


def test_renamed_column_error_names_the_users_column(tmp_path):
    good = {"question": "1+1=", "answer": "2"}
    raises_at_row_2(tmp_path, good, {"question": "2+2=", "answer": ""}, "answer", "is empty",
                    columns={"prompt": "question", "completion": "answer"})


@pytest.mark.parametrize("bad,field,problem", [
    ({"messages": "hello"}, "messages", "expected a non-empty list of turns"),
    ({"messages": []}, "messages", "expected a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "messages[1]", "each turn needs 'role' and 'content'"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages[0]", "each turn needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     "messages[1].role", "unknown role 'bot' (allowed: system, user, assistant, tool)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn to learn from"),
])
def test_messages_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, CHAT, bad, field, problem)


def test_non_string_content(tmp_path):
    bad = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}
    raises_at_row_2(tmp_path, CHAT, bad, "messages[0].content", "expected a string, got int")


@pytest.mark.parametrize("bad,field,problem", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]},
     "conversations[1].from",
     "unknown role 'robot' (allowed: human, user, gpt, assistant, chatgpt, bing, system, tool)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "content": "yo"}]},
     "conversations[1]", "each turn needs 'from' and 'value'"),
])
def test_sharegpt_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, SHAREGPT, bad, field, problem)


@pytest.mark.parametrize("bad,field,problem", [
    ({"instruction": "", "input": "", "output": "hi"}, "instruction", "is empty"),
    ({"instruction": "Say hi.", "input": "", "output": ""}, "output", "is empty"),
])
def test_alpaca_errors(tmp_path, bad, field, problem):
    raises_at_row_2(tmp_path, ALPACA, bad, field, problem)


def test_row_number_is_the_files_after_a_validation_split(tmp_path):
    # val_fraction shuffles train before splitting; the message still points at line 3 of the file
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)]
    rows[2]["completion"] = ""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    for seed in range(3):
        dm = InstructionDataModule(data_files=path, val_fraction=0.25, seed=seed)
        dm.tokenizer = byte_tokenizer()
        with pytest.raises(DataError, match=r"rows\.jsonl \[(train|validation)\] row 2, field 'completion': is empty$"):
            dm.setup("fit")


def test_error_names_the_split_file(tmp_path):
    # with a file per split, the message names the split's own file only
    train = write_jsonl(tmp_path / "train.jsonl", [PC, PC])
    val = write_jsonl(tmp_path / "val.jsonl", [PC, {"prompt": "x", "completion": ""}])
    dm = InstructionDataModule(data_files={"train": train, "validation": val})
    dm.tokenizer = byte_tokenizer()
    with pytest.raises(DataError,
                       match="^" + re.escape(f"{val} [validation] row 1, field 'completion': is empty") + "$"):
        dm.setup("fit")


# -- system_prompt with rows used as written -------------------------------------------------

def test_system_prompt_with_string_prompt_completion_rows_is_an_error(tmp_path):
    problem = ("system_prompt is set, but string prompt/completion rows are used as written, without the chat"
               " template that would hold a system turn; give prompt and completion as lists of turns or unset"
               " system_prompt")
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match="^" + re.escape(f"{path} [train] row 0, field 'prompt': {problem}") + "$"):
        encoded_module(tmp_path, [PC, PC], name="rows.jsonl", system_prompt="Be brief.")


def test_system_prompt_with_alpaca_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=re.escape("data: system_prompt needs chat-templated rows; format 'alpaca'")):
        InstructionDataModule(path="x", format="alpaca", system_prompt="Be brief.")
    path = str(tmp_path / "rows.jsonl")  # detected from the columns: the first row says so
    message = (f"{path} [train] row 0, field 'instruction': system_prompt is set, but Alpaca rows are used as written,"
               " without the chat template that would hold a system turn; convert the rows to messages or unset"
               " system_prompt")
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        encoded_module(tmp_path, [ALPACA, ALPACA], name="rows.jsonl", system_prompt="Be brief.")


def test_system_prompt_with_conversational_prompt_completion_rows_is_applied(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    enc = encoded_module(tmp_path, [row], system_prompt="Be brief.").encoded["train"][0]
    assert byte_tokenizer().decode(enc["prompt_ids"]) == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"


# -- split names -------------------------------------------------------------------------------

def test_a_named_held_out_split_that_is_absent_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [PC, PC])
    val = write_jsonl(tmp_path / "val.jsonl", [PC])
    for setting, kwargs in (("val_split", {"val_split": "dev"}), ("test_split", {"test_split": "heldout"})):
        dm = InstructionDataModule(data_files={"train": train, "validation": val}, **kwargs)
        dm.tokenizer = byte_tokenizer()
        name = kwargs[setting]
        message = f"{train}, {val}: no split {name!r} (data.{setting}); it has ['train', 'validation']"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            dm.setup("fit")


def test_invalid_settings():
    with pytest.raises(ValueError, match="data.format: 'chatml' is not one of"):
        InstructionDataModule(path="x", format="chatml")
    with pytest.raises(ValueError, match="data.truncation: 'left' is not one of"):
        InstructionDataModule(path="x", truncation="left")
    with pytest.raises(ValueError, match=r"data.columns: unknown keys \['answer'\]"):
        InstructionDataModule(path="x", columns={"answer": "a"})
    with pytest.raises(ValueError, match="give a built-in `task`, a `path` or `data_files`"):
        InstructionDataModule()
    with pytest.raises(ValueError, match="val_fraction: 1.0 must be in"):
        InstructionDataModule(path="x", val_fraction=1.0)


def test_missing_file(tmp_path):
    dm = InstructionDataModule(data_files=str(tmp_path / "nope.jsonl"))
    dm.tokenizer = byte_tokenizer()
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dm.setup("fit")


# -- eval groups -------------------------------------------------------------------------------

def test_eval_group_error_names_the_rows_source_location_when_kept(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [dict(PC, kind="a")])  # every split file has the same columns
    # row 1 has nothing to learn and is dropped, so row 3 is kept at position 2
    rows = [dict(PC, kind="a"), {"prompt": "", "completion": "</s>"}, dict(PC, kind="b"), PC]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    dm = InstructionDataModule(data_files={"train": train, "validation": val})
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    dm.group_key = "kind"
    with pytest.raises(DataError, match="^" + re.escape(
            "validation row 2 (position after dropped rows), field 'kind': "
            "no column to group metrics by (columns: [])")):
        dm.eval_groups()
    dm.encoded["validation"][2]["where"] = Where(val, "validation", 3)  # as image rows keep it
    with pytest.raises(DataError, match="^" + re.escape(
            f"{val} [validation] row 3, field 'kind': no column to group metrics by (columns: [])") + "$"):
        dm.eval_groups()
    dm.encoded["validation"].pop(2)
    assert dm.eval_groups() == ["a", "b"]


# -- files datasets would misread ------------------------------------------------------------

def _setup(path, cls=InstructionDataModule):
    dm = cls(data_files=str(path), max_length=256)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")


@pytest.mark.parametrize("value,shown", [(29, "int 29"), (float("nan"), "float nan"), (1.5, "float 1.5")])
def test_a_number_in_a_string_column_is_located(tmp_path, value, shown):
    # datasets would read the column as numbers (turning "2" into 2) and blame row 0
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in [PC, PC, {"prompt": "1+2=", "completion": value}]))
    message = (f"{path} [train] row 2, field 'completion': expected a string (as in other rows), got {shown}; "
               "quote it in the file")
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        _setup(path)


@pytest.mark.parametrize("text,problem", [("", "the file is empty"), ("\n\n  \n", "the file holds only blank lines")])
def test_an_empty_or_blank_file_is_named(tmp_path, text, problem):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {problem}") + "$"):
        _setup(path)


def test_an_empty_csv_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("")
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: the file is empty") + "$"):
        _setup(path)


def test_truncated_json_names_file_row_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = '{"prompt": "1+1=", "completion": "2"}\n'
    path.write_text(row + "\n" + row + '{"prompt": "x", "com')
    where = re.escape(f"{path} [train] row 2 (line 4): invalid JSON (Unterminated string")
    with pytest.raises(DataError, match="^" + where + r".*the file looks truncated$"):
        _setup(path)
    array = tmp_path / "rows.json"
    array.write_text('[{"prompt": "1+1=", "completion": "2"}, {"prompt": "x", "com')
    with pytest.raises(DataError, match="^" + re.escape(f"{array} (line 1, column ") + r"\d+\): invalid JSON"):
        _setup(array)


def test_a_null_rejected_is_reported_against_rejected(tmp_path):
    from lit_align.data import PreferenceDataModule

    good = {"chosen": "Q: 1+1= A: 2", "rejected": "Q: 1+1= A: 3"}
    with raises_located(tmp_path / "rows.jsonl", 2, "rejected", "expected a string or a list of turns, got NoneType"):
        encoded_module(tmp_path, [good, good, {"chosen": "Q: 1+1= A: 2", "rejected": None}], name="rows.jsonl",
                       cls=PreferenceDataModule)


# -- prompts longer than max_length -----------------------------------------------------------

def _prompt_module(tmp_path, prompts, max_length):
    from lit_align import PromptDataModule

    rows = [{"prompt": p, "answer": "1"} for p in prompts]
    return encoded_module(tmp_path, rows, name="rows.jsonl", cls=PromptDataModule, max_length=max_length)


def test_many_truncated_prompts_warn_with_counts(tmp_path):
    from lit_align.data.prompt import TRUNCATED_SHARE

    assert TRUNCATED_SHARE == 0.1
    path = tmp_path / "rows.jsonl"
    with pytest.warns(UserWarning, match=re.escape(f"{path} [train]: 2 of 10 prompts (20%, more than 10%) are longer"
                                                   " than data.max_length=8 and lose their start")):
        _prompt_module(tmp_path, ["a" * 20] * 2 + ["b"] * 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 of 10 is within the share: no warning
        _prompt_module(tmp_path, ["a" * 20] + ["b"] * 9, 8)


def test_every_prompt_truncated_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(DataError, match="^" + re.escape(f"{path} [train]: every prompt (8 of 8) is longer than "
                                                        "data.max_length=4 and would lose its start")):
        _prompt_module(tmp_path, ["a long question?"] * 8, 4)
