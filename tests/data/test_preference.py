"""PreferenceDataModule: shared prompt tokens, labels on the responses only, implicit prompts,
margins, chosen-then-rejected collation, pair truncation, and located errors."""

import logging
import re

import pytest
import torch

from lit_align import ArithTask, PreferenceDataModule
from lit_align.data import DataError
from lit_align.data.encode import IGNORE_INDEX as IGN
from lit_align.data.formats import Segment, Where
from lit_align.data.preference import collate_pairs, encode_pair, split_common_prefix
from tests.data.util import (
    byte_ids,
    byte_tokenizer,
    encoded_module,
    labelled_texts,
    raises_located,
    unlabelled_text,
    write_jsonl,
    write_rows,
)

EOS = "</s>"
EOS_ID = 1
ids = byte_ids


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def prompt_of(text: str) -> str:
    """The byte tokenizer's chat template around one user turn, with the assistant turn opened."""
    return f"<|user|>\n{text}\n<|assistant|>\n"


def module(tmp_path, rows, name="pairs.jsonl", **kwargs) -> PreferenceDataModule:
    """A PreferenceDataModule over ``rows`` written to a jsonl file, set up with the byte tokenizer."""
    return encoded_module(tmp_path, rows, name, cls=PreferenceDataModule, **kwargs)


def first_label(side: dict) -> int:
    return next(i for i, label in enumerate(side["labels"]) if label != IGN)


def test_byte_tokenizer_matches_the_hand_built_ids():
    tok = byte_tokenizer()
    assert tok("12+34=", add_special_tokens=False).input_ids == ids("12+34=") == [52, 53, 46, 54, 55, 64]
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == 0


# -- explicit prompt -----------------------------------------------------------------------

def test_explicit_strings_share_the_prompt_and_label_each_response_and_eos(tmp_path):
    dm = module(tmp_path, [{"prompt": "12+34=", "chosen": "46", "rejected": "47 or so"}])
    enc = dm.encoded["train"][0]
    assert enc["prompt_ids"] == ids("12+34=")
    assert enc["chosen"] == {"input_ids": ids("12+34=46") + [EOS_ID],
                             "labels": [IGN] * 6 + ids("46") + [EOS_ID], "num_labels": 3}
    assert enc["rejected"] == {"input_ids": ids("12+34=47 or so") + [EOS_ID],
                               "labels": [IGN] * 6 + ids("47 or so") + [EOS_ID], "num_labels": 9}
    assert enc["reference"] == "46"
    assert enc["length"] == 15 and enc["num_labels"] == 12
    assert enc["meta"] == {} and "margin" not in enc
    assert dm.stats == {"data/train_rows": 1}


def test_explicit_empty_prompt_leaves_the_first_position_unlabelled(tmp_path):
    # nothing predicts the first token (no BOS), so the first response token has no label
    enc = module(tmp_path, [{"prompt": "", "chosen": "ab", "rejected": "cd"}]).encoded["train"][0]
    assert enc["prompt_ids"] == []
    assert enc["chosen"]["labels"] == [IGN, ids("b")[0], EOS_ID]
    assert enc["rejected"]["labels"] == [IGN, ids("d")[0], EOS_ID]


def test_response_ending_with_eos_gets_no_second_one(tmp_path):
    enc = module(tmp_path, [{"prompt": "q", "chosen": "a" + EOS, "rejected": "b"}]).encoded["train"][0]
    assert enc["chosen"]["input_ids"] == ids("qa") + [EOS_ID]
    assert enc["rejected"]["input_ids"] == ids("qb") + [EOS_ID]
    assert enc["reference"] == "a"


def test_explicit_messages_render_with_the_chat_template_and_label_only_the_assistant(tmp_path):
    row = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5, surely")]}
    enc = module(tmp_path, [row]).encoded["train"][0]
    p = prompt_of("2+2?")
    assert enc["prompt_ids"] == ids(p)
    # the template writes "\n" after `</s>`; the special token swallows it
    assert enc["chosen"]["input_ids"] == ids(p + "4") + [EOS_ID]
    assert enc["chosen"]["labels"] == [IGN] * len(p) + ids("4") + [EOS_ID]
    assert enc["rejected"]["input_ids"] == ids(p + "5, surely") + [EOS_ID]
    assert enc["rejected"]["labels"] == [IGN] * len(p) + ids("5, surely") + [EOS_ID]
    assert enc["reference"] == "4"
    assert enc["num_labels"] == 2 + 10


