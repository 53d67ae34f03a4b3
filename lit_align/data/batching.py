"""Collation, packing and step-planned batching.

Batches are planned per optimizer step: every micro-batch carries the number of
label tokens in its whole optimizer step across gradient-accumulation steps and
data-parallel ranks (``num_label_tokens_step``), so a loss normalised by it is the
same token mean whether a step's rows come in one micro-batch or many.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_align.data.encode import IGNORE_INDEX


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """Stack ragged lists into ``[B, T]`` padded with ``value`` on ``side``."""
    length = length or max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, : len(s)] = torch.as_tensor(s)
            else:
                out[i, length - len(s):] = torch.as_tensor(s)
    return out


def collate_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence per row, right-padded: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``."""
    ids = pad([r["input_ids"] for r in rows], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0),
        "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
    }


def collate_packed(packs: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several rows per sequence: ``position_ids`` restart at 0 for every row, which the
    model turns into a block-diagonal causal mask (no attention across rows), and no
    ``attention_mask`` is given. Right padding forms one more block with no labels."""
    ids, labels, positions = [], [], []
    for pack in packs:
        ids.append([t for r in pack for t in r["input_ids"]])
        labels.append([t for r in pack for t in r["labels"]])
        positions.append([p for r in pack for p in range(len(r["input_ids"]))])
    length = max(len(s) for s in ids)
    pos = torch.zeros(len(packs), length, dtype=torch.long)
    for i, p in enumerate(positions):
        pos[i, : len(p)] = torch.as_tensor(p)
        pos[i, len(p):] = torch.arange(length - len(p))
    return {"input_ids": pad(ids, pad_id), "labels": pad(labels, IGNORE_INDEX), "position_ids": pos}


def collate_generation(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Left-padded generation prompts plus the references and metadata of each row."""
    return {
        "prompt_ids": pad([r["prompt_ids"] for r in rows], pad_id, side="left"),
        "prompt_mask": pad([[1] * len(r["prompt_ids"]) for r in rows], 0, side="left"),
        "references": [r["reference"] for r in rows],
        "meta": [r.get("meta") or {} for r in rows],
    }


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of rows (by length) into sequences of at most ``max_length``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        best = None
        for b, free in enumerate(space):
            if lengths[i] <= free and (best is None or free < space[best]):
                best = b
        if best is None:
            bins.append([i])
            space.append(max_length - lengths[i])
        else:
            bins[best].append(i)
            space[best] -= lengths[i]
    return bins


def plan_batches(lengths: Sequence[int], micro_batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                 group_by_length: bool, world_size: int = 1, drop_last: bool = False) -> list[list[int]]:
    """Global list of micro-batches (item indices) for one epoch.

    ``group_by_length`` sorts each window of 64 micro-batches by length so a batch
    holds rows of similar length (little padding), then shuffles the batches.
    The number of batches is a multiple of ``world_size``; batch ``j`` goes to rank
    ``j % world_size``.
    """
    items = list(range(len(lengths)))
    rng = random.Random(seed * 100_003 + epoch)
    if shuffle:
        rng.shuffle(items)
    if group_by_length:
        window = micro_batch_size * 64
        items = [i for s in range(0, len(items), window)
                 for i in sorted(items[s: s + window], key=lambda i: -lengths[i])]
    batches = [items[s: s + micro_batch_size] for s in range(0, len(items), micro_batch_size)]
    if drop_last and batches and len(batches[-1]) < micro_batch_size:
        batches.pop()
    if group_by_length and shuffle:
        rng.shuffle(batches)
    usable = len(batches) - len(batches) % world_size
    if usable == 0 and batches:
        raise ValueError(f"{len(lengths)} rows make {len(batches)} micro-batches, fewer than the {world_size} ranks")
    return batches[:usable]


class PlannedBatches(IterableDataset):
    """Collated micro-batches of one rank, planned per optimizer step.

    Items are rows or packs (lists of rows). Each yielded batch has
    ``num_label_tokens_step`` (label tokens in its whole optimizer step over all
    micro-batches and ranks) and ``num_seqs_step``.
    """

    def __init__(self, rows: Sequence[dict], items: list[list[int]], collate: Callable[[list[list[dict]]], dict],
                 micro_batch_size: int, *, shuffle: bool, group_by_length: bool, seed: int = 0,
                 drop_last: bool = False, accumulate: int = 1, world_size: int = 1, rank: int = 0,
                 with_generation: bool = False, pad_id: int = 0):
        self.rows, self.items, self.collate = rows, items, collate
        self.lengths = [sum(rows[i]["length"] for i in item) for item in items]
        self.labels = [sum(rows[i]["num_labels"] for i in item) for item in items]
        self.micro_batch_size, self.shuffle, self.group_by_length = micro_batch_size, shuffle, group_by_length
        self.seed, self.drop_last = seed, drop_last
        self.accumulate, self.world_size, self.rank = accumulate, world_size, rank
        self.with_generation, self.pad_id = with_generation, pad_id
        self.epoch, self.skip = 0, 0

    def plan(self) -> list[list[int]]:
        return plan_batches(self.lengths, self.micro_batch_size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                            group_by_length=self.group_by_length, world_size=self.world_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        return len(self.plan()) // self.world_size

    def __iter__(self):
        batches = self.plan()
        per_step = self.accumulate * self.world_size
        step_tokens, step_seqs = [], []
        for s in range(0, len(batches), per_step):
            group = batches[s: s + per_step]
            step_tokens.append(sum(self.labels[i] for b in group for i in b))
            step_seqs.append(sum(len(self.items[i]) for b in group for i in b))
        mine = list(range(self.rank, len(batches), self.world_size))[self.skip:]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id:: info.num_workers]
        # The plan is fixed here, not on the first next(): the loader resets `skip` right after.
        return self._batches(batches, mine, step_tokens, step_seqs, per_step)

    def _batches(self, batches, mine, step_tokens, step_seqs, per_step):
        for j in mine:
            packs = [[self.rows[r] for r in self.items[i]] for i in batches[j]]
            batch = self.collate(packs)
            batch["num_label_tokens_step"] = torch.tensor(float(step_tokens[j // per_step]))
            batch["num_seqs_step"] = torch.tensor(float(step_seqs[j // per_step]))
            if self.with_generation:
                batch.update(collate_generation([row for pack in packs for row in pack], self.pad_id))
            yield batch


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches processed) is saved in checkpoints.

    Lightning saves ``state_dict()`` and restores it with ``load_state_dict()``; the
    next pass then starts at the first unprocessed micro-batch of the same epoch.
    ``progress`` returns ``(epoch, batches processed in it)`` as the trainer counts them
    (the data fetcher reads ahead, so the loader cannot count them itself).
    """

    def __init__(self, dataset: PlannedBatches, progress: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.progress = progress
        # The loader counts its own epochs (one pass each) rather than reading the trainer's: resumed
        # from a checkpoint written after an epoch's last batch (before the epoch ended), Lightning
        # counts that epoch as processed at restart and again when its (empty) rest ends, one more
        # than the passes the data made; read from it, the run would skip one epoch's row order.
        self._restored: int | None = None
        self._next: int | None = None  # the epoch of the next pass
        self._pass: tuple[int, int] | None = None  # (data epoch, trainer epoch count) of this pass

    def __iter__(self):
        if self.progress is not None:
            count = self.progress()[0]
            epoch = next(e for e in (self._restored, self._next, count) if e is not None)
            self._restored, self._next, self._pass = None, epoch + 1, (epoch, count)
            self.dataset.epoch = epoch
        iterator = super().__iter__()
        self.dataset.skip = 0  # a restored position applies to one pass only
        return iterator

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {"epoch": self.dataset.epoch, "batches_done": 0}
        count, done = self.progress()
        if self._pass is None:  # no pass yet
            return {"epoch": count if self._restored is None else self._restored, "batches_done": done}
        epoch, at_start = self._pass
        if count != at_start:  # the pass ended (an epoch-end checkpoint): the next one starts afresh
            return {"epoch": epoch + 1, "batches_done": 0}
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = state["epoch"]
        self.dataset.epoch = state["epoch"]
        self.dataset.skip = state["batches_done"]
