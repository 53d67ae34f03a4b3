"""What a training step depends on besides the weights, the optimizers and the data position
(which Lightning and :class:`~lit_align.data.batching.ResumableLoader` checkpoint): the random
generators, saved with every checkpoint and restored right before the first resumed step, so
that a run resumed from a checkpoint takes the steps the uninterrupted run would have taken."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def rng_state() -> dict[str, Any]:
    """This process's global random generators: torch (CPU and every CUDA device), Python's
    ``random`` and NumPy's legacy global generator, as tensors and plain numbers (loadable
    with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            rank_zero_warn(f"resume: the checkpoint holds the random state of {len(state['cuda'])} CUDA devices, this "
                           f"process sees {torch.cuda.device_count()}; restoring the first ones")
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _gathered(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective under data parallelism)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class ResumeState(L.Callback):
    """Checkpoints the random generators of every rank and, for online RL, the rollout engine's
    own state (:meth:`~lit_align.rollout.RolloutEngine.state_dict`, e.g. a seeded sampler), and
    restores them at the start of the first training batch after a resume: later than any other
    restore, so that nothing drawn while the resumed run starts up (the loader's base seed,
    the sanity check) shifts the training's random stream.

    Validation during fit leaves the generators as it found them, so a step's randomness never
    depends on whether (or how often) held-out evaluation ran before it, which a resumed run
    repeats or skips differently from the uninterrupted one.

    Every module adds it (:meth:`~lit_align.algorithms.base.CausalLMModule.configure_callbacks`).
    A resume on another number of processes cannot repeat the uninterrupted run; it is warned
    about and each rank takes the state of rank ``rank % saved ranks``.
    """

    def __init__(self):
        self._pending: dict | None = None
        self._around_validation: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        # called on every rank when a checkpoint is written (rank 0 writes it)
        module = getattr(self, "_module", None)
        engine = getattr(module, "engine", None)
        return {"rng": _gathered(rng_state()), "engine": _gathered(engine.state_dict() if engine is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._module = pl_module

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        saved, rank = len(state["rng"]), trainer.global_rank
        if saved != trainer.world_size:
            rank_zero_warn(f"resume: the checkpoint was written by {saved} processes, this run has "
                           f"{trainer.world_size}; its random streams cannot repeat the original run's")
        set_rng_state(state["rng"][rank % saved])
        engine = getattr(pl_module, "engine", None)
        if engine is not None:
            engine.load_state_dict(state["engine"][rank % saved])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._around_validation = rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._around_validation is not None:
            set_rng_state(self._around_validation)
            self._around_validation = None
