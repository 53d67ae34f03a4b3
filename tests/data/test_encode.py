"""Tokenizing segments: truncation policies, dropped rows and their counts."""

import logging

import pytest

from lit_align.data import DataError
from lit_align.data.encode import IGNORE_INDEX, Dropped, encode_segments, reference_text
from lit_align.data.formats import Segment
from lit_align.data.preference import encode_pair
from tests.data.util import byte_tokenizer, encoded_module, labelled_texts

EOS = "</s>"


def ids(text):
    return byte_tokenizer()(text, add_special_tokens=False).input_ids


def enc(prompt, completion, max_length, truncation="prompt"):
    return encode_segments([Segment(prompt, False), Segment(completion, True)], byte_tokenizer(), max_length,
                           truncation)


def test_fits_exactly_no_truncation():
    e = enc("abcd", "xyz", max_length=8)  # 4 + 3 + EOS
    assert e["input_ids"] == ids("abcdxyz") + [1]
    assert e["labels"] == [IGNORE_INDEX] * 4 + ids("xyz") + [1]


def test_prompt_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion():
    e = enc("abcdefghij", "xyz", max_length=8)  # 14 tokens: the 6 oldest prompt tokens go
    assert e["input_ids"] == ids("ghijxyz") + [1]
    assert e["labels"] == [IGNORE_INDEX] * 4 + ids("xyz") + [1]
    assert e["prompt_ids"] == ids("ghij")
    assert e["length"] == 8 and e["num_labels"] == 4
    assert e["reference"] == "xyz"
    assert e["truncated"] == ("prompt",)


def test_prompt_truncation_keeps_one_prompt_token_then_cuts_the_end():
    # Documented: remove from the start up to the first label (keeping the one token that
    # predicts it), then from the end; a completion longer than the room loses its tail and EOS.
    e = enc("abcdef", "0123456789", max_length=8)
    assert e["input_ids"] == ids("f0123456")
    assert e["labels"] == [IGNORE_INDEX] + ids("0123456")
    assert e["prompt_ids"] == ids("f")
    assert e["reference"] == "0123456789"
    assert e["truncated"] == ("prompt", "response")


def test_truncated_names_what_was_cut():
    assert enc("abcd", "xyz", max_length=8)["truncated"] == ()
    # an empty prompt leaves nothing to cut at the start: only the response's end goes
    e = enc("", "0123456789", max_length=8)
    assert e["input_ids"] == ids("01234567") and e["truncated"] == ("response",)


def test_prompt_truncation_of_a_multi_turn_conversation_keeps_every_kept_label():
    segs = [Segment("uuuuuuuu", False), Segment("a", True), Segment("vv", False), Segment("b", True)]
    e = encode_segments(segs, byte_tokenizer(), max_length=8)  # 8 + 2 + 2 + 2 = 14 tokens
    assert e["input_ids"] == ids("uua") + [1] + ids("vvb") + [1]
    assert labelled_texts(e, byte_tokenizer()) == ["a" + EOS, "b" + EOS]
    assert e["prompt_ids"] == ids("uua") + [1] + ids("vv")


def test_drop_truncation_drops_rows_that_are_too_long_only():
    assert enc("abcd", "xyz", max_length=8, truncation="drop")["length"] == 8
    with pytest.raises(Dropped) as info:
        enc("abcde", "xyz", max_length=8, truncation="drop")
    assert info.value.reason == "too long"


def test_nothing_left_to_learn_is_dropped():
    # an empty prompt and a completion that is only EOS: the single token has nothing before it
    with pytest.raises(Dropped) as info:
        enc("", EOS, max_length=8)
    assert info.value.reason == "nothing left to learn after truncation"


def test_no_trained_segment_is_dropped():
    with pytest.raises(Dropped) as info:
        encode_segments([Segment("just a prompt", False)], byte_tokenizer(), 16)
    assert info.value.reason == "no completion"


def test_unknown_truncation_policy():
    with pytest.raises(ValueError, match="truncation: 'left' is not one of"):
        enc("a", "b", max_length=8, truncation="left")


# -- counts in the data module ----------------------------------------------------------

ROWS = [
    {"prompt": "ab", "completion": "cd"},              # 5 tokens
    {"prompt": "abcdefghij", "completion": "xyz"},     # 14 tokens: too long for 8
    {"prompt": "a", "completion": "b"},                # 3 tokens
    {"prompt": "", "completion": EOS},                 # nothing to learn
    {"prompt": "0123456789", "completion": "0123"},    # 15 tokens: too long for 8
]


def test_module_drop_policy_counts_dropped_rows(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        dm = encoded_module(tmp_path, ROWS, max_length=8, truncation="drop")
    assert "data.jsonl [train]: dropped {'too long': 2, 'nothing left to learn after truncation': 1} of 5 rows" \
        in caplog.text
    assert [labelled_texts(r, byte_tokenizer()) for r in dm.encoded["train"]] == [["cd" + EOS], ["b" + EOS]]
    assert dm.stats == {
        "data/train_dropped_too_long": 2,
        "data/train_dropped_nothing_left_to_learn_after_truncation": 1,
        "data/train_rows": 2,
    }


def test_module_prompt_policy_keeps_long_rows_within_max_length(tmp_path, caplog):
    rows = ROWS + [{"prompt": "ab", "completion": "0123456789"}]  # 13 tokens: the response loses its end
    with caplog.at_level(logging.INFO):
        dm = encoded_module(tmp_path, rows, max_length=8, truncation="prompt")
    rows = dm.encoded["train"]
    assert [r["length"] for r in rows] == [5, 8, 3, 8, 8]
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["length"] <= 8 for r in rows)
    assert [labelled_texts(r, byte_tokenizer()) for r in rows] == [["cd" + EOS], ["xyz" + EOS], ["b" + EOS],
                                                                    ["0123" + EOS], ["0123456"]]
    assert all("truncated" not in r for r in rows)
    assert dm.stats == {"data/train_dropped_nothing_left_to_learn_after_truncation": 1, "data/train_rows": 5,
                        "data/train_truncated_prompt": 3, "data/train_truncated_response": 1}
    assert ("data.jsonl [train]: dropped {'nothing left to learn after truncation': 1} of 6 rows; truncated to"
            " max_length=8: 3 prompts (from the start), 1 responses (at the end, losing their EOS)") in caplog.text


def test_module_with_every_row_dropped_raises(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl \[train\]: no usable rows \(dropped: \{'too long': 2\}\)"):
        encoded_module(tmp_path, [ROWS[1], ROWS[4]], max_length=8, truncation="drop")


def test_reference_text_is_the_last_trained_segment_without_its_eos():
    tok = byte_tokenizer()
    segments = [Segment("2+2=", False), Segment(" 4", True), Segment(" and then", False), Segment(" 8 </s>\n", True)]
    assert reference_text(segments, tok) == "8"
    assert reference_text([Segment("q", False), Segment("no eos ", True)], tok) == "no eos"
    # the instruction rows and the preference pairs read the same target
    assert encode_segments(segments, tok, 64)["reference"] == "8"
    pair = encode_pair([Segment("q", False)], [Segment("yes</s>", True)], [Segment("no", True)], tok, 64, "prompt")
    assert pair["reference"] == "yes"
