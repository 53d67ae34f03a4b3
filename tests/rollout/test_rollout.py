"""Rollout: HFEngine generation (grouping, EOS masks, truncation, text), log-probs against
independent forwards and HF's own sampling scores, chunking invariance, greedy decoding,
train/eval and inference-mode handling, and the RolloutBatch helpers."""

import pytest
import torch

from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer
from lit_align.rollout import (
    HFEngine,
    RolloutBatch,
    SamplingParams,
    chunked_logprobs,
    completion_logprobs,
    completion_masks,
    decode_completions,
)
from tests.conftest import tiny_config

TOK = build_tokenizer("byte")
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id
VOCAB = len(TOK)
LETTERS = [ord(c) + 3 for c in "abcdefghijklmnopqrstuvwxyz"]
NEG = -1e4  # exp(-1e4) == 0 in float32: a token that is never sampled, yet finite logits


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from two intra-op threads, and on a busy 2-core machine their
    spin-waiting makes this file ~10x slower; restore the session's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def text_of(ids: list[int]) -> str:
    return "".join(chr(i - 3) for i in ids)


def prompt_batch(texts: list[str]) -> dict:
    """Left-padded prompt batch as the prompt data module yields it."""
    rows = [byte_ids(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return dict(prompt_ids=ids,
                prompt_mask=(torch.arange(width)[None] >= width - torch.tensor([len(r) for r in rows])[:, None]).long(),
                prompts=list(texts), meta=[{"idx": i, "text": t} for i, t in enumerate(texts)])


PROMPTS = ["hi", "hello there", "abc"]


def make_model(model_type: str = "llama", eos_bias: float | None = 0.0, letters_only: bool = True, seed: int = 0):
    """A tiny random model whose output logits get a fixed additive bias (a hook on the output
    layer, so generation and every teacher-forced forward see the same distribution).

    ``letters_only``: only lowercase letters and EOS can be sampled (exact text checks, the pad
    id is never sampled mid-completion); ``eos_bias``: added to the EOS logit, ``None`` never EOS."""
    model = build_causal_lm(CausalLMSpec(config=tiny_config(model_type), seed=seed), TOK)
    bias = torch.full((VOCAB,), NEG) if letters_only else torch.zeros(VOCAB)
    bias[LETTERS] = 0.0
    bias[PAD] = NEG
    bias[EOS] = NEG if eos_bias is None else eos_bias
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out + bias.to(out.dtype))
    return model


def check_row_layout(rollout: RolloutBatch, max_new_tokens: int) -> None:
    """Every row: mask 1 up to and including the first EOS, pad after it, truncated iff no EOS."""
    width = rollout.completion_ids.shape[1]
    assert rollout.completion_mask.shape == rollout.logprobs.shape == (len(rollout), width)
    if rollout.truncated.any():
        assert width == max_new_tokens
    for i, row in enumerate(rollout.completion_ids.tolist()):
        mask = rollout.completion_mask[i].tolist()
        if EOS in row:
            k = row.index(EOS)
            assert mask == [1] * (k + 1) + [0] * (width - k - 1)
            assert row[k + 1:] == [PAD] * (width - k - 1)
            assert not rollout.truncated[i]
            body = row[:k]
        else:
            assert rollout.truncated[i]
            assert width == max_new_tokens and mask == [1] * width
            body = row
        assert PAD not in body and EOS not in body
        assert rollout.completions[i] == text_of(body)
        assert int(rollout.lengths[i]) == sum(mask)
        # log-probs: negative on the mask, exactly 0 off it
        lp = rollout.logprobs[i]
        assert (lp[rollout.completion_mask[i].bool()] < 0).all()
        assert (lp[~rollout.completion_mask[i].bool()] == 0).all()


# ---------------------------------------------------------------- HFEngine.generate: layout


def test_generate_groups_masks_truncation_and_text():
    model = make_model(eos_bias=2.2)  # p(EOS) ~ 0.25 per step: some rows stop, some are truncated
    prompts = prompt_batch(PROMPTS)
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=5)
    for seed in range(10):
        torch.manual_seed(seed)
        rollout = HFEngine(TOK, logprob_batch_size=4).generate(model, prompts, sampling)
        if rollout.truncated.any() and not rollout.truncated.all():
            break
    assert rollout.truncated.any() and not rollout.truncated.all(), "no seed gave both stopped and truncated rows"

    assert len(rollout) == 9 and rollout.group_size == 3 and rollout.num_groups == 3
    # the longest prompt has no padding, so trimming keeps the prompt block as given
    assert torch.equal(rollout.prompt_ids, prompts["prompt_ids"].repeat_interleave(3, 0))
    assert torch.equal(rollout.prompt_mask, prompts["prompt_mask"].repeat_interleave(3, 0))
    assert rollout.prompts == [p for p in PROMPTS for _ in range(3)]
    assert rollout.meta == [{"idx": g, "text": PROMPTS[g]} for g in range(3) for _ in range(3)]
    assert rollout.completion_ids.dtype == torch.long and rollout.logprobs.dtype == torch.float32
    assert rollout.truncated.dtype == torch.bool
    check_row_layout(rollout, 5)
    # consistent helpers
    assert torch.equal(rollout.input_ids, torch.cat([rollout.prompt_ids, rollout.completion_ids], 1))
    assert torch.equal(rollout.attention_mask, torch.cat([rollout.prompt_mask, rollout.completion_mask], 1))
    assert decode_completions(TOK, rollout.completion_ids) == rollout.completions


