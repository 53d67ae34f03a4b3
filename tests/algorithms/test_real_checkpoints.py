"""Real-format checkpoints (the zoo of tests/zoo.py) through the algorithms: sampling exactly
SamplingParams, stop tokens, the first update's ratio, dropout, rollout correction and the fixes
of deviations from the papers."""

import math

import pytest
import torch

from lit_align import DAPO, DPO, GRPO, PPO, CausalLMSpec, PolicyGradient, RewardModel
from lit_align.algorithms.online import RolloutCorrectionSpec
from lit_align.algorithms.steps import StepMetrics
from lit_align.data import PromptDataModule
from lit_align.models.tokenizer import end_of_turn_ids
from lit_align.rewards import RewardSpec
from lit_align.rollout import HFEngine, RolloutBatch, SamplingParams, completion_logprobs, hf_generate
from tests.conftest import arith_prompts, tiny_config

REWARDS = [RewardSpec("arith_match")]


def _prompts(module, prompts=4, **kw):
    dm = arith_prompts(prompts, **kw)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm, dm.collate([[r] for r in dm.encoded["train"][:prompts]])


def _grpo(path, **kw):
    kw.setdefault("sampling", SamplingParams(max_new_tokens=6, temperature=1.0))
    m = GRPO(model=CausalLMSpec(pretrained=path), rewards=REWARDS, num_generations=4, beta=0.0,
             eval_max_new_tokens=0, **kw)
    m.configure_model()
    return m


# -- sampling: exactly SamplingParams ------------------------------------------------------
def test_a_checkpoints_generation_config_never_reaches_sampling(zoo):
    """Same weights, repetition_penalty 1.3 (and qwen's temperature 0.7, top_p 0.8, top_k 20) in
    the checkpoint's generation config or not: the same samples under the same seed."""
    outs = []
    for name in ("qwen2_instruct_rep13", "qwen2_instruct"):
        m = _grpo(zoo[name])
        assert name != "qwen2_instruct_rep13" or m.model.generation_config.repetition_penalty == 1.3
        _, batch = _prompts(m)
        torch.manual_seed(0)
        ids = hf_generate(m.model, batch["prompt_ids"], batch["prompt_mask"],
                          SamplingParams(max_new_tokens=8, temperature=1.0, n=4), m.tokenizer.pad_token_id,
                          m.stop_ids())
        outs.append(ids)
        assert m.model.generation_config.repetition_penalty == (1.3 if name.endswith("13") else 1.1)  # restored
    assert torch.equal(outs[0], outs[1])


def test_greedy_decoding_repeats_tokens_a_repetition_penalty_would_forbid(zoo):
    """A guard on the test above: the penalty would change greedy output if it leaked in."""
    from transformers import AutoModelForCausalLM

    m = _grpo(zoo["qwen2_instruct_rep13"])
    _, batch = _prompts(m)
    plain = hf_generate(m.model, batch["prompt_ids"], batch["prompt_mask"], SamplingParams(max_new_tokens=12),
                        m.tokenizer.pad_token_id, m.stop_ids())
    hf = AutoModelForCausalLM.from_pretrained(zoo["qwen2_instruct_rep13"], dtype=torch.float32).eval()
    leaked = hf.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=12,
                         do_sample=False, pad_token_id=m.tokenizer.pad_token_id, eos_token_id=m.stop_ids())
    leaked = leaked[:, batch["prompt_ids"].shape[1]:]
    width = min(plain.shape[1], leaked.shape[1])
    assert not torch.equal(plain[:, :width], leaked[:, :width])


# -- stop tokens ---------------------------------------------------------------------
@pytest.mark.parametrize("name, turn_end", [("llama3_instruct", "<|eot_id|>"), ("qwen2_base", "<|im_end|>")])
def test_rollouts_stop_at_the_chat_templates_turn_end(zoo, name, turn_end):
    """The tokenizer's EOS is <|end_of_text|> / <|endoftext|>, turns end with another token: with
    chat-rendered prompts the stop ids hold it, and a model that says it stops there."""
    m = _grpo(zoo[name])
    dm = PromptDataModule(task=arith_prompts().task, chat_template=True, max_length=64, micro_batch_size=4,
                          eval_batch_size=4)
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    assert dm.chat_templated
    eot = m.tokenizer.convert_tokens_to_ids(turn_end)
    assert end_of_turn_ids(m.tokenizer) == [eot]

    class Attached:  # the module reads the data module through its trainer
        datamodule = dm

    m._trainer = Attached()
    m._stops = None
    stops = m.stop_ids()
    assert eot in stops and m.tokenizer.eos_token_id in stops
    lm_head = m.model.get_output_embeddings()
    hook = lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([eot]), torch.full((*out.shape[:-1], 1), 50.0, dtype=out.dtype)))
    try:
        batch = dm.collate([[r] for r in dm.encoded["train"][:2]])
        rollout = m.sample(batch)[0]
    finally:
        hook.remove()
        m._trainer = None
    assert rollout.lengths.tolist() == [1] * len(rollout) and not rollout.truncated.any()
    assert (rollout.completion_ids[:, 0] == eot).all()


