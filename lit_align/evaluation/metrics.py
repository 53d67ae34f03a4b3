"""torchmetrics metrics shared by the algorithms."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ExactMatch(Metric):
    """Fraction of generations judged correct, summed across processes before dividing."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, correct: list[bool]) -> None:
        self.correct += float(sum(correct))
        self.total += float(len(correct))

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1.0)
