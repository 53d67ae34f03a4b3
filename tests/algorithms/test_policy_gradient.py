"""The policy-gradient module (GRPO / GSPO / DAPO): settings, the rollout engine setting,
first-update ratio, step-level loss normalisation (micro-batches, ranks, a real 2-process DDP
fit), mu > 1, gradient clipping, dynamic sampling, overlong filtering."""

import glob
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from lit_align import DAPO, GRPO, GSPO, PPO, CausalLMSpec, OptimSpec, PolicyGradient
from lit_align.algorithms.policy_gradient import DEFAULT_GENERATION_ROUNDS
from lit_align.losses import AGG_MODES, aggregate_loss, group_advantages
from lit_align.rewards import RewardSpec
from lit_align.rollout import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    chunked_logprobs,
    completion_masks,
    decode_completions,
)
from lit_align.train import main
from tests.conftest import REPO, arith_prompts, fit_recipe, free_port, sample_rollout, tiny_config

G = 4


class FixedEngine(RolloutEngine):
    """A rollout engine without randomness that records its calls: sample ``j`` of a prompt with
    ``s = sum_i (i + 1) * id_i`` (unpadded ids) has ``k = (s + 3 j) % (C + 1)`` letters, then EOS,
    or ``C`` letters and no EOS (truncated) when ``k == C``, with ``C = sampling.max_new_tokens``.
    Completions depend only on the prompt, so every rank and process samples the same rows for
    the same prompt."""

    def __init__(self, tokenizer, logprob_batch_size: int = 32):
        super().__init__(tokenizer, logprob_batch_size)
        self.calls = []

    def update_weights(self, model):
        self.calls.append(("update_weights", model))

    def generate(self, model, prompts, sampling):
        tok, c, n = self.tokenizer, sampling.max_new_tokens, sampling.n
        rows = []
        for ids, mask in zip(prompts["prompt_ids"].tolist(), prompts["prompt_mask"].tolist()):
            s = sum((i + 1) * x for i, x in enumerate(x for x, m in zip(ids, mask) if m))
            for j in range(n):
                k = (s + 3 * j) % (c + 1)
                letters = tok("".join(chr(97 + (s + j + t) % 26) for t in range(k)), add_special_tokens=False).input_ids
                rows.append((letters + [tok.eos_token_id] * (c - k))[:c] if k < c else letters)
        ids = torch.tensor(rows, device=prompts["prompt_ids"].device)
        mask, truncated = completion_masks(ids, tok.eos_token_id)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
        b = len(prompts["prompt_ids"])
        rollout = RolloutBatch(
            prompt_ids=prompts["prompt_ids"].repeat_interleave(n, 0),
            prompt_mask=prompts["prompt_mask"].repeat_interleave(n, 0),
            completion_ids=ids, completion_mask=mask, logprobs=torch.zeros(ids.shape), truncated=truncated,
            prompts=[p for p in prompts.get("prompts", [""] * b) for _ in range(n)],
            completions=decode_completions(tok, ids),
            meta=[m for m in prompts.get("meta", [{}] * b) for _ in range(n)], group_size=n).trimmed()
        rollout.logprobs = chunked_logprobs(model, rollout, sampling.temperature, self.logprob_batch_size)
        self.calls.append(("generate", prompts, sampling, rollout))
        return rollout


FIXED_ENGINE = "tests.algorithms.test_policy_gradient:FixedEngine"


def parity_reward(prompts, completions, meta, **context):
    """Even answers: always 1 (a zero-variance group); odd answers: 0, 1, 0, 1 over the group's
    rows (groups are consecutive rows), whatever was sampled."""
    return [1.0 if int(m["answer"]) % 2 == 0 else float(i % 2) for i, m in enumerate(meta)]


def odd_length_reward(prompts, completions, meta, **context):
    return [float(len(c) % 2) for c in completions]


ODD = RewardSpec("tests.algorithms.test_policy_gradient:odd_length_reward", label="odd")
PARITY = RewardSpec("tests.algorithms.test_policy_gradient:parity_reward", label="parity")


def _module(cls=PolicyGradient, **kw):
    kw.setdefault("rewards", [RewardSpec("arith_match")])
    kw.setdefault("sampling", SamplingParams(max_new_tokens=4, temperature=1.0))
    kw.setdefault("num_generations", G)
    kw.setdefault("optim", OptimSpec(lr=1e-3, warmup_steps=0, schedule="constant"))
    m = cls(model=CausalLMSpec(config=tiny_config(), seed=1), eval_max_new_tokens=0, **kw)
    m.configure_model()
    return m


def _data(prompts=4, train_size=16, **kw):
    return arith_prompts(prompts, train_size, **kw)


def _rollout(m, prompts=4, seed=0) -> RolloutBatch:
    return sample_rollout(m, prompts, G, seed)


def _trainer(tmp_path, max_steps, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, max_steps=max_steps,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)