def test_assistant_turns_inside_the_prompt_are_context_only(tmp_path):
    tok = byte_tokenizer()
    row = {"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4"), user("and 3+5?")],
           "chosen": [assistant("8")], "rejected": [assistant("9")]}
    enc = module(tmp_path, [row]).encoded["train"][0]
    context = "<|system|>\nBe brief.\n" + prompt_of("2+2?") + "4" + EOS + prompt_of("and 3+5?")
    assert tok.decode(enc["prompt_ids"]) == context
    assert labelled_texts(enc["chosen"], tok) == ["8" + EOS]
    assert labelled_texts(enc["rejected"], tok) == ["9" + EOS]
    assert unlabelled_text(enc["chosen"], tok) == unlabelled_text(enc["rejected"], tok) == context
    assert first_label(enc["chosen"]) == first_label(enc["rejected"]) == len(enc["prompt_ids"])


@pytest.mark.parametrize("prompt,chosen,rejected", [
    ("2+2?", [assistant("4")], [assistant("5")]),    # string prompt: a user turn
    ([user("2+2?")], "4", "5"),                      # string responses: assistant turns
    ([user("2+2?")], [assistant("4")], [assistant("5")]),
])
def test_conversational_forms_render_alike(tmp_path, prompt, chosen, rejected):
    enc = module(tmp_path, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]).encoded["train"][0]
    p = prompt_of("2+2?")
    assert enc["prompt_ids"] == ids(p)
    assert enc["chosen"]["input_ids"] == ids(p + "4") + [EOS_ID]
    assert enc["rejected"]["labels"] == [IGN] * len(p) + ids("5") + [EOS_ID]


def test_system_prompt_goes_to_conversational_prompts_and_is_an_error_with_plain_strings(tmp_path):
    tok = byte_tokenizer()
    chat = {"prompt": [user("hi")], "chosen": [assistant("yo")], "rejected": [assistant("no")]}
    enc = module(tmp_path, [chat], system_prompt="Be nice.").encoded["train"][0]
    assert tok.decode(enc["prompt_ids"]) == "<|system|>\nBe nice.\n" + prompt_of("hi")
    assert labelled_texts(enc["chosen"], tok) == ["yo" + EOS]
    enc = module(tmp_path, [dict(chat, prompt="hi")], name="str_prompt.jsonl",
                 system_prompt="Be nice.").encoded["train"][0]
    assert tok.decode(enc["prompt_ids"]) == "<|system|>\nBe nice.\n" + prompt_of("hi")
    # plain strings are used as written: there is no chat template to carry the system turn
    plain = {"prompt": "hi ", "chosen": "yo", "rejected": "no"}
    raises_at(tmp_path, [plain, plain], 0, "chosen",
              "system_prompt is set, but a prompt and response that are both strings are used as written, without"
              " the chat template; give lists of turns or unset system_prompt", system_prompt="Be nice.")


def test_renamed_columns_and_meta(tmp_path):
    rows = [{"question": "1+1=", "good": "2", "bad": "3", "score": 1.5, "id": 7}]
    dm = module(tmp_path, rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "score"})
    enc = dm.encoded["train"][0]
    assert enc["chosen"]["input_ids"] == ids("1+1=2") + [EOS_ID]
    assert enc["rejected"]["input_ids"] == ids("1+1=3") + [EOS_ID]
    assert enc["margin"] == 1.5 and enc["meta"] == {"id": 7}


# -- implicit prompt -----------------------------------------------------------------------

HH = "\n\nHuman: What is 12+34?\n\nAssistant: "


@pytest.mark.parametrize("chosen,rejected,prompt", [
    ("= 123", "= 128", "= "),                                    # never inside a number
    (HH + "46", HH + "47", HH),                                  # shared "4" stays in both responses
    (HH + "Sure, 46.", HH + "Sure, 47.", HH + "Sure, "),          # whole shared words go to the prompt
    (HH + "The cat sat", HH + "The dog sat", HH + "The "),
    ("Answer: 12 apples", "Answer: 123 apples", "Answer: "),     # the rejected side is not cut mid-word either
    ("Answer: 123 apples", "Answer: 12 apples", "Answer: "),
    ("Q: 12", "Q: 123", "Q: "),                                  # one text a prefix of the other
    ("Hi there", "Yo there", ""),
    ("12 apples", "13 apples", ""),
    ("same", "same", "same"),
])
def test_split_common_prefix_moves_back_to_a_word_start(chosen, rejected, prompt):
    n = split_common_prefix(chosen, rejected)
    assert chosen[:n] == rejected[:n] == prompt


