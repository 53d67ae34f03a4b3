"""Export the trained model in Hugging Face format at the end of fit."""

from __future__ import annotations

import glob
import os
import shutil

import lightning as L
import torch

from lit_align.callbacks.last_checkpoint import replace_path


def nonfinite_tensors(directory: str) -> list[str]:
    """``file:tensor`` names of the tensors with a NaN or an infinity in the ``*.safetensors``
    files under ``directory``."""
    from safetensors import safe_open

    bad = []
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.safetensors"), recursive=True)):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(f"{os.path.relpath(path, directory)}:{key}")
    return bad


class HFExport(L.Callback):
    """Calls ``pl_module.export_hf`` when fit ends (every rank: the gather of sharded weights is
    collective; rank 0 writes).

    The export is written to a temporary sibling folder, its tensors are checked (none may hold a
    NaN or an infinity), and only then is it renamed to ``directory``: a crash or a non-finite
    model mid-export leaves the previous export in place."""

    def __init__(self, directory: str):
        self.directory = os.path.normpath(directory)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = f"{self.directory}.tmp"
        if trainer.is_global_zero and os.path.exists(tmp):
            shutil.rmtree(tmp)
        trainer.strategy.barrier("HFExport.clean")
        pl_module.export_hf(tmp)
        bad = nonfinite_tensors(tmp) if trainer.is_global_zero else []
        if trainer.is_global_zero:
            if bad:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                replace_path(tmp, self.directory)
        if not trainer.strategy.reduce_boolean_decision(not bad, all=True):
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise RuntimeError(f"HF export to {self.directory} refused: tensors with NaN or inf "
                               f"({shown or 'on rank 0'}); the previous export, if any, is unchanged")
        trainer.strategy.barrier("HFExport.done")
