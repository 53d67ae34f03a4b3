"""The frozen reference policy pi_ref of KL-regularised methods (DPO and its variants, PPO, GRPO).

One component for every module that needs one, with three sources:

- ``copy``: a frozen model built from its spec (by default the initial policy), sharded like the
  policy, rebuilt from the spec at every start and never saved in checkpoints;
- ``adapters``: with a LoRA policy, the base model is the policy with its adapters disabled, so no
  second copy of the weights is held;
- ``precomputed``: (offline preference data) each row's reference log-probs computed once before
  training by one of the other two, kept here by split and row index, and the model freed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from lit_align.models import CausalLMSpec
from lit_align.models.lora import find_peft

SOURCES = ("copy", "adapters", "precomputed")

#: The prefix of the reference's parameters in a module's state dict (excluded from checkpoints).
PREFIX = "reference."


class Reference(torch.nn.Module):
    """The reference policy of a module whose policy is ``owner.model``.

    Args:
        spec: what the ``copy`` source builds (``None``: nothing to build).
        source: one of :data:`SOURCES`.

    A submodule of its LightningModule (so device moves and precision plugins reach the frozen
    copy); the owner calls :meth:`build` in ``configure_model`` and scores through :meth:`policy`.
    """

    def __init__(self, spec: CausalLMSpec | None, source: str = "copy"):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"reference source {source!r} is not one of {SOURCES}")
        self.spec, self.source = spec, source
        self.model: torch.nn.Module | None = None
        self.tables: dict[str, torch.Tensor] = {}

    def build(self, owner) -> None:
        """Build the frozen copy (``copy`` source) with ``owner.build_frozen`` (sharded as the
        policy is); idempotent."""
        if self.source == "copy" and self.model is None:
            self.model = owner.build_frozen(self.spec)

    @contextmanager
    def policy(self, owner) -> Iterator[torch.nn.Module]:
        """The model to score the reference with, in eval mode, without gradients."""
        adapters_off = self.source == "precomputed" and self.model is None and find_peft(owner.model) is not None
        if self.source == "adapters" or adapters_off:
            context = owner.adapters_disabled()
        elif self.model is not None:
            context = nullcontext(self.model)
        else:
            raise RuntimeError(f"{type(owner).__name__}: the reference model is not built (source {self.source!r})")
        with torch.no_grad(), context as model:
            yield model

    # -- precomputed log-probs ---------------------------------------------------------
    @torch.no_grad()
    def precompute(self, owner, splits: dict[str, list[dict]], collate: Callable[[list[dict]], dict],
                   score: Callable[[torch.nn.Module, dict], torch.Tensor], batch_size: int) -> None:
        """Score every row of every split once and keep the results by split and row position.

        Args:
            owner: the LightningModule (its device; its policy for the ``adapters`` case).
            splits: ``{split: encoded rows}`` (each row's position is its ``index``).
            collate: rows -> batch (``[B, ...]`` tensors).
            score: ``(model, batch) -> [B, K]`` values to keep per row (e.g. chosen, rejected).
            batch_size: rows per forward.
        A copy built for the purpose (or the adapter-free base) scores the rows, so a resumed run
        gets the values of the first one; the copy is freed afterwards.
        """
        todo = {s: rows for s, rows in splits.items() if s not in self.tables and rows}
        if not todo:
            return
        temporary = self.model is None and find_peft(owner.model) is None
        if temporary:
            self.model = owner.build_frozen(self.spec)
        try:
            with self.policy(owner) as model:
                for split, rows in todo.items():
                    parts = []
                    for s in range(0, len(rows), batch_size):
                        batch = {k: v.to(owner.device) if isinstance(v, torch.Tensor) else v
                                 for k, v in collate(rows[s: s + batch_size]).items()}
                        parts.append(score(model, batch).float().cpu())
                    self.tables[split] = torch.cat(parts)
        finally:
            if temporary:
                self.model = None

    def lookup(self, split: str, index: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` precomputed values of the rows ``index`` of ``split``."""
        if split not in self.tables:
            raise RuntimeError(f"reference: no precomputed log-probs for split {split!r} "
                               f"(computed: {sorted(self.tables)})")
        return self.tables[split][index.cpu()]