def test_generate_without_prompts_and_meta_lists():
    model = make_model(eos_bias=2.2)
    prompts = prompt_batch(["ab", "xyz"])
    del prompts["prompts"], prompts["meta"]
    torch.manual_seed(0)
    rollout = HFEngine(TOK).generate(model, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4))
    assert rollout.prompts == [""] * 4 and rollout.meta == [{}] * 4
    check_row_layout(rollout, 4)


def test_model_that_always_stops_at_once():
    model = make_model(eos_bias=40.0)
    torch.manual_seed(0)
    rollout = HFEngine(TOK).generate(model, prompt_batch(PROMPTS),
                                     SamplingParams(n=3, temperature=1.0, max_new_tokens=5))
    assert rollout.completion_ids.tolist() == [[EOS]] * 9
    assert rollout.completion_mask.tolist() == [[1]] * 9
    assert rollout.truncated.tolist() == [False] * 9
    assert rollout.completions == [""] * 9
    assert rollout.lengths.tolist() == [1] * 9
    assert torch.allclose(rollout.logprobs, torch.zeros(9, 1), atol=1e-6)  # log p(EOS) ~ 0


def test_model_that_never_stops_is_truncated():
    model = make_model(eos_bias=None)
    torch.manual_seed(0)
    rollout = HFEngine(TOK).generate(model, prompt_batch(PROMPTS),
                                     SamplingParams(n=3, temperature=1.0, max_new_tokens=5))
    assert rollout.completion_ids.shape == (9, 5)
    assert rollout.truncated.tolist() == [True] * 9
    assert rollout.completion_mask.tolist() == [[1] * 5] * 9
    assert set(rollout.completion_ids.flatten().tolist()) <= set(LETTERS)
    assert rollout.completions == [text_of(r) for r in rollout.completion_ids.tolist()]
    assert all(len(c) == 5 for c in rollout.completions)
    check_row_layout(rollout, 5)


