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


class GroupedExactMatch(Metric):
    """Exact match per group of rows (e.g. per question type), summed across processes.

    Args:
        groups: the group names, fixed up front so every process holds the same states.
    ``update(correct, groups)`` takes one bool and one group name per generation;
    ``compute()`` returns ``{group: fraction correct}`` for the groups that had rows.
    """

    full_state_update = False

    def __init__(self, groups: list[str], **kwargs):
        super().__init__(**kwargs)
        self.groups = list(groups)
        self._index = {g: i for i, g in enumerate(self.groups)}
        self.add_state("correct", default=torch.zeros(len(self.groups)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.groups)), dist_reduce_fx="sum")

    def update(self, correct: list[bool], groups: list[str]) -> None:
        if len(correct) != len(groups):
            raise ValueError(f"GroupedExactMatch: {len(correct)} results for {len(groups)} group names")
        unknown = sorted({str(g) for g in groups} - set(self._index))
        if unknown:
            raise ValueError(f"GroupedExactMatch: groups {unknown} are not among {self.groups}")
        idx = torch.tensor([self._index[str(g)] for g in groups], dtype=torch.long, device=self.correct.device)
        self.correct += torch.bincount(idx, weights=torch.tensor([float(c) for c in correct], device=idx.device),
                                       minlength=len(self.groups)).to(self.correct.dtype)
        self.total += torch.bincount(idx, minlength=len(self.groups)).to(self.total.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        return {g: self.correct[i] / self.total[i] for g, i in self._index.items() if self.total[i] > 0}