def test_implicit_strings_hh_style(tmp_path):
    dm = module(tmp_path, [{"chosen": HH + "46, of course", "rejected": HH + "47 I think"}])
    enc = dm.encoded["train"][0]
    assert enc["prompt_ids"] == ids(HH)
    for side, response in (("chosen", "46, of course"), ("rejected", "47 I think")):
        assert enc[side]["input_ids"] == ids(HH + response) + [EOS_ID]
        assert enc[side]["labels"] == [IGN] * len(HH) + ids(response) + [EOS_ID]
        # the first label is the shared "4": it belongs to the responses, not to the prompt
        assert first_label(enc[side]) == len(HH) and enc[side]["labels"][len(HH)] == ids("4")[0]
    assert enc["reference"] == "46, of course"


def test_implicit_is_chosen_when_there_is_no_prompt_column(tmp_path):
    rows = [{"chosen": HH + "46", "rejected": HH + "47", "id": 0}]
    auto = module(tmp_path, rows).encoded["train"][0]
    forced = module(tmp_path, rows, name="forced.jsonl", format="implicit").encoded["train"][0]
    assert auto == forced and auto["prompt_ids"] == ids(HH) and auto["meta"] == {"id": 0}


def test_implicit_messages_split_at_the_diverging_assistant_turn(tmp_path):
    tok = byte_tokenizer()
    history = [user("2+2?"), assistant("4"), user("and 3+5?")]
    # the two answers share their first characters: the whole turn is still the response
    row = {"chosen": history + [assistant("8, of course")], "rejected": history + [assistant("8? No, 9")]}
    enc = module(tmp_path, [row]).encoded["train"][0]
    context = prompt_of("2+2?") + "4" + EOS + prompt_of("and 3+5?")
    assert tok.decode(enc["prompt_ids"]) == context
    assert labelled_texts(enc["chosen"], tok) == ["8, of course" + EOS]
    assert labelled_texts(enc["rejected"], tok) == ["8? No, 9" + EOS]
    n = len(enc["prompt_ids"])
    assert enc["chosen"]["input_ids"][:n] == enc["rejected"]["input_ids"][:n] == enc["prompt_ids"]
    assert first_label(enc["chosen"]) == first_label(enc["rejected"]) == n
    assert enc["chosen"]["labels"][n] == enc["rejected"]["labels"][n] == ids("8")[0]
    assert enc["reference"] == "8, of course"


def test_implicit_messages_response_can_span_several_turns(tmp_path):
    tok = byte_tokenizer()
    row = {"chosen": [user("hi"), assistant("yo"), user("more"), assistant("sure")],
           "rejected": [user("hi"), assistant("go away")]}
    enc = module(tmp_path, [row]).encoded["train"][0]
    assert tok.decode(enc["prompt_ids"]) == prompt_of("hi")
    assert labelled_texts(enc["chosen"], tok) == ["yo" + EOS, "sure" + EOS]
    assert labelled_texts(enc["rejected"], tok) == ["go away" + EOS]
    assert enc["reference"] == "sure"


# -- margins and collation -----------------------------------------------------------------

def pairs(n, margin=True):
    """Pairs whose prompt ``q{k}=`` tells them apart, responses of different lengths."""
    rows = [{"prompt": f"q{k}=", "chosen": "c" * (k + 1), "rejected": "r" * (3 - k % 3)} for k in range(n)]
    if margin:
        for k, row in enumerate(rows):
            row["margin"] = k / 2 - 1
    return rows


def pair_number(input_ids: torch.Tensor) -> int:
    return int(re.match(r"q(\d+)=", byte_tokenizer().decode(input_ids, skip_special_tokens=True)).group(1))