# -- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards=[]), "rewards"),
    (dict(num_generations=1), "num_generations"),
    (dict(sampling=SamplingParams(n=2, temperature=1.0)), "sampling.n"),
    (dict(sampling=SamplingParams(temperature=0.0)), "temperature"),
    (dict(advantage_estimator="batch"), "advantage_estimator"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(importance_sampling_level="tok"), "importance_sampling_level"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(beta=-0.1), "beta"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kl_in_reward=True), "kl_in_reward"),
    (dict(reference=CausalLMSpec(config=tiny_config())), "reference"),
    (dict(mini_batches=0), "mini_batches"),
    (dict(overlong_buffer=4), "overlong_buffer"),
    (dict(max_generation_rounds=0, dynamic_sampling=True), "max_generation_rounds"),
    (dict(rewards=[RewardSpec("no_such_reward")]), "no_such_reward"),
    # settings that would be silently ignored
    (dict(overlong_penalty_factor=0.5), "overlong_penalty_factor: set to 0.5 but overlong_buffer is 0"),
    (dict(overlong_penalty_factor=-1.0, overlong_buffer=2), "overlong_penalty_factor: must be >= 0"),
    (dict(max_generation_rounds=4), "max_generation_rounds: set to 4 but dynamic_sampling is off"),
    (dict(kl_estimator="k3"), "kl_estimator: set to 'k3' but beta is 0"),
    (dict(engine="nope"), "engine: unknown engine 'nope'"),
    (dict(engine="tests.algorithms.test_policy_gradient:odd_length_reward"), "engine: .* not a subclass of"),
    (dict(engine="tests.no_such_module:Engine"), "engine: .*cannot import"),
])
def test_invalid_settings_fail_at_construction(kwargs, match):
    kwargs.setdefault("rewards", [RewardSpec("arith_match")])
    with pytest.raises(ValueError, match=match):
        PolicyGradient(model=CausalLMSpec(config=tiny_config()), sampling=kwargs.pop("sampling", SamplingParams(
            max_new_tokens=4, temperature=1.0)), **kwargs)


def test_presets_carry_their_papers_defaults_and_accept_overrides():
    spec, rewards = CausalLMSpec(config=tiny_config()), [RewardSpec("arith_match")]
    grpo, gspo = GRPO(model=spec, rewards=rewards), GSPO(model=spec, rewards=rewards)
    dapo = DAPO(model=spec, rewards=rewards)
    assert (grpo.hparams.importance_sampling_level, grpo.hparams.loss_agg_mode, grpo.hparams.beta,
            grpo.kl_estimator, grpo.hparams.clip_low, grpo.hparams.clip_high) == \
        ("token", "seq-mean-token-mean", 0.04, "k3", 0.2, 0.2)
    assert (gspo.hparams.importance_sampling_level, gspo.hparams.clip_low, gspo.hparams.clip_high,
            gspo.hparams.beta) == ("sequence", 3e-4, 4e-4, 0.0)
    assert (dapo.hparams.clip_low, dapo.hparams.clip_high, dapo.hparams.loss_agg_mode, dapo.hparams.beta,
            dapo.hparams.dynamic_sampling, dapo.hparams.overlong_filtering) == \
        (0.2, 0.28, "token-mean", 0.0, True, True)
    assert dapo.rewards.names[-1] == "overlong" and dapo.rewards.weights[-1] == 1.0  # soft overlong punishment
    assert dapo.max_generation_rounds == DEFAULT_GENERATION_ROUNDS
    assert GRPO(model=spec, rewards=rewards, beta=0.0).hparams.beta == 0.0  # no KL: no estimator to reject
    assert GRPO(model=spec, rewards=rewards, kl_estimator="k2").kl_estimator == "k2"
    assert GRPO(model=spec, rewards=rewards, kl_estimator="k1", kl_in_reward=True).kl_estimator == "k1"
    assert DAPO(model=spec, rewards=rewards, overlong_buffer=0).rewards.names == ["arith_match"]
    assert DAPO(model=spec, rewards=rewards, overlong_penalty_factor=0.5).rewards.weights[-1] == 0.5
    assert DAPO(model=spec, rewards=rewards, max_generation_rounds=2).max_generation_rounds == 2
    assert isinstance(grpo, PolicyGradient) and type(grpo).__name__ == "GRPO"


def test_reference_is_built_only_with_a_kl_term():
    assert _module(beta=0.0).ref_model is None
    m = _module(beta=0.1)
    assert m.ref_model is not None and not any(p.requires_grad for p in m.ref_model.parameters())


def test_preset_recipe_defaults_reach_the_cli(tmp_path, tiny_export):
    cli = main(["--config", os.path.join(REPO, "configs", "dapo", "arith.yaml"),
                "--model.init_args.model.pretrained", tiny_export], run=False)
    assert type(cli.model).__name__ == "DAPO"
    assert cli.model.hparams.clip_high == 0.28 and cli.model.hparams.dynamic_sampling


def test_mini_batches_beyond_the_rows_of_a_step_fail_when_fitting_starts(tmp_path):
    """1 prompt x 4 samples per rank and step cannot make 5 mini-batches: fit fails before any
    rollout (the data module says how many prompts a step takes), naming the setting."""
    m, calls = _module(mini_batches=5, rewards=[ODD]), {}
    _recording(m, calls)
    with pytest.raises(ValueError, match=r"PolicyGradient\.mini_batches: 5 mini-batches .* samples 4 \(1 prompts"):
        _trainer(tmp_path, max_steps=1).fit(m, datamodule=_data(prompts=1))
    assert "collect" not in calls
    _module(mini_batches=4, rewards=[ODD]).check_mini_batches(4)  # one row per mini-batch is enough


def test_mini_batches_beyond_the_rows_fail_at_the_first_rollout_without_a_data_module(tmp_path):
    dm = _data(prompts=1)
    m, calls = _module(mini_batches=5, rewards=[ODD]), {}
    _recording(m, calls)
    dm.tokenizer = m.tokenizer
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"mini_batches: 5 mini-batches .* samples 4 \(the rollout's rows\)"):
        _trainer(tmp_path, max_steps=1).fit(m, train_dataloaders=dm.train_dataloader())
    assert len(calls["collect"]) == 1 and "micro" not in calls  # no step on an empty mini-batch


