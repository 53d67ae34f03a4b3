"""Real chat templates in the data layer, on the zoo's tokenizers and the byte tokenizer: one BOS,
no EOS after a turn the template already ended, the reference cut at the turn end, conversations
that open with the assistant, left truncation keeping BOS, the same generation prompt in every data
module, and ``chat_templated``.

Hand-checked ids (tests/zoo.py): single bytes of the byte-level BPEs are the ByteLevel alphabet's
order, so ``'5'`` = 53 - 33 = 20, ``'9'`` = 24, ``'\\n'`` = 198 (``'Ċ'``); Llama 3 and GPT-2 merge
``59`` into one token (404 and 395). Qwen2: ``<|endoftext|>`` 746, ``<|im_start|>`` 747,
``<|im_end|>`` 748. Llama 3: ``<|begin_of_text|>`` 768, ``<|end_of_text|>`` 769,
``<|start_header_id|>`` 774, ``<|end_header_id|>`` 775, ``<|eot_id|>`` 777. GPT-2: ``<|endoftext|>`` 768.
"""

import datasets
import pytest

from lit_align.data import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_align.data.encode import IGNORE_INDEX, encode_segments, reference_text, tokenize_segments
from lit_align.data.formats import Segment
from lit_align.models import CausalLMSpec, build_tokenizer, load_tokenizer
from tests.data.util import (
    byte_ids,
    byte_tokenizer,
    label_spans,
    raises_located,
    write_jsonl,
)

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
ONE = [{"role": "user", "content": "What is 37+58?"}, {"role": "assistant", "content": "59"}]
TWO = ONE + [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "24"}]
# label ids of the answer "59" and its turn end, per tokenizer
ANSWER_LABELS = {"qwen2_instruct": [20, 24, 748, 198], "qwen2_base": [20, 24, 748, 198], "moe": [20, 24, 748, 198],
                 "llama3_instruct": [404, 777], "gpt2": [395, 768, 198]}
# ... of "24" (Llama 3 and GPT-2: one token, 409 and 413) and of "95" (320 and 321)
LABELS_24 = {"qwen2_instruct": [17, 19, 748, 198], "qwen2_base": [17, 19, 748, 198], "moe": [17, 19, 748, 198],
             "llama3_instruct": [409, 777], "gpt2": [413, 768, 198]}
LABELS_95 = {"qwen2_instruct": [24, 20, 748, 198], "qwen2_base": [24, 20, 748, 198], "moe": [24, 20, 748, 198],
             "llama3_instruct": [320, 777], "gpt2": [321, 768, 198]}
CHAT = ("qwen2_instruct", "qwen2_base", "llama3_instruct", "moe")


@pytest.fixture(scope="module")
def tokenizers(zoo):
    return {name: load_tokenizer(CausalLMSpec(pretrained=zoo[name])) for name in ANSWER_LABELS}


def setup_module_with(dm, tokenizer):
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def instruction(tmp_path, tokenizer, rows, **kwargs):
    kwargs.setdefault("max_length", 256)
    return setup_module_with(InstructionDataModule(data_files=write_jsonl(tmp_path / "rows.jsonl", rows), **kwargs),
                             tokenizer)


# -- BOS and EOS ----------------------------------------------------------------------------------------------------
def test_llama3_rows_start_with_the_templates_bos_once_and_end_with_eot_alone(tokenizers, tmp_path):
    tok = tokenizers["llama3_instruct"]
    (enc,) = instruction(tmp_path, tok, [{"messages": ONE}]).encoded["train"]
    ids = enc["input_ids"]
    assert ids[:2] == [768, 774] and ids.count(768) == 1  # <|begin_of_text|><|start_header_id|>
    assert ids[-2:] == [404, 777] and 769 not in ids  # 59<|eot_id|>, no <|end_of_text|>
    assert [i for i in enc["labels"] if i != IGNORE_INDEX] == [404, 777]
    assert enc["prompt_ids"] == ids[:-2] and enc["prompt_ids"][-3:] == [775, 198, 198]  # <|end_header_id|>\n\n


@pytest.mark.parametrize("name", sorted(ANSWER_LABELS))
def test_a_templated_answer_is_labelled_with_the_templates_turn_end_and_no_eos_after_it(tokenizers, tmp_path, name):
    tok = tokenizers[name]
    (one, two) = instruction(tmp_path, tok, [{"messages": ONE}, {"messages": TWO}]).encoded["train"]
    assert label_spans(one) == [ANSWER_LABELS[name]]
    assert one["input_ids"][-len(ANSWER_LABELS[name]):] == ANSWER_LABELS[name]
    assert label_spans(two) == [ANSWER_LABELS[name], LABELS_24[name]]
    if name == "qwen2_base":  # the EOS <|endoftext|> is never appended after <|im_end|>
        assert 746 not in one["input_ids"] + two["input_ids"]
    assert one["reference"] == "59" and two["reference"] == "24"