def test_collation_stacks_chosen_rows_then_rejected_rows_in_pair_order(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(2))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(3))
    dm = PreferenceDataModule(data_files={"train": train, "validation": val}, eval_batch_size=3, max_length=64)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert dm.stats == {"data/train_rows": 2, "data/validation_rows": 3}
    (batch,) = list(dm.val_dataloader())
    chosen = [ids(f"q{k}=" + "c" * (k + 1)) + [EOS_ID] for k in range(3)]
    rejected = [ids(f"q{k}=" + "r" * (3 - k)) + [EOS_ID] for k in range(3)]
    seqs = chosen + rejected
    T = max(map(len, seqs))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, T)
    assert batch["input_ids"].tolist() == [s + [0] * (T - len(s)) for s in seqs]
    assert batch["attention_mask"].tolist() == [[1] * len(s) + [0] * (T - len(s)) for s in seqs]
    assert batch["labels"].tolist() == [[IGN] * 3 + s[3:] + [IGN] * (T - len(s)) for s in seqs]
    assert batch["margin"].tolist() == [-1.0, -0.5, 0.0]
    assert "ref_chosen" not in batch
    # validation batches also carry the generation prompts (left-padded) and the chosen texts
    assert batch["prompt_ids"].tolist() == [ids("q0="), ids("q1="), ids("q2=")]
    assert batch["references"] == ["c", "cc", "ccc"]


def test_train_batches_keep_each_pair_together_with_its_margin_and_row_index(tmp_path):
    dm = module(tmp_path, pairs(7), micro_batch_size=3, max_length=64)
    number = {i: int(byte_tokenizer().decode(r["prompt_ids"])[1:-1]) for i, r in enumerate(dm.encoded["train"])}
    seen = []
    for batch in dm.train_dataloader():
        B = batch["margin"].shape[0]
        assert batch["input_ids"].shape[0] == 2 * B
        ks = [pair_number(batch["input_ids"][i]) for i in range(B)]
        assert [pair_number(batch["input_ids"][B + i]) for i in range(B)] == ks
        assert batch["margin"].tolist() == [k / 2 - 1 for k in ks]
        # each pair's position in its split: the key of per-row state (precomputed reference log-probs)
        assert [number[i] for i in batch["index"].tolist()] == ks
        # each micro-batch is its own optimizer step here: both sides' labels count
        assert batch["num_label_tokens_step"].item() == (batch["labels"] != IGN).sum().item()
        seen += ks
    assert sorted(seen) == list(range(7))


def test_no_margin_column_no_margin_in_the_batch(tmp_path):
    dm = module(tmp_path, pairs(2, margin=False))
    batch = dm.collate([[r] for r in dm.encoded["train"]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_every_file_type_gives_the_same_pairs(tmp_path, ext):
    # CSV cells are read as text: the margin "0.25" still becomes a float
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.25},
            {"prompt": "2+2=", "chosen": "4", "rejected": "22", "margin": 3.0}]
    dm = PreferenceDataModule(data_files=write_rows(tmp_path / f"pairs.{ext}", rows), max_length=32)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    train = dm.encoded["train"]
    assert [r["margin"] for r in train] == [0.25, 3.0]
    assert [r["rejected"]["input_ids"] for r in train] == [ids("1+1=3") + [EOS_ID], ids("2+2=22") + [EOS_ID]]
    assert [r["chosen"]["labels"] for r in train] == [[IGN] * 4 + ids("2") + [EOS_ID], [IGN] * 4 + ids("4") + [EOS_ID]]


# -- truncation and drops ------------------------------------------------------------------

def test_prompt_truncation_cuts_the_shared_prompt_from_the_left(tmp_path):
    # chosen 13 tokens, rejected 15: both lose the same 3 prompt tokens
    enc = module(tmp_path, [{"prompt": "abcdefghij", "chosen": "12", "rejected": "3456"}],
                 max_length=12).encoded["train"][0]
    assert enc["prompt_ids"] == ids("defghij")
    assert enc["chosen"]["input_ids"] == ids("defghij12") + [EOS_ID]
    assert enc["rejected"]["input_ids"] == ids("defghij3456") + [EOS_ID]
    assert enc["chosen"]["labels"] == [IGN] * 7 + ids("12") + [EOS_ID]
    assert enc["rejected"]["labels"] == [IGN] * 7 + ids("3456") + [EOS_ID]
    assert enc["length"] == 12


def test_prompt_truncation_keeps_one_prompt_token_then_cuts_the_responses_end(tmp_path):
    enc = module(tmp_path, [{"prompt": "abcdefghij", "chosen": "12", "rejected": "3456"}],
                 max_length=4).encoded["train"][0]
    assert enc["prompt_ids"] == ids("j")
    assert enc["chosen"] == {"input_ids": ids("j12") + [EOS_ID], "labels": [IGN] + ids("12") + [EOS_ID],
                             "num_labels": 3}
    assert enc["rejected"] == {"input_ids": ids("j345"), "labels": [IGN] + ids("345"), "num_labels": 3}
    assert enc["length"] == 4 and enc["num_labels"] == 6
    assert "truncated" not in enc