# -- the rollout engine ---------------------------------------------------------------------
def test_an_engine_named_by_import_path_does_every_rollout(tmp_path):
    """The engine setting swaps the rollout backend without code changes: the module syncs its
    weights and samples through it before each step, and trains on exactly what it returned."""
    m, calls = _module(engine=FIXED_ENGINE, rewards=[ODD], num_iterations=1), {}
    assert isinstance(m.engine, FixedEngine) and m.hparams.engine == FIXED_ENGINE
    _recording(m, calls)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(m, datamodule=_data(prompts=4))
    assert [c[0] for c in m.engine.calls] == ["update_weights", "generate"] * 2
    for (_, synced), (_, prompts, sampling, rollout), (trained, *_) in zip(
            m.engine.calls[0::2], m.engine.calls[1::2], calls["collect"]):
        assert synced is m.model
        assert len(prompts["prompt_ids"]) == 4
        assert (sampling.n, sampling.max_new_tokens, sampling.temperature) == (G, 4, 1.0)
        assert trained is rollout
    # the fixed completions of the first prompt: k = (s + 3 j) % 5 letters, k = 4 truncated
    rollout = m.engine.calls[1][3]
    valid = rollout.prompt_ids[0][rollout.prompt_mask[0].bool()]
    s = int((valid * torch.arange(1, len(valid) + 1)).sum())
    assert [len(c) for c in rollout.completions[:G]] == [(s + 3 * j) % 5 for j in range(G)]
    assert rollout.truncated[:G].tolist() == [(s + 3 * j) % 5 == 4 for j in range(G)]


def test_every_online_module_and_preset_takes_the_engine_setting():
    spec, rewards = CausalLMSpec(config=tiny_config()), [RewardSpec("arith_match")]
    for cls in (GRPO, GSPO, DAPO, PPO):
        m = cls(model=spec, rewards=rewards, engine=FIXED_ENGINE)
        assert isinstance(m.engine, FixedEngine) and m.hparams.engine == FIXED_ENGINE, cls.__name__
        assert type(cls(model=spec, rewards=rewards).engine).__name__ == "HFEngine"
    with pytest.raises(ValueError, match="PPO.engine: unknown engine"):
        PPO(model=spec, rewards=rewards, engine="nope")


# -- the loss ---------------------------------------------------------------------------
def test_first_update_ratio_is_exactly_one():
    m = _module(forward_batch_size=8, num_iterations=2)  # several passes: the rollout is scored first
    rollout = _rollout(m)
    mask = m.loss_mask(rollout)
    tokens, seqs = m.step_normalizers(mask)
    adv = torch.randn(len(rollout))
    for s in range(0, len(rollout), 8):
        rows = list(range(s, min(s + 8, len(rollout))))
        _, metrics = m.micro_loss(rollout.select(rows).trimmed(), rollout.logprobs[rows], None, adv[rows],
                                  mask[rows], tokens, seqs)
        assert metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0


def _one_step(tmp_path, reuse: bool, **kw):
    m = _module(forward_batch_size=8, rewards=[ODD], **kw)
    scored = []
    score = m.engine.score
    m.engine.score = lambda *a: scored.append(1) or score(*a)
    if not reuse:  # the scoring pass forced back on
        m.reuse_training_logprobs, m.engine.score_rollouts = False, True
    seen = {}
    update = m.update

    def record(rollout, old_logp, *args, **kwargs):
        out = update(rollout, old_logp, *args, **kwargs)
        seen["old"] = old_logp.clone()
        return out

    m.update = record
    L.seed_everything(0)
    trainer = _trainer(tmp_path / str(reuse), max_steps=1)
    trainer.fit(m, datamodule=_data(prompts=4))
    return m, seen["old"], len(scored), {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("kw", [{}, {"beta": 0.04, "kl_estimator": "k3"}])
def test_one_step_per_rollout_reuses_the_training_forwards_log_probs(tmp_path, kw):
    """One optimizer step per rollout: the scoring forward is skipped and the update writes its own
    detached log-probs in as the old ones; weights, old log-probs and every metric (the first
    ratio of 1, the sampler mismatch) equal those of the run that scores first."""
    fast, fast_old, fast_scored, fast_metrics = _one_step(tmp_path, True, **kw)
    slow, slow_old, slow_scored, slow_metrics = _one_step(tmp_path, False, **kw)
    assert fast.reuse_training_logprobs and (fast_scored, slow_scored) == (0, 1)
    torch.testing.assert_close(fast_old, slow_old, rtol=0, atol=1e-6)
    assert fast_old.abs().sum() > 0
    for a, b in zip(fast.model.parameters(), slow.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert fast_metrics.keys() == slow_metrics.keys()
    assert fast_metrics["train/policy/ratio_max"] == fast_metrics["train/policy/ratio_min"] == 1.0
    for key in fast_metrics:
        if not key.startswith("train/time"):
            assert fast_metrics[key] == pytest.approx(slow_metrics[key], abs=1e-5), key
    assert "train/mismatch/k3" in fast_metrics or any(k.startswith("train/mismatch/") for k in fast_metrics)


@pytest.mark.parametrize("kw", [dict(num_iterations=2), dict(mini_batches=2), dict(kl_in_reward=True, beta=0.1,
                                                                                   kl_estimator="k1")])
def test_rollouts_are_scored_when_the_update_needs_log_probs_first(kw):
    m = _module(**kw)
    assert not m.reuse_training_logprobs and m.engine.score_rollouts


def _grads(m, rollout, adv, batch_size, ref=None):
    m.model.zero_grad()
    mask = m.loss_mask(rollout)
    tokens, seqs = m.step_normalizers(mask)
    shift = 0.05 * (torch.arange(len(rollout)) % 3)[:, None]  # off-policy by a different amount per row
    old = (rollout.logprobs - shift) * rollout.completion_mask
    for s in range(0, len(rollout), batch_size):
        rows = list(range(s, min(s + batch_size, len(rollout))))
        loss, _ = m.micro_loss(rollout.select(rows).trimmed(), old[rows],
                               None if ref is None else ref[rows], adv[rows], mask[rows], tokens, seqs)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in m.model.parameters()])


