"""Direct preference optimisation and its loss variants (no reward model)."""

from __future__ import annotations


import torch
from torchmetrics import MeanMetric

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.data.preference import collate_pairs
from lit_align.losses import DPO_LOSS_TYPES, dpo_loss
from lit_align.models import CausalLMSpec, LoraSpec, is_peft

_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _key(stage: str, name: str) -> str:
    return f"{stage}_{name.replace('/', '_')}"


class DPO(CausalLMModule):
    """DPO (Rafailov et al. 2023) with the ``sigmoid`` (cDPO with label smoothing), ``ipo``,
    ``hinge`` and ``robust`` losses of :func:`lit_align.losses.dpo_loss`.

    Batches come from :class:`~lit_align.PreferenceDataModule`: ``[2B, T]`` sequences,
    chosen rows first, scored with one forward pass. Sequence log-probs are sums of
    :func:`~lit_align.losses.token_logprobs` over response tokens.

    Args:
        model: the policy (usually an SFT checkpoint's HF export).
        optim: optimizer and schedule.
        beta: KL strength (IPO's tau for ``ipo``).
        loss_type: one of ``sigmoid``, ``ipo``, ``hinge``, ``robust``.
        label_smoothing: assumed rate of flipped labels (``sigmoid``: cDPO; ``robust``).
        sft_weight: weight of the chosen response's length-normalised NLL (RPO, Pang et al. 2024).
        reference: the frozen reference model; default: the same as ``model`` (a frozen copy of
            the initial policy). With ``lora``, the reference is the base with adapters disabled.
        precompute_ref_logps: compute the reference log-probs of every pair once before
            training, store them with the dataset and free the reference model.
        lora: train adapters (:class:`~lit_align.models.LoraSpec`) instead of the full policy.
        eval_max_new_tokens, num_logged_samples: held-out greedy generation (exact match).

    The loss is a mean over the pairs of the whole optimizer step (over gradient
    accumulation and data-parallel ranks), so it does not depend on the micro-batch split.
    """

    def __init__(self, model: CausalLMSpec, optim: OptimSpec | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 reference: CausalLMSpec | None = None, precompute_ref_logps: bool = False,
                 lora: LoraSpec | None = None, eval_max_new_tokens: int = 32, num_logged_samples: int = 4):
        super().__init__(model, optim, eval_max_new_tokens, num_logged_samples, lora=lora)
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"DPO.loss_type: {loss_type!r} is not one of {DPO_LOSS_TYPES}")
        if beta <= 0:
            raise ValueError(f"DPO.beta: must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO.label_smoothing: must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"DPO.label_smoothing applies to loss_type sigmoid and robust, not {loss_type!r}")
        if sft_weight < 0:
            raise ValueError(f"DPO.sft_weight: must be >= 0, got {sft_weight}")
        if lora is not None and reference is not None:
            raise ValueError("DPO: with `lora` the reference is the base model with adapters disabled; drop `reference`")
        self.save_hyperparameters()
        self.ref_spec = reference or model
        self.ref_model = None
        # the frozen reference is rebuilt from its spec, never saved in checkpoints
        self.strict_loading = False
        self.pair_metrics = torch.nn.ModuleDict({_key(stage, k): MeanMetric() for k in _METRICS for stage in ("train", "val")})

    # -- reference ------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.ref_model is None and self.lora is None and not self.hparams.precompute_ref_logps:
            self.ref_model = self.build_frozen(self.ref_spec)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref_model.")}

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs ``([B], [B])`` of the chosen and rejected responses."""
        if "ref_chosen" in batch:
            return batch["ref_chosen"].to(self.device), batch["ref_rejected"].to(self.device)
        if self.ref_model is not None:
            return self._pair_logps(self.ref_model, batch)[:2]
        if is_peft(self.model):
            with self.adapters_disabled() as base:
                return self._pair_logps(base, batch)[:2]
        raise RuntimeError("DPO: no reference log-probs (precompute_ref_logps ran on a different dataset?)")

    def _precompute_if_asked(self) -> None:
        if self.hparams.precompute_ref_logps:
            self.precompute_reference(self.trainer.datamodule)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._precompute_if_asked()

    # `validate` and `test` runs never pass through on_fit_start
    on_validation_start = on_test_start = _precompute_if_asked

    @torch.no_grad()
    def precompute_reference(self, datamodule) -> None:
        """Store the reference log-probs of every pair in the data module's rows, then free the reference.

        Computed with a freshly built reference (or the adapter-free base), so a resumed
        run gets the same values as the first one.
        """
        pending = [[r for r in rows if "ref_chosen" not in r] for rows in datamodule.encoded.values()]
        if not any(pending):
            return
        ref = None if is_peft(self.model) else self.build_frozen(self.ref_spec)
        batch_size = datamodule.hparams.eval_batch_size
        pad_id = self.tokenizer.pad_token_id
        for todo in pending:
            for s in range(0, len(todo), batch_size):
                chunk = todo[s: s + batch_size]
                batch = {k: v.to(self.device) for k, v in collate_pairs(chunk, pad_id).items()}
                if ref is not None:
                    chosen, rejected = self._pair_logps(ref, batch)[:2]
                else:
                    chosen, rejected = self.reference_logps(batch)
                for r, c, j in zip(chunk, chosen.tolist(), rejected.tolist()):
                    r["ref_chosen"], r["ref_rejected"] = c, j
        del ref

    # -- policy -------------------------------------------------------------------------
    def _pair_logps(self, model: torch.nn.Module, batch: dict):
        """Summed response log-probs of chosen ``[B]`` and rejected ``[B]``, and chosen token counts ``[B]``."""
        logp, mask = self.shifted(batch, model)
        seq = (logp * mask).sum(-1)
        n = batch["input_ids"].shape[0] // 2
        return seq[:n], seq[n:], mask[:n].sum(-1)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        policy_chosen, policy_rejected, chosen_len = self._pair_logps(self.model, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        h = self.hparams
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                            h.beta, h.loss_type, h.label_smoothing)
        if h.sft_weight:
            losses = losses + h.sft_weight * (-policy_chosen / chosen_len.clamp(min=1))
        values = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach(),
        }
        for name, v in values.items():
            metric = self.pair_metrics[_key(stage, name)]
            metric(v)  # forward, not update: on_step logging reads the batch value it caches
            self.log(f"{stage}/{name}", metric, on_step=stage == "train", on_epoch=stage != "train",
                     prog_bar=name == "rewards/accuracies", batch_size=len(v))
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._step(batch, "train")
        self.log("train/loss", losses.mean().detach(), prog_bar=True, batch_size=len(losses))
        self.log_throughput(batch)
        # sum / pairs in the optimizer step, undoing Lightning's division by accumulate
        # and DDP's mean over ranks: a step's gradient is a mean over all its pairs
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        return losses.sum() / batch["num_seqs_step"] * scale

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._step(batch, "val")
        self.log("val/loss", losses.mean(), on_epoch=True, sync_dist=True, batch_size=len(losses))
        self.score_generations(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.score_generations(batch, "test", batch_idx)
