"""The real-format checkpoint zoo (tests/zoo.py): each directory carries its family's quirks once
loaded with transformers' auto classes, and lit_align loads and encodes data with each."""

import filecmp
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from lit_align.data import InstructionDataModule
from lit_align.data.encode import IGNORE_INDEX
from lit_align.models import CausalLMSpec, build_causal_lm, load_tokenizer
from lit_align.models.tokenizer import BYTE_CHAT_TEMPLATE
from tests.data.util import labelled_texts, write_jsonl
from tests.zoo import QWEN_SPLIT, QWEN_SYSTEM, REPETITION_VARIANT, ZOO, build_model, build_zoo, train_bpe, write_variant

CHAT = ("qwen2_instruct", "qwen2_base", "llama3_instruct", "moe")
TURN_END = {"qwen2_instruct": "<|im_end|>", "qwen2_base": "<|im_end|>", "llama3_instruct": "<|eot_id|>",
            "moe": "<|im_end|>"}
GENERATION_PROMPT = {"qwen2_instruct": "<|im_start|>assistant\n", "qwen2_base": "<|im_start|>assistant\n",
                     "moe": "<|im_start|>assistant\n",
                     "llama3_instruct": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
CLASSES = {"qwen2_instruct": "Qwen2ForCausalLM", "qwen2_base": "Qwen2ForCausalLM", "moe": "Qwen2MoeForCausalLM",
           "llama3_instruct": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
CONVERSATION = [{"role": "user", "content": "What is 37+58?"}, {"role": "assistant", "content": "59"},
                {"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "24"}]
SYSTEM = [{"role": "system", "content": "Answer with the digits reversed."}]


def tokens(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)


# -- files ----------------------------------------------------------------------------------------------------------
def test_same_seed_writes_identical_files_and_another_seed_other_weights(zoo, tmp_path):
    again = build_zoo(tmp_path / "again")
    assert set(again) == set(ZOO) | {REPETITION_VARIANT}
    for name, path in zoo.items():
        files = sorted(os.listdir(path))
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= set(files)
        assert files == sorted(os.listdir(again[name]))
        _, mismatch, errors = filecmp.cmpfiles(path, again[name], files, shallow=False)
        assert (mismatch, errors) == ([], []), name
    other = build_model("gpt2", tmp_path / "seed1", seed=1)
    assert not filecmp.cmp(os.path.join(zoo["gpt2"], "model.safetensors"), os.path.join(other, "model.safetensors"),
                           shallow=False)
    assert filecmp.cmp(os.path.join(zoo["gpt2"], "tokenizer.json"), os.path.join(other, "tokenizer.json"),
                       shallow=False)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gpt2"])
def test_tokenizer_training_is_deterministic_with_hundreds_of_tokens(family):
    vocab, merges = train_bpe(family)
    assert train_bpe.__wrapped__(family) == (vocab, merges)  # a fresh trainer, fresh hash seeds
    if family == "qwen2":  # Qwen2Tokenizer rebuilds its pre-tokenizer from this regex when it loads
        assert QWEN_SPLIT == PRETOKENIZE_REGEX
    assert 600 <= len(vocab) <= 1024 and len(merges) == len(vocab) - 256 - {"qwen2": 3, "llama3": 10, "gpt2": 1}[family]


@pytest.mark.parametrize("family, digits", [("qwen2", ["1", "2", "3", "4"]), ("llama3", ["123", "4"]),
                                            ("gpt2", ["1234"])])
def test_digits_are_split_as_in_each_family(zoo, family, digits):
    """Qwen2 gives every digit its own token, Llama 3 up to three, GPT-2 merges any run."""
    name = {"qwen2": "qwen2_instruct", "llama3": "llama3_instruct", "gpt2": "gpt2"}[family]
    tok = AutoTokenizer.from_pretrained(zoo[name])
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234+58=")]
    assert pieces == digits + ["+"] + (["5", "8"] if family == "qwen2" else ["58"]) + ["="]


# -- each family's quirks -------------------------------------------------------------------------------------------
def test_qwen2_instruct_stops_on_im_end_pads_with_endoftext_and_samples_by_default(zoo):
    tok = AutoTokenizer.from_pretrained(zoo["qwen2_instruct"])
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.bos_token is None
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>") and im_end != endoftext
    assert tokens(tok, "<|im_start|>user\n<|im_end|>") == ["<|im_start|>", "user", "Ċ", "<|im_end|>"]
    gen = GenerationConfig.from_pretrained(zoo["qwen2_instruct"])
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (True, 0.7, 0.8, 20, 1.1)
    assert gen.eos_token_id == [im_end, endoftext] and gen.pad_token_id == endoftext
    config = AutoConfig.from_pretrained(zoo["qwen2_instruct"])
    assert (config.eos_token_id, config.bos_token_id, config.dtype) == (im_end, endoftext, torch.bfloat16)
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tok)  # embeddings padded past the tokenizer
    assert config.tie_word_embeddings


def test_qwen2_base_eos_is_endoftext_while_turns_end_with_im_end(zoo):
    tok = AutoTokenizer.from_pretrained(zoo["qwen2_base"])
    endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == endoftext != im_end
    rendered = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert rendered.endswith("59<|im_end|>\n") and "<|endoftext|>" not in rendered
    gen = GenerationConfig.from_pretrained(zoo["qwen2_base"])
    assert (gen.do_sample, gen.eos_token_id, gen.max_new_tokens) == (False, endoftext, 2048)
    assert AutoConfig.from_pretrained(zoo["qwen2_base"]).eos_token_id == endoftext


def test_llama3_adds_bos_has_no_pad_and_only_the_generation_config_knows_eot(zoo):
    tok = AutoTokenizer.from_pretrained(zoo["llama3_instruct"])
    bos, end_of_text, eot = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", None)
    assert tok("37+58=").input_ids[0] == bos and bos not in tok("37+58=", add_special_tokens=False).input_ids
    assert [bos, end_of_text, eot] == [len(train_bpe("llama3")[1]) + 256 + i for i in (0, 1, 9)]  # Llama 3's order
    gen = GenerationConfig.from_pretrained(zoo["llama3_instruct"])
    assert gen.eos_token_id == [end_of_text, eot] and gen.pad_token_id is None
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)
    config = AutoConfig.from_pretrained(zoo["llama3_instruct"])
    assert (config.eos_token_id, config.bos_token_id, config.vocab_size) == (end_of_text, bos, len(tok))
    assert not config.tie_word_embeddings


def test_gpt2_dropout_everywhere_absolute_positions_no_pad_no_template(zoo):
    tok = AutoTokenizer.from_pretrained(zoo["gpt2"])
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>" and tok.pad_token is None
    assert tok.chat_template is None and tok("37+58=").input_ids == tok("37+58=", add_special_tokens=False).input_ids
    gen = GenerationConfig.from_pretrained(zoo["gpt2"])
    assert gen.eos_token_id == gen.bos_token_id == tok.eos_token_id and gen.pad_token_id is None
    model = AutoModelForCausalLM.from_pretrained(zoo["gpt2"])
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop, c.summary_first_dropout) == (0.1, 0.1, 0.1, 0.1)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    # embeddings, then per block: attention weights, attention output, MLP output
    assert len(drops) == 1 + 3 * c.n_layer and set(drops) == {0.1}
    assert model.transformer.wpe.weight.shape == (c.n_positions, c.n_embd)
    ids = torch.tensor([tok("37+58=").input_ids])
    model.eval()
    plain = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    shifted = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] + 7).logits
    assert (shifted - plain).abs().max() > 1e-3  # learned absolute positions, not relative ones
    model.train()
    torch.manual_seed(0)
    assert (model(input_ids=ids).logits - plain).abs().max() > 1e-3  # dropout is live in train mode