def test_truncated_pairs_are_counted_by_what_was_cut(tmp_path, caplog):
    rows = [{"prompt": "ab", "chosen": "c", "rejected": "d"},           # 4 tokens: fits
            {"prompt": "abcdefghij", "chosen": "12", "rejected": "3"},  # 13: the prompt loses 3 tokens
            {"prompt": "abcdefghij", "chosen": "12", "rejected": "3456"},  # 15: the prompt loses 5 tokens
            {"prompt": "", "chosen": "123456789", "rejected": "1"}]     # no prompt to cut: the chosen end goes
    with caplog.at_level(logging.INFO):
        dm = module(tmp_path, rows, max_length=10)
    assert [r["length"] for r in dm.encoded["train"]] == [4, 10, 10, 10]
    assert dm.encoded["train"][3]["chosen"]["input_ids"] == ids("123456789") + [EOS_ID]  # 10 tokens: fits
    assert dm.stats == {"data/train_rows": 4, "data/train_truncated_prompt": 2}
    rows[3]["chosen"] = "1234567890"
    rows[2]["rejected"] = "345678901"  # 20 tokens: the prompt is cut to one token, then the end
    with caplog.at_level(logging.INFO):
        dm = module(tmp_path, rows, name="cut.jsonl", max_length=10)
    assert dm.encoded["train"][2]["rejected"]["input_ids"] == ids("j345678901")  # no EOS
    assert dm.encoded["train"][3]["chosen"]["labels"] == [IGN] + ids("234567890")  # no EOS
    assert dm.stats == {"data/train_rows": 4, "data/train_truncated_prompt": 2, "data/train_truncated_response": 2}
    assert ("cut.jsonl [train]: truncated to max_length=10: 2 prompts (from the start), 2 responses (at the end,"
            " losing their EOS)") in caplog.text


def test_drop_truncation_drops_pairs_with_either_side_too_long(tmp_path):
    rows = [{"prompt": "ab", "chosen": "c", "rejected": "d"},          # 4 tokens each
            {"prompt": "ab", "chosen": "c", "rejected": "dddddddd"},   # rejected: 11 tokens
            {"prompt": "ab", "chosen": "cccccccc", "rejected": "d"},   # chosen: 11 tokens
            {"prompt": "abcdefgh", "chosen": "c", "rejected": "d"}]    # 10 tokens each: fits
    dm = module(tmp_path, rows, max_length=10, truncation="drop")
    assert dm.stats == {"data/train_rows": 2, "data/train_dropped_too_long": 2}
    assert [r["prompt_ids"] for r in dm.encoded["train"]] == [ids("ab"), ids("abcdefgh")]
    dm = module(tmp_path, rows, name="kept.jsonl", max_length=10, truncation="prompt")
    assert dm.stats == {"data/train_rows": 4, "data/train_truncated_prompt": 2}


def test_pairs_with_nothing_to_learn_or_nothing_to_prefer_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "", "chosen": EOS, "rejected": "no"},   # chosen: one token, which nothing predicts
            {"prompt": "1+1=", "chosen": "2", "rejected": "2"}]
    dm = module(tmp_path, rows)
    assert dm.stats == {"data/train_rows": 1, "data/train_dropped_nothing_left_to_learn_after_truncation": 1,
                        "data/train_dropped_identical_responses": 1}


def test_identical_implicit_pairs_are_dropped_as_strings_and_as_messages(tmp_path):
    chat = [user("hi"), assistant("yo")]
    dm = module(tmp_path, [{"chosen": chat, "rejected": chat},
                           {"chosen": chat, "rejected": [user("hi"), assistant("no")]}])
    assert dm.stats == {"data/train_rows": 1, "data/train_dropped_identical_responses": 1}
    dm = module(tmp_path, [{"chosen": HH + "46", "rejected": HH + "46"}, {"chosen": HH + "46", "rejected": HH + "47"}],
                name="strings.jsonl")
    assert dm.stats == {"data/train_rows": 1, "data/train_dropped_identical_responses": 1}


