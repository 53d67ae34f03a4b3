"""The vLLM engine on CPU: weight sync (plain and LoRA policies) proven by greedy equality with HF
generate on the same weights, sampler vs training log-probs, stop ids, seeded reproducibility,
and the errors raised before any weights load."""

import dataclasses
import math

import pytest
import torch

from tests.vllm.conftest import ENGINE_ARGS, SKIP_REASON, VLLM_CONFIG, perturb

pytest.importorskip("vllm", reason=SKIP_REASON)

from lit_align import GRPO  # noqa: E402
from lit_align.models import CausalLMSpec, LoraSpec, apply_lora, build_causal_lm, build_tokenizer  # noqa: E402
from lit_align.rewards import RewardSpec  # noqa: E402
from lit_align.rollout import EngineSpec, HFEngine, SamplingParams, build_engine  # noqa: E402
from lit_align.rollout.vllm import VLLMEngine  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

TOK = build_tokenizer("byte", padding_side="left")
TEXTS = ["12+34=", "7+5=", "100+1=", "hello there", "a"]
#: fp32 on both sides, different kernels (vLLM's CPU attention and GEMMs vs PyTorch's SDPA):
#: log-probs of the same tokens agree to this (measured: at most 2e-5 over these prompts).
LOGPROB_ATOL = 1e-4


def prompts(texts=TEXTS) -> dict:
    enc = TOK(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return dict(prompt_ids=enc.input_ids, prompt_mask=enc.attention_mask, prompts=list(texts),
                meta=[{"i": i} for i in range(len(texts))])


def policy(seed: int = 0, **config) -> torch.nn.Module:
    model = build_causal_lm(CausalLMSpec(config={**VLLM_CONFIG, **config}, seed=seed), TOK)
    perturb(model, seed + 100)  # away from the near-uniform random init: distinct greedy tokens
    return model


@pytest.fixture(scope="module")
def engine():
    e = build_engine("vllm", TOK, logprob_batch_size=4, **ENGINE_ARGS)
    yield e
    e.close()


def greedy(eng, model, n=1, max_new_tokens=10, **kw):
    return eng.generate(model, prompts(), SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=n, **kw))


def assert_same_completions(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)
    assert a.completions == b.completions


def test_synced_weights_give_hf_greedy_completions(engine):
    model = policy()
    engine.update_weights(model)
    first = greedy(engine, model, n=2)
    assert_same_completions(first, greedy(HFEngine(TOK, 4), model, n=2))
    assert first.group_size == 2 and first.prompts[:2] == [TEXTS[0]] * 2 and first.meta[2] == {"i": 1}
    # a training step changes the weights: vLLM follows only once they are synced
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(input_ids=first.input_ids, attention_mask=first.attention_mask).logits
    logits[:, -first.completion_ids.shape[1] - 1:-1].logsumexp(-1).mean().backward()  # push every sampled logit down
    opt.step()
    perturb(model, 7, scale=0.2)
    hf = greedy(HFEngine(TOK, 4), model)
    stale = greedy(engine, model)
    assert not torch.equal(stale.completion_ids, hf.completion_ids), "the weight change did not change greedy text"
    engine.update_weights(model)
    assert_same_completions(greedy(engine, model), hf)


def test_lora_policy_syncs_its_merged_weights(engine):
    model = apply_lora(policy(seed=3), LoraSpec(r=4, alpha=8))
    perturb(model, 11, scale=0.5, only="lora_")
    base = policy(seed=3)
    assert not torch.equal(greedy(HFEngine(TOK, 4), model).completion_ids,
                           greedy(HFEngine(TOK, 4), base).completion_ids), "the adapters changed nothing"
    engine.update_weights(model)
    assert_same_completions(greedy(engine, model), greedy(HFEngine(TOK, 4), model))
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the policy keeps its adapters


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampler_logprobs_match_the_training_forward(engine, temperature):
    model = policy(seed=5)
    engine.update_weights(model)
    torch.manual_seed(0)
    r = engine.generate(model, prompts(), SamplingParams(max_new_tokens=8, temperature=temperature,
                                                        n=1 if temperature == 0 else 4))
    mask = r.completion_mask.bool()
    assert r.sampler_logprobs.dtype == torch.float32 and r.sampler_logprobs.shape == r.logprobs.shape
    assert (r.sampler_logprobs[~mask] == 0).all() and (r.sampler_logprobs[mask] < 0).all()
    gap = (r.logprobs - r.sampler_logprobs).abs()[mask]
    assert gap.max() < LOGPROB_ATOL, float(gap.max())


