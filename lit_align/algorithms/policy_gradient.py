"""Group-relative policy-gradient RL (GRPO, GSPO, DAPO) as one module with independent settings."""

from __future__ import annotations

import inspect
import time

import torch
import torch.distributed as dist

from lit_align.algorithms.online import OnlineRLModule, RolloutCorrectionSpec
from lit_align.algorithms.optim import OptimSpec, build_optimizer
from lit_align.algorithms.steps import StepMetrics
from lit_align.distributed import all_reduce
from lit_align.losses import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    IS_LEVELS,
    POLICY_LOSSES,
    aggregate_loss,
    kl_penalty,
    policy_loss,
)
from lit_align.models import CausalLMSpec, LoraSpec
from lit_align.rewards import RewardSpec
from lit_align.rollout import EngineSpec, RolloutBatch, SamplingParams, completion_logprobs

#: Sampling rounds per step under dynamic sampling when ``max_generation_rounds`` is unset.
DEFAULT_GENERATION_ROUNDS = 4


class PolicyGradient(OnlineRLModule):
    """Critic-free policy-gradient RL on groups of sampled completions.

    Each training step takes a batch of prompts (``PromptDataModule``), samples
    ``num_generations`` completions per prompt, scores them with the rewards, turns the
    rewards into group-relative advantages and runs ``num_iterations`` passes over
    ``mini_batches`` of the rollout, one optimizer step per mini-batch (manual optimization;
    ``trainer.max_steps`` counts optimizer steps).

    Args:
        model: the policy (usually an SFT checkpoint's HF export).
        optim: optimizer, schedule and gradient clipping (``optim.grad_clip``).
        rewards: reward functions and weights (:class:`~lit_align.rewards.RewardSpec`); the
            scalar reward of a completion is their weighted sum.
        num_generations: completions per prompt (G, the group size).
        sampling: temperature, top-p/top-k and ``max_new_tokens`` of the rollouts (``n`` stays 1:
            the group size is ``num_generations``).
        advantage_estimator: a name in :data:`~lit_align.losses.ADVANTAGE_ESTIMATORS`: ``grpo``
            (divide by the group's reward std), ``dr_grpo`` (no std division, Dr. GRPO, Liu et al.
            2025) or ``rloo`` (leave-one-out baseline, Ahmadian et al. 2024).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``
            (Clip-Higher when ``clip_high > clip_low``, DAPO).
        importance_sampling_level: ``token`` (PPO/GRPO), ``sequence`` (GSPO, Zheng et al. 2025)
            (a name in :data:`~lit_align.losses.IS_LEVELS`). ``sequence`` goes with
            ``loss_agg_mode: seq-mean-token-mean`` only (a token-sum aggregation would weight each
            sequence's one ratio by its length); ``sequence-token`` (GSPO-token) is refused while
            advantages are one per sequence, where it equals ``sequence``.
        policy_loss: the per-token surrogate, a name in :data:`~lit_align.losses.POLICY_LOSSES`:
            ``ppo_clip`` (the clipped surrogate) or ``dual_clip`` (Dual-clip PPO, Ye et al. 2020).
        loss_agg_mode: one of :data:`~lit_align.losses.AGG_MODES`, normalised over the whole
            optimizer step (every micro-batch and data-parallel rank).
        beta: KL coefficient; 0 builds no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020), per token; ``None``: ``k3``. Only
            with ``beta > 0``; ``k1`` only with ``kl_in_reward`` (as a loss its expected gradient is
            0; k2 in the loss follows KL(pi || ref), k3 KL(ref || pi), see :mod:`lit_align.losses.kl`).
        kl_in_reward: subtract ``beta`` x the sequence's summed KL from its reward before the
            advantages (instead of adding ``beta`` x KL to the loss).
        reference: the frozen reference; default the initial policy (with ``lora``: the base
            with adapters disabled).
        num_iterations: passes (mu) over each rollout batch; old log-probs are the rollout policy's.
        mini_batches: optimizer steps per pass, each on an equal share of the rollout; at most the
            rows a rank samples per step (prompts per batch x ``num_generations``), checked when
            fitting starts.
        forward_batch_size: rows per forward/backward (training and scoring passes).
        dynamic_sampling: drop groups whose rewards are all equal and sample further prompts
            until the batch holds as many groups as prompts it started with (DAPO, Yu et al. 2025,
            sec. 3.2), at most ``max_generation_rounds`` rounds; a batch still short after that is
            filled with dropped groups carrying no loss.
        max_generation_rounds: the cap on sampling rounds per step under dynamic sampling;
            ``None``: :data:`DEFAULT_GENERATION_ROUNDS`. Only with ``dynamic_sampling``. Extra
            prompts are never the step's own (nor an earlier round's) while unused ones remain; a
            mini-batch left with no real row takes no optimizer step.
        dynamic_sampling_metric: the label of the reward whose within-group variance decides
            which groups dynamic sampling keeps (DAPO and verl filter on accuracy); ``None``: the
            first configured reward; never the overlong penalty. Only with ``dynamic_sampling``.
        overlong_filtering: truncated completions (no EOS within ``max_new_tokens``) carry no loss
            (DAPO, sec. 3.4); they still count in their group's advantages.
        overlong_buffer: soft overlong punishment: add :func:`~lit_align.losses.overlong_penalty`
            with ``cache_len = overlong_buffer`` and ``max_len = sampling.max_new_tokens`` to the
            reward (0: off; ``None``: the paper's ``max_new_tokens // 5``).
        overlong_penalty_factor: the punishment's weight in the reward; ``None``: 1. Only with
            ``overlong_buffer > 0``.
        engine: the rollout engine, ``{name, args}`` or a plain name (see
            :class:`~lit_align.algorithms.online.OnlineRLModule`).
        rollout_correction: importance weights for the sampler / training-forward gap
            (:class:`~lit_align.algorithms.online.RolloutCorrectionSpec`; ``None``: off).
        lora, eval_max_new_tokens, num_logged_samples: as in :class:`CausalLMModule`.
        eval_reward_threshold: as in :class:`~lit_align.algorithms.online.OnlineRLModule`.

    Invalid combinations fail here, at construction.
    """

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, rewards: list[RewardSpec] | None = None,
                 num_generations: int = 8, sampling: SamplingParams | None = None, advantage_estimator: str = "grpo",
                 clip_low: float = 0.2, clip_high: float = 0.2, importance_sampling_level: str = "token",
                 policy_loss: str = "ppo_clip", loss_agg_mode: str = "token-mean", beta: float = 0.0,
                 kl_estimator: str | None = None,
                 kl_in_reward: bool = False, reference: CausalLMSpec | None = None, num_iterations: int = 1,
                 mini_batches: int = 1, forward_batch_size: int = 32, dynamic_sampling: bool = False,
                 max_generation_rounds: int | None = None, dynamic_sampling_metric: str | None = None,
                 overlong_filtering: bool = False, overlong_buffer: int | None = 0,
                 overlong_penalty_factor: float | None = None, engine: EngineSpec | str = "hf",
                 rollout_correction: RolloutCorrectionSpec | None = None, lora: LoraSpec | None = None,
                 eval_max_new_tokens: int = 32, num_logged_samples: int = 4,
                 eval_reward_threshold: float | None = None):
        sampling = sampling or SamplingParams(temperature=1.0)
        if overlong_buffer is None:  # DAPO's soft band: the last fifth of the generation limit (4096 of 20480)
            overlong_buffer = max(1, sampling.max_new_tokens // 5)
        # settings that would be silently ignored fail first, before anything is built from them
        self.check_settings([
            (overlong_buffer < 0 or overlong_buffer >= sampling.max_new_tokens,
             f"overlong_buffer: need 0 <= overlong_buffer < sampling.max_new_tokens ({sampling.max_new_tokens}), "
             f"got {overlong_buffer}"),
            (overlong_penalty_factor is not None and overlong_buffer == 0,
             f"overlong_penalty_factor: set to {overlong_penalty_factor} but overlong_buffer is 0 (no soft overlong "
             "punishment); set overlong_buffer > 0 or drop it"),
            (overlong_penalty_factor is not None and overlong_penalty_factor < 0,
             f"overlong_penalty_factor: must be >= 0, got {overlong_penalty_factor}"),
            (kl_estimator is not None and beta == 0,
             f"kl_estimator: set to {kl_estimator!r} but beta is 0 (no KL term); set beta > 0 or drop it"),
            (max_generation_rounds is not None and not dynamic_sampling,
             f"max_generation_rounds: set to {max_generation_rounds} but dynamic_sampling is off; "
             "turn it on or drop it"),
            (max_generation_rounds is not None and max_generation_rounds < 1,
             f"max_generation_rounds: must be >= 1, got {max_generation_rounds}"),
            (dynamic_sampling_metric is not None and not dynamic_sampling,
             f"dynamic_sampling_metric: set to {dynamic_sampling_metric!r} but dynamic_sampling is off; "
             "turn it on or drop it"),
            (dynamic_sampling_metric == "overlong",
             "dynamic_sampling_metric: groups are filtered on a correctness reward, not on the overlong penalty "
             "(DAPO and verl filter on accuracy)"),
            (beta > 0 and kl_estimator == "k1" and not kl_in_reward,
             "kl_estimator: 'k1' in the loss has zero expected gradient (E[grad log pi] = 0); use k1 with "
             "kl_in_reward, or k2 / k3 in the loss"),
            (importance_sampling_level == "sequence-token",
             "importance_sampling_level: 'sequence-token' (GSPO-token) equals 'sequence' while advantages are one per "
             "sequence, as they are here; use 'sequence'"),
            (importance_sampling_level == "sequence" and loss_agg_mode != "seq-mean-token-mean",
             f"importance_sampling_level: 'sequence' with loss_agg_mode {loss_agg_mode!r} weights each sequence's one "
             "ratio by its length; GSPO (eq. 5) averages over sequences: use loss_agg_mode seq-mean-token-mean"),
        ])
        extra = [RewardSpec("overlong", weight=1.0 if overlong_penalty_factor is None else overlong_penalty_factor,
                            args={"max_len": sampling.max_new_tokens, "cache_len": overlong_buffer})] \
            if overlong_buffer > 0 else []
        super().__init__(model=model, optim=optim, rewards=rewards, sampling=sampling, num_generations=num_generations,
                         beta=beta, kl_estimator=kl_estimator, reference=reference,
                         forward_batch_size=forward_batch_size, lora=lora, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, extra_rewards=extra, engine=engine,
                         rollout_correction=rollout_correction,
                         eval_reward_threshold=eval_reward_threshold)
        self.check_settings([
            (num_generations < 2,
             f"num_generations: need >= 2 samples per prompt for group advantages, got {num_generations}"),
            (advantage_estimator not in ADVANTAGE_ESTIMATORS,
             f"advantage_estimator: {advantage_estimator!r} is not one of {tuple(ADVANTAGE_ESTIMATORS)}"),
            (clip_low < 0 or clip_high < 0 or clip_low >= 1,
             f"clip_low / clip_high: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}"),
            (importance_sampling_level not in IS_LEVELS,
             f"importance_sampling_level: {importance_sampling_level!r} is not one of {tuple(IS_LEVELS)}"),
            (policy_loss not in POLICY_LOSSES, f"policy_loss: {policy_loss!r} is not one of {tuple(POLICY_LOSSES)}"),
            (loss_agg_mode not in AGG_MODES, f"loss_agg_mode: {loss_agg_mode!r} is not one of {tuple(AGG_MODES)}"),
            (kl_in_reward and beta == 0, "kl_in_reward: needs beta > 0"),
            (num_iterations < 1 or mini_batches < 1, "num_iterations and mini_batches must be >= 1"),
        ])
        self.save_hyperparameters()
        self.advantage_estimator, self.policy_loss, self.loss_agg_mode = advantage_estimator, policy_loss, loss_agg_mode
        self.clip_low, self.clip_high, self.importance_sampling_level = clip_low, clip_high, importance_sampling_level
        self.kl_in_reward, self.num_iterations, self.mini_batches = kl_in_reward, num_iterations, mini_batches
        self.dynamic_sampling, self.overlong_filtering = dynamic_sampling, overlong_filtering
        # One optimizer step per rollout: the rollout's log-probs under the weights that sampled it
        # are the training forward's own, detached, so the no-grad scoring forward is skipped (as
        # TRL skips it) and the ratio of that step is exactly 1 either way. Every other setting
        # needs them before the update (later passes, the KL in the reward, the correction weights).
        self.reuse_training_logprobs = (num_iterations == 1 and mini_batches == 1 and not kl_in_reward
                                        and rollout_correction is None)
        self.engine.score_rollouts = not self.reuse_training_logprobs
        self.max_generation_rounds = (DEFAULT_GENERATION_ROUNDS if max_generation_rounds is None
                                      else max_generation_rounds)
        # the reward groups are filtered on: the first configured one (the correctness reward) by default
        self.dynamic_sampling_metric = dynamic_sampling_metric or self.rewards.names[0]
        self.check_settings([
            (self.dynamic_sampling_metric not in self.rewards.names[: len(rewards or [])],
             f"dynamic_sampling_metric: {self.dynamic_sampling_metric!r} is not the label of one of the configured "
             f"rewards {self.rewards.names[: len(rewards or [])]}"),
        ])

    def configure_optimizers(self):
        # with max_steps unset the trainer counts batches; each batch takes mu x mini_batches steps
        steps = int(self.trainer.estimated_stepping_batches)
        if self.trainer.max_steps in (None, -1):
            steps *= self.num_iterations * self.mini_batches
        return build_optimizer(self.optim, self.model.parameters(), steps)

    def collect(self, batch: dict) -> tuple[RolloutBatch, torch.Tensor, dict, dict]:
        """Sample and score a rollout for ``batch``'s prompts; with dynamic sampling, keep only
        groups whose rewards differ and sample further prompts until the batch is full.

        Returns ``(rollout, total reward [N], each reward [N], stats)``. Under dynamic sampling
        ``stats`` also holds ``loss_rows`` (``[N]`` bool, the rows that carry loss: filled-in groups
        do not), ``drop_rate`` (share of zero-variance groups among all groups generated this
        step), ``surplus_groups`` (groups with varied rewards left out because the batch was
        already full), ``filled_groups`` and ``rounds``; all per rank."""
        g = self.num_generations
        rollout, total, parts = self.sample(batch)
        zero_std = total.view(-1, g).std(-1) == 0
        stats = {"zero_std_groups": zero_std.float().mean(), "rounds": 1}
        if not self.dynamic_sampling:
            return rollout, total, parts, stats
        varied = self.varied_groups(parts)
        target = rollout.num_groups
        kept = [(rollout, total, parts, varied)]
        n_varied, n_seen, rounds = int(varied.sum()), target, 1
        dm = self.trainer.datamodule if self.trainer is not None else None
        used = list(batch.get("index", []))  # extra prompts are never the step's own again
        # every rank samples in every round: generation under sharding is collective
        while (int(all_reduce(torch.tensor(n_varied), dist.ReduceOp.MIN)) < target
               and rounds < self.max_generation_rounds):
            more = dm.extra_prompts(self.global_step, rounds, target, exclude=used)
            used += list(more.get("index", []))
            more = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in more.items()}
            r, t, p = self.sample(more)
            keep = self.varied_groups(p)
            kept.append((r, t, p, keep))
            n_varied += int(keep.sum())
            n_seen += r.num_groups
            rounds += 1
        rows, fill = [], []
        for r, t, p, keep in kept:
            for gi in range(r.num_groups):
                (rows if keep[gi] else fill).append((r, t, p, gi))
        chosen, loss_groups = rows[:target], min(len(rows), target)
        chosen += fill[: target - len(chosen)]
        parts_keys = list(parts)
        out = RolloutBatch.cat([r.select(list(range(gi * g, gi * g + g))) for r, _, _, gi in chosen],
                               self.tokenizer.pad_token_id)
        total = torch.cat([t[gi * g: gi * g + g] for _, t, _, gi in chosen])
        parts = {k: torch.cat([p[k][gi * g: gi * g + g] for _, _, p, gi in chosen]) for k in parts_keys}
        loss_rows = torch.zeros(len(out), dtype=torch.bool, device=self.device)
        loss_rows[: loss_groups * g] = True
        # the kept rows came from several rollouts: score them again in one training layout
        if not self.reuse_training_logprobs:
            self.engine.score(self.model, out, self.sampling.temperature)
        stats.update(rounds=rounds, drop_rate=(n_seen - n_varied) / n_seen, surplus_groups=n_varied - loss_groups,
                     filled_groups=target - loss_groups, loss_rows=loss_rows)
        return out, total, parts, stats

    def varied_groups(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[groups]`` bool: groups whose :attr:`dynamic_sampling_metric` reward is not the same
        for every sample (the groups dynamic sampling keeps)."""
        return parts[self.dynamic_sampling_metric].float().view(-1, self.num_generations).std(-1) > 0

    # -- the update -------------------------------------------------------------------
    def step_normalizers(self, loss_mask: torch.Tensor, rows: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denominators of one optimizer step's loss, summed over all ranks.

        Args:
            loss_mask: ``[n, C]`` this rank's share of the step, 1 on tokens that carry loss.
            rows: ``[n]`` bool, the real rows; ``None``: all. Rows outside it only fill a
                dynamic-sampling batch and are no sequences of the step.
        Returns:
            ``(tokens, sequences)``: the tokens that carry loss (``token-mean``) and every real
            row (``seq-mean-*``, Dr. GRPO's ``num_seqs x max_len``). A row whose tokens are all
            masked (a truncated one under overlong filtering) contributes 0 and still counts,
            as :func:`~lit_align.losses.aggregate_loss` defines, so the denominator does not
            depend on how many rows were filtered.
        """
        tokens = all_reduce(loss_mask.sum().float())
        n = torch.tensor(float(loss_mask.shape[0]), device=loss_mask.device) if rows is None else rows.sum().float()
        # a step of filler rows only has no loss at all; 1 keeps its zero loss finite
        seqs = all_reduce(n).clamp(min=1.0)
        return tokens, seqs

    def micro_loss(self, rollout: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, loss_mask: torch.Tensor, num_tokens: torch.Tensor,
                   num_seqs: torch.Tensor, weights: torch.Tensor | None = None,
                   reuse: bool = False) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch as its share of the optimizer step's loss (sums over micro-batches
        and ranks to the step's value). All ``[n, C]`` inputs are cut to ``rollout``'s width;
        ``weights`` are the rollout-correction factors of the policy loss (``None``: off). With
        ``reuse`` the rollout was not scored: ``old_logp`` (``[n, C]``, written in place) receives
        this forward's detached log-probs, which are the old ones."""
        c = rollout.completion_ids.shape[1]
        logp, entropy = completion_logprobs(self.model, rollout, self.sampling.temperature, with_entropy=True)
        if reuse:
            old_logp[:, :c] = logp.detach()
        old_logp, loss_mask = old_logp[:, :c], loss_mask[:, :c]
        weights = weights[:, :c] if weights is not None else None
        agg = dict(agg_mode=self.loss_agg_mode, max_len=self.sampling.max_new_tokens, num_tokens=num_tokens,
                   num_seqs=num_seqs)
        loss, metrics = policy_loss(logp, old_logp, advantages, loss_mask, self.clip_low, self.clip_high,
                                    level=self.importance_sampling_level, loss_fn=self.policy_loss, weights=weights,
                                    **agg)
        metrics["pg_loss"] = loss.detach()
        mask = loss_mask.float()
        n = mask.sum().clamp(min=1)
        metrics["entropy"] = (entropy * mask).sum() / n
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp[:, :c], self.kl_estimator)
            metrics["kl"] = (kl.detach() * mask).sum() / n
            if not self.kl_in_reward:
                kl_loss = aggregate_loss(kl, loss_mask, self.loss_agg_mode, max_len=agg["max_len"],
                                         num_tokens=num_tokens, num_seqs=num_seqs)
                loss = loss + self.beta * kl_loss
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout, total, parts, stats = self.collect(batch)
        t1 = time.perf_counter()
        ref_logp = self.reference_logprobs(rollout) if self.reference is not None else None
        loss_mask = self.loss_mask(rollout, stats.get("loss_rows"))
        advantages = self.advantages(rollout, total, ref_logp)
        weights, mismatch = (None, {}) if self.reuse_training_logprobs else self.correction(rollout)
        step_metrics = self.update(rollout, rollout.logprobs, ref_logp, advantages, loss_mask, stats.get("loss_rows"),
                                   weights)
        if self.reuse_training_logprobs:  # the update filled rollout.logprobs in
            _, mismatch = self.correction(rollout)
        t2 = time.perf_counter()
        self.log_rollout(rollout, total, parts, stats, {**step_metrics, **mismatch}, t1 - t0, t2 - t1)

    def advantages(self, rollout: RolloutBatch, total: torch.Tensor, ref_logp: torch.Tensor | None) -> torch.Tensor:
        """``[N]`` group-relative advantages of the rewards; with ``kl_in_reward`` each reward first
        loses ``beta`` x its sequence's summed KL to the reference (the rollout policy's)."""
        reward = total
        if self.kl_in_reward:
            kl = kl_penalty(rollout.logprobs, ref_logp, self.kl_estimator) * rollout.completion_mask
            reward = total - self.beta * kl.sum(-1)
        return ADVANTAGE_ESTIMATORS[self.advantage_estimator](reward, self.num_generations)

    def loss_mask(self, rollout: RolloutBatch, loss_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C]`` tokens that carry loss: the completions, minus truncated ones under overlong
        filtering and minus rows outside ``loss_rows`` (groups that only fill a batch)."""
        mask = rollout.completion_mask.clone()
        if self.overlong_filtering:
            mask[rollout.truncated] = 0
        if loss_rows is not None:
            mask[~loss_rows] = 0
        return mask

    def update(self, rollout: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               advantages: torch.Tensor, loss_mask: torch.Tensor, loss_rows: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``num_iterations`` passes of ``mini_batches`` optimizer steps over the rollout
        (``loss_rows``: the real rows, see :meth:`step_normalizers`)."""
        def normalizers(lo: int, hi: int):
            return self.step_normalizers(loss_mask[lo:hi], None if loss_rows is None else loss_rows[lo:hi])

        def micro(rows: list[int], chunk: RolloutBatch, norms) -> tuple[torch.Tensor, dict]:
            extra = {} if weights is None else {"weights": weights[rows]}
            # rows are a contiguous range: the slice is a view the reused log-probs are written into
            old = old_logp[rows[0]: rows[-1] + 1] if self.reuse_training_logprobs else old_logp[rows]
            return self.micro_loss(chunk, old, None if ref_logp is None else ref_logp[rows],
                                   advantages[rows], loss_mask[rows], *norms, reuse=self.reuse_training_logprobs,
                                   **extra)

        metrics = StepMetrics(shares=("pg_loss",), mins=("ratio_min",), maxs=("ratio_max",))
        stepped = [(self.optimizers(), self.lr_schedulers(), self.optim.grad_clip, "")]
        return self.optimize(rollout, self.num_iterations, micro, normalizers, stepped, metrics,
                             loss_tokens=loss_mask.sum(-1))

    # -- logging ----------------------------------------------------------------------
    def log_rollout(self, rollout: RolloutBatch, total: torch.Tensor, parts: dict, stats: dict, metrics: dict,
                    gen_time: float, train_time: float) -> None:
        values = self.rollout_metrics(rollout, total, parts, gen_time, train_time)
        values["zero_std_groups"] = stats["zero_std_groups"]
        if self.dynamic_sampling:
            values.update({"dynamic_sampling/drop_rate": torch.tensor(float(stats["drop_rate"])),
                           "dynamic_sampling/surplus_groups": torch.tensor(float(stats["surplus_groups"])),
                           "dynamic_sampling/rounds": torch.tensor(float(stats["rounds"])),
                           "dynamic_sampling/filled_groups": torch.tensor(float(stats["filled_groups"]))})
        for k, v in metrics.items():
            top = (k in ("kl", "entropy", "pg_loss", "grad_norm", "grad_clipped", "skipped_steps")
                   or k.startswith("mismatch/"))
            values[k if top else f"policy/{k}"] = v
        self.log_train(values, len(rollout))


def preset(name: str, doc: str, **defaults) -> type[PolicyGradient]:
    """A subclass of :class:`PolicyGradient` that only changes defaults: its signature shows them,
    so configs and ``--print_config`` see the preset's values; anything can still be overridden."""
    params = inspect.signature(PolicyGradient.__init__, eval_str=True).parameters
    unknown = set(defaults) - set(params)
    if unknown:
        raise TypeError(f"preset {name}: unknown settings {sorted(unknown)}")

    def __init__(self, *args, **kwargs):
        PolicyGradient.__init__(self, *args, **{**defaults, **kwargs})

    __init__.__signature__ = inspect.Signature(
        [p.replace(default=defaults[k]) if k in defaults else p for k, p in params.items()])
    __init__.__doc__ = PolicyGradient.__init__.__doc__
    return type(name, (PolicyGradient,), {"__init__": __init__, "__doc__": doc + "\n\n" + PolicyGradient.__doc__,
                                          "__module__": __name__})
