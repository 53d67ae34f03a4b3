"""Direct preference optimisation and its loss variants (no reward model)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.reference import Reference
from lit_align.losses import PREFERENCE_LOSSES, dpo_loss
from lit_align.models import CausalLMSpec, LoraSpec, disable_dropout
from lit_align.registry import lookup

#: The data module's split each stage's batches come from.
STAGE_SPLITS = {"train": "train", "val": "validation", "test": "test"}

_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")


def _key(stage: str, name: str) -> str:
    return f"{stage}_{name.replace('/', '_')}"


class DPO(CausalLMModule):
    """DPO (Rafailov et al. 2023) and its variants: the losses of
    :data:`~lit_align.losses.PREFERENCE_LOSSES` through :func:`lit_align.losses.dpo_loss`
    (``sigmoid``, cDPO with label smoothing; ``ipo``; ``ipo_sum``; RSO's ``hinge``; ``robust``).

    Batches come from :class:`~lit_align.PreferenceDataModule`: ``[2B, T]`` sequences,
    chosen rows first, scored with one forward pass. Sequence log-probs are sums of
    :func:`~lit_align.losses.token_logprobs` over response tokens, or their means for a
    length-normalised loss type (``ipo``, as the IPO authors and TRL compute it).

    Args:
        model: the policy (usually an SFT checkpoint's HF export).
        optim: optimizer and schedule.
        beta: KL strength (IPO's tau for ``ipo``).
        loss_type: a name in :data:`~lit_align.losses.PREFERENCE_LOSSES`.
        label_smoothing: assumed rate of flipped labels (``sigmoid``: cDPO; ``robust``).
        sft_weight: weight of the chosen response's length-normalised NLL (RPO, Pang et al. 2024).
        reference: the frozen reference model; default: the same as ``model`` (a frozen copy of
            the initial policy). With ``lora``, the reference is the base with adapters disabled
            (:class:`~lit_align.algorithms.reference.Reference`).
        precompute_ref_logps: compute the reference log-probs of every pair once before
            training (by split and row), then free the reference model.
        lora: train adapters (:class:`~lit_align.models.LoraSpec`) instead of the full policy.
        eval_max_new_tokens, num_logged_samples: held-out greedy generation (exact match).
        disable_dropout: set the policy's dropout to 0 (as TRL does): with dropout, the policy's
            log-probs of a pair are noisy while the reference's (eval mode) are not.

    The loss is a mean over the pairs of the whole optimizer step (over gradient
    accumulation and data-parallel ranks), so it does not depend on the micro-batch split. A
    mixture-of-experts policy with ``output_router_logits: true`` adds its router
    load-balancing loss times ``router_aux_loss_coef`` (TRL's ``aux_loss_enabled``).
    """

    supports_tensor_parallel = True
    supports_router_aux_loss = True

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 reference: CausalLMSpec | None = None, precompute_ref_logps: bool = False,
                 lora: LoraSpec | None = None, eval_max_new_tokens: int = 32, num_logged_samples: int = 4,
                 disable_dropout: bool = True):
        super().__init__(model=model, optim=optim, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora)
        try:
            self.loss_fn = lookup(PREFERENCE_LOSSES, "DPO.loss_type", loss_type)
        except ValueError as e:
            raise ValueError(str(e)) from None
        if beta <= 0:
            raise ValueError(f"DPO.beta: must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO.label_smoothing: must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and not self.loss_fn.label_smoothing:
            raise ValueError(f"DPO.label_smoothing applies to loss_type "
                             f"{', '.join(k for k, v in PREFERENCE_LOSSES.items() if v.label_smoothing)}, "
                             f"not {loss_type!r}")
        if sft_weight < 0:
            raise ValueError(f"DPO.sft_weight: must be >= 0, got {sft_weight}")
        if lora is not None and reference is not None:
            raise ValueError("DPO: with `lora` the reference is the base model with adapters disabled; "
                             "drop `reference`")
        self.save_hyperparameters()
        self.beta, self.loss_type, self.label_smoothing, self.sft_weight = beta, loss_type, label_smoothing, sft_weight
        self.disable_dropout = disable_dropout
        self.reference = Reference(reference or model, "precomputed" if precompute_ref_logps else
                                   "adapters" if lora is not None else "copy")
        self.pair_metrics = torch.nn.ModuleDict({_key(stage, k): MeanMetric()
                                                 for k in _METRICS for stage in ("train", "val")})

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen reference copy (``None`` with LoRA or precomputed log-probs)."""
        return self.reference.model

    # -- reference ------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.disable_dropout:
            disable_dropout(self.model)
        self.reference.build(self)

    def reference_logps(self, batch: dict, stage: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``([B], [B])`` of the chosen and rejected responses (summed, or
        token means for a length-normalised loss type)."""
        if self.reference.source == "precomputed":
            if "index" not in batch:
                raise RuntimeError("DPO: precomputed reference log-probs need batches with each pair's `index` "
                                   "(PreferenceDataModule rows)")
            values = self.reference.lookup(STAGE_SPLITS[stage], batch["index"]).to(self.device)
            return values[:, 0], values[:, 1]
        with self.reference.policy(self) as ref:
            return self._pair_logps(ref, batch)[:2]

    def _precompute_if_asked(self) -> None:
        if self.reference.source == "precomputed":
            self.precompute_reference(self.trainer.datamodule)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._precompute_if_asked()

    # `validate` and `test` runs never pass through on_fit_start
    on_validation_start = on_test_start = _precompute_if_asked

    def precompute_reference(self, datamodule) -> None:
        """Compute the reference log-probs of every pair of every split once (see
        :meth:`~lit_align.algorithms.reference.Reference.precompute`); the data module's rows are
        left as they are."""
        def score(model, batch):
            chosen, rejected, _ = self._pair_logps(model, batch)
            return torch.stack([chosen, rejected], dim=-1)

        self.reference.precompute(self, datamodule.encoded, lambda rows: datamodule.collate([[r] for r in rows]),
                                  score, datamodule.hparams.eval_batch_size)

    # -- policy -------------------------------------------------------------------------
    def _pair_logps(self, model: torch.nn.Module, batch: dict):
        """Response log-probs of chosen ``[B]`` and rejected ``[B]`` (sums over tokens, or means when
        the loss type is length-normalised), and the chosen token counts ``[B]``."""
        logp, mask = self.shifted(batch, model)
        seq = (logp * mask).sum(-1)
        counts = mask.sum(-1)
        if self.loss_fn.length_normalized:
            seq = seq / counts.clamp(min=1)
        n = batch["input_ids"].shape[0] // 2
        return seq[:n], seq[n:], counts[:n]

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        policy_chosen, policy_rejected, chosen_len = self._pair_logps(self.model, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, stage)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                            self.beta, self.loss_type, self.label_smoothing)
        if self.sft_weight:
            # RPO's NLL is the chosen response's token mean, whichever form the preference loss takes
            nll = -policy_chosen if self.loss_fn.length_normalized else -policy_chosen / chosen_len.clamp(min=1)
            losses = losses + self.sft_weight * nll
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
        return self.step_loss(losses.sum() / batch["num_seqs_step"] + self.router_aux_share())

    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        if stage == "val":  # the held-out preference loss and reward metrics; test scores generations only
            losses = self._step(batch, "val")
            self.log("val/loss", losses.mean(), on_epoch=True, sync_dist=True, batch_size=len(losses))
        self.score_generations(batch, stage, batch_idx)