@pytest.mark.parametrize("name, labels", [("qwen2_base", [20, 24, 746]), ("qwen2_instruct", [20, 24, 748]),
                                          ("llama3_instruct", [404, 769]), ("gpt2", [395, 768])])
def test_plain_prompt_completion_rows_still_end_with_the_eos(tokenizers, tmp_path, name, labels):
    tok = tokenizers[name]
    dm = instruction(tmp_path, tok, [{"prompt": "37+58=", "completion": "59"}])
    (enc,) = dm.encoded["train"]
    bos = [768] if name == "llama3_instruct" else []  # the Llama 3 tokenizer adds its BOS to plain text
    assert enc["input_ids"] == bos + tok("37+58=", add_special_tokens=False).input_ids + labels
    assert [i for i in enc["labels"] if i != IGNORE_INDEX] == labels and enc["reference"] == "59"
    assert dm.chat_templated is False


def test_a_template_that_ends_turns_in_plain_text_still_gets_the_eos():
    tok = build_tokenizer("byte")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    segments = [Segment("user: 2+2?\nassistant: ", False, templated=True), Segment("4\n", True, templated=True)]
    enc = encode_segments(segments, tok, 64)
    assert enc["input_ids"] == byte_ids("user: 2+2?\nassistant: 4\n") + [1]
    assert label_spans(enc) == [byte_ids("4\n") + [1]] and enc["reference"] == "4" and enc["templated"] is True


# -- the exact-match reference --------------------------------------------------------------------------------------
def test_reference_is_cut_at_the_first_stop_the_generation_would_stop_at(tokenizers):
    base = tokenizers["qwen2_base"]
    assert reference_text([Segment("59<|im_end|>\n", True, templated=True)], base) == "59"
    assert reference_text([Segment(" 59 <|endoftext|>", True)], base) == "59"
    # plain text is generated without the template, so only the EOS stops it
    assert reference_text([Segment("59<|im_end|>", True)], base) == "59<|im_end|>"
    assert reference_text([Segment("59<|eot_id|>", True, templated=True)], tokenizers["llama3_instruct"]) == "59"
    assert reference_text([Segment("a</s>b</s>", True)], byte_tokenizer()) == "a"


# -- conversations opening with the assistant -----------------------------------------------------------------------
GREETING = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "What is 37+58?"},
            {"role": "assistant", "content": "59"}]


@pytest.mark.parametrize("name, head", [("qwen2_base", QWEN_SYSTEM + "<|im_start|>assistant\n"),
                                        ("llama3_instruct", ("<|begin_of_text|><|start_header_id|>assistant"
                                                             "<|end_header_id|>\n\n")),
                                        ("gpt2", "<|assistant|>\n")])
def test_a_conversation_may_open_with_the_assistant(tokenizers, tmp_path, name, head):
    tok = tokenizers[name]
    (enc,) = instruction(tmp_path, tok, [{"messages": GREETING}]).encoded["train"]
    hi = {"qwen2_base": [71, 72, 748, 198], "llama3_instruct": [71, 72, 777], "gpt2": [71, 72, 768, 198]}[name]
    assert label_spans(enc) == [hi, ANSWER_LABELS[name]]
    assert enc["input_ids"][: len(tok(head, add_special_tokens=False).input_ids) + len(hi)] == \
        tok(head, add_special_tokens=False).input_ids + hi
    if name == "llama3_instruct":
        assert enc["input_ids"].count(768) == 1  # the template's BOS, once


def test_an_empty_conversational_prompt_renders_the_generation_prompt_alone(tmp_path):
    completion = [{"role": "assistant", "content": "yo"}]
    dm = instruction(tmp_path, byte_tokenizer(), [{"prompt": [], "completion": completion}])
    (enc,) = dm.encoded["train"]
    assert enc["input_ids"] == byte_ids("<|assistant|>\nyo") + [1] and enc["prompt_ids"] == byte_ids("<|assistant|>\n")
    pairs = PreferenceDataModule(data_files=write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "", "chosen": completion, "rejected": [{"role": "assistant", "content": "no"}]}]), max_length=64)
    (pair,) = setup_module_with(pairs, byte_tokenizer()).encoded["train"]
    assert pair["prompt_ids"] == byte_ids("<|assistant|>\n")
    assert pair["chosen"]["input_ids"][-3:] == byte_ids("yo") + [1]


