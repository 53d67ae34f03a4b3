"""Group-relative policy-gradient RL (GRPO, GSPO, DAPO) as one module with independent settings."""

from __future__ import annotations

import inspect
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from lit_align.algorithms.online import OnlineRLModule, all_reduce
from lit_align.algorithms.optim import OptimSpec, build_optimizer
from lit_align.losses import ADVANTAGE_SCALES, AGG_MODES, IS_LEVELS, aggregate_loss, group_advantages, kl_penalty, policy_loss
from lit_align.models import CausalLMSpec, LoraSpec
from lit_align.rewards import RewardSpec
from lit_align.rollout import EngineSpec, RolloutBatch, SamplingParams, chunked_logprobs, completion_logprobs


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
        advantage_scale: ``group`` (divide by the group's reward std, GRPO) or ``none`` (Dr. GRPO,
            Liu et al. 2025).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``
            (Clip-Higher when ``clip_high > clip_low``, DAPO).
        importance_sampling_level: ``token`` (PPO/GRPO), ``sequence`` (GSPO, Zheng et al. 2025)
            or ``sequence-token`` (GSPO-token).
        loss_agg_mode: one of :data:`~lit_align.losses.AGG_MODES`, normalised over the whole
            optimizer step (every micro-batch and data-parallel rank).
        beta: KL coefficient; 0 builds no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020), per token; ``None``: ``k3``. Only
            with ``beta > 0``.
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
            ``None``: :data:`DEFAULT_GENERATION_ROUNDS`. Only with ``dynamic_sampling``.
        overlong_filtering: truncated completions (no EOS within ``max_new_tokens``) carry no loss
            (DAPO, sec. 3.4); they still count in their group's advantages.
        overlong_buffer: soft overlong punishment: add :func:`~lit_align.losses.overlong_penalty`
            with ``cache_len = overlong_buffer`` and ``max_len = sampling.max_new_tokens`` to the
            reward (0: off).
        overlong_penalty_factor: the punishment's weight in the reward; ``None``: 1. Only with
            ``overlong_buffer > 0``.
        engine: the rollout engine, a registered name or ``"package.module:Class"`` (see
            :class:`~lit_align.algorithms.online.OnlineRLModule`).
        lora, eval_max_new_tokens, num_logged_samples: as in :class:`CausalLMModule`.

    Invalid combinations fail here, at construction.
    """

    def __init__(self, model: CausalLMSpec, optim: OptimSpec | None = None, rewards: list[RewardSpec] | None = None,
                 num_generations: int = 8, sampling: SamplingParams | None = None, advantage_scale: str = "group",
                 clip_low: float = 0.2, clip_high: float = 0.2, importance_sampling_level: str = "token",
                 loss_agg_mode: str = "token-mean", beta: float = 0.0, kl_estimator: str | None = None,
                 kl_in_reward: bool = False, reference: CausalLMSpec | None = None, num_iterations: int = 1,
                 mini_batches: int = 1, forward_batch_size: int = 32, dynamic_sampling: bool = False,
                 max_generation_rounds: int | None = None, overlong_filtering: bool = False, overlong_buffer: int = 0,
                 overlong_penalty_factor: float | None = None, engine: str | EngineSpec = "hf", lora: LoraSpec | None = None,
                 eval_max_new_tokens: int = 32, num_logged_samples: int = 4):
        sampling = sampling or SamplingParams(temperature=1.0)
        # settings that would be silently ignored fail first, before anything is built from them
        self.check_settings([
            (overlong_buffer < 0 or overlong_buffer >= sampling.max_new_tokens, f"overlong_buffer: need 0 <= overlong_buffer < sampling.max_new_tokens ({sampling.max_new_tokens}), got {overlong_buffer}"),
            (overlong_penalty_factor is not None and overlong_buffer == 0, f"overlong_penalty_factor: set to {overlong_penalty_factor} but overlong_buffer is 0 (no soft overlong punishment); set overlong_buffer > 0 or drop it"),
            (overlong_penalty_factor is not None and overlong_penalty_factor < 0, f"overlong_penalty_factor: must be >= 0, got {overlong_penalty_factor}"),
            (kl_estimator is not None and beta == 0, f"kl_estimator: set to {kl_estimator!r} but beta is 0 (no KL term); set beta > 0 or drop it"),
            (max_generation_rounds is not None and not dynamic_sampling, f"max_generation_rounds: set to {max_generation_rounds} but dynamic_sampling is off; turn it on or drop it"),
            (max_generation_rounds is not None and max_generation_rounds < 1, f"max_generation_rounds: must be >= 1, got {max_generation_rounds}"),
        ])
        extra = [RewardSpec("overlong", weight=1.0 if overlong_penalty_factor is None else overlong_penalty_factor,
                            args={"max_len": sampling.max_new_tokens, "cache_len": overlong_buffer})] \
            if overlong_buffer > 0 else []
        super().__init__(model, optim, rewards, sampling, num_generations, beta, kl_estimator, reference,
                         forward_batch_size, lora, eval_max_new_tokens, num_logged_samples, extra_rewards=extra,
                         engine=engine)
        self.max_generation_rounds = DEFAULT_GENERATION_ROUNDS if max_generation_rounds is None else max_generation_rounds
        self.check_settings([
            (num_generations < 2, f"num_generations: need >= 2 samples per prompt for group advantages, got {num_generations}"),
            (advantage_scale not in ADVANTAGE_SCALES, f"advantage_scale: {advantage_scale!r} is not one of {ADVANTAGE_SCALES}"),
            (clip_low < 0 or clip_high < 0 or clip_low >= 1, f"clip_low / clip_high: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}"),
            (importance_sampling_level not in IS_LEVELS, f"importance_sampling_level: {importance_sampling_level!r} is not one of {IS_LEVELS}"),
            (loss_agg_mode not in AGG_MODES, f"loss_agg_mode: {loss_agg_mode!r} is not one of {AGG_MODES}"),
            (kl_in_reward and beta == 0, "kl_in_reward: needs beta > 0"),
            (num_iterations < 1 or mini_batches < 1, "num_iterations and mini_batches must be >= 1"),
        ])
        self.save_hyperparameters()

    def configure_optimizers(self):
        # with max_steps unset the trainer counts batches; each batch takes mu x mini_batches steps
        steps = int(self.trainer.estimated_stepping_batches)
        if self.trainer.max_steps in (None, -1):
            steps *= self.hparams.num_iterations * self.hparams.mini_batches
        return build_optimizer(self.optim, self.model.parameters(), steps)

    def collect(self, batch: dict) -> tuple[RolloutBatch, torch.Tensor, dict, dict]:
        """Sample and score a rollout for ``batch``'s prompts; with dynamic sampling, keep only
        groups whose rewards differ and sample further prompts until the batch is full.

        Returns ``(rollout, total reward [N], each reward [N], stats)``. Under dynamic sampling
        ``stats`` also holds ``loss_rows`` (``[N]`` bool, the rows that carry loss: filled-in groups
        do not), ``drop_rate`` (share of zero-variance groups among all groups generated this
        step), ``surplus_groups`` (groups with varied rewards left out because the batch was
        already full), ``filled_groups`` and ``rounds``; all per rank."""
        g = self.hparams.num_generations
        rollout, total, parts = self.sample(batch)
        zero_std = total.view(-1, g).std(-1) == 0
        stats = {"zero_std_groups": zero_std.float().mean(), "rounds": 1}
        if not self.hparams.dynamic_sampling:
            return rollout, total, parts, stats
        target = rollout.num_groups
        kept = [(rollout, total, parts, ~zero_std)]
        n_varied, n_seen, rounds = int((~zero_std).sum()), target, 1
        dm = self.trainer.datamodule if self.trainer is not None else None
        # every rank samples in every round: generation under sharding is collective
        while int(all_reduce(torch.tensor(n_varied), dist.ReduceOp.MIN)) < target and rounds < self.max_generation_rounds:
            more = dm.extra_prompts(self.global_step, rounds, target)
            more = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in more.items()}
            r, t, p = self.sample(more)
            keep = t.view(-1, g).std(-1) > 0
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
        out.logprobs = chunked_logprobs(self.model, out, self.sampling.temperature, self.forward_batch_size)
        stats.update(rounds=rounds, drop_rate=(n_seen - n_varied) / n_seen, surplus_groups=n_varied - loss_groups,
                     filled_groups=target - loss_groups, loss_rows=loss_rows)
        return out, total, parts, stats

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
                   num_seqs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch as its share of the optimizer step's loss (sums over micro-batches
        and ranks to the step's value). All ``[n, C]`` inputs are cut to ``rollout``'s width."""
        h = self.hparams
        c = rollout.completion_ids.shape[1]
        old_logp, loss_mask = old_logp[:, :c], loss_mask[:, :c]
        logp, entropy = completion_logprobs(self.model, rollout, self.sampling.temperature, with_entropy=True)
        agg = dict(agg_mode=h.loss_agg_mode, max_len=self.sampling.max_new_tokens, num_tokens=num_tokens,
                   num_seqs=num_seqs)
        loss, metrics = policy_loss(logp, old_logp, advantages, loss_mask, h.clip_low, h.clip_high,
                                    level=h.importance_sampling_level, **agg)
        metrics["pg_loss"] = loss.detach()
        mask = loss_mask.float()
        n = mask.sum().clamp(min=1)
        metrics["entropy"] = (entropy * mask).sum() / n
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp[:, :c], self.kl_estimator)
            metrics["kl"] = (kl.detach() * mask).sum() / n
            if not h.kl_in_reward:
                kl_loss = aggregate_loss(kl, loss_mask, h.loss_agg_mode, max_len=agg["max_len"],
                                         num_tokens=num_tokens, num_seqs=num_seqs)
                loss = loss + h.beta * kl_loss
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        t0 = time.perf_counter()
        rollout, total, parts, stats = self.collect(batch)
        t1 = time.perf_counter()
        ref_logp = self.reference_logprobs(rollout) if h.beta > 0 else None
        loss_mask = self.loss_mask(rollout, stats.get("loss_rows"))
        advantages = self.advantages(rollout, total, ref_logp)
        step_metrics = self.update(rollout, rollout.logprobs, ref_logp, advantages, loss_mask, stats.get("loss_rows"))
        t2 = time.perf_counter()
        self.log_rollout(rollout, total, parts, stats, step_metrics, t1 - t0, t2 - t1)

    def advantages(self, rollout: RolloutBatch, total: torch.Tensor, ref_logp: torch.Tensor | None) -> torch.Tensor:
        """``[N]`` group-relative advantages of the rewards; with ``kl_in_reward`` each reward first
        loses ``beta`` x its sequence's summed KL to the reference (the rollout policy's)."""
        h = self.hparams
        reward = total
        if h.kl_in_reward:
            kl = kl_penalty(rollout.logprobs, ref_logp, self.kl_estimator) * rollout.completion_mask
            reward = total - h.beta * kl.sum(-1)
        return group_advantages(reward, h.num_generations, scale=h.advantage_scale)

    def loss_mask(self, rollout: RolloutBatch, loss_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C]`` tokens that carry loss: the completions, minus truncated ones under overlong
        filtering and minus rows outside ``loss_rows`` (groups that only fill a batch)."""
        mask = rollout.completion_mask.clone()
        if self.hparams.overlong_filtering:
            mask[rollout.truncated] = 0
        if loss_rows is not None:
            mask[~loss_rows] = 0
        return mask

    def update(self, rollout: RolloutBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               advantages: torch.Tensor, loss_mask: torch.Tensor, loss_rows: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """``num_iterations`` passes of ``mini_batches`` optimizer steps over the rollout
        (``loss_rows``: the real rows, see :meth:`step_normalizers`)."""
        h = self.hparams
        n = len(rollout)
        self.check_mini_batches(n)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size if self.trainer is not None else 1
        bounds = [round(i * n / h.mini_batches) for i in range(h.mini_batches + 1)]
        sums, mins, maxs, count = defaultdict(float), {}, {}, 0
        for _ in range(h.num_iterations):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                tokens, seqs = self.step_normalizers(loss_mask[lo:hi], None if loss_rows is None else loss_rows[lo:hi])
                optimizer.zero_grad()
                for s in range(lo, hi, h.forward_batch_size):
                    rows = list(range(s, min(s + h.forward_batch_size, hi)))
                    micro = rollout.select(rows).trimmed()
                    loss, metrics = self.micro_loss(micro, old_logp[rows], None if ref_logp is None else ref_logp[rows],
                                                    advantages[rows], loss_mask[rows], tokens, seqs)
                    # data parallelism averages gradients over ranks: scale back to the global sum
                    self.manual_backward(loss * world)
                    count += 1
                    for k, v in metrics.items():
                        if k == "ratio_min":
                            mins[k] = min(mins.get(k, float("inf")), float(v))
                        elif k == "ratio_max":
                            maxs[k] = max(maxs.get(k, float("-inf")), float(v))
                        else:
                            sums[k] += float(v)
                if self.optim.grad_clip is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
        out = {k: torch.tensor(v / max(count, 1)) for k, v in sums.items()}
        out["pg_loss"] = torch.tensor(sums["pg_loss"] * world / max(h.num_iterations * h.mini_batches, 1))
        out.update({k: torch.tensor(v) for k, v in {**mins, **maxs}.items()})
        return out

    # -- logging ----------------------------------------------------------------------
    def log_rollout(self, rollout: RolloutBatch, total: torch.Tensor, parts: dict, stats: dict, metrics: dict,
                    gen_time: float, train_time: float) -> None:
        values = self.rollout_metrics(rollout, total, parts, gen_time, train_time)
        values["zero_std_groups"] = stats["zero_std_groups"]
        if self.hparams.dynamic_sampling:
            values.update({"dynamic_sampling/drop_rate": torch.tensor(float(stats["drop_rate"])),
                           "dynamic_sampling/surplus_groups": torch.tensor(float(stats["surplus_groups"])),
                           "dynamic_sampling/rounds": torch.tensor(float(stats["rounds"])),
                           "dynamic_sampling/filled_groups": torch.tensor(float(stats["filled_groups"]))})
        for k, v in metrics.items():
            values[k if k in ("kl", "entropy", "pg_loss") else f"policy/{k}"] = v
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
