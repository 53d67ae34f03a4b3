"""Supervised fine-tuning (instruction tuning) with the loss on response tokens only."""

from __future__ import annotations

import torch

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.losses import aggregate_loss
from lit_align.models import CausalLMSpec, LoraSpec


class SFT(CausalLMModule):
    """Cross-entropy on label tokens, a token mean over the whole optimizer step.

    Batches come from :class:`~lit_align.InstructionDataModule`: ``input_ids``,
    ``labels`` ``[B, T]`` (``-100`` off the response), ``attention_mask`` or, when
    packed, ``position_ids``; ``num_label_tokens_step`` counts the label tokens of
    the optimizer step over all micro-batches and ranks. Normalising by it makes one
    step's loss and gradient the same however its rows are split into micro-batches
    (the gradient-accumulation fix of HF Trainer's ``num_items_in_batch``). A
    mixture-of-experts model with ``output_router_logits: true`` adds its router
    load-balancing loss times ``router_aux_loss_coef`` (as HF's own loss does).

    Args: see :class:`~lit_align.algorithms.base.CausalLMModule`.
    """

    supports_tensor_parallel = True
    supports_router_aux_loss = True

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, eval_max_new_tokens: int = 32,
                 num_logged_samples: int = 4, lora: LoraSpec | None = None):
        super().__init__(model=model, optim=optim, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora)
        self.save_hyperparameters()  # the record a resumed run's settings are checked against

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logp, mask = self.shifted(batch)
        share = aggregate_loss(-logp, mask, "token-mean", num_tokens=batch["num_label_tokens_step"])
        n = mask.sum().clamp(min=1)
        self.log("train/loss", (-(logp * mask).sum() / n).detach(), prog_bar=True, batch_size=int(n))
        self.log_throughput(batch)
        return self.step_loss(share + self.router_aux_share())

    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        logp, mask = self.shifted(batch)
        n = mask.sum()
        self.log(f"{stage}/loss", -(logp * mask).sum() / n.clamp(min=1), on_epoch=True, sync_dist=True,
                 batch_size=int(n), reduce_fx="mean")
        self.score_generations(batch, stage, batch_idx)
