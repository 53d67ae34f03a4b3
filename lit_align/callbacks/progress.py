"""A progress bar that counts optimizer steps when the run is limited by steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich's bar with ``Step N/max_steps`` as the training description when ``trainer.max_steps``
    limits the run (Lightning's shows ``Epoch 0/-2`` there, from ``max_epochs=-1``); epoch-limited
    runs keep ``Epoch N/M``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        text = f"Step {trainer.global_step}/{trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None and not self.is_disabled:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
