"""Every row format: the loss sits on completion / assistant tokens (each followed by EOS) and nowhere else."""

import pytest

from lit_align.data import DataError
from lit_align.data.encode import IGNORE_INDEX, encode_segments
from lit_align.data.formats import (
    DEFAULT_COLUMNS,
    Segment,
    Where,
    detect_format,
    lookup,
    renamed_columns,
    row_to_segments,
)
from tests.data.util import byte_tokenizer, encoded_module, labelled_texts, unlabelled_text

EOS = "</s>"
WHERE = Where("rows.jsonl", "train", 0)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+5?"},
    {"role": "assistant", "content": "8, of course"},
]
# The byte tokenizer's chat template; its special tokens swallow the whitespace next to them,
# so the newline the template writes after each `</s>` is not in the token ids.
CHAT_PROMPT_1 = "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"
CHAT_PROMPT_2 = "<|user|>\nand 3+5?\n<|assistant|>\n"


def encode(row, fmt, columns=None, system_prompt=None, max_length=512, truncation="prompt"):
    tok = byte_tokenizer()
    names = {**DEFAULT_COLUMNS, **(columns or {})}
    segments = row_to_segments(row, fmt, names, tok, WHERE, system_prompt)
    return encode_segments(segments, tok, max_length, truncation)


def test_byte_tokenizer_facts_the_tests_rely_on():
    tok = byte_tokenizer()
    assert tok.eos_token == EOS and tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.bos_token_id is None
    assert tok("ab", add_special_tokens=False).input_ids == [100, 101]
    assert tok("ab").input_ids == [100, 101, 1]  # ByT5 appends EOS unless told not to


def test_prompt_completion_labels_only_the_completion_and_eos():
    enc = encode({"prompt": "12+34=", "completion": "46"}, "prompt_completion")
    tok = byte_tokenizer()
    assert enc["input_ids"] == tok("12+34=46", add_special_tokens=False).input_ids + [1]
    assert enc["labels"] == [IGNORE_INDEX] * 6 + tok("46", add_special_tokens=False).input_ids + [1]
    assert labelled_texts(enc, tok) == ["46" + EOS]
    assert unlabelled_text(enc, tok) == "12+34="
    assert tok.decode(enc["prompt_ids"]) == "12+34="
    assert enc["reference"] == "46"
    assert enc["num_labels"] == 3 and enc["length"] == 9


def test_completion_that_already_ends_with_eos_gets_no_second_one():
    enc = encode({"prompt": "q", "completion": "a" + EOS}, "prompt_completion")
    assert enc["input_ids"] == [116, 100, 1]
    assert labelled_texts(enc, byte_tokenizer()) == ["a" + EOS]
    assert enc["reference"] == "a"


def test_empty_prompt_first_position_has_no_label():
    # Nothing predicts the first token of a sequence (there is no BOS), so it carries no label.
    enc = encode({"prompt": "", "completion": "ab"}, "prompt_completion")
    assert enc["input_ids"] == [100, 101, 1]
    assert enc["labels"] == [IGNORE_INDEX, 101, 1]
    assert enc["prompt_ids"] == []


def test_messages_multi_turn_loss_only_on_assistant_turns():
    tok = byte_tokenizer()
    enc = encode({"messages": CHAT}, "messages")
    assert labelled_texts(enc, tok) == ["4" + EOS, "8, of course" + EOS]
    assert unlabelled_text(enc, tok) == CHAT_PROMPT_1 + CHAT_PROMPT_2
    assert tok.decode(enc["input_ids"]) == CHAT_PROMPT_1 + "4" + EOS + CHAT_PROMPT_2 + "8, of course" + EOS
    # the generation prompt is the conversation up to the last assistant turn
    assert tok.decode(enc["prompt_ids"]) == CHAT_PROMPT_1 + "4" + EOS + CHAT_PROMPT_2
    assert enc["reference"] == "8, of course"
    assert enc["num_labels"] == len("4") + 1 + len("8, of course") + 1


def test_messages_segments_follow_the_chat_template():
    segments = row_to_segments({"messages": CHAT}, "messages", DEFAULT_COLUMNS, byte_tokenizer(), WHERE)
    assert segments == [
        Segment(CHAT_PROMPT_1, False, templated=True), Segment("4" + EOS + "\n", True, templated=True),
        Segment(CHAT_PROMPT_2, False, templated=True), Segment("8, of course" + EOS + "\n", True, templated=True),
    ]


def test_system_prompt_added_only_when_the_conversation_has_none():
    tok = byte_tokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode({"messages": chat}, "messages", system_prompt="Be nice.")
    assert unlabelled_text(enc, tok) == "<|system|>\nBe nice.\n<|user|>\nhi\n<|assistant|>\n"
    enc = encode({"messages": CHAT}, "messages", system_prompt="Be nice.")
    assert unlabelled_text(enc, tok).startswith("<|system|>\nBe brief.\n")
    assert "Be nice." not in tok.decode(enc["input_ids"])


def test_alpaca_with_input():
    tok = byte_tokenizer()
    enc = encode({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}, "alpaca")
    assert unlabelled_text(enc, tok) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n"
    )
    assert labelled_texts(enc, tok) == ["5" + EOS]
    assert enc["reference"] == "5"


@pytest.mark.parametrize("row", [{"instruction": "Say hi.", "output": "hi"},
                                 {"instruction": "Say hi.", "input": "", "output": "hi"},
                                 {"instruction": "Say hi.", "input": None, "output": "hi"}])