def test_moe_routes_each_token_to_two_of_four_experts(zoo):
    config = AutoConfig.from_pretrained(zoo["moe"])
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == ("qwen2_moe", 4, 2)
    assert config.output_router_logits is False and config.decoder_sparse_step == 1 and config.mlp_only_layers == []
    model = AutoModelForCausalLM.from_pretrained(zoo["moe"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(zoo["moe"])
    assert [(layer.mlp.gate.num_experts, layer.mlp.gate.top_k) for layer in model.model.layers] == [(4, 2)] * 2
    ids = torch.tensor([tok("What is 37+58?").input_ids])
    out = model(input_ids=ids, output_router_logits=True)
    assert [tuple(r.shape) for r in out.router_logits] == [(ids.shape[1], 4)] * config.num_hidden_layers
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    chat = AutoTokenizer.from_pretrained(zoo["qwen2_instruct"])
    assert tok.get_vocab() == chat.get_vocab() and tok.chat_template == chat.chat_template
    assert (tok.eos_token, tok.pad_token) == (chat.eos_token, chat.pad_token)


def test_repetition_variant_has_the_same_weights_and_only_the_penalty_changed(zoo, tmp_path):
    base, variant = zoo["qwen2_instruct"], zoo[REPETITION_VARIANT]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert filecmp.cmp(os.path.join(base, name), os.path.join(variant, name), shallow=False)
    a, b = (GenerationConfig.from_pretrained(p).to_diff_dict() for p in (base, variant))
    assert b.pop("repetition_penalty") == 1.3 and a.pop("repetition_penalty") == 1.1 and a == b
    clean = GenerationConfig.from_pretrained(write_variant(variant, tmp_path / "clean", replace=True))
    ids = {k: a[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert {k: v for k, v in clean.to_diff_dict().items() if k != "transformers_version"} == ids


# -- chat templates -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("name", CHAT)
def test_chat_template_is_prefix_consistent_and_ends_turns_with_its_token(zoo, name, system):
    tok = AutoTokenizer.from_pretrained(zoo[name])
    conv = (SYSTEM if system else []) + CONVERSATION

    def render(msgs, gen=False):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(conv)
    for k, turn in enumerate(conv):
        assert full.startswith(render(conv[: k + 1]))
        if turn["role"] == "assistant":
            head = render(conv[:k], gen=True)
            assert head.endswith(GENERATION_PROMPT[name])
            assert render(conv[: k + 1]) == head + turn["content"] + TURN_END[name] + ("" if name.startswith("llama")
                                                                                       else "\n")
    if name.startswith("qwen") or name == "moe":  # Qwen's default system turn when the conversation has none
        assert full.startswith("<|im_start|>system\n" + ("Answer with" if system else QWEN_SYSTEM))
    else:
        assert full.startswith("<|begin_of_text|><|start_header_id|>" + conv[0]["role"])
    ids = tok(full, add_special_tokens=False).input_ids
    turns = len(conv) + (name != "llama3_instruct" and not system)
    assert ids.count(tok.convert_tokens_to_ids(TURN_END[name])) == turns  # the end-of-turn token is one id
    assert (tok.convert_tokens_to_ids(TURN_END[name]) == tok.eos_token_id) == (name in ("qwen2_instruct", "moe"))


# -- lit_align with each model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO)
def test_lit_align_builds_each_model_and_tokenizer(zoo, name):
    spec = CausalLMSpec(pretrained=zoo[name])
    tok = load_tokenizer(spec)
    auto = AutoTokenizer.from_pretrained(zoo[name])
    assert type(tok) is type(auto) and tok.get_vocab() == auto.get_vocab()
    text = "What is 37+58? 59 Describe the image."
    assert tok(text).input_ids == auto(text).input_ids
    model = build_causal_lm(spec, tok)
    config = AutoConfig.from_pretrained(zoo[name])
    assert type(model).__name__ == CLASSES[name]
    assert model.get_input_embeddings().num_embeddings == config.vocab_size >= len(tok)  # never resized down
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    half = build_causal_lm(CausalLMSpec(pretrained=zoo[name], dtype="bfloat16"), tok)
    stored = torch.float32 if name == "gpt2" else torch.bfloat16  # GPT-2's checkpoint is float32, the others bf16
    assert config.dtype == stored
    for (key, p), q in zip(model.state_dict().items(), half.state_dict().values()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), key
        assert stored == torch.float32 or torch.equal(q.float(), p), key  # float32 is the stored bf16, upcast exactly
    ids = torch.tensor([tok(text).input_ids])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name, pad", [("qwen2_instruct", "<|endoftext|>"), ("qwen2_base", "<|endoftext|>"),
                                       ("llama3_instruct", "<|end_of_text|>"), ("gpt2", "<|endoftext|>"),
                                       ("moe", "<|endoftext|>")])
def test_load_tokenizer_keeps_a_pad_and_template_or_falls_back_to_eos_and_the_byte_template(zoo, name, pad):
    tok = load_tokenizer(CausalLMSpec(pretrained=zoo[name]))
    auto = AutoTokenizer.from_pretrained(zoo[name])
    assert tok.pad_token == pad and tok.pad_token_id == tok.convert_tokens_to_ids(pad)
    assert (tok.pad_token_id == tok.eos_token_id) == (auto.pad_token is None or name == "qwen2_base")
    assert tok.chat_template == (BYTE_CHAT_TEMPLATE if name == "gpt2" else auto.chat_template)


def _encoded_row(zoo, name, tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": SYSTEM + CONVERSATION}]
    dm = InstructionDataModule(data_files=write_jsonl(tmp_path / "chat.jsonl", rows), max_length=256,
                               micro_batch_size=2, eval_batch_size=2)
    dm.tokenizer = load_tokenizer(CausalLMSpec(pretrained=zoo[name]))
    dm.setup("fit")
    return dm.tokenizer, dm.encoded["train"]


CLOSE = {"qwen2_instruct": "<|im_end|>\n", "qwen2_base": "<|im_end|>\n", "moe": "<|im_end|>\n",
         "llama3_instruct": "<|eot_id|>", "gpt2": "\n"}


@pytest.mark.parametrize("name", CHAT + ("gpt2",))
def test_instruction_data_encodes_messages_with_each_template(zoo, name, tmp_path):
    tok, encoded = _encoded_row(zoo, name, tmp_path)
    end = TURN_END.get(name, tok.eos_token)  # GPT-2 renders with the byte template: turns end with its EOS
    assert len(encoded) == 2
    for has_system, enc in enumerate(encoded):
        ids, labels = enc["input_ids"], enc["labels"]
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
        spans = labelled_texts(enc, tok)
        assert [s.split(end)[0] for s in spans] == ["59", "24"] and all(end in s for s in spans)
        assert tok.decode(enc["prompt_ids"]).endswith("What is 12+30?" + CLOSE[name]
                                                      + GENERATION_PROMPT.get(name, "<|assistant|>\n"))
        prompt = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
        assert "What is 37+58?" in prompt and "What is 12+30?" in prompt and "59" not in prompt
        assert ("Answer with the digits reversed." in prompt) == bool(has_system)
        # Qwen's template writes its default system turn when the row has none.
        turns = 2 if name == "gpt2" else len(CONVERSATION) + (has_system or name != "llama3_instruct")
        assert ids.count(tok.convert_tokens_to_ids(end)) == turns  # the end-of-turn token stays one id


@pytest.mark.parametrize("name", CHAT)
def test_instruction_data_has_at_most_one_bos(zoo, name, tmp_path):
    tok, encoded = _encoded_row(zoo, name, tmp_path)
    for enc in encoded:
        assert tok.bos_token_id is None or enc["input_ids"].count(tok.bos_token_id) == 1
        if tok.bos_token_id is not None:  # Llama 3: the template's BOS, first, with no tokenizer BOS before it
            assert enc["input_ids"][0] == enc["prompt_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("name", CHAT + ("gpt2",))
def test_instruction_data_reference_is_the_answer_alone(zoo, name, tmp_path):
    """The exact-match reference of a row is the last assistant turn's text, without the template's markup."""
    _, encoded = _encoded_row(zoo, name, tmp_path)
    assert [enc["reference"] for enc in encoded] == ["24", "24"]


def _make_zoo():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("make_zoo", os.path.join(REPO, "benchmarks", "make_zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_make_zoo_script_writes_the_fixture_files_and_a_penalised_copy(zoo, tmp_path):
    main = _make_zoo()
    paths = main([str(tmp_path / "a"), "--only", "gpt2", "--only", "qwen2_instruct"])
    assert set(paths) == {"gpt2", "qwen2_instruct", REPETITION_VARIANT}
    for name, path in paths.items():
        files = sorted(os.listdir(zoo[name]))
        assert filecmp.cmpfiles(zoo[name], path, files, shallow=False)[0] == files
    penalised = main([str(tmp_path / "b"), "--only", "gpt2", "--repetition-penalty", "1.3"])["gpt2"]
    assert GenerationConfig.from_pretrained(penalised).repetition_penalty == 1.3
    assert filecmp.cmp(os.path.join(zoo["gpt2"], "model.safetensors"), os.path.join(penalised, "model.safetensors"),
                       shallow=False)
    for bad in ("nan", "0"):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "c"), "--repetition-penalty", bad])
