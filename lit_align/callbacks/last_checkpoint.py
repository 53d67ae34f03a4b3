"""The run's one ``last.ckpt``: written periodically, at validation, at the end of training and
at an interruption (SIGTERM, SIGINT), always by replacing the previous file atomically."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
import zipfile

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

# exit codes of a run stopped by a signal: 128 + the signal's number, as a shell reports them
SIGNAL_EXIT = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


# the signal that stopped the latest run in this process (read by the entry point for its exit code)
_interrupted: dict[str, str | None] = {"signal": None, "path": None}


def interruption() -> tuple[str | None, str | None]:
    """``(signal name, last.ckpt path)`` of the latest run stopped by a signal, or ``(None, None)``."""
    return _interrupted["signal"], _interrupted["path"]


def default_every_n_steps(max_steps: int) -> int:
    """Periodic ``last.ckpt`` interval when none is given: 20 checkpoints over a step-limited run
    (at least every step, at most every 1,000), every 1,000 steps otherwise."""
    return min(1000, max(1, max_steps // 20)) if max_steps and max_steps > 0 else 1000


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (``None`` when it is intact): ``torch.save``
    writes a zip archive whose members carry CRCs, so truncation and corruption are found without
    unpickling. A directory (a sharded checkpoint) is taken as intact."""
    if os.path.isdir(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"not a readable checkpoint ({type(err).__name__}: {err})"
    return f"member {bad!r} fails its CRC check" if bad else None


def replace_path(tmp: str, final: str) -> None:
    """Move ``tmp`` (file or directory) to ``final``, replacing what is there, so that ``final`` is
    always either the old or the new complete version."""
    if os.path.isdir(final) and not os.path.islink(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class LastCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt``, the state to resume a run from (``--ckpt_path last``).

    It is written every ``every_n_steps`` optimizer steps (and every ``every_seconds`` of training
    when given), after each validation during fit, at the end of training, and when the run is
    stopped by SIGTERM or SIGINT. A first SIGINT (Ctrl-C) stops the run like SIGTERM, at the end
    of the current batch; a second one interrupts at once. After an interruption the process exits
    with 128 + the signal's number. Each write goes to a temporary sibling renamed into place, so
    a crash mid-write leaves the previous ``last.ckpt`` intact.

    Args:
        dirpath: the run's checkpoint directory.
        every_n_steps: steps between periodic checkpoints (``None``: no step interval).
        every_seconds: seconds of training between periodic checkpoints (``None``: no time interval).
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_steps: int | None = None, every_seconds: float | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"save_every_n_steps: must be >= 1, got {every_n_steps}")
        if every_seconds is not None and not 0 < every_seconds < math.inf:
            raise ValueError(f"save_every_minutes: must be a finite number > 0, got {every_seconds / 60}")
        self.dirpath, self.every_n_steps, self.every_seconds = dirpath, every_n_steps, every_seconds
        self.path = os.path.join(dirpath, self.FILENAME)
        self.last_saved_path: str | None = None  # the newest checkpoint this run wrote
        self._saved_step: int | None = None
        self._saved_time = time.monotonic()
        self._signal: str | None = None
        self._previous_sigint = None

    # -- signals -----------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_time = time.monotonic()
        self._signal = None
        _interrupted.update(signal=None, path=None)
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave Ctrl-C to Lightning
            self._previous_sigint = None
        self._trainer = trainer

    def _on_sigint(self, signum, frame) -> None:
        if self._signal == "SIGINT":  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._signal = "SIGINT"
        log.warning("SIGINT: stopping at the end of this batch and writing last.ckpt (Ctrl-C again to stop now)")
        # the loops stop at the next batch boundary on this flag, on every rank (rank 0 broadcasts it)
        self._trainer._signal_connector.received_sigterm = True

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            signame = self._signal or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            signame = "SIGINT"
        else:  # any other error: the last checkpoint written before it stays the last good one
            return
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            self.save(trainer)
            log.warning(f"{signame}: wrote {self.path} at step {trainer.global_step}; resume with --ckpt_path last")
        _interrupted.update(signal=signame, path=self.last_saved_path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    # -- periodic and final checkpoints ----------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self._saved_step:
            return
        due = self.every_n_steps is not None and step - (self._saved_step or 0) >= self.every_n_steps
        if self.every_seconds is not None:
            # the decision must be the same on every rank (saving is collective): rank 0's clock decides
            late = time.monotonic() - self._saved_time >= self.every_seconds
            due = due or bool(trainer.strategy.broadcast(late, src=0))
        if due:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.state.fn == "fit" and not trainer.sanity_checking
                and trainer.global_step not in (0, self._saved_step)):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step not in (0, self._saved_step):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (collective: every rank calls it)."""
        tmp = os.path.join(self.dirpath, f".{self.FILENAME}.tmp")
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
        trainer.strategy.barrier("LastCheckpoint.save")
        trainer.save_checkpoint(tmp)  # ends with a barrier: every rank's part is written
        if trainer.is_global_zero:
            replace_path(tmp, self.path)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._saved_step, self._saved_time, self.last_saved_path = trainer.global_step, time.monotonic(), self.path
