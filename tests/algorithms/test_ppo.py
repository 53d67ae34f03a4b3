"""PPO: adaptive KL, settings, critic values, per-token rewards / GAE targets, mini-batches per
rollout, the first-update ratio, one optimizer per model and its own gradient clipping,
micro-batch invariance, KL coefficient in checkpoints, the recipes through the CLI and a short
learning run."""

import os

import lightning as L
import pytest
import torch

from lit_align import PPO, CausalLMSpec, OptimSpec
from lit_align.algorithms.ppo import AdaptiveKL, completion_values, explained_variance
from lit_align.losses import gae, masked_whiten
from lit_align.models import token_scores
from lit_align.rewards import RewardSpec
from lit_align.rollout import RolloutBatch, SamplingParams
from lit_align.train import main
from tests.conftest import REPO, arith_prompts, sample_rollout, stand_in_exports, tiny_config

G = 4


def digit_reward(prompts, completions, meta, **context):
    """Share of a completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


DIGITS = RewardSpec("tests.algorithms.test_ppo:digit_reward")


def _module(build=True, **kw):
    kw.setdefault("rewards", [DIGITS])
    kw.setdefault("sampling", SamplingParams(max_new_tokens=4, temperature=1.0))
    kw.setdefault("num_generations", G)
    kw.setdefault("optim", OptimSpec(lr=1e-3, schedule="constant"))
    kw.setdefault("critic_optim", OptimSpec(lr=1e-3, schedule="constant"))
    kw.setdefault("beta", 0.0)
    m = PPO(model=CausalLMSpec(config=tiny_config(), seed=1), eval_max_new_tokens=0, **kw)
    if build:
        m.configure_model()
    return m


def _data(prompts=4, train_size=16, **kw):
    return arith_prompts(prompts, train_size, **kw)


def _rollout(m, prompts=4, seed=0) -> RolloutBatch:
    return sample_rollout(m, prompts, G, seed)


def _trainer(tmp_path, max_steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), **kw)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model):
    return [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]


# -- adaptive KL and settings ---------------------------------------------------------------
@pytest.mark.parametrize("kl, n, factor", [
    (12.0, 10, 1.02),     # KL / target - 1 = 1, clipped to 0.2: beta * (1 + 0.2 * 10 / 100)
    (3.0, 10, 0.98),      # -0.5, clipped to -0.2
    (6.6, 10, 1.01),      # 0.1 inside the clip: 1 + 0.1 * 10 / 100
    (5.4, 50, 0.95),      # -0.1 with 50 sequences
    (6.0, 10, 1.0),       # on target
    (0.0, 100, 0.8),      # no KL at all, a whole horizon of sequences
    (100.0, 0, 1.0),      # no sequences: no change
])
def test_adaptive_kl_update_hand_values(kl, n, factor):
    assert AdaptiveKL(target=6.0, horizon=100).update(0.1, kl, n) == pytest.approx(0.1 * factor, rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(target=0.0), dict(target=-1.0), dict(horizon=0)])
def test_adaptive_kl_invalid_settings(kwargs):
    with pytest.raises(ValueError, match="adaptive_kl"):
        AdaptiveKL(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gamma=1.5), r"PPO\.gamma"),
    (dict(gamma=-0.1), r"PPO\.gamma"),
    (dict(lam=1.01), "lam"),
    (dict(clip_range=0.0), r"PPO\.clip_range: must be in \(0, 1\)"),
    (dict(clip_range=1.0), r"PPO\.clip_range: must be in \(0, 1\)"),
    (dict(clip_range_value=0.0), r"PPO\.clip_range_value"),
    (dict(vf_coef=0.0), r"PPO\.vf_coef"),
    (dict(entropy_coef=-0.01), r"PPO\.entropy_coef"),
    (dict(ppo_epochs=0), r"PPO\.ppo_epochs"),
    (dict(mini_batches=0), "mini_batches"),
    (dict(missing_eos_penalty=-1.0), r"PPO\.missing_eos_penalty"),
    (dict(beta=0.0, adaptive_kl=AdaptiveKL()), r"PPO\.adaptive_kl: needs beta > 0"),
    (dict(rewards=[]), r"PPO\.rewards"),
    (dict(kl_estimator="k4"), r"PPO\.kl_estimator: 'k4'"),
    (dict(beta=-0.1), r"PPO\.beta"),
    (dict(forward_batch_size=0), r"PPO\.forward_batch_size"),
    (dict(sampling=SamplingParams(temperature=0.0)), "temperature"),
    (dict(beta=0.0, reference=CausalLMSpec(config=tiny_config())), r"PPO\.reference"),
])
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(build=False, **kwargs)


def test_defaults_and_critic_spec():
    m = _module(build=False, beta=0.05, critic_optim=None)
    assert m.critic_optim is m.optim and m.value_spec is m.spec  # critic: the actor's weights and optimizer
    assert m.kl_coef.dtype == torch.float64 and m.kl_coef.item() == 0.05
    h = m.hparams
    assert (h.gamma, h.lam, h.clip_range, h.clip_range_value, h.vf_coef, h.ppo_epochs, h.kl_estimator) == \
        (1.0, 0.95, 0.2, 0.2, 0.1, 4, "k1")


def test_kl_coef_stays_float64_when_precision_casts_the_weights():
    from lightning.pytorch.plugins.precision import HalfPrecision

    m = _module(beta=0.0123456789)
    HalfPrecision("bf16-true").convert_module(m)
    assert next(m.model.parameters()).dtype == torch.bfloat16 and next(m.critic.parameters()).dtype == torch.bfloat16
    assert m.kl_coef.dtype == torch.float64 and m.kl_coef.item() == 0.0123456789
    # the adaptive controller's small steps survive (bf16 would round 1.0013 x back to 1 x)
    m.kl_coef.fill_(AdaptiveKL(target=6.0, horizon=10000).update(float(m.kl_coef), 12.0, 64))
    assert m.kl_coef.item() == pytest.approx(0.0123456789 * 1.00128, rel=1e-12)


# -- critic values -------------------------------------------------------------------------
def test_explained_variance_hand_values():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])  # the last column is off the mask
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert explained_variance(torch.full_like(returns, -7.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # residual [0, 0, 0, 1]: Var = 0.25 - 0.0625 = 0.1875; Var(returns) = 1.25 -> 1 - 0.15
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, -9.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    # a critic predicting the opposite deviations: Var(2 (R - mean)) = 4 Var(R) -> 1 - 4
    assert explained_variance(5.0 - returns, returns, mask).item() == pytest.approx(-3.0)


def test_completion_values_read_the_head_before_each_completion_token():
    m = _module()
    rollout = _rollout(m)
    p, c = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    with torch.no_grad():
        values = completion_values(m.critic, rollout)
        heads = token_scores(m.critic, rollout.input_ids, rollout.attention_mask)
    assert values.shape == (len(rollout), c) and values.dtype == torch.float32
    torch.testing.assert_close(values, heads[:, p - 1: p + c - 1].float() * rollout.completion_mask, rtol=0, atol=0)
    assert (values[rollout.completion_mask == 0] == 0).all()
    # the first value is the state "prompt only": the head at the prompt's last token, unpadded
    row = int(rollout.prompt_mask.sum(-1).argmin())  # the most left-padded prompt
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()][None]
    with torch.no_grad():
        alone = token_scores(m.critic, prompt, torch.ones_like(prompt))[0, -1]
    torch.testing.assert_close(values[row, 0], alone, rtol=1e-5, atol=1e-6)
    # rollout_values: the same numbers, chunked and trimmed, in the critic's eval mode
    m.forward_batch_size = 3
    torch.testing.assert_close(m.rollout_values(rollout), values, rtol=1e-5, atol=1e-6)
    assert m.critic.training


# -- targets ---------------------------------------------------------------------------------
def _hand_rollout():
    """3 rows, prompt width 2, completion width 4; completions of 3, 4 and 1 tokens."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.2, -0.4, -0.6, -0.8], [-3.0, 0.0, 0.0, 0.0]])
    return RolloutBatch(prompt_ids=torch.full((3, 2), 7), prompt_mask=torch.ones(3, 2, dtype=torch.long),
                        completion_ids=torch.full((3, 4), 9) * mask, completion_mask=mask, logprobs=logp,
                        truncated=torch.tensor([False, True, False]))