def test_every_pair_dropped_is_an_error(tmp_path):
    path = str(tmp_path / "pairs.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path} [train]: no usable rows (dropped: {{'too long': 2}})")):
        module(tmp_path, [{"prompt": "abcdef", "chosen": "x", "rejected": "y"}] * 2, max_length=4, truncation="drop")


# -- errors ----------------------------------------------------------------------------------

GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
GOOD_CHAT = {"prompt": [user("hi")], "chosen": [assistant("yo")], "rejected": [assistant("no")]}
GOOD_IMPLICIT = {"chosen": [user("hi"), assistant("yo")], "rejected": [user("hi"), assistant("no")]}


def raises_at(tmp_path, rows, row, field, problem, **kwargs):
    with raises_located(tmp_path / "rows.jsonl", row, field, problem):
        module(tmp_path, rows, name="rows.jsonl", **kwargs)


@pytest.mark.parametrize("good,bad,field,problem", [
    (GOOD, {"prompt": "1+1=", "chosen": "2"}, "rejected",
     "expected a non-empty string or a list of turns, got None"),
    (GOOD, {"prompt": "1+1=", "chosen": "", "rejected": "3"}, "chosen",
     "expected a non-empty string or a list of turns, got ''"),
    (GOOD, {"prompt": "1+1=", "chosen": " \n", "rejected": "3"}, "chosen",
     "expected a non-empty string or a list of turns, got ' \\n'"),
    (GOOD, {"chosen": "2", "rejected": "3"}, "prompt", "expected a string or a list of turns, got None"),
    (GOOD_CHAT, dict(GOOD_CHAT, chosen=[{"content": "yo"}]), "chosen[0]", "each turn needs 'role' and 'content'"),
    (GOOD_CHAT, dict(GOOD_CHAT, rejected=[{"role": "bot", "content": "no"}]), "rejected[0].role",
     "unknown role 'bot' (allowed: system, user, assistant, tool)"),
    (GOOD_CHAT, dict(GOOD_CHAT, prompt=[{"role": "human", "content": "hi"}]), "prompt[0].role",
     "unknown role 'human' (allowed: system, user, assistant, tool)"),
    (GOOD_CHAT, dict(GOOD_CHAT, chosen=[user("yo")]), "chosen", "no assistant turn to learn from"),
    (GOOD_CHAT, dict(GOOD_CHAT, rejected=[assistant(" ")]), "rejected[0].content", "empty assistant turn"),
    (GOOD_CHAT, dict(GOOD_CHAT, chosen=[]), "chosen", "expected a non-empty list of turns"),
])
def test_explicit_row_errors(tmp_path, good, bad, field, problem):
    raises_at(tmp_path, [good, good, bad, good], 2, field, problem)


@pytest.mark.parametrize("value,problem", [
    (2, "got 2"), ({"text": "2"}, "got {'text': '2'}"),
])
def test_chosen_neither_string_nor_turns(tmp_path, value, problem):
    # a column holds one type across a file, so every row is bad and the first one is reported
    rows = [{"prompt": "1+1=", "chosen": value, "rejected": "3"}] * 2
    raises_at(tmp_path, rows, 0, "chosen", f"expected a non-empty string or a list of turns, {problem}")


@pytest.mark.parametrize("bad,field,problem", [
    ({"chosen": "Hi there", "rejected": "Yo there"}, "chosen",
     "chosen and rejected share no prompt prefix (implicit prompt format)"),
    ({"chosen": "12 apples", "rejected": "13 apples"}, "chosen",
     "chosen and rejected share no prompt prefix (implicit prompt format)"),
    ({"chosen": "Q: 12 ", "rejected": "Q: 12 or 13"}, "chosen",
     "expected a non-empty string or a list of turns, got ''"),
])
def test_implicit_string_errors(tmp_path, bad, field, problem):
    good = {"chosen": HH + "46", "rejected": HH + "47"}
    raises_at(tmp_path, [good, good, bad, good], 2, field, problem)


