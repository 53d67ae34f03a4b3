"""Stop training on a non-finite loss or gradient before the optimizer applies it."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training met a NaN or infinite loss or gradient norm."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(L.Callback):
    """Checks every loss before its backward and every gradient before its optimizer step.

    A NaN or infinity stops the run with :class:`NonFiniteError` naming the global step and the
    last good checkpoint (the newest ``last.ckpt`` the run wrote, else the best one). With
    ``max_skipped`` > 0, up to that many such optimizer steps are skipped instead (their gradients
    dropped, so AdamW leaves weights and moments as they were) and counted in the logs as
    ``train/skipped_nonfinite``. The check is reduced over ranks, so every rank decides alike.

    Args:
        max_skipped: optimizer steps with a non-finite loss or gradient to skip before stopping.
    """

    def __init__(self, max_skipped: int = 0):
        if max_skipped < 0:
            raise ValueError(f"skip_nonfinite_steps: must be >= 0, got {max_skipped}")
        self.max_skipped = max_skipped
        self.skipped = 0
        self._bad_loss: str | None = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = f"loss {float(loss.detach().float().sum())}"
            if self.max_skipped == 0:  # no need to wait for the gradients
                self._stop(trainer, self._bad_loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # one host sync per step: the per-tensor norms (NaN or inf wherever a gradient has one), stacked
        finite = self._bad_loss is None and (
            not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()))
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        what, self._bad_loss = self._bad_loss or "gradient norm", None
        if finite:
            return
        if self.skipped >= self.max_skipped:
            self._stop(trainer, what)
        self.skipped += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        log.warning(f"step {trainer.global_step}: non-finite {what}, optimizer step skipped "
                    f"({self.skipped} of at most {self.max_skipped})")
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        last = None
        for cb in trainer.callbacks:
            last = last or getattr(cb, "last_saved_path", None)
        for cb in trainer.checkpoint_callbacks:
            last = last or getattr(cb, "best_model_path", None) or None
        skipped = f" after skipping {self.skipped} such steps (skip_nonfinite_steps={self.max_skipped})" \
            if self.max_skipped else " (set --skip_nonfinite_steps N to skip up to N such steps)"
        raise NonFiniteError(f"non-finite {what} at global step {trainer.global_step}{skipped}; "
                             f"last good checkpoint: {last or 'none written yet'}")
