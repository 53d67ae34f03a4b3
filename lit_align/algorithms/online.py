"""What online RL modules (PolicyGradient, PPO) share: rewards, the rollout engine, the frozen
reference, scoring, the optimizer-step loop over a rollout, rollout logging and held-out evaluation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.reference import Reference
from lit_align.algorithms.steps import StepMetrics, mini_batch_bounds
from lit_align.distributed import all_reduce, data_parallel
from lit_align.losses import CORRECTION_LEVELS, CORRECTION_MODES, KL_ESTIMATORS, mismatch_metrics, rollout_correction
from lit_align.models import CausalLMSpec, LoraSpec, build_hf_config, disable_dropout
from lit_align.rewards import Rewards, RewardSpec
from lit_align.rollout import (
    EngineSpec,
    RolloutBatch,
    SamplingParams,
    build_engine,
    chunked_logprobs,
    completion_masks,
)

__all__ = ["DEFAULT_KL_ESTIMATOR", "OnlineRLModule", "all_reduce"]

#: The KL estimator when a KL term is on and none is named (GRPO's k3, Shao et al. 2024, eq. 4).
DEFAULT_KL_ESTIMATOR = "k3"

#: ``(optimizer, scheduler, grad_clip, metric suffix)`` of one model stepped by :meth:`OnlineRLModule.optimize`.
Stepped = tuple[object, object, float | None, str]

#: Consecutive rollouts whose every completion hits ``max_new_tokens`` before a loud warning.
TRUNCATION_WARNING_STEPS = 3
#: Consecutive rollouts that take no optimizer step at all (no token carries loss) before a loud
#: warning, and before the run stops: nothing would ever end it, since ``max_steps`` counts steps.
EMPTY_ROLLOUTS_WARNING, EMPTY_ROLLOUTS_LIMIT = 3, 25


@dataclass
class RolloutCorrectionSpec:
    """Re-weighting of the policy loss for the gap between the sampler and the training forward
    (:func:`~lit_align.losses.rollout_correction`; TIS, Yao et al. 2025; MIS as in verl).

    Args:
        level: ``token``, ``sequence`` (product of the sequence's token ratios) or ``geometric``
            (exp of their mean).
        mode: ``truncate`` (weight min(ratio, threshold)) or ``mask`` (1 if ratio <= threshold, else 0).
        threshold: a finite number > 0 (TIS uses 2).
    """

    level: str = "token"
    mode: str = "truncate"
    threshold: float = 2.0

    def __post_init__(self) -> None:
        if self.level not in CORRECTION_LEVELS:
            raise ValueError(f"rollout_correction.level: {self.level!r} is not one of {CORRECTION_LEVELS}")
        if self.mode not in CORRECTION_MODES:
            raise ValueError(f"rollout_correction.mode: {self.mode!r} is not one of {CORRECTION_MODES}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"rollout_correction.threshold: must be a finite number > 0, got {self.threshold!r}")


class OnlineRLModule(CausalLMModule):
    """Base of modules that learn from their own samples (manual optimization).

    Args:
        model, optim, lora, eval_max_new_tokens, num_logged_samples: as in :class:`CausalLMModule`.
        rewards: reward functions and weights (:class:`~lit_align.rewards.RewardSpec`), summed.
        sampling: temperature, top-p/top-k and ``max_new_tokens`` of the rollouts.
        num_generations: completions per prompt.
        beta: KL coefficient; 0 builds no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020), per token; ``None``: ``k3`` when
            ``beta > 0`` (the resolved value is :attr:`kl_estimator`; ``None`` without a KL term).
        reference: the frozen reference; default the initial policy (with ``lora``: the base
            with adapters disabled).
        forward_batch_size: rows per forward/backward (training and scoring passes).
        engine: the rollout engine: a registered name (``hf``: HF ``generate`` on the training
            model, ``vllm``: a colocated vLLM engine, :data:`~lit_align.rollout.ENGINES`) or an import
            path ``"package.module:Class"`` of a :class:`~lit_align.rollout.RolloutEngine` subclass,
            or ``{name: ..., args: {...}}`` (:class:`~lit_align.rollout.EngineSpec`) with the
            engine's settings; built as ``Class(tokenizer, logprob_batch_size=forward_batch_size, **args)``
            and checked against the policy's config and the sampling settings here.
        eval_reward_threshold: on held-out data without a checker (not a built-in task), a greedy
            completion counts as correct (``val/exact_match``) when the correctness reward, the
            first configured one (as for dynamic sampling), reaches this value; ``None``: 1.0 (full
            marks of a 0/1 reward). Refused on data with a checker, which judges instead.

    Every setting is checked here and kept as an attribute of the same name; ``hparams`` is the
    record of what was given (checkpoints, CLI).
    """

    # held-out generation is the only validation: without it, checkpoints keep the last only
    fallback_monitor = (None, "min")

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None, rewards: list[RewardSpec] | None,
                 sampling: SamplingParams | None, num_generations: int, beta: float, kl_estimator: str | None,
                 reference: CausalLMSpec | None, forward_batch_size: int, lora: LoraSpec | None,
                 eval_max_new_tokens: int, num_logged_samples: int, extra_rewards: list[RewardSpec] = (),
                 engine: EngineSpec | str = "hf", rollout_correction: RolloutCorrectionSpec | None = None,
                 eval_reward_threshold: float | None = None):
        super().__init__(model=model, optim=optim, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora)
        sampling = sampling or SamplingParams(temperature=1.0)
        resolved_kl = (DEFAULT_KL_ESTIMATOR if kl_estimator is None else kl_estimator) if beta > 0 else kl_estimator
        self.check_settings([
            (not rewards, "rewards: give at least one reward (a built-in name or 'package.module:function')"),
            (num_generations < 1, f"num_generations: must be >= 1, got {num_generations}"),
            (sampling.n != 1, "sampling.n: leave it at 1 and set num_generations"),
            (sampling.temperature <= 0, "sampling.temperature: must be > 0 for on-policy sampling"),
            (beta < 0, f"beta: must be >= 0, got {beta}"),
            (resolved_kl is not None and resolved_kl not in KL_ESTIMATORS,
             f"kl_estimator: {resolved_kl!r} is not one of {tuple(KL_ESTIMATORS)}"),
            (beta == 0 and reference is not None, "reference: unused with beta 0 (no KL term); drop it or set beta"),
            (lora is not None and reference is not None,
             "reference: with lora the reference is the base with adapters disabled; drop it"),
            (forward_batch_size < 1, f"forward_batch_size: must be >= 1, got {forward_batch_size}"),
            (eval_reward_threshold is not None and not math.isfinite(eval_reward_threshold),
             f"eval_reward_threshold: must be a finite number, got {eval_reward_threshold}"),
            (lora is not None and lora.dropout > 0, f"lora.dropout: {lora.dropout if lora else 0} would make the "
             "rollout's log-probs differ from the training forward's (the first ratio would not be 1); set it to 0"),
        ])
        self.sampling = sampling
        self.num_generations = num_generations
        self.rewards = Rewards(list(rewards) + list(extra_rewards))
        try:
            self.engine = build_engine(engine, self.tokenizer, logprob_batch_size=forward_batch_size)
            self.engine.check(build_hf_config(model, self.tokenizer), sampling)
        except (ValueError, TypeError) as e:  # TypeError: a class whose constructor does not fit
            raise ValueError(f"{type(self).__name__}.engine: {e}") from e
        # rollout log-probs are scored in the training layout: the first update's ratio is exactly 1
        self.engine.segments = self.training_segments
        self.forward_batch_size = forward_batch_size
        self.rollout_correction = rollout_correction
        self.eval_reward_given = eval_reward_threshold is not None
        self.eval_reward_threshold = 1.0 if eval_reward_threshold is None else float(eval_reward_threshold)
        self._all_truncated = 0
        self._empty_rollouts = 0
        self.beta, self.kl_estimator = beta, resolved_kl
        self.reference = Reference(reference or model, "adapters" if lora is not None else "copy") if beta > 0 else None
        self.automatic_optimization = False
        # completions and tokens generated so far over every rank, the ones dynamic sampling
        # discards included: the generation budget a method spent (saved with checkpoints; int64,
        # which precision plugins leave alone)
        self.register_buffer("generated", torch.zeros(2, dtype=torch.int64))

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen reference copy (``None`` without a KL term or with LoRA)."""
        return self.reference.model if self.reference is not None else None

    def check_settings(self, checks: list[tuple[bool, str]]) -> None:
        """Raise for the first ``(bad, message)`` that holds, naming the class and setting."""
        for bad, message in checks:
            if bad:
                raise ValueError(f"{type(self).__name__}.{message}")

    # -- models ---------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        disable_dropout(self.model)
        if self.reference is not None:
            self.reference.build(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.rewards.setup(self.device)
        # fail before the first rollout when the data module says how many prompts a step takes
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and self.data_checker() is None:
            for i, spec in enumerate(self.rewards.specs):
                if spec.name == "task_check":
                    raise ValueError(f"{type(self).__name__}.rewards[{i}] 'task_check': the data module "
                                     f"{type(dm).__name__} has no checker (only built-in tasks have one); "
                                     "use arith_match or your own reward")
        if dm is not None and self.data_checker() is not None and self.eval_reward_given:
            raise ValueError(f"{type(self).__name__}.eval_reward_threshold: set to {self.eval_reward_threshold} but "
                             f"the data module {type(dm).__name__} has a checker, which judges held-out completions; "
                             "drop it")
        prompts = getattr(getattr(dm, "hparams", None), "micro_batch_size", None)
        if isinstance(prompts, int):
            self.check_mini_batches(prompts * self.num_generations, prompts)

    def check_mini_batches(self, rows: int, prompts: int | None = None) -> None:
        """Raise unless each of the ``mini_batches`` optimizer steps gets at least one of the
        ``rows`` a rank samples per step (an empty mini-batch would step on no gradient)."""
        if rows < self.mini_batches:
            source = f"{prompts} prompts (data.micro_batch_size) x num_generations {self.num_generations}" \
                if prompts is not None else "the rollout's rows"
            raise ValueError(f"{type(self).__name__}.mini_batches: {self.mini_batches} mini-batches per pass need at "
                             f"least {self.mini_batches} rows per rank and step, but a step samples {rows} ({source}); "
                             "lower mini_batches or sample more prompts per step")

    def training_segments(self, n: int) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` mini-batches a rollout of ``n`` rows is trained in."""
        return mini_batch_bounds(n, self.mini_batches)

    def reference_logprobs(self, rollout: RolloutBatch) -> torch.Tensor:
        """``[N, C]`` log-probs of the sampled tokens under the reference, in the training layout."""
        if self.reference is None:
            raise RuntimeError(f"{type(self).__name__}: no reference (beta is 0)")
        with self.reference.policy(self) as ref:
            return chunked_logprobs(ref, rollout, self.sampling.temperature, self.forward_batch_size,
                                    self.training_segments(len(rollout)))

    def correction(self, rollout: RolloutBatch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``(weights [N, C] or None, mismatch metrics)`` of a rollout: the rollout-correction
        weights when it is on, and the sampler / training-forward gap whenever the engine reports
        the sampler's log-probs."""
        if rollout.sampler_logprobs is None:
            if self.rollout_correction is not None:
                raise RuntimeError(f"{type(self).__name__}.rollout_correction: the rollout engine "
                                   f"{type(self.engine).__name__} reports no sampler log-probs to correct with")
            return None, {}
        if self.rollout_correction is None:
            metrics = mismatch_metrics(rollout.logprobs, rollout.sampler_logprobs, rollout.completion_mask)
            metrics["masked_frac"] = torch.zeros(())
            return None, {f"mismatch/{k}": v for k, v in metrics.items()}
        c = self.rollout_correction
        weights, metrics = rollout_correction(rollout.logprobs, rollout.sampler_logprobs, rollout.completion_mask,
                                              c.level, c.mode, c.threshold)
        return weights, {f"mismatch/{k}": v for k, v in metrics.items()}

    # -- rollouts and rewards ---------------------------------------------------------
    def score(self, rollout: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward ``[N]`` and each reward's raw values."""
        lengths = rollout.lengths - (~rollout.truncated).long()  # EOS is not content
        total, parts = self.rewards(rollout.prompts, rollout.completions, rollout.meta,
                                    completion_lengths=lengths.tolist(), truncated=rollout.truncated.tolist(),
                                    max_new_tokens=self.sampling.max_new_tokens,
                                    completion_ids=rollout.completion_ids.tolist(), checker=self.data_checker())
        return total.to(self.device), {k: v.to(self.device) for k, v in parts.items()}

    def judge(self, batch: dict, completions: list[str], completion_ids: torch.Tensor, stage: str) -> list[bool]:
        """Held-out correctness: the data's checker where it has one; otherwise the correctness
        reward (the first configured reward) at least :attr:`eval_reward_threshold`, so that
        ``val/exact_match`` measures what training optimises rather than string equality with
        one reference (its mean is logged as ``<stage>/reward/<label>``)."""
        if self.data_checker() is not None:
            return super().judge(batch, completions, completion_ids, stage)
        mask, truncated = completion_masks(completion_ids, self.stop_ids())
        lengths = mask.sum(-1) - (~truncated).long()  # the stop token is not content
        prompts = batch.get("prompts") or self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        label = self.rewards.names[0]
        values = self.rewards.score_one(label, list(prompts), completions, list(batch["meta"]),
                                        completion_lengths=lengths.tolist(), truncated=truncated.tolist(),
                                        max_new_tokens=self.eval_max_new_tokens,
                                        completion_ids=completion_ids.tolist(), checker=None)
        self.log(f"{stage}/reward/{label}", values.mean().to(self.device), on_step=False, on_epoch=True,
                 batch_size=len(completions))
        return (values >= self.eval_reward_threshold).tolist()

    def data_checker(self) -> Callable[[str, dict, str], bool] | None:
        """The attached data module's ``checker(completion, meta, reference)`` (``None``: no
        trainer, no data module, or data without a checkable answer)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "checker", None)

    def sample(self, prompts: dict) -> tuple[RolloutBatch, torch.Tensor, dict]:
        """``num_generations`` scored completions per prompt: ``(rollout, total [N], each reward)``."""
        sampling = dataclasses.replace(self.sampling, n=self.num_generations, stop_token_ids=self.stop_ids())
        self.engine.update_weights(self.model)
        rollout = self.engine.generate(self.model, prompts, sampling)
        counts = torch.stack([torch.tensor(len(rollout)), rollout.lengths.sum().cpu().long()]).to(self.generated.device)
        self.generated += all_reduce(counts)  # every rank samples as often: collective in step
        total, parts = self.score(rollout)
        return rollout, total, parts

    def watch_truncation(self, rollout: RolloutBatch) -> None:
        """Warn when every completion has run to ``max_new_tokens`` for several rollouts in a row:
        the stop ids are probably not the tokens the model ends with."""
        self._all_truncated = self._all_truncated + 1 if bool(rollout.truncated.all()) else 0
        if self._all_truncated == TRUNCATION_WARNING_STEPS:
            names = [self.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids()]
            rank_zero_warn(f"{type(self).__name__}: every completion of the last {TRUNCATION_WARNING_STEPS} rollouts "
                           f"ran to max_new_tokens={self.sampling.max_new_tokens} without a stop token; stopping at "
                           f"ids {self.stop_ids()} ({names}). If the model ends its answers with another token, set "
                           "sampling.stop_token_ids (or raise max_new_tokens).")

    # -- the optimizer steps over a rollout ------------------------------------------------
    def optimize(self, rollout: RolloutBatch, passes: int,
                 micro_loss: Callable[[list[int], RolloutBatch, object], tuple[torch.Tensor, dict]],
                 normalizers: Callable[[int, int], object], stepped: list[Stepped], metrics: StepMetrics,
                 loss_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``passes`` x :attr:`mini_batches` optimizer steps over ``rollout``, the one step loop of
        online RL.

        For each mini-batch ``[lo, hi)``: ``normalizers(lo, hi)`` gives its denominators (summed
        over ranks, before any micro-batch runs), every optimizer's gradients are zeroed, each
        micro-batch of :attr:`forward_batch_size` rows (:meth:`RolloutBatch.chunks`) adds
        ``micro_loss(rows, chunk, norms) -> (share, metrics)`` to one backward (data parallelism
        expects one per forward; the losses of several models add up), then each stepped model is
        clipped, stepped and its schedule advanced. Returns ``metrics.result``, with each model's
        ``grad_norm`` (before clipping) and ``grad_clipped`` averaged over the steps.

        ``loss_tokens`` ``[N]`` counts each row's tokens that carry loss: a mini-batch with none on
        any rank (filler groups of a short dynamic-sampling batch, all truncated under overlong
        filtering) takes no optimizer step at all, since Adam would still move the weights on a
        zero gradient; ``skipped_steps`` counts them.
        """
        n = len(rollout)
        self.check_mini_batches(n)
        world = data_parallel(self._trainer)[0]
        skipped = 0
        for _ in range(passes):
            for lo, hi in mini_batch_bounds(n, self.mini_batches):
                if loss_tokens is not None and float(all_reduce(loss_tokens[lo:hi].sum().float())) == 0:
                    skipped += 1  # the same decision on every rank: the sum is global
                    continue
                norms = normalizers(lo, hi)
                for optimizer, *_ in stepped:
                    optimizer.zero_grad()
                for rows, chunk in rollout.chunks(self.forward_batch_size, lo, hi):
                    loss, values = micro_loss(rows, chunk, norms)
                    self.manual_backward(self.step_loss(loss))
                    metrics.add(values)
                for optimizer, scheduler, clip, name in stepped:
                    metrics.add_step(self.clip_and_measure(optimizer, clip, name))
                    optimizer.step()
                    scheduler.step()
        self.watch_empty_rollouts(skipped == passes * len(mini_batch_bounds(n, self.mini_batches)))
        out = metrics.result(world)
        out["skipped_steps"] = torch.tensor(float(skipped))
        return out

    def watch_empty_rollouts(self, empty: bool) -> None:
        """Count rollouts that took no optimizer step (every group filtered out by dynamic
        sampling or overlong filtering): warn after :data:`EMPTY_ROLLOUTS_WARNING` in a row and
        stop after :data:`EMPTY_ROLLOUTS_LIMIT` (as verl stops when its generation batches run out)."""
        self._empty_rollouts = self._empty_rollouts + 1 if empty else 0
        if self._empty_rollouts not in (EMPTY_ROLLOUTS_WARNING, EMPTY_ROLLOUTS_LIMIT):
            return
        why = (f"{type(self).__name__}: the last {self._empty_rollouts} rollouts took no optimizer step: no "
               "completion carried loss (every group's rewards were equal under dynamic sampling, or every "
               "completion was truncated under overlong filtering). Raise max_generation_rounds or "
               "max_new_tokens, or start from a model that sometimes succeeds.")
        if self._empty_rollouts == EMPTY_ROLLOUTS_LIMIT:
            raise RuntimeError(f"{why} Stopping at global step {self.global_step}.")
        rank_zero_warn(why)

    # -- logging ----------------------------------------------------------------------
    def rollout_metrics(self, rollout: RolloutBatch, total: torch.Tensor, parts: dict, gen_time: float,
                        train_time: float) -> dict[str, torch.Tensor]:
        """Each reward's mean/std, accuracy and the mean lengths of right and of wrong completions
        (tasks with a checker), lengths, truncation, timing, and
        the completions and tokens generated since the run began (``generated/*``, every rank's)."""
        n = len(rollout)
        values = {"reward/mean": total.mean(), "reward/std": total.std() if n > 1 else total.new_tensor(0.0)}
        for name, v in parts.items():
            values[f"reward/{name}/mean"] = v.float().mean()
            values[f"reward/{name}/std"] = v.float().std() if n > 1 else v.new_tensor(0.0)
        checker = getattr(getattr(self.trainer, "datamodule", None), "checker", None)
        if checker is not None:
            correct = [checker(c, m, "") for c, m in zip(rollout.completions, rollout.meta)]
            values["accuracy"] = torch.tensor(sum(correct) / max(len(correct), 1))
            # the length of right and of wrong completions apart (Dr. GRPO's claim: a length-biased
            # loss grows the wrong ones); a kind absent from the rollout is not logged that step
            right = torch.tensor(correct, dtype=torch.bool, device=rollout.lengths.device)
            for key, rows in (("correct", right), ("wrong", ~right)):
                if rows.any():
                    values[f"response_length/{key}"] = rollout.lengths[rows].float().mean()
        self.watch_truncation(rollout)
        lengths = rollout.lengths.float()
        values.update({
            "response_length/mean": lengths.mean(), "response_length/max": lengths.max(),
            "truncation_rate": rollout.truncated.float().mean(),
            "time/generation_s": torch.tensor(gen_time), "time/training_s": torch.tensor(train_time),
            "time/generation_frac": torch.tensor(gen_time / max(gen_time + train_time, 1e-9)),
            # cumulative, all ranks: plot a metric against the generation budget, not only steps
            "generated/completions": self.generated[0].double(), "generated/tokens": self.generated[1].double(),
        })
        return values

    def log_train(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in values.items():
            self.log(f"train/{k}", torch.as_tensor(v).float().to(self.device), on_step=True, on_epoch=False,
                     prog_bar=k in ("reward/mean", "accuracy"), batch_size=batch_size)

