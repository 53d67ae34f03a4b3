"""Reward modelling from pairwise preferences (Bradley-Terry; InstructGPT, Ouyang et al. 2022)."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from lit_align.algorithms.base import CausalLMModule
from lit_align.algorithms.optim import OptimSpec
from lit_align.losses import bradley_terry_loss
from lit_align.models import CausalLMSpec, LoraSpec, apply_lora, disable_dropout
from lit_align.models.reward import build_reward_model, sequence_scores

PAIR_METRICS = ("loss", "accuracy", "margin", "chosen_score", "rejected_score")


class RewardModel(CausalLMModule):
    """A scalar reward r(x, y) trained so that preferred responses score higher.

    The model is an HF ``*ForSequenceClassification`` with one output
    (:func:`~lit_align.models.reward.build_reward_model`), usually initialised from an SFT
    export (InstructGPT, Ouyang et al. 2022, sec. 3.5), scored at each sequence's last
    token. The loss is the Bradley-Terry negative log-likelihood of the preferences,
    -log sigma(r(x, y_c) - r(x, y_r) - m) (Ouyang et al. 2022, eq. 1; the margin m of
    Llama 2, Touvron et al. 2023, eq. 2), see :func:`~lit_align.losses.bradley_terry_loss`.

    Batches come from :class:`~lit_align.PreferenceDataModule`: ``input_ids``,
    ``attention_mask`` ``[2B, T]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected, right
    padded), optional ``margin`` ``[B]`` and ``num_seqs_step`` (pairs in the whole optimizer
    step over micro-batches and ranks). The loss is a mean over the optimizer step's pairs,
    so a step's gradient is the same however its pairs are split into micro-batches.

    Logged for ``train``, ``val`` and ``test``: ``loss``, ``accuracy`` (fraction of pairs with
    r_c > r_r; a tie counts as wrong), ``margin`` (mean r_c - r_r), ``chosen_score`` and
    ``rejected_score``. Checkpoints keep the best ``val/accuracy``.

    Args:
        model: the backbone to start from (:class:`~lit_align.models.CausalLMSpec`): a causal LM
            (its head is replaced by a scalar one seeded by ``model.seed``), a reward-model
            export, or an inline config.
        optim: optimizer and schedule (:class:`~lit_align.algorithms.optim.OptimSpec`).
        center_coef: weight of mean((r_c + r_r)^2), keeping rewards centred on 0 (Eisenstein
            et al. 2023), which PPO's reward scale relies on; 0 disables it.
        use_margin: subtract the data's per-pair ``margin`` column inside the sigmoid when present.
        num_logged_samples: pairs written to TensorBoard as text, with their scores, at each validation.
        disable_dropout: set the model's dropout to 0 (as TRL does): the two sides of a pair are then
            scored by the same function.
        lora: train low-rank adapters on the backbone (:class:`~lit_align.models.LoraSpec`); the
            scalar head is trained in full (peft's sequence-classification task keeps ``score``
            in ``modules_to_save``).
    """

    supports_tensor_parallel = True

    monitor = ("val/accuracy", "max")  # a reward model does not generate

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, center_coef: float = 0.0,
                 use_margin: bool = True, num_logged_samples: int = 4, disable_dropout: bool = True,
                 lora: LoraSpec | None = None):
        if center_coef < 0:
            raise ValueError(f"RewardModel.center_coef: {center_coef} must be >= 0")
        if num_logged_samples < 0:
            raise ValueError(f"RewardModel.num_logged_samples: {num_logged_samples} must be >= 0")
        # No greedy exact match: a reward model does not generate (eval_max_new_tokens=0).
        super().__init__(model=model, optim=optim, eval_max_new_tokens=0, num_logged_samples=num_logged_samples,
                         lora=lora)
        # The spec in the checkpoint is what load_reward_model rebuilds the model from.
        self.save_hyperparameters()
        self.center_coef = center_coef
        self.use_margin = use_margin
        self.disable_dropout = disable_dropout
        # flat keys: a ModuleDict cannot hold a "train" key (nn.Module.train)
        self.pair_metrics = nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in ("train", "val", "test")
                                           for name in PAIR_METRICS})

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_reward_model(self.spec, self.tokenizer)
            # from_pretrained returns eval mode; train like a freshly built model and let Lightning
            # switch to eval for validation; dropout off unless asked (as TRL's RewardTrainer)
            if self.disable_dropout:
                disable_dropout(self.model)
            if self.lora is not None:
                self.model = apply_lora(self.model, self.lora, task_type="SEQ_CLS")
            self.model = self.shard(self.model.train())

    def score_generations(self, batch: dict, stage: str, batch_idx: int) -> None:
        """Reward models are evaluated on pairs, never by generation."""

    # -- scores and loss ----------------------------------------------------------------
    def pair_scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen [B], rejected [B])`` float32 scores of a preference batch of ``2B`` rows."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None or ids.shape[0] % 2:
            raise ValueError("RewardModel needs PreferenceDataModule batches: attention_mask and 2B rows "
                             f"(chosen then rejected), got {ids.shape[0]} rows"
                             + ("" if mask is not None else " without attention_mask"))
        scores = sequence_scores(self.model, ids, mask).float()
        half = ids.shape[0] // 2
        return scores[:half], scores[half:]

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict) -> torch.Tensor:
        """Bradley-Terry loss averaged over this micro-batch's pairs (scalar)."""
        margin = batch.get("margin") if self.use_margin else None
        return bradley_terry_loss(chosen, rejected, margin=margin, center_coef=self.center_coef)

    def _update_metrics(self, stage: str, loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                        on_step: bool) -> None:
        values = {"loss": loss.detach(), "accuracy": (chosen > rejected).float(),
                  "margin": (chosen - rejected).detach(),
                  "chosen_score": chosen.detach(), "rejected_score": rejected.detach()}
        n = chosen.shape[0]
        for name, value in values.items():
            metric = self.pair_metrics[f"{stage}_{name}"]
            # the loss is already a mean over the n pairs: weight it by n for the epoch mean
            weight = n if value.ndim == 0 else 1.0
            if on_step:
                metric(value, weight)  # forward: the batch value (logged) and the running state
            else:
                metric.update(value, weight)
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=not on_step, prog_bar=name == "accuracy")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_scores(batch)
        loss = self.pair_loss(chosen, rejected, batch)  # a mean over this micro-batch's pairs
        self._update_metrics("train", loss, chosen, rejected, on_step=True)
        self.log_throughput(batch)
        return self.step_loss(loss * chosen.shape[0] / batch["num_seqs_step"])

    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        chosen, rejected = self.pair_scores(batch)
        self._update_metrics(stage, self.pair_loss(chosen, rejected, batch), chosen, rejected, on_step=False)
        if batch_idx == 0:
            self.log_pairs(batch, chosen, rejected, stage)

    def log_pairs(self, batch: dict, chosen: torch.Tensor, rejected: torch.Tensor, stage: str) -> None:
        """A few held-out pairs with their scores, as TensorBoard text."""
        n = min(self.num_logged_samples, chosen.shape[0])
        if not n or not isinstance(self.logger, TensorBoardLogger) or self.global_rank != 0:
            return
        half = chosen.shape[0]
        texts = self.tokenizer.batch_decode(
            [row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])], skip_special_tokens=True)
        lines = [f"**chosen** `{texts[i]!r}` score {chosen[i]:.3f}  \n**rejected** `{texts[half + i]!r}` "
                 f"score {rejected[i]:.3f}" for i in range(n)]
        self.logger.experiment.add_text(f"{stage}/pairs", "\n\n---\n\n".join(lines), self.global_step)