def test_alpaca_without_input(row):
    tok = byte_tokenizer()
    enc = encode(row, "alpaca")
    assert unlabelled_text(enc, tok) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert labelled_texts(enc, tok) == ["hi" + EOS]


def test_sharegpt_matches_the_same_conversation_as_messages():
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    conversations = [{"from": role[t["role"]], "value": t["content"]} for t in CHAT]
    tok = byte_tokenizer()
    enc = encode({"conversations": conversations}, "sharegpt")
    assert labelled_texts(enc, tok) == ["4" + EOS, "8, of course" + EOS]
    assert enc == encode({"messages": CHAT}, "messages")


def test_conversational_prompt_completion():
    tok = byte_tokenizer()
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    enc = encode(row, "prompt_completion")
    assert unlabelled_text(enc, tok) == "<|user|>\nhi\n<|assistant|>\n"
    assert labelled_texts(enc, tok) == ["yo" + EOS]
    assert enc["reference"] == "yo"


def test_conversational_prompt_assistant_turns_are_context_only():
    # an assistant turn inside the prompt is history: only the completion is learned
    tok = byte_tokenizer()
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    enc = encode(row, "prompt_completion")
    assert labelled_texts(enc, tok) == ["8, of course" + EOS]
    assert tok.decode(enc["prompt_ids"]) == CHAT_PROMPT_1 + "4" + EOS + CHAT_PROMPT_2
    assert enc["input_ids"] == encode({"messages": CHAT}, "messages")["input_ids"]


@pytest.mark.parametrize("columns,fmt", [
    (["messages", "id"], "messages"),
    (["conversations"], "sharegpt"),
    (["prompt", "completion", "answer"], "prompt_completion"),
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, DEFAULT_COLUMNS) == fmt


def test_detect_format_names_the_columns_when_it_cannot_tell():
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['question', 'answer'\]"):
        detect_format(["question", "answer"], DEFAULT_COLUMNS)


# -- through the data module ---------------------------------------------------------------

def test_renamed_columns_through_the_module(tmp_path):
    rows = [{"question": "1+1=", "answer": "2", "id": 7}, {"question": "2+2=", "answer": "4", "id": 8}]
    dm = encoded_module(tmp_path, rows, columns={"prompt": "question", "completion": "answer"})
    tok = byte_tokenizer()
    train = dm.encoded["train"]
    assert [unlabelled_text(r, tok) for r in train] == ["1+1=", "2+2="]
    assert [labelled_texts(r, tok) for r in train] == [["2" + EOS], ["4" + EOS]]
    # columns that are not part of the format come along as metadata
    assert [r["meta"] for r in train] == [{"id": 7}, {"id": 8}]
    assert dm.stats == {"data/train_rows": 2}


def test_renamed_messages_column_through_the_module(tmp_path):
    dm = encoded_module(tmp_path, [{"chat": CHAT}], columns={"messages": "chat"})
    assert labelled_texts(dm.encoded["train"][0], byte_tokenizer()) == ["4" + EOS, "8, of course" + EOS]


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "p", "completion": "c"}, ["c" + EOS]),
    ({"messages": CHAT}, ["4" + EOS, "8, of course" + EOS]),
    ({"instruction": "i", "input": "x", "output": "o"}, ["o" + EOS]),
    ({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}, ["g" + EOS]),
])
def test_auto_format_through_the_module(tmp_path, row, expected):
    dm = encoded_module(tmp_path, [row])
    enc = dm.encoded["train"][0]
    assert labelled_texts(enc, byte_tokenizer()) == expected
    assert enc["labels"][0] == IGNORE_INDEX


def test_explicit_format_overrides_detection(tmp_path):
    # both `messages` and prompt/completion present: `format` picks which one is used
    row = {"messages": CHAT, "prompt": "p", "completion": "c"}
    dm = encoded_module(tmp_path, [row], format="prompt_completion")
    assert labelled_texts(dm.encoded["train"][0], byte_tokenizer()) == ["c" + EOS]


def test_lookup_walks_dotted_keys_a_literal_key_wins_and_a_present_null_is_a_value():
    row = {"reward_model": {"ground_truth": 7, "note": None}, "a.b": 1, "a": {"b": 2}}
    missing = object()
    assert lookup(row, "reward_model.ground_truth") == 7
    assert lookup(row, "a.b") == 1 and lookup({"a": {"b": 2}}, "a.b") == 2
    assert lookup(row, "reward_model.note", missing) is None
    assert lookup(row, "reward_model.truth") is None and lookup(row, "reward_model.truth", missing) is missing
    assert lookup(row, "reward_model.ground_truth.x", missing) is missing  # 7 holds no keys
    assert lookup(["not", "a", "mapping"], "x", missing) is missing


def test_renamed_columns_apply_renames_and_refuse_unknown_names():
    assert renamed_columns({"chosen": "good"}, {"prompt": "prompt", "chosen": "chosen"}) == \
        {"prompt": "prompt", "chosen": "good"}
    assert renamed_columns(None, {"prompt": "prompt"}) == {"prompt": "prompt"}
    with pytest.raises(ValueError, match=r"^data.columns: unknown keys \['answer', 'x'\] \(known: \['prompt'\]\)$"):
        renamed_columns({"x": "y", "answer": "a"}, {"prompt": "prompt"})
