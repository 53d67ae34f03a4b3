"""Callbacks the subprocess tests pass to the CLI (``--trainer.callbacks``)."""

import os

import lightning as L


class StepFile(L.Callback):
    """Writes the global step to ``path`` after every training batch, so a test can tell when a
    run in another process has trained."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(trainer.global_step))
        os.replace(tmp, self.path)


class PoisonGrad(L.Callback):
    """Sets one gradient to NaN after the backward of the step that starts at ``step`` (once), and
    keeps the weights just before and just after that step."""

    def __init__(self, step: int):
        self.step, self.done, self.before, self.after = step, False, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.before is None:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done and self.after is None:
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class FailAt(L.Callback):
    """Raises ``RuntimeError("crash")`` when the step that starts at ``step`` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


class InfWeightAtEnd(L.Callback):
    """Puts an infinity into the first weight when training ends (before the export)."""

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] = float("inf")