def test_every_zoo_checkpoint_eos_list_joins_the_stop_ids(zoo):
    m = _grpo(zoo["llama3_instruct"])
    tok = m.tokenizer
    assert m.stop_ids() == [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    given = _grpo(zoo["llama3_instruct"], sampling=SamplingParams(max_new_tokens=4, temperature=1.0,
                                                                   stop_token_ids=[7, 9]))
    assert given.stop_ids() == [7, 9]  # given ids replace the defaults


def test_a_run_that_never_stops_warns_with_the_stop_ids(zoo):
    m = _grpo(zoo["qwen2_base"])
    rollout = RolloutBatch(prompt_ids=torch.ones(2, 2, dtype=torch.long),
                           prompt_mask=torch.ones(2, 2, dtype=torch.long),
                           completion_ids=torch.ones(2, 3, dtype=torch.long),
                           completion_mask=torch.ones(2, 3, dtype=torch.long), logprobs=torch.zeros(2, 3),
                           truncated=torch.tensor([True, True]), group_size=2)
    m.watch_truncation(rollout)
    m.watch_truncation(rollout)
    with pytest.warns(UserWarning, match=r"ran to max_new_tokens=6 without a stop token; stopping at ids \["):
        m.watch_truncation(rollout)


# -- the first update's ratio --------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2_instruct", "qwen2_base", "llama3_instruct", "gpt2", "moe"])
def test_first_update_ratio_is_one_on_every_zoo_model(zoo, name):
    """fp32, an awkward layout (3 rows per forward, 3 mini-batches of 16 rows): each training
    micro-batch's log-probs equal the rollout's within 1e-6, so the first ratio is 1."""
    m = _grpo(zoo[name], forward_batch_size=3, mini_batches=3)
    m.model.float()
    _, batch = _prompts(m)
    torch.manual_seed(0)
    rollout = m.sample(batch)[0]
    m.model.train()
    worst = 0.0
    for lo, hi in m.training_segments(len(rollout)):
        for rows, chunk in rollout.chunks(m.forward_batch_size, lo, hi):
            logp, _ = completion_logprobs(m.model, chunk, m.sampling.temperature)
            old = rollout.logprobs[rows][:, : logp.shape[1]]
            worst = max(worst, (logp - old).abs().max().item())
    assert worst <= 1e-6, worst


# -- dropout ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DPO, RewardModel])
def test_dpo_and_reward_model_disable_dropout_by_default(zoo, cls):
    m = cls(model=CausalLMSpec(pretrained=zoo["gpt2"]))
    m.configure_model()
    drops = [mod.p for mod in m.model.modules() if isinstance(mod, torch.nn.Dropout)]
    assert drops and all(p == 0.0 for p in drops)
    kept = cls(model=CausalLMSpec(pretrained=zoo["gpt2"]), disable_dropout=False)
    kept.configure_model()
    assert any(mod.p == 0.1 for mod in kept.model.modules() if isinstance(mod, torch.nn.Dropout))


# -- rollout correction ------------------------------------------------------------------------
def test_bf16_sampling_against_an_fp32_forward_shows_a_mismatch():
    spec = CausalLMSpec(config=tiny_config(hidden_size=64, intermediate_size=128), seed=3)
    m = GRPO(model=spec, rewards=REWARDS, num_generations=4, beta=0.0, eval_max_new_tokens=0,
             sampling=SamplingParams(max_new_tokens=6, temperature=1.0))
    m.configure_model()
    # the mismatch is against the training forward's scoring pass, which one step per rollout skips
    m.engine.score_rollouts = True
    _, batch = _prompts(m)
    torch.manual_seed(0)
    same = m.sample(batch)[0]
    _, metrics_same = m.correction(same)
    m.engine = HFEngine(m.tokenizer, logprob_batch_size=32, autocast_dtype="bfloat16")
    m.engine.segments = m.training_segments
    torch.manual_seed(0)
    bf16 = m.sample(batch)[0]
    _, metrics_bf16 = m.correction(bf16)
    # fp32 sampling differs from the training forward only by KV-cache arithmetic
    assert metrics_same["mismatch/kl"].item() < 1e-9
    assert metrics_bf16["mismatch/kl"].item() > 100 * max(metrics_same["mismatch/kl"].item(), 1e-12)
    assert metrics_bf16["mismatch/ratio_max"].item() > 1.0 and metrics_bf16["mismatch/masked_frac"].item() == 0.0


def test_rollout_correction_weights_enter_the_policy_loss():
    spec = CausalLMSpec(config=tiny_config(), seed=3)
    on = GRPO(model=spec, rewards=REWARDS, num_generations=4, beta=0.0, eval_max_new_tokens=0,
              sampling=SamplingParams(max_new_tokens=4, temperature=1.0),
              rollout_correction=RolloutCorrectionSpec(level="sequence", mode="mask", threshold=1.0))
    on.configure_model()
    _, batch = _prompts(on)
    torch.manual_seed(0)
    rollout = on.sample(batch)[0]
    rollout.sampler_logprobs = (rollout.logprobs
                                - 0.5 * (torch.arange(len(rollout)) % 2)[:, None] * rollout.completion_mask)
    weights, metrics = on.correction(rollout)
    # odd rows: sampler log-probs 0.5 lower per token, ratio e^0.5 per token > 1: masked out
    expected = (torch.arange(len(rollout)) % 2 == 0).float()[:, None] * rollout.completion_mask
    assert torch.equal(weights, expected)
    assert metrics["mismatch/masked_frac"].item() == pytest.approx(
        rollout.completion_mask[1::2].sum().item() / rollout.completion_mask.sum().item())
    mask = on.loss_mask(rollout)
    tokens, seqs = on.step_normalizers(mask)
    adv = torch.randn(len(rollout))
    loss_w, _ = on.micro_loss(rollout, rollout.logprobs, None, adv, mask, tokens, seqs, weights=weights)
    loss_even, _ = on.micro_loss(rollout, rollout.logprobs, None, adv, mask * expected.long(), tokens, seqs)
    assert loss_w.item() == pytest.approx(loss_even.item(), rel=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        RolloutCorrectionSpec(threshold=float("inf"))
    with pytest.raises(ValueError, match="level"):
        RolloutCorrectionSpec(level="batch")


# -- deviations from the papers -----------------------------------------------------------------
def test_dapo_soft_overlong_band_is_a_fifth_of_the_limit_unless_set():
    spec = CausalLMSpec(config=tiny_config())
    dapo = DAPO(model=spec, rewards=REWARDS, sampling=SamplingParams(max_new_tokens=20, temperature=1.0))
    overlong = dapo.rewards.specs[dapo.rewards.names.index("overlong")]
    assert overlong.args == {"max_len": 20, "cache_len": 4}
    set_ = DAPO(model=spec, rewards=REWARDS, sampling=SamplingParams(max_new_tokens=20, temperature=1.0),
                overlong_buffer=2)
    assert set_.rewards.specs[set_.rewards.names.index("overlong")].args["cache_len"] == 2
    assert dapo.dynamic_sampling_metric == "arith_match"  # the correctness reward, not the overlong one


def test_dynamic_sampling_filters_on_the_named_reward_not_the_total():
    m = DAPO(model=CausalLMSpec(config=tiny_config()), rewards=REWARDS, num_generations=2,
             sampling=SamplingParams(max_new_tokens=10, temperature=1.0))
    # group 0: all correct, lengths differ (the total varies through the overlong penalty);
    # group 1: correctness varies
    parts = {"arith_match": torch.tensor([1.0, 1.0, 0.0, 1.0]), "overlong": torch.tensor([0.0, -0.5, 0.0, 0.0])}
    assert m.varied_groups(parts).tolist() == [False, True]


def test_extra_prompts_are_never_the_steps_own():
    dm = arith_prompts(4, train_size=12)
    from lit_align.models import build_tokenizer

    dm.tokenizer = build_tokenizer("byte")
    dm.setup("fit")
    own = [0, 1, 2, 3]
    for rnd in range(1, 3):  # 12 rows: the step's 4, then 4 fresh per round
        more = dm.extra_prompts(5, rnd, 4, exclude=own)
        assert not set(more["index"]) & set(own) and len(set(more["index"])) == 4
        own += more["index"]
    # more asked than fresh rows left: the fresh ones first, then repeats
    last = dm.extra_prompts(5, 9, 6, exclude=list(range(10)))
    assert {10, 11} <= set(last["index"]) and len(last["index"]) == 6


def test_a_mini_batch_without_a_loss_token_takes_no_optimizer_step():
    m = GRPO(model=CausalLMSpec(config=tiny_config()), rewards=REWARDS, num_generations=2, beta=0.0,
             mini_batches=2, forward_batch_size=2, eval_max_new_tokens=0,
             sampling=SamplingParams(max_new_tokens=4, temperature=1.0))
    m.configure_model()
    rollout = RolloutBatch(prompt_ids=torch.ones(4, 2, dtype=torch.long),
                           prompt_mask=torch.ones(4, 2, dtype=torch.long),
                           completion_ids=torch.full((4, 3), 5), completion_mask=torch.ones(4, 3, dtype=torch.long),
                           logprobs=torch.zeros(4, 3), truncated=torch.zeros(4, dtype=torch.bool), group_size=2)
    steps = []

    class Opt:
        param_groups = [{"params": list(m.model.parameters())}]

        def zero_grad(self):
            pass

        def step(self):
            steps.append("step")

    class Sched:
        def step(self):
            steps.append("sched")

    m.manual_backward = lambda loss: None
    loss_tokens = torch.tensor([3, 3, 0, 0])  # the second mini-batch carries nothing

    def micro(rows, chunk, norms):
        return torch.zeros(()), {"pg_loss": torch.zeros(())}

    out = m.optimize(rollout, 1, micro, lambda lo, hi: None, [(Opt(), Sched(), None, "")], StepMetrics(),
                     loss_tokens=loss_tokens)
    assert steps == ["step", "sched"] and out["skipped_steps"].item() == 1.0


def test_ppo_critic_starts_from_the_configured_reward_model(tiny_reward_export):
    from lit_align.models import load_reward_model

    m = PPO(model=CausalLMSpec(config=tiny_config()),
            rewards=[RewardSpec("reward_model", args={"path": tiny_reward_export})],
            eval_max_new_tokens=0)
    m.configure_model()
    rm, _ = load_reward_model(tiny_reward_export)
    critic, reference = m.critic.state_dict(), rm.state_dict()
    assert critic.keys() == reference.keys()
    assert all(torch.equal(critic[k], reference[k]) for k in reference)
    plain = PPO(model=CausalLMSpec(config=tiny_config()), rewards=REWARDS, eval_max_new_tokens=0)
    assert plain.value_from is None and plain.value_spec is not None


def test_the_reward_model_scores_truncated_completions_without_an_eos(tiny_reward_export):
    from lit_align.rewards.reward_model import RewardModelReward

    reward = RewardModelReward(tiny_reward_export, tokenizer="byte")
    eos = reward.tokenizer.eos_token_id if reward.tokenizer is not None else None
    full, cut = reward.encode("12+3=", "51"), reward.encode("12+3=", "51", truncated=True)
    eos = reward.tokenizer.eos_token_id
    assert full[-1] == eos and cut == full[:-1]
    scores = reward(["12+3="] * 2, ["51", "51"], [{}, {}], truncated=[False, True])
    assert scores[0].item() != scores[1].item()


def test_ipo_compares_length_normalised_log_ratios():
    from lit_align.data import ArithTask, PreferenceDataModule
    from lit_align.losses import dpo_loss

    m = DPO(model=CausalLMSpec(config=tiny_config(), seed=1), loss_type="ipo", beta=0.5, eval_max_new_tokens=0)
    m.configure_model()
    dm = PreferenceDataModule(task=ArithTask(digits=2, train_size=8, val_size=4), max_length=16, micro_batch_size=4)
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    batch = dm.collate([[r] for r in dm.encoded["train"][:4]])
    logp, mask = m.shifted(batch)
    sums, counts = (logp * mask).sum(-1), mask.sum(-1)
    means = sums / counts
    pc, pr = m._pair_logps(m.model, batch)[:2]
    torch.testing.assert_close(torch.cat([pc, pr]), means)
    with torch.no_grad():
        expected = dpo_loss(means[:4], means[4:], means[:4] - 0.1, means[4:], 0.5, "ipo")[0]
    assert not math.isclose(expected.mean().item(), dpo_loss(sums[:4], sums[4:], sums[:4] - 0.1, sums[4:], 0.5,
                                                             "ipo")[0].mean().item())


def test_policy_gradient_keeps_every_setting_as_an_attribute():
    m = PolicyGradient(model=CausalLMSpec(config=tiny_config()), rewards=REWARDS, beta=0.1, clip_high=0.3)
    assert (m.beta, m.kl_estimator, m.clip_high, m.mini_batches) == (0.1, "k3", 0.3, 1)
    assert m.hparams.kl_estimator is None  # hparams records what was given; the attribute is resolved
    no_kl = PolicyGradient(model=CausalLMSpec(config=tiny_config()), rewards=REWARDS)
    assert no_kl.kl_estimator is None and no_kl.reference is None