def test_targets_rewards_advantages_and_returns():
    m = _module(build=False, beta=0.5, gamma=0.9, lam=0.8)
    rollout = _hand_rollout()
    ref = torch.tensor([[-1.5, -1.0, -0.5, 4.0], [-0.2, -0.6, -0.4, -1.0], [-2.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, -0.5, 0.25, 1.0], [2.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, -1.0, 3.0])
    t = m.targets(rollout, scores, ref, values)
    # k1 = logp - ref on completion tokens, 0 elsewhere
    kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, 0.2, -0.2, 0.2], [-1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(t["kl"], kl)
    # -0.5 * kl on every completion token, the score on the last one
    rewards = torch.tensor([[-0.25, 0.5, 1.0, 0.0], [0.0, -0.1, 0.1, -1.1], [3.5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(t["rewards"], rewards)
    torch.testing.assert_close(t["non_score"], -0.5 * kl)
    adv, ret = gae(rewards, values, rollout.completion_mask, 0.9, 0.8)
    torch.testing.assert_close(t["returns"], ret)
    torch.testing.assert_close(t["advantages"], masked_whiten(adv, rollout.completion_mask))
    # whitened: zero mean, unit variance over the 8 completion tokens
    valid = t["advantages"][rollout.completion_mask.bool()]
    assert valid.mean().abs() < 1e-6 and valid.var(unbiased=False).sub(1).abs() < 1e-4
    # row 2 by hand: one token, nothing after it -> A = r - V = 3.5 - 2, R = 3.5
    assert ret[2, 0].item() == pytest.approx(3.5) and adv[2, 0].item() == pytest.approx(1.5)
    # row 0 by hand: delta_2 = 1 - 0.3; delta_1 = 0.5 + 0.9 * 0.3 - 0.2; A_1 = delta_1 + 0.72 * A_2
    a2 = 1.0 - 0.3
    a1 = 0.5 + 0.9 * 0.3 - 0.2 + 0.72 * a2
    a0 = -0.25 + 0.9 * 0.2 - 0.1 + 0.72 * a1
    torch.testing.assert_close(adv[0, :3], torch.tensor([a0, a1, a2]))


def test_targets_with_lambda_one_are_returns_to_go_and_no_reference():
    m = _module(build=False, beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    rollout = _hand_rollout()
    values = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, -0.5, 0.25, 1.0], [2.0, 0.0, 0.0, 0.0]])
    t = m.targets(rollout, torch.tensor([1.0, -1.0, 3.0]), None, values)
    assert t["kl"].abs().sum() == 0 and t["non_score"].abs().sum() == 0
    # the score is the only reward: every completion token's return is its sequence's score
    torch.testing.assert_close(t["returns"], torch.tensor([1.0, -1.0, 3.0])[:, None] * rollout.completion_mask)
    torch.testing.assert_close(t["advantages"], (t["returns"] - values) * rollout.completion_mask)


def test_targets_use_the_current_kl_coef_and_estimator():
    m = _module(build=False, beta=0.5, kl_estimator="k3", adaptive_kl=AdaptiveKL())
    m.kl_coef.fill_(0.25)
    rollout = _hand_rollout()
    ref = rollout.logprobs - 0.5 * rollout.completion_mask
    t = m.targets(rollout, torch.zeros(3), ref, torch.zeros(3, 4))
    k3 = (torch.exp(torch.tensor(-0.5)) + 0.5 - 1).item()  # exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(t["kl"], k3 * rollout.completion_mask.float())
    torch.testing.assert_close(t["rewards"], -0.25 * k3 * rollout.completion_mask.float())


def _recording(m, calls):
    sample, targets, micro_losses = m.sample, m.targets, m.micro_losses

    def rec_sample(batch):
        rollout, total, parts = sample(batch)
        rollout.truncated = torch.tensor([i % 3 != 0 for i in range(len(rollout))])  # some rows end with EOS
        calls.setdefault("sample", []).append((rollout, total.clone()))
        return rollout, total, parts

    def rec_targets(rollout, scores, ref_logp, values):
        out = targets(rollout, scores, ref_logp, values)
        calls.setdefault("targets", []).append((scores.clone(), None if ref_logp is None else ref_logp.clone(),
                                                values.clone(), out))
        return out

    def rec_micro(rollout, old_logp, *args):
        actor, critic, metrics = micro_losses(rollout, old_logp, *args)
        calls.setdefault("micro", []).append((old_logp.clone(), {k: float(v) for k, v in metrics.items()}))
        return actor, critic, metrics

    m.sample, m.targets, m.micro_losses = rec_sample, rec_targets, rec_micro


def test_training_step_penalises_missing_eos_and_starts_at_ratio_one(tmp_path):
    """One rollout, 2 epochs of 2 mini-batches: 8 optimizer steps (4 per model); the scores given
    to targets() lose the penalty on truncated rows; the first micro-batch's ratio is 1."""
    m, calls = _module(beta=0.1, missing_eos_penalty=0.7, ppo_epochs=2, mini_batches=2, forward_batch_size=4), {}
    _recording(m, calls)
    trainer = _trainer(tmp_path, max_steps=8)
    trainer.fit(m, datamodule=_data())
    assert trainer.global_step == 8 and len(calls["sample"]) == 1 and len(calls["micro"]) == 8
    rollout, total = calls["sample"][0]
    scores, ref_logp, values, t = calls["targets"][0]
    assert 0 < rollout.truncated.sum() < len(rollout)
    torch.testing.assert_close(scores, total - 0.7 * rollout.truncated.float())
    assert float(trainer.callback_metrics["train/score"]) == pytest.approx(float(scores.mean()), abs=1e-6)
    assert float(trainer.callback_metrics["train/reward/mean"]) == pytest.approx(float(total.mean()), abs=1e-6)
    # the reference is the initial policy: the first rollout has exactly no KL
    torch.testing.assert_close(ref_logp, rollout.logprobs, rtol=0, atol=0)
    assert float(trainer.callback_metrics["train/kl"]) == 0.0 and t["kl"].abs().sum() == 0
    torch.testing.assert_close(t["rewards"].sum(-1), scores)  # only the score, on the last token
    # micro-batches of 4 rows; every one gets the rollout's own log-probs as old log-probs
    for k, (old, _) in enumerate(calls["micro"]):
        rows = slice(4 * (k % 4), 4 * (k % 4) + 4)
        torch.testing.assert_close(old, rollout.logprobs[rows], rtol=0, atol=0)
    first = calls["micro"][0][1]
    assert first["policy/ratio_mean"] == 1.0 and first["policy/approx_kl"] == 0.0 and first["policy/clip_frac"] == 0.0
    # after two optimizer steps (mini-batch 1), the policy has moved: later ratios differ from 1
    assert any(abs(x["policy/ratio_mean"] - 1.0) > 1e-7 for _, x in calls["micro"][4:])
    metrics = trainer.callback_metrics
    for key in ("train/value/loss", "train/explained_variance", "train/values/mean", "train/policy/pg_loss",
                "train/entropy", "train/kl_coef", "train/non_score_reward", "train/accuracy"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["train/kl_coef"].item() == pytest.approx(0.1)


def test_mini_batches_beyond_the_rows_of_a_step_fail_when_fitting_starts(tmp_path):
    """1 prompt x 4 samples per rank and step cannot make 5 mini-batches: fit fails before any
    rollout (the data module says how many prompts a step takes), naming the setting."""
    m, calls = _module(mini_batches=5), {}
    _recording(m, calls)
    with pytest.raises(ValueError, match=r"PPO\.mini_batches: 5 mini-batches .* samples 4 \(1 prompts"):
        _trainer(tmp_path, max_steps=2).fit(m, datamodule=_data(prompts=1))
    assert "sample" not in calls
    _module(mini_batches=4).check_mini_batches(4)  # one row per mini-batch is enough


def test_mini_batches_beyond_the_rows_fail_at_the_first_rollout_without_a_data_module(tmp_path):
    dm = _data(prompts=1)
    m, calls = _module(mini_batches=5), {}
    _recording(m, calls)
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"PPO\.mini_batches: 5 mini-batches .* samples 4 \(the rollout's rows\)"):
        _trainer(tmp_path, max_steps=2).fit(m, train_dataloaders=dm.train_dataloader())
    assert len(calls["sample"]) == 1 and "micro" not in calls  # no step on an empty mini-batch


def test_first_micro_batch_ratio_is_exactly_one():
    m = _module()
    rollout = _rollout(m)
    values = m.rollout_values(rollout)
    adv, ret = torch.randn(rollout.logprobs.shape), torch.randn(rollout.logprobs.shape)
    num_tokens = rollout.completion_mask.sum().float()
    for s in range(0, len(rollout), 8):
        rows = list(range(s, s + 8))
        _, _, metrics = m.micro_losses(rollout.select(rows).trimmed(), rollout.logprobs[rows], values[rows],
                                       adv[rows], ret[rows], num_tokens)
        assert metrics["policy/ratio_mean"].item() == 1.0
        assert metrics["policy/approx_kl"].item() == 0.0
        assert metrics["policy/clip_frac"].item() == 0.0


# -- optimizers ------------------------------------------------------------------------------
def test_each_optimizer_holds_exactly_its_own_model(tmp_path):
    m = _module(beta=0.1, ppo_epochs=1, mini_batches=1)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(m, datamodule=_data())
    actor, critic = trainer.optimizers
    ids = lambda params: [id(p) for p in params]  # noqa: E731
    actor_params = ids(p for g in actor.param_groups for p in g["params"])
    critic_params = ids(p for g in critic.param_groups for p in g["params"])
    assert sorted(actor_params) == sorted(ids(m.model.parameters()))
    assert sorted(critic_params) == sorted(ids(m.critic.parameters()))
    assert not set(actor_params) & set(ids(m.ref_model.parameters()))
    assert actor.param_groups[0]["lr"] == 1e-3 and critic.param_groups[0]["lr"] == 1e-3
    # schedules span the optimizer steps of each model: max_steps counts both
    assert [s.scheduler.lr_lambdas[0](0) for s in trainer.lr_scheduler_configs] == [1.0, 1.0]


@pytest.mark.parametrize("frozen", ["critic", "model"])
def test_a_step_changes_only_the_model_whose_optimizer_has_a_learning_rate(tmp_path, frozen):
    m = _module(beta=0.1, ppo_epochs=1, mini_batches=1, optim=OptimSpec(lr=1e-2, schedule="constant"),
                critic_optim=OptimSpec(lr=1e-2, schedule="constant"))
    (m.critic_optim if frozen == "critic" else m.optim).lr = 0.0  # AdamW at lr 0 leaves the weights as they are
    before = {name: _state(getattr(m, name)) for name in ("model", "critic", "ref_model")}
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(m, datamodule=_data())
    assert trainer.global_step == 2
    moving = "model" if frozen == "critic" else "critic"
    assert _changed(before[frozen], getattr(m, frozen)) == []
    assert _changed(before["ref_model"], m.ref_model) == []
    changed = _changed(before[moving], getattr(m, moving))
    assert len(changed) >= len(before[moving]) // 2, changed
    if moving == "critic":
        assert "score.weight" in changed  # the value head learns


class GradAtStep(L.Callback):
    """The flat gradient each optimizer steps on (after any clipping), in step order, flattened
    in its model's parameter order (the optimizer's groups order them differently)."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        model = next(x for x in (pl_module.model, pl_module.critic) if params == {id(p) for p in x.parameters()})
        self.grads.append((model, torch.cat([p.grad.flatten() for p in model.parameters()]).clone()))


def test_each_optimizer_clips_its_own_gradients_to_its_own_limit(tmp_path):
    """The actor's grad_clip (1e-3) and the critic's (2e-3) each rescale only their own model's
    gradient, to norm = their own limit (the unclipped norms are larger), keeping its direction;
    each optimizer steps on its clipped gradient."""
    limits = {"model": 1e-3, "critic": 2e-3}
    m = _module(beta=0.1, ppo_epochs=1, mini_batches=1,
                optim=OptimSpec(lr=1e-3, schedule="constant", grad_clip=limits["model"]),
                critic_optim=OptimSpec(lr=1e-3, schedule="constant", grad_clip=limits["critic"]))
    flat = lambda model: torch.cat([p.grad.flatten() for p in model.parameters()])  # noqa: E731
    seen, clip = [], m.clip_and_measure

    def spy(optimizer, max_norm, suffix=""):
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        name = next(n for n in limits if params == {id(p) for p in getattr(m, n).parameters()})
        other = "critic" if name == "model" else "model"
        before, untouched = flat(getattr(m, name)).clone(), flat(getattr(m, other)).clone()
        out = clip(optimizer, max_norm, suffix)
        assert torch.equal(flat(getattr(m, other)), untouched)  # the other model's gradient is left alone
        torch.testing.assert_close(out[f"grad_norm{suffix}"], before.norm())  # measured before clipping
        seen.append((name, before, flat(getattr(m, name)).clone(), max_norm, "norm"))
        return out

    m.clip_and_measure = spy
    at_step = GradAtStep()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[at_step])
    trainer.fit(m, datamodule=_data())
    assert trainer.global_step == 2
    assert [name for name, *_ in seen] == ["model", "critic"]  # one optimizer step each
    assert [model for model, _ in at_step.grads] == [m.model, m.critic]
    for (name, before, after, value, algorithm), (_, stepped) in zip(seen, at_step.grads):
        limit = limits[name]
        assert (value, algorithm) == (limit, "norm")
        assert before.norm() > 10 * limit, name  # clipping had work to do
        assert after.norm() <= limit * (1 + 1e-6), name
        assert after.norm().item() == pytest.approx(limit, rel=1e-3), name
        torch.testing.assert_close(after, before * (limit / before.norm()), rtol=1e-3, atol=1e-9)
        assert torch.equal(stepped, after), name  # the optimizer stepped on the clipped gradient


def _micro_grads(m, rollout, old_logp, old_values, adv, returns, size):
    m.zero_grad(set_to_none=True)
    num_tokens = rollout.completion_mask.sum().float()
    for s in range(0, len(rollout), size):
        rows = list(range(s, min(s + size, len(rollout))))
        actor, critic, _ = m.micro_losses(rollout.select(rows).trimmed(), old_logp[rows], old_values[rows],
                                          adv[rows], returns[rows], num_tokens)
        (actor + critic).backward()
    flat = lambda model: torch.cat([p.grad.flatten() for p in model.parameters()])  # noqa: E731
    return flat(m.model), flat(m.critic)


def test_one_micro_batch_equals_several():
    """16 rows in one forward or in four (or 16) give the same actor and critic gradients:
    losses are shares of the step's token count. Off-policy old log-probs and shifted old values
    so that both clips are active somewhere; an entropy bonus with gradient."""
    m = _module(beta=0.1, clip_range=0.05, clip_range_value=0.05, entropy_coef=0.01)
    rollout = _rollout(m)
    values = m.rollout_values(rollout)
    t = m.targets(rollout, torch.tensor(digit_reward(None, rollout.completions, None)) + torch.randn(len(rollout)),
                  rollout.logprobs + 0.2 * rollout.completion_mask, values)
    mask = rollout.completion_mask
    old_logp = (rollout.logprobs - 0.1 * (torch.arange(len(rollout)) % 3)[:, None]) * mask
    old_values = (values + 0.1 * (torch.arange(len(rollout)) % 2)[:, None]) * mask
    args = (rollout, old_logp, old_values, t["advantages"], t["returns"])
    whole_actor, whole_critic = _micro_grads(m, *args, 16)
    assert whole_actor.abs().max() > 0 and whole_critic.abs().max() > 0
    for size in (4, 1):
        actor, critic = _micro_grads(m, *args, size)
        torch.testing.assert_close(actor, whole_actor, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(critic, whole_critic, rtol=1e-5, atol=1e-5)
    # clipping was active for both losses
    _, _, metrics = m.micro_losses(rollout, old_logp, old_values, t["advantages"], t["returns"], mask.sum().float())
    assert metrics["policy/clip_frac"] > 0 and metrics["value/clip_frac"] > 0


def test_each_loss_reaches_only_its_own_model():
    m = _module(beta=0.1)
    rollout = _rollout(m)
    values = m.rollout_values(rollout)
    adv = torch.randn(rollout.logprobs.shape) * rollout.completion_mask
    actor, critic, _ = m.micro_losses(rollout, rollout.logprobs, values, adv, values + 1.0,
                                      rollout.completion_mask.sum().float())
    actor.backward(retain_graph=True)
    assert all(p.grad is None for p in m.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.model.parameters())
    m.model.zero_grad(set_to_none=True)
    critic.backward()
    assert all(p.grad is None for p in m.model.parameters())
    assert m.critic.score.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in m.ref_model.parameters())


def test_logged_step_metrics_do_not_depend_on_the_micro_batch_size(tmp_path):
    """The same rollout with forward_batch_size 16 and 4: logged losses and entropy agree
    (they are step totals or means, not a micro-batch's share)."""
    logged = []
    for size in (16, 4):
        m = _module(ppo_epochs=1, mini_batches=1, forward_batch_size=size)
        L.seed_everything(3)
        trainer = _trainer(tmp_path, max_steps=2)
        trainer.fit(m, datamodule=_data())
        logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    whole, split = logged
    assert whole["train/reward/mean"] == split["train/reward/mean"]  # the same rollout
    for key in ("train/policy/pg_loss", "train/value/loss", "train/entropy", "train/policy/ratio_mean"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    assert whole["train/entropy"] > 1.0  # a random model over ~260 tokens: several nats


# -- adaptive KL in training and checkpoints --------------------------------------------------
def test_adaptive_kl_moves_the_coefficient_and_is_checkpointed(tmp_path):
    """KL below target (the reference is the policy: 0 on the first rollout) lowers the
    coefficient; KL above target (a different reference, k3 > 0) raises it. 16 sequences,
    horizon 10: factors 1 -+ 0.2 * 16 / 10. The value is a state_dict buffer and resumes."""
    down = _module(beta=0.1, adaptive_kl=AdaptiveKL(target=1.0, horizon=10), ppo_epochs=1, mini_batches=1)
    trainer = _trainer(tmp_path / "down", max_steps=2)
    trainer.fit(down, datamodule=_data())
    assert float(trainer.callback_metrics["train/kl"]) == 0.0
    assert float(trainer.callback_metrics["train/kl_coef"]) == pytest.approx(0.1)  # the step's own coefficient
    assert down.kl_coef.item() == pytest.approx(0.1 * 0.68, rel=1e-12)

    def up_module():
        return _module(beta=0.1, adaptive_kl=AdaptiveKL(target=1e-6, horizon=10), kl_estimator="k3",
                       reference=CausalLMSpec(config=tiny_config(), seed=7), ppo_epochs=1, mini_batches=1)

    up = up_module()
    trainer = _trainer(tmp_path / "up", max_steps=2)
    trainer.fit(up, datamodule=_data())
    assert float(trainer.callback_metrics["train/kl"]) > 0
    assert up.kl_coef.item() == pytest.approx(0.1 * 1.32, rel=1e-12)
    path = str(tmp_path / "up.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state["kl_coef"].dtype == torch.float64 and state["kl_coef"].item() == pytest.approx(0.132, rel=1e-12)
    assert not any(k.startswith("ref_model.") for k in state) and any(k.startswith("critic.") for k in state)
    # resuming restores the coefficient, and the next rollout multiplies it again
    resumed = up_module()
    trainer = _trainer(tmp_path / "up", max_steps=4)
    trainer.fit(resumed, datamodule=_data(), ckpt_path=path, weights_only=False)  # hparams hold dataclasses
    assert trainer.global_step == 4
    assert float(trainer.callback_metrics["train/kl_coef"]) == pytest.approx(0.132)
    assert resumed.kl_coef.item() == pytest.approx(0.1 * 1.32 * 1.32, rel=1e-12)


# -- recipes ---------------------------------------------------------------------------------
PPO_RECIPES = sorted(p for p in os.listdir(os.path.join(REPO, "configs", "ppo")) if p.endswith(".yaml"))


@pytest.mark.parametrize("recipe", PPO_RECIPES)
def test_every_ppo_recipe_trains_through_the_cli(tmp_path, recipe):
    """4 optimizer steps (one epoch of one mini-batch: 2 per rollout, so 2 rollouts) from a tiny
    export; a recipe scoring with a reward model under checkpoints/ gets a tiny RM export,
    which also initialises the critic."""
    import yaml

    path = os.path.join(REPO, "configs", "ppo", recipe)
    init = yaml.safe_load(open(path))["model"]["init_args"]
    rm = any(r["name"] == "reward_model" for r in init["rewards"])
    rm_dir = str(tmp_path / "rm_export")  # where stand_in_exports writes a tiny RM
    args = ["fit", "--config", path, *stand_in_exports(os.path.join("configs", "ppo", recipe), tmp_path)]
    args += ["--trainer.max_steps", "4", "--model.init_args.ppo_epochs", "1", "--model.init_args.mini_batches", "1",
             "--trainer.val_check_interval", "2", "--data.init_args.task.val_size", "4",
             "--data.init_args.eval_batch_size", "4", "--data.init_args.micro_batch_size", "4",
             "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
             "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "t"]
    cli = main(args)
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    for key in ("train/score", "train/kl", "train/value/loss", "train/explained_variance", "val/exact_match",
                "train/reward/mean", "train/policy/pg_loss"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # one learning-rate curve per optimizer, each with its own value
    assert metrics["lr/actor/pg1"].item() == pytest.approx(init["optim"]["lr"])
    assert metrics["lr/critic/pg1"].item() == pytest.approx(init["critic_optim"]["lr"])
    if rm:
        assert cli.model.rewards.names == ["reward_model"]
        assert cli.model.value_spec.pretrained == rm_dir
    assert os.path.exists(tmp_path / "ckpt" / "t" / "hf" / "config.json")
    assert os.path.exists(tmp_path / "ckpt" / "t" / "last.ckpt")


# -- learning ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_rises(tmp_path):
    """From random init, PPO learns to answer in digits: the digit-share score (mean of 5
    rollouts) goes from ~0.07 to >= 0.8 in 50 rollouts of 16 completions, 2 epochs each (200
    optimizer steps; measured 0.09 -> 0.99, and 0.97-1.0 for seeds 1, 4, 6, 7; ~2 s)."""
    L.seed_everything(0)
    m = PPO(model=CausalLMSpec(config=tiny_config(), seed=1), rewards=[DIGITS], beta=0.0,
            sampling=SamplingParams(max_new_tokens=4, temperature=1.0), forward_batch_size=64,
            ppo_epochs=2, mini_batches=1, vf_coef=0.5, eval_max_new_tokens=0,
            optim=OptimSpec(lr=3e-3, schedule="constant"), critic_optim=OptimSpec(lr=1e-2, schedule="constant"))
    scores = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            scores.append(float(trainer.callback_metrics["train/score"]))

    trainer = _trainer(tmp_path, max_steps=4 * 50, callbacks=[Record()])  # 2 epochs x 2 optimizers per rollout
    trainer.fit(m, datamodule=_data(prompts=16, train_size=200))
    assert len(scores) == 50
    start, end = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert start < 0.2 and end >= 0.8, (start, end, scores)


@pytest.mark.slow
def test_missing_eos_penalty_applies_to_truncated_completions_scored_by_the_reward_model(tmp_path,
                                                                                        tiny_reward_export):
    """The RM scores a truncated completion as it is (no EOS appended); PPO then subtracts
    missing_eos_penalty from exactly those rows' scores: score = RM(x, y) - 0.7 * truncated."""
    from lit_align.rewards.reward_model import RewardModelReward

    rm = RewardSpec("reward_model", args={"path": tiny_reward_export, "tokenizer": "byte"})
    m, calls = _module(rewards=[rm], missing_eos_penalty=0.7, ppo_epochs=1, mini_batches=1), {}
    sample, targets = m.sample, m.targets

    def rec_sample(batch):
        out = sample(batch)
        calls["sample"] = out
        return out

    def rec_targets(rollout, scores, ref_logp, values):
        calls["scores"] = scores.clone()
        return targets(rollout, scores, ref_logp, values)

    m.sample, m.targets = rec_sample, rec_targets
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(m, datamodule=_data())
    assert trainer.global_step == 2
    rollout, _, parts = calls["sample"]
    truncated = rollout.truncated
    assert truncated.any()  # 4 new tokens from a random policy: most never reach EOS
    reward = RewardModelReward(tiny_reward_export, tokenizer="byte")
    args = (rollout.prompts, rollout.completions, rollout.meta)
    as_is = reward(*args, truncated=truncated.tolist())
    with_eos = reward(*args, truncated=[False] * len(rollout))
    torch.testing.assert_close(parts["reward_model"].cpu(), as_is)
    assert (as_is[truncated] != with_eos[truncated]).all()  # no EOS was appended to a truncated row
    torch.testing.assert_close(calls["scores"].cpu(), as_is - 0.7 * truncated.float())
    assert float(trainer.callback_metrics["train/score"]) == pytest.approx(float((as_is - 0.7 * truncated).mean()),
                                                                             abs=1e-5)