@pytest.mark.parametrize("bad,field,problem", [
    ({"chosen": [user("hi"), assistant("yo")], "rejected": [user("hey"), assistant("yo")]}, "chosen",
     "chosen and rejected share no prompt turns (implicit prompt format)"),
    ({"chosen": [user("hi"), assistant("yo"), user("a"), assistant("b")],
      "rejected": [user("hi"), assistant("yo"), user("c"), assistant("b")]}, "chosen[2]",
     "the conversations diverge at a 'user' turn; expected the assistant's"),
    ({"chosen": [user("hi"), assistant("yo")], "rejected": [user("hi"), assistant("yo"), assistant("more")]},
     "chosen", "ends where the other conversation's response begins: no response to compare"),
    ({"chosen": [user("hi"), assistant("yo"), assistant("more")], "rejected": [user("hi"), assistant("yo")]},
     "rejected", "ends where the other conversation's response begins: no response to compare"),
    ({"chosen": [user("hi"), assistant("yo")], "rejected": [{"role": "user"}, assistant("no")]}, "rejected[0]",
     "each turn needs 'role' and 'content'"),
])
def test_implicit_message_errors(tmp_path, bad, field, problem):
    raises_at(tmp_path, [GOOD_IMPLICIT, GOOD_IMPLICIT, bad, GOOD_IMPLICIT], 2, field, problem)


def test_implicit_string_and_turns_mixed(tmp_path):
    rows = [{"chosen": "hi yo", "rejected": [user("hi"), assistant("no")]}] * 2
    raises_at(tmp_path, rows, 0, "chosen", "chosen and rejected must both be strings or both be lists of turns")


@pytest.mark.parametrize("margin,problem", [
    ("high", "expected a number, got 'high'"),
    ("nan", "expected a finite number, got 'nan'"),
    ("-inf", "expected a finite number, got '-inf'"),
])
def test_bad_margin(tmp_path, margin, problem):
    good = dict(GOOD, margin="1.5")  # strings that hold numbers are fine (CSV cells are text)
    raises_at(tmp_path, [good, good, dict(GOOD, margin=margin), good], 2, "margin", problem)


def test_renamed_column_error_names_the_users_column(tmp_path):
    good = {"question": "1+1=", "good": "2", "bad": "3"}
    raises_at(tmp_path, [good, good, dict(good, bad=""), good], 2, "bad",
              "expected a non-empty string or a list of turns, got ''",
              columns={"prompt": "question", "chosen": "good", "rejected": "bad"})


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"prompt": "p", "chosen": "a"}], {},
     "preference data (explicit prompt) needs columns ['rejected']; found ['prompt', 'chosen']"),
    ([{"chosen": "p a"}], {}, "preference data (implicit prompt) needs columns ['rejected']; found ['chosen']"),
    ([{"chosen": "p a", "rejected": "p b"}], {"format": "explicit"},
     "preference data (explicit prompt) needs columns ['prompt']; found ['chosen', 'rejected']"),
    ([{"question": "p", "chosen": "a", "rejected": "b"}], {"columns": {"prompt": "question", "rejected": "worse"}},
     "preference data (explicit prompt) needs columns ['worse']; found ['question', 'chosen', 'rejected']"),
])
def test_missing_columns(tmp_path, rows, kwargs, message):
    path = str(tmp_path / "pairs.jsonl")
    full = f"{path} [train]: {message} (map yours with `columns`)"
    with pytest.raises(DataError, match="^" + re.escape(full) + "$"):
        module(tmp_path, rows, **kwargs)


