"""Export the trained model in Hugging Face format at the end of fit."""

from __future__ import annotations

import lightning as L


class HFExport(L.Callback):
    """Calls ``pl_module.export_hf(directory)`` when fit ends (every rank: the
    gather of sharded weights is collective; rank 0 writes)."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export_hf(self.directory)