def test_top_k_sampler_logprobs_are_the_truncated_distribution(engine):
    """With top-k the sampler's log-probs are renormalised over the k kept tokens: above the
    training forward's (untruncated) log-probs by log(mass of the top k), the gap rollout
    correction exists for."""
    model = policy(seed=5)
    engine.update_weights(model)
    r = engine.generate(model, prompts(), SamplingParams(max_new_tokens=6, temperature=1.0, top_k=2, n=3))
    mask = r.completion_mask.bool()
    logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, -r.completion_ids.shape[1] - 1:-1]
    top2 = logits.float().log_softmax(-1).topk(2, -1).values.logsumexp(-1)
    expected = r.logprobs - top2
    torch.testing.assert_close(r.sampler_logprobs[mask], expected[mask], rtol=0, atol=LOGPROB_ATOL)
    assert (r.sampler_logprobs[mask] > r.logprobs[mask]).all()


def test_stop_token_ids_end_completions(engine):
    model = policy(seed=6)
    engine.update_weights(model)
    free = greedy(engine, model, max_new_tokens=8)
    stop = int(free.completion_ids[0, 2])
    stopped = greedy(engine, model, max_new_tokens=8, stop_token_ids=[stop])
    assert_same_completions(stopped, greedy(HFEngine(TOK, 4), model, max_new_tokens=8, stop_token_ids=[stop]))
    first = free.completion_ids[0].tolist().index(stop)
    assert int(stopped.completion_mask[0].sum()) == first + 1 and not stopped.truncated[0]
    assert int(stopped.completion_ids[0, first]) == stop


def test_a_seeded_engine_repeats_its_rollouts_and_leaves_the_global_rng_alone(engine):
    model = policy(seed=8)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, n=4)
    runs = []
    for _ in range(2):
        e = build_engine("vllm", TOK, logprob_batch_size=4, seed=3, **ENGINE_ARGS)
        e.update_weights(model)
        state = torch.get_rng_state()
        runs.append([e.generate(model, prompts(), sampling).completion_ids for _ in range(2)])
        assert torch.equal(torch.get_rng_state(), state)
        e.close()
    (a1, a2), (b1, b2) = runs
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # each rollout draws new samples
    # unseeded: each rollout's seed comes from torch's global generator, as HF generate samples
    engine.update_weights(model)
    torch.manual_seed(1)
    c1 = engine.generate(model, prompts(), sampling).completion_ids
    torch.manual_seed(1)
    assert torch.equal(engine.generate(model, prompts(), sampling).completion_ids, c1)
    # the n samples of a prompt differ, and the same seed does not repeat across prompts
    assert len({tuple(r) for r in c1[:4].tolist()}) > 1 and not torch.equal(c1[:4], c1[4:8])


def test_generate_before_any_sync_is_refused():
    e = build_engine("vllm", TOK, **ENGINE_ARGS)
    with pytest.raises(RuntimeError, match="call update_weights"):
        e.generate(policy(), prompts(), SamplingParams())


# -- errors before any weights load -------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization: need a number in \(0, 1\]"),
    (dict(gpu_memory_utilization=math.nan), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=0.5, kv_cache_memory_bytes=1 << 20),
     "gpu_memory_utilization and kv_cache_memory_bytes: .*give one"),
    (dict(kv_cache_memory_bytes=0), "kv_cache_memory_bytes"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size: need an integer >= 1"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(dtype="int8"), "dtype: 'int8' is not one of"),
    (dict(seed=-1), "seed"),
    (dict(sleep_between_rollouts=True), "sleep_between_rollouts: vLLM's sleep mode is not available on this platform"),
])
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match="engine vllm: " + match):
        build_engine("vllm", TOK, **kwargs)