def test_generate_when_pad_is_eos():
    tok = build_tokenizer("byte")
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == EOS
    model = make_model(eos_bias=2.2)
    prompts = prompt_batch(PROMPTS)
    prompts["prompt_ids"] = prompts["prompt_ids"].masked_fill(prompts["prompt_mask"] == 0, EOS)
    for seed in range(10):
        torch.manual_seed(seed)
        rollout = HFEngine(tok).generate(model, prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=5))
        if rollout.truncated.any() and (rollout.lengths < rollout.completion_ids.shape[1]).any():
            break
    for i, row in enumerate(rollout.completion_ids.tolist()):
        if EOS in row:
            k = row.index(EOS)
            assert rollout.completion_mask[i].tolist() == [1] * (k + 1) + [0] * (len(row) - k - 1)
            assert row[k:] == [EOS] * (len(row) - k) and not rollout.truncated[i]
        else:
            assert rollout.completion_mask[i].all() and rollout.truncated[i]
        assert rollout.completions[i] == text_of(row[: row.index(EOS)] if EOS in row else row)


# ---------------------------------------------------------------- log-probs


def reference_logprobs(model, rollout: RolloutBatch, temperature: float) -> torch.Tensor:
    """Per row, one forward over the unpadded prompt + completion (default positions 0..L-1)."""
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(rollout)):
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
            completion = rollout.completion_ids[i][rollout.completion_mask[i].bool()]
            logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0].double()
            logp = torch.log_softmax(logits / temperature, -1)
            pred = logp[len(prompt) - 1: len(prompt) - 1 + len(completion)]
            out[i, : len(completion)] = pred.gather(-1, completion[:, None])[:, 0]
    return out