def test_missing_columns_of_a_carved_validation_split_hide_the_row_number_column(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a"}] * 4)
    dm = PreferenceDataModule(data_files=path, val_fraction=0.5)
    dm.tokenizer = byte_tokenizer()
    message = (f"{path} [train]: preference data (explicit prompt) needs columns ['rejected']; "
               "found ['prompt', 'chosen']")
    with pytest.raises(DataError, match="^" + re.escape(message)):
        dm.setup("fit")


def test_error_names_the_validation_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    val = write_jsonl(tmp_path / "val.jsonl", [GOOD, GOOD, dict(GOOD, rejected="")])
    dm = PreferenceDataModule(data_files={"train": train, "validation": val})
    dm.tokenizer = byte_tokenizer()
    message = f"{val} [validation] row 2, field 'rejected': expected a non-empty string or a list of turns, got ''"
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        dm.setup("fit")


def test_a_null_margin_among_numbers_is_an_error(tmp_path):
    # jsonl rows without the key get a null margin; a batch cannot carry margins for some pairs only
    rows = [dict(GOOD, margin=1.0), dict(GOOD, margin=0.5), GOOD, dict(GOOD, margin=2.0)]
    raises_at(tmp_path, rows, 2, "margin", "no margin (null); the margin column needs a number on every row")
    renamed = [dict(GOOD, score=1.0), dict(GOOD, score=None)]
    raises_at(tmp_path, renamed, 1, "score", "no margin (null); the margin column needs a number on every row",
              columns={"margin": "score"})


def test_collate_pairs_rejects_margins_on_some_pairs_only(tmp_path):
    dm = module(tmp_path, pairs(3, margin=False))
    rows = dm.encoded["train"]
    rows[1]["margin"] = 1.0
    with pytest.raises(ValueError,
                       match=re.escape("collate_pairs: 1 of 3 pairs have a margin; give every pair one or none")):
        collate_pairs(rows, 0)


class ResamplingTokenizer:
    """The byte tokenizer, except that it splits ``"q"`` differently on every other call, like a
    tokenizer that samples its segmentation (subword regularization)."""

    def __init__(self):
        self.inner, self.calls = byte_tokenizer(), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        out = self.inner(text, **kwargs)
        if text == "q":
            self.calls += 1
            if self.calls % 2 == 0:
                out["input_ids"] = [99]
        return out


def test_encode_pair_locates_an_unfindable_prompt_boundary():
    seg = [Segment("q", False)]
    where = Where("pairs.jsonl", "train", 5)
    problem = ("the prompt tokenizes differently before this response than alone (a tokenizer that samples its"
               " segmentation?): cannot find the prompt boundary")
    with pytest.raises(DataError, match="^" + re.escape(f"pairs.jsonl [train] row 5, field 'good': {problem}") + "$"):
        encode_pair(seg, [Segment("a", True)], [Segment("b", True)], ResamplingTokenizer(), 16, "prompt",
                    where=where, fields=("good", "bad"))
    with pytest.raises(ValueError, match="^" + re.escape(f"chosen: {problem}") + "$"):
        encode_pair(seg, [Segment("a", True)], [Segment("b", True)], ResamplingTokenizer(), 16, "prompt")


def test_invalid_settings():
    with pytest.raises(ValueError,
                       match=re.escape("data.format: 'pairs' is not one of ('auto', 'explicit', 'implicit')")):
        PreferenceDataModule(path="x", format="pairs")
    with pytest.raises(ValueError, match=re.escape("data.columns: unknown keys ['completion']")):
        PreferenceDataModule(path="x", columns={"completion": "c"})
    with pytest.raises(ValueError, match="data.truncation: 'left' is not one of"):
        PreferenceDataModule(path="x", truncation="left")


def test_needs_a_tokenizer(tmp_path):
    dm = PreferenceDataModule(data_files=write_jsonl(tmp_path / "p.jsonl", [GOOD]))
    with pytest.raises(ValueError, match="PreferenceDataModule needs a tokenizer"):
        dm.setup("fit")


# -- the built-in arith task ---------------------------------------------------------------

def test_arith_pairs_through_the_module():
    tok = byte_tokenizer()
    task = ArithTask(digits=2, train_size=60, val_size=10)
    dm = PreferenceDataModule(task=task, max_length=16)
    dm.tokenizer = tok
    dm.setup("fit")
    assert dm.stats == {"data/train_rows": 60, "data/validation_rows": 10, "data/test_rows": 10}
    rows = task.rows("preference")
    prompts = {}
    for split, encoded in dm.encoded.items():
        assert len(encoded) == len(rows[split])
        for enc, row in zip(encoded, rows[split]):
            question = tok.decode(enc["prompt_ids"])
            assert question == row["prompt"] and re.fullmatch(r"\d\d\+\d\d=", question)
            value = ArithTask.solve(question[:-1])
            assert enc["meta"] == {"answer": str(value)}
            chosen = labelled_texts(enc["chosen"], tok)
            rejected = labelled_texts(enc["rejected"], tok)
            assert chosen == [task.format_answer(value) + EOS] and enc["reference"] == task.format_answer(value)
            assert rejected == [row["rejected"] + EOS] and rejected != chosen
            assert task.check(enc["reference"], enc["meta"]["answer"])
            assert not task.check(row["rejected"], enc["meta"]["answer"])
            assert dm.checker(enc["reference"], enc["meta"], enc["reference"])
            assert first_label(enc["chosen"]) == first_label(enc["rejected"]) == len(question)
        prompts[split] = {tok.decode(e["prompt_ids"]) for e in encoded}
    assert len(prompts["train"]) == 60 and len(prompts["validation"]) == len(prompts["test"]) == 10
    assert prompts["train"].isdisjoint(prompts["validation"] | prompts["test"])
    assert prompts["validation"].isdisjoint(prompts["test"])