def test_tensor_parallel_size_must_divide_the_world(monkeypatch):
    import lit_align.rollout.vllm as engine_module

    # before the strategy sets the process group up, the world is the launcher's (the single-process
    # engines of this module may have left a world of one set up)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(engine_module.dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the 3 training processes"):
        build_engine("vllm", TOK, tensor_parallel_size=2)


def test_lit_align_llava_model_is_refused_before_vllm_starts(engine):
    """lit_align's LlavaModel (tower + projector + causal LM) matches no vLLM architecture: refused at
    the first sync, before vLLM starts (the live engine stays up)."""
    from lit_align.models.llava import LlavaModel

    llava = LlavaModel(torch.nn.Identity(), torch.nn.Linear(64, 64), policy(), image_token_id=5)
    e = build_engine("vllm", TOK, **ENGINE_ARGS)
    match = (r"engine vllm: LlavaModel \(lit_align's LLaVA model: .*\) is not a model family vLLM serves, so "
             "engine.name: vllm cannot sample from it; use engine: hf")
    with pytest.raises(ValueError, match=match):
        e.update_weights(llava)
    assert e.llm is None and engine.llm is not None


def test_several_processes_need_their_process_group_before_the_engine_starts(monkeypatch):
    """Under torchrun (WORLD_SIZE 2) each rank's engine joins the training process group; built
    before the strategy set it up, vLLM would make a world of its own: refused."""
    import lit_align.rollout.vllm as engine_module

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(engine_module.dist, "is_initialized", lambda: False)
    e = build_engine("vllm", TOK, **ENGINE_ARGS)
    with pytest.raises(RuntimeError, match="engine vllm: 2 training processes .* torch.distributed is not initialised"):
        e.update_weights(policy())
    assert e.llm is None


def test_engine_runs_in_the_training_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="set it to 0"):
        build_engine("vllm", TOK)


@dataclasses.dataclass
class WithMinP(SamplingParams):
    min_p: float = 0.0


@pytest.mark.parametrize("config, sampling, match", [
    (dict(model_type="ctrl", n_embd=64, n_layer=2, n_head=2), SamplingParams(temperature=1.0),
     "does not serve CTRLLMHeadModel"),
    (tiny_config(), SamplingParams(temperature=1.0),
     r"serves head sizes \[32, .*the model's is 16 \(hidden size 32 / 2 heads\)"),
    (VLLM_CONFIG, WithMinP(temperature=1.0, min_p=0.1), "sampling.min_p: vLLM's sampler has no such setting"),
    # vision-language families: the engine syncs a text-only causal LM and sends no images
    (dict(model_type="llava"), SamplingParams(temperature=1.0),
     "model_type 'llava' is a multimodal model family, not served by engine.name: vllm .*use engine: hf"),
    (dict(model_type="gemma3"), SamplingParams(temperature=1.0),  # vLLM serves it, with its vision tower
     r"Gemma3ForConditionalGeneration \(model_type 'gemma3'\) is a multimodal model family, not served by "
     "engine.name: vllm"),
])
def test_what_vllm_cannot_serve_fails_when_the_module_is_built(config, sampling, match, monkeypatch):
    import lit_align.rollout.vllm as engine_module

    monkeypatch.setattr(engine_module.VLLMEngine, "_build", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match="GRPO.engine: engine vllm: .*" + match):
        GRPO(model=CausalLMSpec(config=config), rewards=[RewardSpec("arith_match")], sampling=sampling,
             engine=EngineSpec("vllm", ENGINE_ARGS))
    # the same sampling class at its defaults is fine
    VLLMEngine.check_sampling(WithMinP())