def padded_reference_logprobs(model, rollout: RolloutBatch, temperature: float) -> torch.Tensor:
    """One forward over the padded batch with position ids that follow the mask, full logits."""
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.double()
    p, c = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1: p + c - 1] / temperature, -1)
    return logp.gather(-1, rollout.completion_ids[..., None])[..., 0] * rollout.completion_mask


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_match_independent_forward(model_type, temperature):
    # full vocabulary (letters_only=False) so the log-softmax normaliser covers every id
    model = make_model(model_type, eos_bias=4.5, letters_only=False)
    model.train()  # gpt2 has dropout: the engine must score in eval mode
    torch.manual_seed(1)
    prompts = prompt_batch(PROMPTS)
    rollout = HFEngine(TOK, logprob_batch_size=4).generate(
        model, prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=6))
    assert (rollout.lengths < rollout.completion_ids.shape[1]).any()  # some rows right-padded
    assert model.training
    model.eval()
    expected = reference_logprobs(model, rollout, temperature)
    assert torch.allclose(rollout.logprobs.double(), expected, atol=1e-5, rtol=0)
    assert torch.allclose(rollout.logprobs.double(), padded_reference_logprobs(model, rollout, temperature),
                          atol=1e-5, rtol=0)
    # the check is not vacuous: the temperature and the positions both change the numbers
    other = reference_logprobs(model, rollout, temperature * 1.5)
    assert not torch.allclose(rollout.logprobs.double(), other, atol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_extra_left_padding_changes_nothing(model_type):
    """Scoring a row with extra left padding changes nothing (absolute positions included)."""
    model = make_model(model_type, eos_bias=4.5, letters_only=False).eval()
    torch.manual_seed(2)
    rollout = HFEngine(TOK).generate(model, prompt_batch(PROMPTS),
                                     SamplingParams(n=1, temperature=1.0, max_new_tokens=4))
    padded = RolloutBatch.cat([rollout, RolloutBatch(
        prompt_ids=torch.full((1, rollout.prompt_ids.shape[1] + 7), 5),
        prompt_mask=torch.ones(1, rollout.prompt_ids.shape[1] + 7, dtype=torch.long),
        completion_ids=torch.full((1, 1), EOS), completion_mask=torch.ones(1, 1, dtype=torch.long),
        logprobs=torch.zeros(1, 1), truncated=torch.tensor([False]), prompts=[""], completions=[""], meta=[{}],
        sampler_logprobs=torch.zeros(1, 1))], PAD)
    assert padded.prompt_ids.shape[1] == rollout.prompt_ids.shape[1] + 7
    logp, _ = completion_logprobs(model, padded, 1.0)
    assert torch.allclose(logp[:3], rollout.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_hf_sampling_scores(model_type, temperature):
    """The teacher-forced forward reproduces the distribution HF ``generate`` sampled from."""
    model = make_model(model_type, eos_bias=4.5, letters_only=False).eval()
    prompts = prompt_batch(PROMPTS)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(input_ids=prompts["prompt_ids"], attention_mask=prompts["prompt_mask"], do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=6, num_return_sequences=3,
                             pad_token_id=PAD, eos_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[:, prompts["prompt_ids"].shape[1]:].clone()
    mask, truncated = completion_masks(ids, EOS)
    ids = torch.where(mask.bool(), ids, PAD)
    rollout = RolloutBatch(prompt_ids=prompts["prompt_ids"].repeat_interleave(3, 0),
                           prompt_mask=prompts["prompt_mask"].repeat_interleave(3, 0), completion_ids=ids,
                           completion_mask=mask, logprobs=torch.zeros(ids.shape), truncated=truncated,
                           prompts=[p for p in PROMPTS for _ in range(3)], completions=decode_completions(TOK, ids),
                           meta=[{}] * len(ids), group_size=3)
    scores = torch.stack(out.scores, 1).float()  # [N, C, V], processed: logits / temperature
    assert torch.isfinite(scores).all()  # no top-k / top-p filtering
    hf = torch.log_softmax(scores, -1).gather(-1, ids[..., None])[..., 0] * mask
    ours = chunked_logprobs(model, rollout, temperature, batch_size=4)
    assert torch.allclose(ours, hf, atol=1e-4, rtol=0)


def test_chunked_logprobs_equal_training_chunks_exactly():
    model = make_model("llama", eos_bias=3.0)
    torch.manual_seed(4)
    rollout = HFEngine(TOK, logprob_batch_size=3).generate(
        model, prompt_batch(PROMPTS), SamplingParams(n=3, temperature=0.7, max_new_tokens=6))
    chunked = chunked_logprobs(model, rollout, 0.7, batch_size=3)
    assert torch.equal(chunked, rollout.logprobs)  # the engine scored with the same chunks
    for start in (0, 3, 6):
        rows = list(range(start, start + 3))
        chunk = rollout.select(rows).trimmed()
        model.eval()
        with torch.no_grad():
            logp, _ = completion_logprobs(model, chunk, 0.7)
        assert torch.equal(logp, chunked[rows, : logp.shape[1]])
        assert (chunked[rows, logp.shape[1]:] == 0).all()
        # the training forward (train mode, grad on; this model has no dropout): ratio exactly 1
        model.train()
        logp_train, _ = completion_logprobs(model, chunk, 0.7)
        assert logp_train.requires_grad
        ratio = torch.exp(logp_train - chunk.logprobs)
        assert torch.equal(ratio.detach(), torch.ones_like(ratio))
    for batch_size in (1, 2, 4, 9, 20):
        assert torch.allclose(chunked_logprobs(model, rollout, 0.7, batch_size), chunked, atol=1e-5, rtol=0)
    assert model.training  # chunked_logprobs restores the mode


def test_entropy_is_masked_and_matches_distribution():
    model = make_model("llama", eos_bias=3.0).eval()
    torch.manual_seed(5)
    rollout = HFEngine(TOK).generate(model, prompt_batch(PROMPTS),
                                     SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    logp, entropy = completion_logprobs(model, rollout, 1.0, with_entropy=True)
    assert not entropy.requires_grad
    assert (entropy[rollout.completion_mask == 0] == 0).all()
    on = entropy[rollout.completion_mask == 1]
    # letters_only: 27 reachable ids, so 0 < H <= log 27
    assert (on > 0).all() and (on <= torch.log(torch.tensor(27.0)) + 1e-5).all()


# ---------------------------------------------------------------- greedy decoding


def eos_after(model, trigger: int):
    """Make EOS the argmax wherever the *input* token is ``trigger`` (works with and without cache)."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        hit = (ids[:, -logits.shape[1]:] == trigger).to(logits.dtype)
        output.logits = logits + hit[..., None] * 100.0 * torch.nn.functional.one_hot(torch.tensor(EOS), VOCAB)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def greedy_loop(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == EOS:
                break
    return out


def test_greedy_matches_hand_argmax_loop_and_stops_at_eos():
    model = make_model("llama", eos_bias=-20.0).eval()  # on its own, never stops
    prompt = byte_ids("abc")
    free = greedy_loop(model, prompt, 8)
    assert len(free) == 8 and EOS not in free
    trigger = free[2]
    eos_after(model, trigger)
    expected = greedy_loop(model, prompt, 8)
    assert expected[-1] == EOS and len(expected) <= 4  # stops right after the trigger is produced
    assert expected[:-1] == free[: len(expected) - 1]

    model.train()
    prompts = prompt_batch(["hello there", "abc"])  # "abc" is left-padded in the batch
    results = []
    for seed in (0, 123):
        torch.manual_seed(seed)
        results.append(HFEngine(TOK).generate(model, prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=8)))
    a, b = results
    for name in ("completion_ids", "completion_mask", "truncated", "logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.completions == b.completions
    for row in (2, 3):  # both samples of "abc"
        length = int(a.lengths[row])
        assert a.completion_ids[row, :length].tolist() == expected
        assert not a.truncated[row]
        assert a.completions[row] == text_of(expected[:-1])
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])
    # greedy rows are scored at temperature 1
    assert torch.allclose(a.logprobs.double(), reference_logprobs(model.eval(), a, 1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("filtering", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)],
                         ids=["top_k=1", "top_p=1e-6", "both"])
def test_top_k_one_or_tiny_top_p_samples_the_greedy_completion(filtering):
    """At temperature 1, keeping only the most likely token (top-k 1, or a nucleus smaller than
    any single token's probability) leaves no randomness: every seed gives the greedy rows,
    which equal a hand argmax loop on each unpadded prompt."""
    model = make_model("llama", eos_bias=2.5)  # some rows stop before the limit
    prompts = prompt_batch(PROMPTS)
    greedy = HFEngine(TOK).generate(model, prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    for i, text in enumerate(PROMPTS):
        loop = greedy_loop(model.eval(), byte_ids(text), 6)
        for row in (2 * i, 2 * i + 1):
            assert greedy.completion_ids[row, : int(greedy.lengths[row])].tolist() == loop
    assert (~greedy.truncated).any()  # EOS is among the greedy tokens somewhere
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out = HFEngine(TOK).generate(model, prompts,
                                     SamplingParams(n=2, temperature=1.0, max_new_tokens=6, **filtering))
        for name in ("completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(out, name), getattr(greedy, name)), (name, seed)
        assert out.completions == greedy.completions
        # both scored under the unfiltered softmax(logits / 1)
        assert torch.allclose(out.logprobs, greedy.logprobs, atol=1e-6, rtol=0)
    # not vacuous: without the filter, temperature-1 samples leave the greedy path
    torch.manual_seed(0)
    free = HFEngine(TOK).generate(model, prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert free.completions != greedy.completions


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_generation_runs_on_the_kv_cache(temperature):
    """``generate`` is called with ``use_cache=True`` and decodes incrementally: one forward over
    the prompt, then one new token per forward (without the cache each step re-reads all)."""
    model = make_model("llama", eos_bias=None)  # never stops: all 5 steps run
    calls, widths, original = [], [], model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.generate = spy
    model.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    prompts = prompt_batch(PROMPTS)
    rollout = HFEngine(TOK).generate(model, prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=5))
    assert len(calls) == 1 and calls[0]["generation_config"].use_cache is True
    p = prompts["prompt_ids"].shape[1]
    assert widths[:5] == [p, 1, 1, 1, 1]
    assert widths[5:] == [p + 5]  # then one teacher-forced scoring forward (no cache)
    assert rollout.completion_ids.shape == (6, 5)


# ---------------------------------------------------------------- modes and autograd


def test_generation_is_eval_and_inference_mode_and_outputs_train():
    model = make_model("gpt2", eos_bias=2.2)
    model.train()
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(dict(training=model.training, any_training=any(m.training for m in model.modules()),
                         inference=torch.is_inference_mode_enabled()))
        return original(*args, **kwargs)

    model.generate = spy
    forwards = []
    model.register_forward_pre_hook(lambda mod, args: forwards.append(mod.training))
    torch.manual_seed(6)
    rollout = HFEngine(TOK).generate(model, prompt_batch(PROMPTS),
                                     SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    assert seen == [dict(training=False, any_training=False, inference=True)]
    assert forwards and not any(forwards)  # every forward (sampling and scoring) in eval mode
    assert model.training and all(m.training for m in model.modules())

    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated"):
        assert not getattr(rollout, name).is_inference(), name
    # a training step on the rollout: forward, importance ratio, backward
    logp, _ = completion_logprobs(model, rollout, 1.0)
    advantages = torch.linspace(-1, 1, len(rollout))[:, None]
    ratio = torch.exp(logp - rollout.logprobs)
    mask = rollout.completion_mask
    loss = -(ratio * advantages * mask).sum() / mask.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_generation_restores_eval_mode_too():
    model = make_model("llama", eos_bias=2.2).eval()
    HFEngine(TOK).generate(model, prompt_batch(["ab"]), SamplingParams(n=1, temperature=1.0, max_new_tokens=2))
    assert not model.training


# ---------------------------------------------------------------- completion_masks


def test_completion_masks_pad_equal_to_eos():
    mask, truncated = completion_masks(torch.tensor([[5, 1, 1, 1], [5, 6, 7, 8]]), 1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_completion_masks_first_eos_wins():
    ids = torch.tensor([[1, 0, 0, 0], [4, 5, 1, 0], [4, 1, 6, 1], [4, 5, 6, 1], [0, 4, 5, 6]])
    mask, truncated = completion_masks(ids, 1)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, False, False, True]
    assert mask.dtype == torch.long and truncated.dtype == torch.bool


def test_decode_completions_stops_at_eos():
    ids = torch.tensor([[byte_ids("h")[0], byte_ids("i")[0], EOS, PAD], byte_ids("abcd"), [EOS, PAD, PAD, PAD]])
    assert decode_completions(TOK, ids) == ["hi", "abcd", ""]


# ---------------------------------------------------------------- RolloutBatch


def batch_a() -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 0, 4], [0, 0, 10, 11]]),
        prompt_mask=torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]),
        completion_ids=torch.tensor([[20, 1, 0, 0, 0], [21, 22, 1, 0, 0], [23, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        logprobs=torch.tensor([[-1.0, -2.0, 0, 0, 0], [-3.0, -4.0, -5.0, 0, 0], [-6.0, -7.0, 0, 0, 0],
                               [-8.0, 0, 0, 0, 0]]),
        truncated=torch.tensor([False, False, False, False]),
        prompts=["p0", "p0", "p1", "p1"], completions=["c0", "c1", "c2", "c3"],
        meta=[{"g": 0}, {"g": 0}, {"g": 1}, {"g": 1}], group_size=2)


def batch_b() -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=torch.tensor([[30, 31], [30, 31]]), prompt_mask=torch.ones(2, 2, dtype=torch.long),
        completion_ids=torch.tensor([[40], [41]]), completion_mask=torch.ones(2, 1, dtype=torch.long),
        logprobs=torch.tensor([[-0.5], [-0.25]]), truncated=torch.tensor([True, True]),
        prompts=["q", "q"], completions=["x", "y"], meta=[{"g": 2}, {"g": 2}], group_size=2)


def test_rollout_batch_properties():
    a = batch_a()
    assert len(a) == 4 and a.num_groups == 2
    assert a.lengths.tolist() == [2, 3, 2, 1]
    assert a.input_ids.shape == (4, 9) and a.input_ids[1].tolist() == [0, 7, 8, 9, 21, 22, 1, 0, 0]
    assert a.attention_mask[1].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_select_keeps_rows_in_order():
    a = batch_a()
    s = a.select([3, 0])
    assert s.prompt_ids.tolist() == [[0, 0, 10, 11], [0, 0, 5, 6]]
    assert s.completion_ids.tolist() == [[1, 0, 0, 0, 0], [20, 1, 0, 0, 0]]
    assert s.logprobs.tolist() == [[-8.0, 0, 0, 0, 0], [-1.0, -2.0, 0, 0, 0]]
    assert s.prompts == ["p1", "p0"] and s.completions == ["c3", "c0"] and s.meta == [{"g": 1}, {"g": 0}]
    assert s.group_size == 2
    t = a.select(torch.tensor([2, 3]))
    assert t.completions == ["c2", "c3"] and t.truncated.tolist() == [False, False]


def test_trimmed_drops_all_pad_columns_only():
    a = batch_a()
    t = a.trimmed()
    assert t.prompt_ids.tolist() == [[0, 5, 6], [7, 8, 9], [0, 0, 4], [0, 10, 11]]
    assert t.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert t.completion_ids.tolist() == [[20, 1, 0], [21, 22, 1], [23, 1, 0], [1, 0, 0]]
    assert t.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert t.logprobs.tolist() == [[-1.0, -2.0, 0], [-3.0, -4.0, -5.0], [-6.0, -7.0, 0], [-8.0, 0, 0]]
    assert t.prompts == a.prompts and t.completions == a.completions and t.meta == a.meta
    assert torch.equal(t.truncated, a.truncated) and t.group_size == 2
    # values unchanged: the unmasked tokens and their positions relative to the boundary
    for i in range(4):
        assert (t.input_ids[i][t.attention_mask[i].bool()].tolist()
                == a.input_ids[i][a.attention_mask[i].bool()].tolist())
    # a sub-batch trims further
    s = a.select([2, 3]).trimmed()
    assert s.prompt_ids.tolist() == [[0, 4], [10, 11]] and s.completion_ids.tolist() == [[23, 1], [1, 0]]
    assert s.logprobs.tolist() == [[-6.0, -7.0], [-8.0, 0]]
    # nothing to trim: unchanged
    b = batch_b().trimmed()
    assert torch.equal(b.prompt_ids, batch_b().prompt_ids) and torch.equal(b.logprobs, batch_b().logprobs)


def test_cat_repads_to_common_widths():
    a, b = batch_a(), batch_b()
    c = RolloutBatch.cat([b, a], pad_id=99)
    assert len(c) == 6 and c.group_size == 2 and c.num_groups == 3
    assert c.prompt_ids.tolist() == [[99, 99, 30, 31], [99, 99, 30, 31]] + a.prompt_ids.tolist()
    assert c.prompt_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]] + a.prompt_mask.tolist()
    assert c.completion_ids.tolist() == [[40, 99, 99, 99, 99], [41, 99, 99, 99, 99]] + a.completion_ids.tolist()
    assert c.completion_mask.tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]] + a.completion_mask.tolist()
    assert c.logprobs.tolist() == [[-0.5, 0, 0, 0, 0], [-0.25, 0, 0, 0, 0]] + a.logprobs.tolist()
    assert c.truncated.tolist() == [True, True, False, False, False, False]
    assert c.prompts == ["q", "q", "p0", "p0", "p1", "p1"]
    assert c.completions == ["x", "y", "c0", "c1", "c2", "c3"]
    assert c.meta == [{"g": 2}, {"g": 2}, {"g": 0}, {"g": 0}, {"g": 1}, {"g": 1}]
    assert c.lengths.tolist() == [1, 1, 2, 3, 2, 1]
    assert c.logprobs.dtype == torch.float32 and c.completion_ids.dtype == torch.long
    # the other order: a's rows first, b's padded
    d = RolloutBatch.cat([a, b], pad_id=0)
    assert d.prompt_ids[4:].tolist() == [[0, 0, 30, 31]] * 2
    assert d.completion_ids[4:].tolist() == [[40, 0, 0, 0, 0], [41, 0, 0, 0, 0]]


def test_cat_rejects_mixed_group_sizes_and_empty():
    b = batch_b()
    odd = batch_b()
    odd.group_size = 1
    with pytest.raises(ValueError, match="group sizes"):
        RolloutBatch.cat([b, odd], pad_id=0)
    with pytest.raises(ValueError):
        RolloutBatch.cat([], pad_id=0)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01),
                                 dict(top_k=-1), dict(n=0), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")),
                                 dict(stop_token_ids=[-1]), dict(stop_token_ids=[1.5])])
def test_sampling_params_reject_invalid(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampling_params_accept_edges():
    s = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0, n=1)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.n) == (1, 0.0, 1.0, 0, 1)
    SamplingParams(top_p=1e-3, top_k=5, temperature=2.0, n=8)


def test_stop_token_ids_default_to_eos():
    assert SamplingParams().stop_ids(TOK) == [EOS]
    assert SamplingParams(stop_token_ids=[7, 9]).stop_ids(TOK) == [7, 9]


def test_completion_masks_end_at_the_first_stop_of_any_kind():
    ids = torch.tensor([[4, 9, 7, 1], [4, 5, 6, 8], [7, 0, 0, 0]])
    mask, truncated = completion_masks(ids, [7, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    assert decode_completions(TOK, torch.tensor([byte_ids("ab") + [7]]), [7]) == ["ab"]


def test_hf_engine_stops_at_any_stop_id():
    """With EOS impossible, greedy rows stop at the first 'x' when 'x' is a stop id (the text
    before it), and run to max_new_tokens (truncated) when only the EOS stops."""
    model = make_model(eos_bias=None)
    batch = prompt_batch(PROMPTS)
    free = HFEngine(TOK).generate(model, batch, SamplingParams(max_new_tokens=6))
    assert free.truncated.all()
    stop = free.completion_ids[0, 2].item()  # a letter the first row emits at step 3
    stopped = HFEngine(TOK).generate(model, batch, SamplingParams(max_new_tokens=6, stop_token_ids=[stop, EOS]))
    for i, row in enumerate(free.completion_ids.tolist()):
        k = row.index(stop) if stop in row else len(row)
        assert stopped.completions[i] == text_of(row[:k])
        assert int(stopped.completion_mask[i].sum()) == min(k + 1, 6) and bool(stopped.truncated[i]) == (k == 6)
    assert not stopped.truncated[0]


def test_cat_and_trimmed_carry_sampler_logprobs():
    a, b = batch_a(), batch_b()
    a.sampler_logprobs = a.logprobs - 0.5 * a.completion_mask
    b.sampler_logprobs = b.logprobs.clone()
    c = RolloutBatch.cat([a, b], pad_id=0)
    assert c.sampler_logprobs.shape == c.logprobs.shape
    assert c.sampler_logprobs[:4].tolist() == a.sampler_logprobs.tolist()
    assert c.sampler_logprobs[4:, 1:].abs().sum() == 0
    assert a.trimmed().sampler_logprobs.shape == a.trimmed().logprobs.shape
    assert a.select([1]).sampler_logprobs.tolist() == [a.sampler_logprobs[1].tolist()]
    with pytest.raises(ValueError, match="sampler_logprobs"):
        RolloutBatch.cat([a, batch_b()], pad_id=0)
    assert RolloutBatch.cat([batch_a(), batch_b()], pad_id=0).sampler_logprobs is None