def test_a_template_that_cannot_render_an_empty_conversation_names_the_row(tmp_path):
    tok = build_tokenizer("byte")
    tok.chat_template = ("{% if not messages %}{{ raise_exception('Conversations must start with a user turn') }}"
                         "{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                         "{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": ONE}, {"messages": GREETING}])
    dm = InstructionDataModule(data_files=path, max_length=256)
    dm.tokenizer = tok
    with raises_located(path, 1, "messages", "the chat template cannot render an empty conversation: the first turn"
                        " is the assistant's, and the template cannot render the generation prompt before it (start"
                        " with a user turn, or give a non-empty prompt): TemplateError: Conversations must start with"
                        " a user turn"):
        dm.setup("fit")


def test_a_template_refusing_a_turn_names_the_row_and_the_turns(tmp_path):
    tok = build_tokenizer("byte")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}] + ONE}])
    dm = InstructionDataModule(data_files=path, max_length=256)
    dm.tokenizer = tok
    with raises_located(path, 0, "messages", "the chat template cannot render turns ['system', 'user']:"
                        " TemplateError: no system role"):
        dm.setup("fit")


# -- truncation keeps BOS -------------------------------------------------------------------------------------------
LONG = [{"role": "user", "content": "word " * 40 + "What is 37+58?"}, {"role": "assistant", "content": "59"}]


def test_left_truncation_keeps_llama3s_bos_in_every_data_module(tokenizers, tmp_path):
    tok = tokenizers["llama3_instruct"]
    dm = instruction(tmp_path, tok, [{"messages": LONG}], max_length=16)
    (enc,) = dm.encoded["train"]
    assert len(enc["input_ids"]) == 16 and enc["input_ids"][0] == 768 and enc["input_ids"][-2:] == [404, 777]
    assert enc["input_ids"][1] != 774 and label_spans(enc) == [[404, 777]]  # the cut is after the BOS
    assert dm.stats["data/train_truncated_prompt"] == 1
    pairs = PreferenceDataModule(data_files=write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": LONG[:1], "chosen": "59", "rejected": "95"}]), max_length=16)
    (pair,) = setup_module_with(pairs, tok).encoded["train"]
    for side, answer in (("chosen", 404), ("rejected", 320)):
        ids = pair[side]["input_ids"]
        assert len(ids) == 16 and ids[0] == 768 and ids.count(768) == 1 and ids[-2:] == [answer, 777]
        assert ids[:-2] == pair["prompt_ids"]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "word " * 40 + "37+58=", "answer": "59"}])
    (templated,) = setup_module_with(PromptDataModule(data_files=path, max_length=16, chat_template=True),
                                     tok).encoded["train"]
    (plain,) = setup_module_with(PromptDataModule(data_files=path, max_length=16), tok).encoded["train"]
    assert templated["prompt_ids"][0] == plain["prompt_ids"][0] == 768
    assert len(templated["prompt_ids"]) == len(plain["prompt_ids"]) == 16
    # the template wrote its BOS as text, so the prompt text keeps it; the tokenizer's own BOS is not text
    assert templated["prompt"].startswith("<|begin_of_text|>") and templated["prompt"].count("<|begin_of_text|>") == 1
    assert not plain["prompt"].startswith("<|begin_of_text|>") and plain["prompt"].endswith("37+58=")
    assert tok(plain["prompt"]).input_ids == plain["prompt_ids"]  # re-tokenized as the rewards do: the same ids
    assert tokenize_segments([Segment(templated["prompt"], False)], tok)[0] == templated["prompt_ids"]


