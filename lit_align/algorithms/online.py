"""What online RL modules (PolicyGradient, PPO) share: rewards, the rollout engine, the frozen
reference, scoring, rollout logging and held-out evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.losses import KL_ESTIMATORS
from lit_align.models import CausalLMSpec, LoraSpec, build_hf_config, disable_dropout, is_peft
from lit_align.rewards import RewardSpec, Rewards
from lit_align.rollout import EngineSpec, RolloutBatch, SamplingParams, build_engine, chunked_logprobs


#: The KL estimator when a KL term is on and none is named (GRPO's k3, Shao et al. 2024, eq. 4).
DEFAULT_KL_ESTIMATOR = "k3"


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` reduced over data-parallel ranks (itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


class OnlineRLModule(CausalLMModule):
    """Base of modules that learn from their own samples (manual optimization).

    Args:
        model, optim, lora, eval_max_new_tokens, num_logged_samples: as in :class:`CausalLMModule`.
        rewards: reward functions and weights (:class:`~lit_align.rewards.RewardSpec`), summed.
        sampling: temperature, top-p/top-k and ``max_new_tokens`` of the rollouts.
        num_generations: completions per prompt.
        beta: KL coefficient; 0 builds no reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020), per token; ``None``: ``k3``.
        reference: the frozen reference; default the initial policy (with ``lora``: the base
            with adapters disabled).
        forward_batch_size: rows per forward/backward (training and scoring passes).
        engine: the rollout engine: a registered name (``hf``: HF ``generate`` on the training
            model, ``vllm``: a colocated vLLM engine, :data:`~lit_align.rollout.ENGINES`) or an import
            path ``"package.module:Class"`` of a :class:`~lit_align.rollout.RolloutEngine` subclass,
            or ``{name: ..., args: {...}}`` (:class:`~lit_align.rollout.EngineSpec`) with the
            engine's settings; built as ``Class(tokenizer, logprob_batch_size=forward_batch_size, **args)``
            and checked against the policy's config and the sampling settings here.
    """

    # held-out generation is the only validation: without it, checkpoints keep the last only
    fallback_monitor = (None, "min")

    def __init__(self, model: CausalLMSpec, optim: OptimSpec | None, rewards: list[RewardSpec] | None,
                 sampling: SamplingParams | None, num_generations: int, beta: float, kl_estimator: str | None,
                 reference: CausalLMSpec | None, forward_batch_size: int, lora: LoraSpec | None,
                 eval_max_new_tokens: int, num_logged_samples: int, extra_rewards: list[RewardSpec] = (),
                 engine: str | EngineSpec = "hf"):
        super().__init__(model, optim, eval_max_new_tokens, num_logged_samples, lora=lora)
        sampling = sampling or SamplingParams(temperature=1.0)
        kl_estimator = DEFAULT_KL_ESTIMATOR if kl_estimator is None else kl_estimator
        checks = [
            (not rewards, "rewards: give at least one reward (a built-in name or 'package.module:function')"),
            (num_generations < 1, f"num_generations: must be >= 1, got {num_generations}"),
            (sampling.n != 1, "sampling.n: leave it at 1 and set num_generations"),
            (sampling.temperature <= 0, "sampling.temperature: must be > 0 for on-policy sampling"),
            (beta < 0, f"beta: must be >= 0, got {beta}"),
            (kl_estimator not in KL_ESTIMATORS, f"kl_estimator: {kl_estimator!r} is not one of {KL_ESTIMATORS}"),
            (beta == 0 and reference is not None, "reference: unused with beta 0 (no KL term); drop it or set beta"),
            (lora is not None and reference is not None, "reference: with lora the reference is the base with adapters disabled; drop it"),
            (forward_batch_size < 1, f"forward_batch_size: must be >= 1, got {forward_batch_size}"),
        ]
        self.check_settings(checks)
        self.sampling = sampling
        self.num_generations = num_generations
        self.rewards = Rewards(list(rewards) + list(extra_rewards))
        try:
            self.engine = build_engine(engine, self.tokenizer, logprob_batch_size=forward_batch_size)
            self.engine.check(build_hf_config(model, self.tokenizer), sampling)
        except (ValueError, TypeError) as e:  # TypeError: a class whose constructor does not fit
            raise ValueError(f"{type(self).__name__}.engine: {e}") from e
        self.forward_batch_size = forward_batch_size
        self.beta, self.kl_estimator = beta, kl_estimator
        self.ref_spec = reference or model
        self.ref_model = None
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen reference is rebuilt from its spec, never saved

    def check_settings(self, checks: list[tuple[bool, str]]) -> None:
        """Raise for the first ``(bad, message)`` that holds, naming the class and setting."""
        for bad, message in checks:
            if bad:
                raise ValueError(f"{type(self).__name__}.{message}")

    # -- models ---------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        disable_dropout(self.model)
        if self.beta > 0 and self.ref_model is None and self.lora is None:
            self.ref_model = self.build_frozen(self.ref_spec)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref_model.")}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.rewards.setup(self.device)
        # fail before the first rollout when the data module says how many prompts a step takes
        dm = getattr(self.trainer, "datamodule", None)
        prompts = getattr(getattr(dm, "hparams", None), "micro_batch_size", None)
        if isinstance(prompts, int):
            self.check_mini_batches(prompts * self.num_generations, prompts)

    def check_mini_batches(self, rows: int, prompts: int | None = None) -> None:
        """Raise unless each of the ``mini_batches`` optimizer steps gets at least one of the
        ``rows`` a rank samples per step (an empty mini-batch would step on no gradient)."""
        mini_batches = self.hparams.mini_batches
        if rows < mini_batches:
            source = f"{prompts} prompts (data.micro_batch_size) x num_generations {self.num_generations}" \
                if prompts is not None else "the rollout's rows"
            raise ValueError(f"{type(self).__name__}.mini_batches: {mini_batches} mini-batches per pass need at "
                             f"least {mini_batches} rows per rank and step, but a step samples {rows} ({source}); "
                             "lower mini_batches or sample more prompts per step")

    @torch.no_grad()
    def reference_logprobs(self, rollout: RolloutBatch) -> torch.Tensor:
        """``[N, C]`` log-probs of the sampled tokens under the reference, in the training layout."""
        t, size = self.sampling.temperature, self.forward_batch_size
        if self.ref_model is not None:
            return chunked_logprobs(self.ref_model, rollout, t, size)
        if is_peft(self.model):
            with self.adapters_disabled() as base:
                return chunked_logprobs(base, rollout, t, size)
        raise RuntimeError(f"{type(self).__name__}: beta > 0 but no reference model was built")

    # -- rollouts and rewards ---------------------------------------------------------
    def score(self, rollout: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward ``[N]`` and each reward's raw values."""
        lengths = rollout.lengths - (~rollout.truncated).long()  # EOS is not content
        total, parts = self.rewards(rollout.prompts, rollout.completions, rollout.meta,
                                    completion_lengths=lengths.tolist(), truncated=rollout.truncated.tolist(),
                                    max_new_tokens=self.sampling.max_new_tokens,
                                    completion_ids=rollout.completion_ids.tolist())
        return total.to(self.device), {k: v.to(self.device) for k, v in parts.items()}

    def sample(self, prompts: dict) -> tuple[RolloutBatch, torch.Tensor, dict]:
        """``num_generations`` scored completions per prompt: ``(rollout, total [N], each reward)``."""
        s = self.sampling
        sampling = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, n=self.num_generations, stop_token_ids=s.stop_token_ids)
        self.engine.update_weights(self.model)
        rollout = self.engine.generate(self.model, prompts, sampling)
        total, parts = self.score(rollout)
        return rollout, total, parts

    # -- logging ----------------------------------------------------------------------
    def rollout_metrics(self, rollout: RolloutBatch, total: torch.Tensor, parts: dict, gen_time: float,
                        train_time: float) -> dict[str, torch.Tensor]:
        """Each reward's mean/std, accuracy (tasks with a checker), lengths, truncation, timing."""
        n = len(rollout)
        values = {"reward/mean": total.mean(), "reward/std": total.std() if n > 1 else total.new_tensor(0.0)}
        for name, v in parts.items():
            values[f"reward/{name}/mean"] = v.float().mean()
            values[f"reward/{name}/std"] = v.float().std() if n > 1 else v.new_tensor(0.0)
        checker = getattr(getattr(self.trainer, "datamodule", None), "checker", None)
        if checker is not None:
            correct = [checker(c, m, "") for c, m in zip(rollout.completions, rollout.meta)]
            values["accuracy"] = torch.tensor(sum(correct) / max(len(correct), 1))
        lengths = rollout.lengths.float()
        values.update({
            "response_length/mean": lengths.mean(), "response_length/max": lengths.max(),
            "truncation_rate": rollout.truncated.float().mean(),
            "time/generation_s": torch.tensor(gen_time), "time/training_s": torch.tensor(train_time),
            "time/generation_frac": torch.tensor(gen_time / max(gen_time + train_time, 1e-9)),
        })
        return values

    def log_train(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in values.items():
            self.log(f"train/{k}", torch.as_tensor(v).float().to(self.device), on_step=True, on_epoch=False,
                     prog_bar=k in ("reward/mean", "accuracy"), batch_size=batch_size)

    # -- evaluation ---------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.score_generations(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.score_generations(batch, "test", batch_idx)
