"""PPO for language models (RLHF): actor, critic, frozen reference and a score, with GAE and a
KL penalty in the reward, written with Lightning's manual optimization and two optimizers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lit_align.algorithms.online import OnlineRLModule, RolloutCorrectionSpec
from lit_align.algorithms.optim import OptimSpec, build_optimizer
from lit_align.algorithms.steps import StepMetrics
from lit_align.distributed import all_reduce
from lit_align.losses import (
    POLICY_LOSSES,
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_penalty,
    kl_shaped_rewards,
    masked_whiten,
    policy_loss,
    value_loss,
)
from lit_align.models import (
    CausalLMSpec,
    LoraSpec,
    build_reward_model,
    disable_dropout,
    load_reward_model,
    token_scores,
)
from lit_align.models.causal_lm import enable_gradient_checkpointing
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
        """The next coefficient (:func:`~lit_align.losses.adaptive_kl_coef`)."""
        return adaptive_kl_coef(beta, kl, n, self.target, self.horizon)


def completion_values(critic: torch.nn.Module, rollout: RolloutBatch) -> torch.Tensor:
    """``[N, C]`` value of the state before each completion token (the critic's head at the
    position whose logits predict that token), 0 off the completion mask."""
    values = token_scores(critic, rollout.input_ids, rollout.attention_mask)
    p = rollout.prompt_ids.shape[1]
    return values[:, p - 1: -1].float() * rollout.completion_mask


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

    Under data parallelism the advantages are whitened with the mean and variance of every rank's
    valid tokens (all-reduced; verl whitens its whole batch in one place, TRL each rank's own), so a
    step on 2 ranks equals one process holding both ranks' rollouts.

    Args:
        model: the actor (usually an SFT checkpoint's HF export).
        optim: the actor's optimizer, schedule and gradient clipping.
        critic_optim: the critic's (default: ``optim``).
        value_model: the critic's initialisation: a reward model export (its head included) or
            any causal LM (a new scalar head). Default: the reward model of a ``reward_model``
            reward when one is configured (InstructGPT, Ouyang et al. 2022, sec. 3.5), else the
            actor's weights. It must use the actor's tokenizer. Gradient checkpointing follows
            its own ``gradient_checkpointing``, or the actor's for a critic loaded from the
            reward model.
        rewards: the score (:class:`~lit_align.rewards.RewardSpec` list, summed with weights).
        sampling: rollout sampling (``max_new_tokens``, temperature, top-p/top-k).
        num_generations: completions per prompt.
        beta: initial KL coefficient; 0 builds no reference.
        kl_estimator: ``k1`` (the usual RLHF choice) or ``k3`` for the per-token KL, or ``k2``.
        adaptive_kl: adapt ``beta`` towards a target KL (:class:`AdaptiveKL`); ``None``: fixed.
        missing_eos_penalty: subtracted from the score of completions with no EOS.
        gamma, lam: GAE discount and lambda.
        whiten_advantages: normalise advantages to zero mean, unit variance over the valid tokens
            of the rollouts of every rank.
        clip_range: policy ratio clip epsilon.
        clip_range_value: value clip (``None``: unclipped value loss).
        vf_coef: value loss weight.
        entropy_coef: entropy bonus weight (0: none).
        ppo_epochs: passes over each rollout batch.
        mini_batches: optimizer steps per pass (of each optimizer), each on an equal share of the
            rollout; at most the rows a rank samples per step (prompts per batch x
            ``num_generations``), checked when fitting starts.
        forward_batch_size: rows per forward/backward.
        reference, lora, eval_max_new_tokens, num_logged_samples, engine, eval_reward_threshold: as in
            :class:`OnlineRLModule`.
        policy_loss: the actor's per-token surrogate, a name in :data:`~lit_align.losses.POLICY_LOSSES`.
        rollout_correction: as in :class:`~lit_align.algorithms.policy_gradient.PolicyGradient`.

    ``beta`` is the configured coefficient (a KL term exists when it is > 0); the coefficient in
    use is the buffer :attr:`kl_coef`, which the adaptive controller moves and checkpoints keep.
    """

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, critic_optim: OptimSpec | None = None,
                 value_model: CausalLMSpec | None = None, rewards: list[RewardSpec] | None = None,
                 sampling: SamplingParams | None = None, num_generations: int = 1, beta: float = 0.05,
                 kl_estimator: str = "k1", adaptive_kl: AdaptiveKL | None = None,
                 missing_eos_penalty: float | None = None, gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, clip_range: float = 0.2, clip_range_value: float | None = 0.2,
                 vf_coef: float = 0.1, entropy_coef: float = 0.0, ppo_epochs: int = 4, mini_batches: int = 1,
                 forward_batch_size: int = 32, reference: CausalLMSpec | None = None, lora: LoraSpec | None = None,
                 eval_max_new_tokens: int = 32, num_logged_samples: int = 4, engine: EngineSpec | str = "hf",
                 policy_loss: str = "ppo_clip", rollout_correction: RolloutCorrectionSpec | None = None,
                 eval_reward_threshold: float | None = None):
        super().__init__(model=model, optim=optim, rewards=rewards, sampling=sampling, num_generations=num_generations,
                         beta=beta, kl_estimator=kl_estimator, reference=reference,
                         forward_batch_size=forward_batch_size, lora=lora, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, engine=engine, rollout_correction=rollout_correction,
                         eval_reward_threshold=eval_reward_threshold)
        self.check_settings([
            (not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0, f"gamma / lam: must be in [0, 1], got {gamma}, {lam}"),
            (not 0.0 < clip_range < 1.0, f"clip_range: must be in (0, 1), got {clip_range}"),
            (clip_range_value is not None and clip_range_value <= 0,
             f"clip_range_value: must be > 0 or null, got {clip_range_value}"),
            (vf_coef <= 0, f"vf_coef: must be > 0, got {vf_coef}"),
            (entropy_coef < 0, f"entropy_coef: must be >= 0, got {entropy_coef}"),
            (ppo_epochs < 1 or mini_batches < 1, "ppo_epochs and mini_batches must be >= 1"),
            (missing_eos_penalty is not None and missing_eos_penalty < 0,
             f"missing_eos_penalty: must be >= 0, got {missing_eos_penalty}"),
            (adaptive_kl is not None and beta == 0, "adaptive_kl: needs beta > 0 (a reference to measure KL against)"),
            (policy_loss not in POLICY_LOSSES, f"policy_loss: {policy_loss!r} is not one of {tuple(POLICY_LOSSES)}"),
        ])
        self.save_hyperparameters()
        self.missing_eos_penalty, self.whiten_advantages = missing_eos_penalty, whiten_advantages
        self.gamma, self.lam, self.vf_coef, self.entropy_coef = gamma, lam, vf_coef, entropy_coef
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.ppo_epochs, self.mini_batches, self.policy_loss = ppo_epochs, mini_batches, policy_loss
        self.critic_optim = critic_optim or self.optim
        rm_paths = [spec.args.get("path") for spec in self.rewards.specs if spec.name == "reward_model"]
        # the critic starts from the score's own reward model unless told otherwise (InstructGPT)
        self.value_spec = value_model or (None if rm_paths else model)
        self.value_from = None if value_model is not None or not rm_paths else str(rm_paths[0])
        self.critic = None
        self.adaptive_kl = adaptive_kl
        # the current KL coefficient: adapted during training, saved and restored with checkpoints
        self.register_buffer("kl_coef", torch.tensor(float(beta), dtype=torch.float64))

    resume_invariants = ("model", "lora", "reference", "value_model")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.adaptive_kl is None and "kl_coef" in checkpoint.get("state_dict", {}):
            # a fixed coefficient is the configured beta; only the adaptive controller's is state
            checkpoint["state_dict"]["kl_coef"] = self.kl_coef.detach().clone().cpu()

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
            self.critic = self.shard(disable_dropout(self.build_critic().train()))

    def build_critic(self) -> torch.nn.Module:
        """The critic: ``value_model``, or the configured reward model (head included), which must
        share the actor's vocabulary."""
        if self.value_from is None:
            return build_reward_model(self.value_spec, self.tokenizer)
        critic, tokenizer = load_reward_model(self.value_from)
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"PPO.value_model: the critic would start from the reward model {self.value_from}, whose "
                             "tokenizer differs from the policy's; set value_model (e.g. the policy) explicitly")
        if self.spec.gradient_checkpointing:  # an export carries no spec of its own: the actor's setting
            enable_gradient_checkpointing(critic)
        return critic.to(next(self.model.parameters()).dtype)

    def configure_optimizers(self):
        # two optimizers: the trainer counts both; each steps once per mini-batch
        steps = int(self.trainer.estimated_stepping_batches)
        steps = steps // 2 if self.trainer.max_steps not in (None, -1) else \
            steps * self.ppo_epochs * self.mini_batches
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
        for lo, hi in self.training_segments(len(rollout)):
            for rows, chunk in rollout.chunks(self.forward_batch_size, lo, hi):
                out[rows[0]: rows[-1] + 1, : chunk.completion_ids.shape[1]] = completion_values(self.critic, chunk)
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
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            # statistics of the whole step's batch: per-rank ones would change the update with the layout
            advantages = masked_whiten(advantages, mask, reduce=all_reduce)
        return {"rewards": rewards, "non_score": non_score, "kl": kl, "advantages": advantages, "returns": returns}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout, total, parts = self.sample(batch)
        t1 = time.perf_counter()
        scores = total.clone()
        if self.missing_eos_penalty:
            scores = scores - self.missing_eos_penalty * rollout.truncated.float()
        ref_logp = self.reference_logprobs(rollout) if self.reference is not None else None
        values = self.rollout_values(rollout)
        t = self.targets(rollout, scores, ref_logp, values)
        weights, mismatch = self.correction(rollout)
        metrics = {**self.update(rollout, values, t["advantages"], t["returns"], weights), **mismatch}
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
                     advantages: torch.Tensor, returns: torch.Tensor, num_tokens: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Actor and critic losses of one micro-batch as its share of the optimizer step
        (token means over the step's ``num_tokens`` valid tokens, all ranks)."""
        c = rollout.completion_ids.shape[1]
        mask = rollout.completion_mask
        old_logp, old_values, advantages, returns = (x[:, :c] for x in (old_logp, old_values, advantages, returns))
        logp, entropy = completion_logprobs(self.model, rollout, self.sampling.temperature, with_entropy=True,
                                            entropy_grad=self.entropy_coef > 0)
        weights = weights[:, :c] if weights is not None else None
        pg_loss, pg = policy_loss(logp, old_logp, advantages, mask, self.clip_range, self.clip_range, level="token",
                                  agg_mode="token-mean", num_tokens=num_tokens, loss_fn=self.policy_loss,
                                  weights=weights)
        ent = (entropy * mask).sum() / num_tokens
        actor_loss = pg_loss - self.entropy_coef * ent
        values = completion_values(self.critic, rollout)
        vf_loss, vf = value_loss(values, old_values, returns, mask, self.clip_range_value)
        share = mask.sum() / num_tokens  # value_loss is a mean over this micro-batch's tokens
        critic_loss = self.vf_coef * vf_loss * share
        metrics = {"policy/pg_loss": pg_loss.detach(), "policy/clip_frac": pg["clip_frac_low"] + pg["clip_frac_high"],
                   "policy/approx_kl": pg["approx_kl"], "policy/ratio_mean": pg["ratio_mean"],
                   "entropy": ent.detach(), "value/loss": (vf_loss * share).detach(),
                   "value/clip_frac": vf["clip_frac"]}
        return actor_loss, critic_loss, metrics

    def update(self, rollout: RolloutBatch, old_values: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of ``mini_batches`` steps of both optimizers."""
        def normalizers(lo: int, hi: int) -> torch.Tensor:
            return all_reduce(rollout.completion_mask[lo:hi].sum().float()).clamp(min=1)

        def micro(rows: list[int], chunk: RolloutBatch, num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
            extra = {} if weights is None else {"weights": weights[rows]}
            actor_loss, critic_loss, metrics = self.micro_losses(
                chunk, rollout.logprobs[rows], old_values[rows], advantages[rows], returns[rows], num_tokens, **extra)
            # disjoint graphs: each loss reaches only its own model, so one backward serves both
            return actor_loss + critic_loss, metrics

        (actor_opt, critic_opt), (actor_sched, critic_sched) = self.optimizers(), self.lr_schedulers()
        stepped = [(actor_opt, actor_sched, self.optim.grad_clip, "/actor"),
                   (critic_opt, critic_sched, self.critic_optim.grad_clip, "/critic")]
        metrics = StepMetrics(shares=("policy/pg_loss", "value/loss", "entropy"))
        return self.optimize(rollout, self.ppo_epochs, micro, normalizers, stepped, metrics)