# the combinations PolicyGradient accepts: GSPO's sequence ratio goes with a mean over sequences
VALID_LEVEL_AGG = [("token", agg) for agg in AGG_MODES] + [("sequence", "seq-mean-token-mean")]


@pytest.mark.parametrize("level, agg", VALID_LEVEL_AGG)
def test_one_micro_batch_equals_several(agg, level):
    """Normalised over the whole step, 16 rows in one forward or in four give the same gradient
    (off-policy old log-probs so that clipping is active somewhere; KL term in the loss)."""
    m = _module(loss_agg_mode=agg, importance_sampling_level=level, beta=0.1, clip_low=0.02, clip_high=0.02)
    rollout = _rollout(m)
    adv = group_advantages(torch.randn(len(rollout)), G)
    ref = rollout.logprobs + 0.1
    whole = _grads(m, rollout, adv, 16, ref)
    split = _grads(m, rollout, adv, 4, ref)
    assert whole.abs().max() > 0
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)


TWO_RANK_MODES = AGG_MODES


def _flat_grad(m):
    return torch.cat([p.grad.flatten() for p in m.model.parameters()])


def _rank_grads(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        state = torch.load(path, weights_only=False)
        rollout, adv = state["rollout"], state["adv"]
        half = len(rollout) // world
        rows = list(range(rank * half, (rank + 1) * half))
        grads = []
        for agg in TWO_RANK_MODES:
            m = _module(loss_agg_mode=agg)
            m.model.load_state_dict(state["model"])
            mask = state["mask"][rows]
            tokens, seqs = m.step_normalizers(mask)  # all-reduced over the two ranks
            mine = rollout.select(rows)
            loss, _ = m.micro_loss(mine.trimmed(), mine.logprobs, None, adv[rows], mask, tokens, seqs)
            (loss * world).backward()  # as PolicyGradient.update scales it
            grad = _flat_grad(m)
            dist.all_reduce(grad)
            grads.append(grad / world)  # what data parallelism does to gradients
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """Two gloo ranks with all-reduced step normalisers give the single-process gradient, for
    token- and sequence-normalised modes, with unequal token counts on the two ranks."""
    m = _module()
    rollout = _rollout(m)
    adv = group_advantages(torch.randn(len(rollout)), G)
    mask = m.loss_mask(rollout)
    mask[len(rollout) // 2: len(rollout) // 2 + 4, 1:] = 0  # rank 1 holds fewer tokens
    path, out = str(tmp_path / "state.pt"), str(tmp_path / "grad.pt")
    torch.save({"model": m.model.state_dict(), "rollout": rollout, "adv": adv, "mask": mask}, path)
    port = free_port()
    mp.spawn(_rank_grads, args=(2, port, path, out), nprocs=2, join=True)
    for agg, two in zip(TWO_RANK_MODES, torch.load(out)):
        single = _module(loss_agg_mode=agg)
        single.model.load_state_dict(m.model.state_dict())
        tokens, seqs = single.step_normalizers(mask)
        loss, _ = single.micro_loss(rollout.trimmed(), rollout.logprobs, None, adv, mask, tokens, seqs)
        loss.backward()
        torch.testing.assert_close(two, _flat_grad(single), rtol=1e-5, atol=1e-7, msg=agg)


def test_step_normalizers_count_every_real_row():
    """Sequences of a step are its rows, whether or not any of their tokens carry loss; only
    rows that fill a dynamic-sampling batch are left out."""
    m = _module()
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    tokens, seqs = m.step_normalizers(mask)
    assert (tokens.item(), seqs.item()) == (3.0, 4.0)
    tokens, seqs = m.step_normalizers(mask, torch.tensor([True, True, True, False]))
    assert (tokens.item(), seqs.item()) == (3.0, 3.0)
    _, seqs = m.step_normalizers(mask[:2] * 0, torch.tensor([False, False]))
    assert seqs.item() == 1.0  # filler only: a zero loss, kept finite


@pytest.mark.parametrize("agg", ["seq-mean-token-sum-norm", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_overlong_filtering_keeps_the_sequence_denominator(tmp_path, agg):
    """With overlong filtering the truncated rows carry no loss but stay sequences of the step:
    Dr. GRPO's loss is sum over kept tokens / (all 16 rows x max_new_tokens), whatever the number
    of truncated rows (first update: ratio 1, so each kept token's loss is -A)."""
    m, calls = _module(engine=FIXED_ENGINE, rewards=[ODD], overlong_filtering=True, loss_agg_mode=agg,
                       advantage_estimator="dr_grpo"), {}
    seen = []
    micro_loss = m.micro_loss

    def rec(rollout, old_logp, ref_logp, advantages, loss_mask, num_tokens, num_seqs, **kw):
        seen.append((loss_mask.clone(), advantages.clone(), num_tokens.item(), num_seqs.item()))
        return micro_loss(rollout, old_logp, ref_logp, advantages, loss_mask, num_tokens, num_seqs, **kw)

    m.micro_loss = rec
    _recording(m, calls)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(m, datamodule=_data(prompts=4))
    rollout, total, _, _ = calls["collect"][0]
    truncated = rollout.truncated
    assert 0 < int(truncated.sum()) < len(rollout)  # some rows are filtered, not all
    (mask, adv, num_tokens, num_seqs), = seen
    assert num_seqs == len(rollout) == 16  # the filtered rows still count
    kept = ~truncated
    assert mask[truncated].sum() == 0 and num_tokens == float(rollout.completion_mask[kept].sum())
    adv_hand = total - total.view(-1, G).mean(-1).repeat_interleave(G)  # advantage_estimator dr_grpo
    torch.testing.assert_close(adv, adv_hand)
    lengths = rollout.completion_mask.sum(-1).float()
    per_seq = {"seq-mean-token-sum-norm": -adv_hand * lengths / 4, "seq-mean-token-mean": -adv_hand,
               "seq-mean-token-sum": -adv_hand * lengths}[agg]
    expected = (per_seq * kept).sum() / 16
    assert abs(float(expected)) > 1e-3
    torch.testing.assert_close(trainer.callback_metrics["train/pg_loss"], expected.float())


def fixed_reward(prompts, completions, meta, **context):
    """A reward set by the row's place in its group (groups are consecutive rows), not by what
    was sampled: the same on every rank for the same prompt."""
    return [float((i % G) ** 2) for i in range(len(completions))]


class StepRecord(L.Callback):
    """Saves, per rank, the prompts trained on, the world size, the gradient of each optimizer
    step (after DDP's all-reduce) and the weights at the start and the end of fit."""

    def __init__(self, directory: str):
        self.directory, self.prompts, self.grads, self.start = directory, [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()]).clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts += list(batch["prompts"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens = int(pl_module.engine.calls[-1][3].completion_mask.sum())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.model.parameters()]).clone())

    def on_fit_end(self, trainer, pl_module):
        os.makedirs(self.directory, exist_ok=True)
        torch.save({"prompts": self.prompts, "grads": self.grads, "world_size": trainer.world_size, "start": self.start,
                    "tokens": self.tokens,
                    "weights": torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])},
                   os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def fit_fixed(directory: str, devices: int, agg: str) -> None:
    """One optimizer step of PolicyGradient on the 4 prompts of a tiny arith split, split over
    ``devices`` DDP processes (gloo), with the fixed engine and reward: no randomness anywhere,
    so any number of processes sees the same global batch."""
    torch.set_num_threads(1)
    m = PolicyGradient(model=CausalLMSpec(config=tiny_config(), seed=1), engine=FIXED_ENGINE, num_generations=G,
                       rewards=[RewardSpec("tests.algorithms.test_policy_gradient:fixed_reward", label="fixed")],
                       sampling=SamplingParams(max_new_tokens=4, temperature=1.0), loss_agg_mode=agg,
                       # eps far above |grad|: Adam's first step is ~ -lr * grad / eps, so the weights
                       # show the gradient's scale (a unit-eps Adam step would hide it as sign(grad))
                       optim=OptimSpec(lr=1e-1, eps=1.0, warmup_steps=0, schedule="constant", grad_clip=None),
                       eval_max_new_tokens=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=directory, callbacks=[StepRecord(directory)])
    trainer.fit(m, datamodule=arith_prompts(prompts=4 // devices, train_size=4))


@pytest.mark.slow
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_ddp_fit_on_two_processes_equals_one(tmp_path, agg):
    """PolicyGradient fit under DDP on 2 CPU processes, 2 prompts each (different token counts),
    takes the same optimizer step as one process on all 4: same gradient, same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "tests.algorithms.test_policy_gradient", str(tmp_path / "ddp"), "2",
                           agg], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    fit_fixed(str(tmp_path / "single"), 1, agg)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert len(ranks[0]["prompts"]) == len(ranks[1]["prompts"]) == 2
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # a mean of per-rank means would differ
    assert sorted(ranks[0]["prompts"] + ranks[1]["prompts"]) == sorted(single["prompts"])  # one global batch
    assert len(single["grads"]) == len(ranks[0]["grads"]) == 1
    grad = single["grads"][0]
    assert grad.abs().max() > 1e-4
    assert torch.equal(ranks[0]["grads"][0], ranks[1]["grads"][0])
    torch.testing.assert_close(ranks[0]["grads"][0], grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert torch.equal(ranks[0]["start"], single["start"])
    moved = single["weights"] - single["start"]
    # Adam's first step with bias correction: -lr * g / (|g| + eps)
    torch.testing.assert_close(moved, -0.1 * grad / (grad.abs() + 1.0), rtol=1e-3, atol=2e-7)  # float32 weights ~1
    torch.testing.assert_close(ranks[0]["weights"] - ranks[0]["start"], moved, rtol=1e-4, atol=2e-7)


def test_overlong_filtering_removes_truncated_rows_from_the_loss():
    m = _module(overlong_filtering=True)
    rollout = _rollout(m)
    rollout.truncated = torch.tensor([i % 3 == 0 for i in range(len(rollout))])
    mask = m.loss_mask(rollout)
    assert mask[rollout.truncated].sum() == 0
    assert torch.equal(mask[~rollout.truncated], rollout.completion_mask[~rollout.truncated])
    assert torch.equal(_module().loss_mask(rollout), rollout.completion_mask)


# -- through the trainer --------------------------------------------------------------------
def _recording(m, calls):
    collect, micro_loss = m.collect, m.micro_loss

    def rec_collect(batch):
        out = collect(batch)
        calls.setdefault("collect", []).append(out)
        return out

    def rec_micro(rollout, old_logp, *args, **kwargs):
        loss, metrics = micro_loss(rollout, old_logp, *args, **kwargs)
        calls.setdefault("micro", []).append((old_logp.clone(), metrics))
        return loss, metrics

    m.collect, m.micro_loss = rec_collect, rec_micro


def test_several_iterations_use_the_rollout_log_probs_as_old(tmp_path):
    """mu = 3 passes over 2 mini-batches: 6 optimizer steps per rollout, each against the rollout's
    own log-probs; the ratio is 1 on the first step only."""
    m, calls = _module(num_iterations=3, mini_batches=2, forward_batch_size=8, rewards=[ODD]), {}
    _recording(m, calls)
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.fit(m, datamodule=_data(prompts=4))
    assert trainer.global_step == 6 and len(calls["collect"]) == 1
    rollout = calls["collect"][0][0]
    half = len(rollout) // 2
    for k, (old, _) in enumerate(calls["micro"]):
        rows = slice(0, half) if k % 2 == 0 else slice(half, None)
        assert torch.equal(old, rollout.logprobs[rows])
    first, later = calls["micro"][0][1], [c[1] for c in calls["micro"][2:]]
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0
    assert any(abs(x["ratio_max"] - 1.0) > 1e-6 or abs(x["ratio_min"] - 1.0) > 1e-6 for x in later)
    for key in ("train/reward/mean", "train/reward/odd/mean", "train/accuracy", "train/policy/clip_frac_low",
                "train/policy/clip_frac_high", "train/policy/ratio_max", "train/entropy", "train/truncation_rate",
                "train/response_length/mean", "train/zero_std_groups", "train/time/generation_s"):
        assert key in trainer.callback_metrics, key


def test_lengths_of_right_and_wrong_completions_are_logged_apart(tmp_path):
    """train/response_length/{correct,wrong}: the mean token count of the rollout's completions
    the task's checker accepts, and of the rest."""
    m, calls = _module(rewards=[ODD]), {}
    _recording(m, calls)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(m, datamodule=_data(prompts=4))
    rollout = calls["collect"][0][0]
    checker = trainer.datamodule.checker
    right = [checker(c, meta, "") for c, meta in zip(rollout.completions, rollout.meta)]
    lengths = rollout.lengths.float().tolist()
    for key, want in (("correct", True), ("wrong", False)):
        rows = [n for n, r in zip(lengths, right) if r == want]
        if rows:
            got = float(trainer.callback_metrics[f"train/response_length/{key}"])
            assert got == pytest.approx(sum(rows) / len(rows)), key
        else:
            assert f"train/response_length/{key}" not in trainer.callback_metrics
    assert not all(right)  # a random-init policy: some wrong completions were measured


def _record_samples(m):
    """Every ``(rollout, total)`` the module samples, across dynamic-sampling rounds."""
    seen, sample = [], m.sample

    def rec(prompts):
        out = sample(prompts)
        seen.append((out[0], out[1]))
        return out

    m.sample = rec
    return seen


def _dynamic_fit(tmp_path, rounds):
    m, calls = _module(dynamic_sampling=True, max_generation_rounds=rounds, rewards=[PARITY]), {}
    _recording(m, calls)
    sampled = _record_samples(m)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(m, datamodule=_data(prompts=6, train_size=40))
    groups = torch.cat([t for _, t in sampled]).view(-1, G)
    return trainer, calls["collect"][0], groups.std(-1) > 0, [r.num_groups for r, _ in sampled]


def test_generation_budget_counts_every_sampled_completion(tmp_path):
    """``train/generated/*``: completions and tokens sampled since the run began, the groups
    dynamic sampling drops included (its extra rounds are what it spends), kept in checkpoints."""
    m = _module(dynamic_sampling=True, max_generation_rounds=8, rewards=[PARITY])
    sampled = _record_samples(m)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(m, datamodule=_data(prompts=6, train_size=40))
    completions = sum(len(r) for r, _ in sampled)
    tokens = sum(int(r.lengths.sum()) for r, _ in sampled)
    assert len(sampled) > 2 and completions > 2 * 6 * G  # extra rounds ran: more than the 2 batches' rows
    assert m.generated.tolist() == [completions, tokens]
    assert trainer.callback_metrics["train/generated/completions"] == completions
    assert trainer.callback_metrics["train/generated/tokens"] == tokens
    assert torch.equal(m.state_dict()["generated"], m.generated)


class GradAtStep(L.Callback):
    """The flat gradient the optimizer steps on (after any clipping), at each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.model.parameters()]).clone())


@pytest.mark.parametrize("grad_clip", [1e-3, None])
def test_grad_clip_bounds_every_update(tmp_path, grad_clip):
    """optim.grad_clip rescales each optimizer step's global gradient to norm <= the limit (the
    unclipped norm is larger), keeping its direction; without it nothing is clipped."""
    m = _module(rewards=[ODD], mini_batches=2, optim=OptimSpec(lr=1e-3, warmup_steps=0, schedule="constant",
                                                              grad_clip=grad_clip))
    seen, clip = [], m.clip_and_measure

    def spy(optimizer, max_norm, name=""):
        before = _flat_grad(m).clone()
        out = clip(optimizer, max_norm, name)
        if max_norm is not None:  # without a limit the norm is only measured
            seen.append((before, _flat_grad(m).clone(), max_norm, "norm"))
        torch.testing.assert_close(out["grad_norm"], before.norm())  # the norm before clipping
        return out

    m.clip_and_measure = spy
    at_step = GradAtStep()
    _trainer(tmp_path, max_steps=2, callbacks=[at_step]).fit(m, datamodule=_data(prompts=4))
    assert len(at_step.grads) == 2
    if grad_clip is None:
        assert seen == []
        return
    assert len(seen) == 2  # once per optimizer step (2 mini-batches)
    for (before, after, value, algorithm), stepped in zip(seen, at_step.grads):
        assert (value, algorithm) == (grad_clip, "norm")
        assert before.norm() > 10 * grad_clip  # clipping had work to do
        assert after.norm() <= grad_clip * (1 + 1e-6)
        assert after.norm().item() == pytest.approx(grad_clip, rel=1e-3)
        torch.testing.assert_close(after, before * (grad_clip / before.norm()), rtol=1e-3, atol=1e-9)
        assert torch.equal(stepped, after)  # the optimizer stepped on the clipped gradient


def test_dynamic_sampling_fills_the_batch_with_varied_groups(tmp_path):
    """Even-answer prompts always give a zero-variance group, odd ones never: with rounds enough
    the 6 groups of the step all have varied rewards, none is a filler, and the logged drop
    rate is the share of zero-variance groups among all groups sampled (not the varied groups
    that came after the batch was full, which are logged as the surplus)."""
    trainer, (rollout, total, _, stats), varied, sizes = _dynamic_fit(tmp_path, rounds=8)
    assert rollout.num_groups == 6 and len(total) == 6 * G
    assert stats["rounds"] == len(sizes) > 1 and sizes == [6] * len(sizes)
    assert stats["filled_groups"] == 0 and stats["loss_rows"].all()
    assert (total.view(-1, G).std(-1) > 0).all()  # every group of the batch carries a signal
    assert int(varied[:-6].sum()) < 6 <= int(varied.sum())  # it stopped at the first round that filled it
    answers = torch.tensor([int(m["answer"]) for m in rollout.meta[::G]])
    assert (answers % 2 == 1).all()
    zero = int((~varied).sum())
    assert zero > 0
    assert stats["drop_rate"] == pytest.approx(zero / len(varied))
    assert stats["surplus_groups"] == int(varied.sum()) - 6
    metrics = trainer.callback_metrics
    assert metrics["train/dynamic_sampling/drop_rate"].item() == pytest.approx(zero / len(varied))
    assert metrics["train/dynamic_sampling/surplus_groups"].item() == int(varied.sum()) - 6
    assert metrics["train/dynamic_sampling/filled_groups"].item() == 0


def test_dynamic_sampling_out_of_rounds_fills_with_groups_that_carry_no_loss(tmp_path):
    """One round only: the zero-variance groups of that round fill the batch; they carry no
    loss and are no sequences of the step's normaliser."""
    trainer, (rollout, total, _, stats), varied, sizes = _dynamic_fit(tmp_path, rounds=1)
    assert sizes == [6] and stats["rounds"] == 1
    n_varied = int(varied.sum())
    assert 0 < n_varied < 6 and stats["filled_groups"] == 6 - n_varied and stats["surplus_groups"] == 0
    kept = stats["loss_rows"].view(-1, G)[:, 0]
    assert kept.tolist() == [True] * n_varied + [False] * (6 - n_varied)
    groups = total.view(-1, G)
    assert (groups[kept].std(-1) > 0).all() and (groups[~kept].std(-1) == 0).all()
    assert stats["drop_rate"] == pytest.approx((6 - n_varied) / 6)
    mask = trainer.lightning_module.loss_mask(rollout, stats["loss_rows"])
    assert mask[~stats["loss_rows"]].sum() == 0
    _, seqs = trainer.lightning_module.step_normalizers(mask, stats["loss_rows"])
    assert seqs.item() == n_varied * G


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_kl_goes_into_the_loss_or_into_the_reward(agg):
    in_loss, in_reward = _module(beta=0.5, loss_agg_mode=agg), _module(beta=0.5, kl_in_reward=True, loss_agg_mode=agg)
    rollout = _rollout(in_loss)
    ref = rollout.logprobs + 0.3 * rollout.completion_mask
    mask = in_loss.loss_mask(rollout)
    tokens, seqs = in_loss.step_normalizers(mask)
    total = torch.tensor([float(i % 2) for i in range(len(rollout))])
    # in the loss: the advantages ignore the KL and the loss adds beta x aggregated k3
    adv = in_loss.advantages(rollout, total, ref)
    torch.testing.assert_close(adv, group_advantages(total, G))
    loss_kl, _ = in_loss.micro_loss(rollout, rollout.logprobs, ref, adv, mask, tokens, seqs)
    loss_plain, _ = in_reward.micro_loss(rollout, rollout.logprobs, ref, adv, mask, tokens, seqs)
    k3 = torch.exp(ref - rollout.logprobs) - (ref - rollout.logprobs) - 1
    torch.testing.assert_close(loss_kl - loss_plain, 0.5 * aggregate_loss(k3, mask, agg, max_len=4, num_tokens=tokens,
                                                                         num_seqs=seqs))
    # in the reward: each reward loses beta x the sequence's summed k3 before the advantages
    expected = group_advantages(total - 0.5 * (k3 * rollout.completion_mask).sum(-1), G)
    torch.testing.assert_close(in_reward.advantages(rollout, total, ref), expected)


# -- recipes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["grpo", "gspo", "dapo"])
def test_every_rl_recipe_trains_through_the_cli(tmp_path, tiny_export, algo):
    # the tiny export answers no sum and never stops: DAPO's dynamic sampling and overlong
    # filtering would leave no row to train on, so it trains on the digit share, untruncated
    extra = ["--model.init_args.rewards=[{name: tests.algorithms.test_policy_gradient:digit_reward}]",
             "--model.init_args.overlong_filtering=false"] if algo == "dapo" else []
    cli = fit_recipe(f"configs/{algo}/arith.yaml", tmp_path, tiny_export, extra=extra)
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    for key in ("val/exact_match", "train/reward/mean", "train/accuracy", "train/entropy"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert os.path.exists(tmp_path / "ckpt" / "t" / "hf" / "config.json")


def digit_reward(prompts, completions, meta, **context):
    """Share of a completion's characters that are digits (0 for an empty completion)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GRPO, GSPO, DAPO], ids=lambda c: c.__name__)
def test_reward_rises(tmp_path, cls):
    """From random init, each preset learns to answer in digits: the digit-share reward goes
    from ~0.07 (10 of 384 byte tokens) to >= 0.8 in 60 optimizer steps (GRPO measured: 0.07 at
    step 5, 0.49 at 30, 0.98 at 50)."""
    L.seed_everything(0)
    m = cls(model=CausalLMSpec(config=tiny_config(), seed=1), num_generations=8, beta=0.0,
            rewards=[RewardSpec("tests.algorithms.test_policy_gradient:digit_reward")],
            sampling=SamplingParams(max_new_tokens=4, temperature=1.0), forward_batch_size=128,
            optim=OptimSpec(lr=3e-3, schedule="constant"), eval_max_new_tokens=0,
            # a random-init model almost never samples EOS: overlong filtering would mask every row
            **({"overlong_buffer": 0, "overlong_filtering": False} if cls is DAPO else {}))
    rewards = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            rewards.append(float(trainer.callback_metrics["train/reward/digit_reward/mean"]))

    trainer = _trainer(tmp_path, max_steps=60, callbacks=[Record()])
    trainer.fit(m, datamodule=_data(prompts=16, train_size=200))
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert start < 0.2 and end >= 0.8, (start, end)


GRPO_DELTAS = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "grpo", "*.yaml")))


@pytest.mark.parametrize("delta", GRPO_DELTAS, ids=os.path.basename)
def test_every_grpo_ablation_trains_through_the_cli(tmp_path, tiny_export, delta):
    import yaml

    cli = fit_recipe("configs/grpo/arith.yaml", tmp_path, tiny_export, extra=["--config", delta])
    assert cli.trainer.global_step == 4
    for key, value in yaml.safe_load(open(delta))["model"]["init_args"].items():
        assert cli.model.hparams[key] == value, key
    assert torch.isfinite(cli.trainer.callback_metrics["train/reward/mean"])


if __name__ == "__main__":  # the 2-process test launches this file: python -m tests.algorithms.test_policy_gradient
    fit_fixed(sys.argv[1], int(sys.argv[2]), sys.argv[3])


def test_rollouts_without_a_step_warn_then_stop():
    """Rollouts that take no optimizer step (every group filtered out) warn after 3 in a row and
    stop the run after 25, naming the step; a rollout that steps resets the count."""
    from lit_align.algorithms.online import EMPTY_ROLLOUTS_LIMIT, EMPTY_ROLLOUTS_WARNING

    m = GRPO(model=CausalLMSpec(config=tiny_config()), rewards=[RewardSpec("arith_match")])
    for _ in range(EMPTY_ROLLOUTS_WARNING - 1):
        m.watch_empty_rollouts(True)
    m.watch_empty_rollouts(False)
    assert m._empty_rollouts == 0
    with pytest.warns(UserWarning, match="last 3 rollouts took no optimizer step"):
        for _ in range(EMPTY_ROLLOUTS_WARNING):
            m.watch_empty_rollouts(True)
    with pytest.raises(RuntimeError, match=f"last {EMPTY_ROLLOUTS_LIMIT} rollouts .* Stopping at global step 0"):
        for _ in range(EMPTY_ROLLOUTS_LIMIT - EMPTY_ROLLOUTS_WARNING):
            m.watch_empty_rollouts(True)


# -- held-out correctness on data without a checker -------------------------------------------
def _file_prompts(tmp_path, n=12):
    from lit_align import PromptDataModule
    from tests.data.util import write_jsonl

    rows = [{"prompt": f"{i}+{i + 3}=", "answer": str(2 * i + 3)} for i in range(n)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    return PromptDataModule(data_files={"train": path, "validation": path}, max_length=16, micro_batch_size=4,
                            eval_batch_size=5)


def _validate(tmp_path, m, dm):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return trainer.validate(m, datamodule=dm, verbose=False)[0]


def thirds_reward(prompts, completions, meta, **context):
    """1 for answers divisible by 3, 0.75 one above, 0 two above; scores the meta, not the
    text, so a tiny random model's completions still get every value."""
    return [(1.0, 0.75, 0.0)[int(m["answer"]) % 3] for m in meta]


@pytest.mark.parametrize("threshold, expected", [(None, 4 / 12), (0.5, 8 / 12)])
def test_held_out_accuracy_without_a_checker_is_the_correctness_reward(tmp_path, threshold, expected):
    """On files (no task checker) val/exact_match counts completions whose first reward reaches
    the threshold (default 1.0), not completions equal to the reference; answers 3..25 step 2
    fall 4 / 4 / 4 into the reward's three values."""
    thirds = RewardSpec("tests.algorithms.test_policy_gradient:thirds_reward", label="thirds")
    m = PolicyGradient(model=CausalLMSpec(config=tiny_config(), seed=1), rewards=[thirds, ODD], num_generations=2,
                       sampling=SamplingParams(max_new_tokens=4, temperature=1.0), eval_max_new_tokens=5,
                       eval_reward_threshold=threshold)
    out = _validate(tmp_path, m, _file_prompts(tmp_path))
    assert out["val/exact_match"] == pytest.approx(expected)
    assert out["val/reward/thirds"] == pytest.approx((4 * 1.0 + 4 * 0.75) / 12)


def test_a_threshold_on_data_with_a_checker_is_refused(tmp_path):
    m = _module(eval_reward_threshold=0.5)
    trainer = _trainer(tmp_path, 1)
    with pytest.raises(ValueError, match="eval_reward_threshold: set to 0.5 but the data module .* has a checker"):
        trainer.fit(m, datamodule=_data())


def test_a_non_finite_threshold_is_refused():
    with pytest.raises(ValueError, match="eval_reward_threshold: must be a finite number"):
        _module(eval_reward_threshold=float("nan"))