# -- one generation prompt everywhere -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CHAT + ("gpt2",))
def test_every_data_module_gives_the_same_generation_prompt(tokenizers, tmp_path, name):
    tok = tokenizers[name]
    sft = instruction(tmp_path, tok, [{"messages": ONE}])
    pref = setup_module_with(PreferenceDataModule(data_files=write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": ONE[:1], "chosen": "59", "rejected": "95"}]), max_length=256), tok)
    rl = setup_module_with(PromptDataModule(data_files=write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": ONE[:1], "answer": "59"}]), max_length=256), tok)
    (s,), (p,), (r,) = sft.encoded["train"], pref.encoded["train"], rl.encoded["train"]
    rendered = tok.apply_chat_template(ONE[:1], tokenize=False, add_generation_prompt=True)
    assert r["prompt"] == rendered
    assert s["prompt_ids"] == p["prompt_ids"] == r["prompt_ids"] == tok(rendered, add_special_tokens=False).input_ids
    n = len(r["prompt_ids"])
    assert p["chosen"]["input_ids"][:n] == p["rejected"]["input_ids"][:n] == r["prompt_ids"]
    assert p["chosen"]["input_ids"][n:] == ANSWER_LABELS[name] and p["reference"] == "59"
    assert label_spans(p["chosen"]) == [ANSWER_LABELS[name]] and label_spans(p["rejected"]) == [LABELS_95[name]]
    assert sft.chat_templated and pref.chat_templated and rl.chat_templated


# -- chat_templated -------------------------------------------------------------------------------------------------
CHAT_ROW = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("row, templated", [
    ({"prompt": "2+2=", "completion": "4"}, False),
    ({"prompt": CHAT_ROW[:1], "completion": CHAT_ROW[1:]}, True),
    ({"messages": CHAT_ROW}, True),
    ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}, True),
    ({"instruction": "Add.", "input": "2 2", "output": "4"}, False),
], ids=["prompt_completion", "conversational_prompt_completion", "messages", "sharegpt", "alpaca"])
def test_instruction_data_is_chat_templated_exactly_for_conversations(tmp_path, row, templated):
    assert instruction(tmp_path, byte_tokenizer(), [row]).chat_templated is templated


@pytest.mark.parametrize("row, templated", [
    ({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, False),
    ({"prompt": CHAT_ROW[:1], "chosen": "4", "rejected": "5"}, True),
    ({"prompt": "2+2?", "chosen": CHAT_ROW[1:], "rejected": [{"role": "assistant", "content": "5"}]}, True),
    ({"chosen": "2+2= 4", "rejected": "2+2= 5"}, False),
    ({"chosen": CHAT_ROW, "rejected": CHAT_ROW[:1] + [{"role": "assistant", "content": "5"}]}, True),
], ids=["explicit_strings", "explicit_turns", "explicit_turn_responses", "implicit_strings", "implicit_turns"])
def test_preference_data_is_chat_templated_exactly_for_conversational_pairs(tmp_path, row, templated):
    dm = PreferenceDataModule(data_files=write_jsonl(tmp_path / "pairs.jsonl", [row]), max_length=64)
    assert setup_module_with(dm, byte_tokenizer()).chat_templated is templated


@pytest.mark.parametrize("prompt, settings, templated", [
    ("2+2=", {}, False),
    ("2+2=", {"chat_template": True}, True),
    ("2+2=", {"format": "messages"}, True),
    (CHAT_ROW[:1], {}, True),
], ids=["string", "string_chat_template", "string_as_messages", "turns"])
def test_prompt_data_is_chat_templated_exactly_when_prompts_are_rendered(tmp_path, prompt, settings, templated):
    dm = PromptDataModule(data_files=write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt, "answer": "4"}]),
                          max_length=64, **settings)
    assert setup_module_with(dm, byte_tokenizer()).chat_templated is templated


def test_chat_templated_is_true_when_any_split_is_and_unknown_before_setup():
    from lit_align import ArithTask

    dm = PromptDataModule(task=ArithTask(digits=1, train_size=8, val_size=2), max_length=64)
    with pytest.raises(RuntimeError, match=r"PromptDataModule.chat_templated: call setup\(\) first"):
        _ = dm.chat_templated
    assert setup_module_with(dm, byte_tokenizer()).chat_templated is False
    # a split of a file with other columns (one file per builder cannot mix string and list prompts)
    (row,) = dm.encode_split(datasets.Dataset.from_list([{"prompt": CHAT_ROW[:1], "answer": "4"}]), "test", "extra")
    assert row["prompt"] == "<|user|>\n2+2?\n<|assistant|>\n" and dm.chat_templated is True
    dm.encode_split(datasets.Dataset.from_list([{"prompt": "2+2=", "answer": "4"}]), "test", "plain")
    assert dm.chat_templated is True


def test_built_in_tasks_are_plain_text_except_the_shapes_conversations():
    from lit_align import ArithTask
    from lit_align.data.tasks import ShapesTextTask

    for cls in (InstructionDataModule, PreferenceDataModule, PromptDataModule):
        dm = cls(task=ArithTask(digits=1, train_size=8, val_size=2), max_length=32)
        assert setup_module_with(dm, byte_tokenizer()).chat_templated is False, cls.__name__
    shapes = InstructionDataModule(task=ShapesTextTask(train_size=4, val_size=2), max_length=512)
    assert setup_module_with(shapes, byte_tokenizer()).chat_templated is True


def test_image_data_is_chat_templated_for_conversations_and_conversational_pairs(tmp_path):
    from torchvision.transforms import Compose, Resize, ToTensor

    from lit_align.data import ImageInstructionDataModule, ShapesTask
    from tests.data.util import image_tokenizer

    def image_module(**kwargs):
        dm = ImageInstructionDataModule(max_length=512, **kwargs)
        dm.tokenizer, dm.image_transform, dm.num_image_tokens = image_tokenizer(), Compose([Resize((8, 8)),
                                                                                            ToTensor()]), 2
        dm.setup("fit")
        return dm

    for kind in ("instruction", "preference"):
        assert image_module(task=ShapesTask(train_size=4, val_size=2), kind=kind).chat_templated is True
    text_only = write_jsonl(tmp_path / "rows.jsonl", [{"image": None, "prompt": "Say hi.", "completion": "hi"}])
    assert image_module(data_files=text_only, kind="caption").chat_templated is False
