"""PPO for language models (RLHF): actor, critic, frozen reference and a score, with GAE and a
KL penalty in the reward, written with Lightning's manual optimization and two optimizers."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from lit_align.algorithms.online import OnlineRLModule, all_reduce
from lit_align.algorithms.optim import OptimSpec, build_optimizer
from lit_align.losses import gae, kl_penalty, kl_shaped_rewards, masked_whiten, policy_loss, value_loss
from lit_align.models import CausalLMSpec, LoraSpec, build_reward_model, disable_dropout, token_scores
from lit_align.rewards import RewardSpec
from lit_align.rollout import EngineSpec, RolloutBatch, SamplingParams, completion_logprobs


@dataclass
class AdaptiveKL:
    """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2): after each rollout,
    ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon`` with ``KL`` the mean summed
    KL per sequence and ``n`` the rollout's sequences (over all ranks)."""

    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon < 1:
            raise ValueError(f"adaptive_kl: need target > 0 and horizon >= 1, got {self.target}, {self.horizon}")

    def update(self, beta: float, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return beta * (1.0 + error * n / self.horizon)


def completion_values(critic: torch.nn.Module, rollout: RolloutBatch) -> torch.Tensor:
    """``[N, C]`` value of the state before each completion token (the critic's head at the
    position whose logits predict that token), 0 off the completion mask."""
    values = token_scores(critic, rollout.input_ids, rollout.attention_mask)
    p = rollout.prompt_ids.shape[1]
    return values[:, p - 1: -1].float() * rollout.completion_mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 for a perfect critic, 0 for a constant one."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    return 1.0 - var(returns - values) / var(returns).clamp(min=1e-8)


class PPO(OnlineRLModule):
    """PPO with a learned critic (Schulman et al. 2017; RLHF as in Ziegler et al. 2019 and
    Ouyang et al. 2022; implementation details after Huang et al. 2024, "The N+ implementation
    details of RLHF with PPO").

    Each training step samples completions for a batch of prompts (``PromptDataModule``),
    scores them with the rewards (rules or a trained reward model), builds per-token rewards
    (``-beta * KL`` on every response token plus the score on the last one, see
    :func:`~lit_align.losses.kl_shaped_rewards`), computes advantages with
    :func:`~lit_align.losses.gae` against the critic's values, whitens them over valid tokens
    and runs ``ppo_epochs`` passes over ``mini_batches``, each an actor step
    (:func:`~lit_align.losses.policy_loss`, token level) and a critic step
    (:func:`~lit_align.losses.value_loss`) with their own optimizers, schedules and clipping.
    ``trainer.max_steps`` counts optimizer steps of both (two per mini-batch).

    Under data parallelism each rank whitens its advantages over its own rollout's valid tokens
    (the mean and variance are not all-reduced, as in TRL), so ranks use different statistics.

    Args:
        model: the actor (usually an SFT checkpoint's HF export).
        optim: the actor's optimizer, schedule and gradient clipping.
        critic_optim: the critic's (default: ``optim``).
        value_model: the critic's initialisation: a reward model export (its head included) or
            any causal LM (a new scalar head); default the actor's weights. It must use the
            actor's tokenizer.
        rewards: the score (:class:`~lit_align.rewards.RewardSpec` list, summed with weights).
        sampling: rollout sampling (``max_new_tokens``, temperature, top-p/top-k).
        num_generations: completions per prompt.
        beta: initial KL coefficient; 0 builds no reference.
        kl_estimator: ``k1`` (the usual RLHF choice) or ``k3`` for the per-token KL, or ``k2``.
        adaptive_kl: adapt ``beta`` towards a target KL (:class:`AdaptiveKL`); ``None``: fixed.
        missing_eos_penalty: subtracted from the score of completions with no EOS.
        gamma, lam: GAE discount and lambda.
        whiten_advantages: normalise advantages to zero mean, unit variance over valid tokens
            (the rank's own rollout rows; no all-reduce under data parallelism).
        clip_range: policy ratio clip epsilon.
        clip_range_value: value clip (``None``: unclipped value loss).
        vf_coef: value loss weight.
        entropy_coef: entropy bonus weight (0: none).
        ppo_epochs: passes over each rollout batch.
        mini_batches: optimizer steps per pass (of each optimizer), each on an equal share of the
            rollout; at most the rows a rank samples per step (prompts per batch x
            ``num_generations``), checked when fitting starts.
        forward_batch_size: rows per forward/backward.
        reference, lora, eval_max_new_tokens, num_logged_samples, engine: as in :class:`OnlineRLModule`.
    """

    def __init__(self, model: CausalLMSpec, optim: OptimSpec | None = None, critic_optim: OptimSpec | None = None,
                 value_model: CausalLMSpec | None = None, rewards: list[RewardSpec] | None = None,
                 sampling: SamplingParams | None = None, num_generations: int = 1, beta: float = 0.05,
                 kl_estimator: str = "k1", adaptive_kl: AdaptiveKL | None = None,
                 missing_eos_penalty: float | None = None, gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, clip_range: float = 0.2, clip_range_value: float | None = 0.2,
                 vf_coef: float = 0.1, entropy_coef: float = 0.0, ppo_epochs: int = 4, mini_batches: int = 1,
                 forward_batch_size: int = 32, reference: CausalLMSpec | None = None, lora: LoraSpec | None = None,
                 eval_max_new_tokens: int = 32, num_logged_samples: int = 4, engine: str | EngineSpec = "hf"):
        super().__init__(model, optim, rewards, sampling, num_generations, beta, kl_estimator, reference,
                         forward_batch_size, lora, eval_max_new_tokens, num_logged_samples, engine=engine)
        self.check_settings([
            (not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0, f"gamma / lam: must be in [0, 1], got {gamma}, {lam}"),
            (not 0.0 < clip_range < 1.0, f"clip_range: must be in (0, 1), got {clip_range}"),
            (clip_range_value is not None and clip_range_value <= 0, f"clip_range_value: must be > 0 or null, got {clip_range_value}"),
            (vf_coef <= 0, f"vf_coef: must be > 0, got {vf_coef}"),
            (entropy_coef < 0, f"entropy_coef: must be >= 0, got {entropy_coef}"),
            (ppo_epochs < 1 or mini_batches < 1, "ppo_epochs and mini_batches must be >= 1"),
            (missing_eos_penalty is not None and missing_eos_penalty < 0, f"missing_eos_penalty: must be >= 0, got {missing_eos_penalty}"),
            (adaptive_kl is not None and beta == 0, "adaptive_kl: needs beta > 0 (a reference to measure KL against)"),
        ])
        self.save_hyperparameters()
        self.critic_optim = critic_optim or self.optim
        self.value_spec = value_model or model
        self.critic = None
        self.adaptive_kl = adaptive_kl
        # the current KL coefficient: adapted during training, saved and restored with checkpoints
        self.register_buffer("kl_coef", torch.tensor(float(beta), dtype=torch.float64))

    def _apply(self, fn, *args, **kwargs):
        # moves follow the module, but the coefficient stays float64 when precision plugins cast
        # the weights (bf16 would round away the adaptive controller's small updates)
        kl_coef = self.kl_coef
        super()._apply(fn, *args, **kwargs)
        self.kl_coef = kl_coef.to(self.kl_coef.device)
        return self

    # -- models ---------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.critic is None:
            self.critic = self.shard(disable_dropout(build_reward_model(self.value_spec, self.tokenizer).train()))

    def configure_optimizers(self):
        # two optimizers: the trainer counts both; each steps once per mini-batch
        steps = int(self.trainer.estimated_stepping_batches)
        steps = steps // 2 if self.trainer.max_steps not in (None, -1) else \
            steps * self.hparams.ppo_epochs * self.hparams.mini_batches
        actor = build_optimizer(self.optim, self.model.parameters(), max(steps, 1))
        critic = build_optimizer(self.critic_optim, self.critic.parameters(), max(steps, 1))
        # distinct names: LearningRateMonitor logs two schedulers of the same name under one key
        actor["lr_scheduler"]["name"], critic["lr_scheduler"]["name"] = "lr/actor", "lr/critic"
        return [actor, critic]

    @torch.no_grad()
    def rollout_values(self, rollout: RolloutBatch) -> torch.Tensor:
        """Critic values ``[N, C]`` of the rollout, in the training layout."""
        out = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
        was_training = self.critic.training
        self.critic.eval()
        for s in range(0, len(rollout), self.forward_batch_size):
            chunk = rollout.select(list(range(s, min(s + self.forward_batch_size, len(rollout))))).trimmed()
            out[s: s + len(chunk), : chunk.completion_ids.shape[1]] = completion_values(self.critic, chunk)
        self.critic.train(was_training)
        return out

    # -- the rollout's targets ------------------------------------------------------------
    def targets(self, rollout: RolloutBatch, scores: torch.Tensor, ref_logp: torch.Tensor | None,
                values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token rewards, advantages and returns of a rollout.

        ``scores`` ``[N]`` (after the missing-EOS penalty) lands on each completion's last
        token; ``-kl_coef * KL(rollout policy || reference)`` on every completion token."""
        mask = rollout.completion_mask
        if ref_logp is not None:
            kl = kl_penalty(rollout.logprobs, ref_logp, self.kl_estimator) * mask
        else:
            kl = torch.zeros_like(rollout.logprobs)
        rewards, non_score = kl_shaped_rewards(scores, kl, mask, float(self.kl_coef))
        advantages, returns = gae(rewards, values, mask, self.hparams.gamma, self.hparams.lam)
        if self.hparams.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {"rewards": rewards, "non_score": non_score, "kl": kl, "advantages": advantages, "returns": returns}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        t0 = time.perf_counter()
        rollout, total, parts = self.sample(batch)
        t1 = time.perf_counter()
        scores = total.clone()
        if h.missing_eos_penalty:
            scores = scores - h.missing_eos_penalty * rollout.truncated.float()
        ref_logp = self.reference_logprobs(rollout) if self.beta > 0 else None
        values = self.rollout_values(rollout)
        t = self.targets(rollout, scores, ref_logp, values)
        metrics = self.update(rollout, values, t["advantages"], t["returns"])
        mask = rollout.completion_mask.float()
        kl_per_seq = t["kl"].sum(-1)
        stats = self.rollout_metrics(rollout, total, parts, t1 - t0, time.perf_counter() - t1)
        stats.update({
            "score": scores.mean(), "non_score_reward": t["non_score"].sum(-1).mean(), "kl": kl_per_seq.mean(),
            "kl_coef": self.kl_coef.float(), "values/mean": (values * mask).sum() / mask.sum().clamp(min=1),
            "explained_variance": explained_variance(values, t["returns"], mask),
        })
        stats.update(metrics)
        self.log_train(stats, len(rollout))
        if self.adaptive_kl is not None:
            n = int(all_reduce(torch.tensor(len(rollout), device=self.device)))
            mean_kl = float(all_reduce(kl_per_seq.sum())) / max(n, 1)
            self.kl_coef.fill_(self.adaptive_kl.update(float(self.kl_coef), mean_kl, n))

    def micro_losses(self, rollout: RolloutBatch, old_logp: torch.Tensor, old_values: torch.Tensor,
                     advantages: torch.Tensor, returns: torch.Tensor, num_tokens: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Actor and critic losses of one micro-batch as its share of the optimizer step
        (token means over the step's ``num_tokens`` valid tokens, all ranks)."""
        h = self.hparams
        c = rollout.completion_ids.shape[1]
        mask = rollout.completion_mask
        old_logp, old_values, advantages, returns = (x[:, :c] for x in (old_logp, old_values, advantages, returns))
        logp, entropy = completion_logprobs(self.model, rollout, self.sampling.temperature, with_entropy=True,
                                            entropy_grad=h.entropy_coef > 0)
        pg_loss, pg = policy_loss(logp, old_logp, advantages, mask, h.clip_range, h.clip_range, level="token",
                                  agg_mode="token-mean", num_tokens=num_tokens)
        ent = (entropy * mask).sum() / num_tokens
        actor_loss = pg_loss - h.entropy_coef * ent
        values = completion_values(self.critic, rollout)
        vf_loss, vf = value_loss(values, old_values, returns, mask, h.clip_range_value)
        share = mask.sum() / num_tokens  # value_loss is a mean over this micro-batch's tokens
        critic_loss = h.vf_coef * vf_loss * share
        metrics = {"policy/pg_loss": pg_loss.detach(), "policy/clip_frac": pg["clip_frac_low"] + pg["clip_frac_high"],
                   "policy/approx_kl": pg["approx_kl"], "policy/ratio_mean": pg["ratio_mean"],
                   "entropy": ent.detach(), "value/loss": (vf_loss * share).detach(), "value/clip_frac": vf["clip_frac"]}
        return actor_loss, critic_loss, metrics

    def update(self, rollout: RolloutBatch, old_values: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of ``mini_batches`` steps of both optimizers."""
        h = self.hparams
        (actor_opt, critic_opt), (actor_sched, critic_sched) = self.optimizers(), self.lr_schedulers()
        world = self.trainer.world_size if self.trainer is not None else 1
        n = len(rollout)
        self.check_mini_batches(n)
        bounds = [round(i * n / h.mini_batches) for i in range(h.mini_batches + 1)]
        sums, count = defaultdict(float), 0
        for _ in range(h.ppo_epochs):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                num_tokens = all_reduce(rollout.completion_mask[lo:hi].sum().float()).clamp(min=1)
                actor_opt.zero_grad()
                critic_opt.zero_grad()
                for s in range(lo, hi, self.forward_batch_size):
                    rows = list(range(s, min(s + self.forward_batch_size, hi)))
                    micro = rollout.select(rows).trimmed()
                    actor_loss, critic_loss, metrics = self.micro_losses(
                        micro, rollout.logprobs[rows], old_values[rows], advantages[rows], returns[rows], num_tokens)
                    # one backward for both (disjoint graphs: each loss reaches only its own model),
                    # since data parallelism expects one per forward; scaled back to the global sum
                    # because it averages gradients over ranks
                    self.manual_backward((actor_loss + critic_loss) * world)
                    count += 1
                    for k, v in metrics.items():
                        sums[k] += float(v)
                for opt, sched, spec in ((actor_opt, actor_sched, self.optim), (critic_opt, critic_sched, self.critic_optim)):
                    if spec.grad_clip is not None:
                        self.clip_gradients(opt, gradient_clip_val=spec.grad_clip, gradient_clip_algorithm="norm")
                    opt.step()
                    sched.step()
        steps = h.ppo_epochs * h.mini_batches
        out = {}
        for k, v in sums.items():
            # losses are shares that add up over a step's micro-batches; the rest are micro-batch means
            out[k] = torch.tensor(v * world / steps if k in ("policy/pg_loss", "value/loss", "entropy") else v / max(count, 1))
        return out
