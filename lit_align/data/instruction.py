"""InstructionDataModule: instruction / chat data for SFT."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_align.data.batching import PlannedBatches, ResumableLoader, collate_packed, collate_rows, pack_rows
from lit_align.data.encode import TRUNCATION, Dropped, encode_segments
from lit_align.data.formats import DEFAULT_COLUMNS, FORMATS, DataError, Where, detect_format, row_to_segments
from lit_align.data.sources import ROW_COLUMN, load_splits, task_splits
from lit_align.data.tasks import ArithTask

_SCALARS = (str, int, float, bool)


class InstructionDataModule(L.LightningDataModule):
    """Instruction and chat data with the loss on completion / assistant tokens only.

    Args:
        task: a built-in task (``arith``) used when ``path`` and ``data_files`` are unset.
        path: hub id, local folder, or a local json/jsonl/parquet/csv file.
        data_files: files for ``datasets``' json/csv/parquet builders (a dict maps splits to files).
        name: dataset configuration name.
        train_split / val_split / test_split: split names; a missing validation split
            is taken from train with ``val_fraction``.
        format: ``auto`` (from the columns), ``prompt_completion``, ``messages``,
            ``alpaca`` (instruction/input/output) or ``sharegpt`` (conversations with from/value).
        columns: renames of the standard columns, e.g. ``{prompt: question, completion: answer}``.
        system_prompt: a system turn added to conversations that have none.
        max_length: longest sequence in tokens (packed sequences too).
        truncation: ``prompt`` (cut the prompt side, then the end) or ``drop`` for rows longer than ``max_length``.
        micro_batch_size: rows (or packed sequences) per micro-batch per device.
        eval_batch_size: rows per validation / test batch.
        packing: pack several rows into each sequence, with no attention across rows.
        group_by_length: batch rows of similar length together (less padding).
        max_eval_rows: cap on validation / test rows (``None``: all).
        num_workers: DataLoader workers.
        seed: shuffling seed.

    The tokenizer comes from the LightningModule (``model.tokenizer``) at ``setup``,
    so model and data always agree; set ``tokenizer`` by hand to use the module alone.
    """

    def __init__(self, task: ArithTask | None = None, path: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, name: str | None = None,
                 train_split: str = "train", val_split: str | None = "validation", test_split: str | None = "test",
                 val_fraction: float = 0.0, format: str = "auto", columns: dict[str, str] | None = None,
                 system_prompt: str | None = None, max_length: int = 1024, truncation: str = "prompt",
                 micro_batch_size: int = 8, eval_batch_size: int = 64, packing: bool = False,
                 group_by_length: bool = True, max_eval_rows: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"data.format: {format!r} is not one of {FORMATS}")
        if truncation not in TRUNCATION:
            raise ValueError(f"data.truncation: {truncation!r} is not one of {TRUNCATION}")
        unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(f"data.columns: unknown keys {sorted(unknown)} (known: {sorted(DEFAULT_COLUMNS)})")
        if task is None and path is None and data_files is None:
            raise ValueError("data: give a built-in `task`, a `path` or `data_files`")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction: {val_fraction} must be in [0, 1)")
        if micro_batch_size < 1 or eval_batch_size < 1 or max_length < 2:
            raise ValueError("data: micro_batch_size and eval_batch_size must be >= 1 and max_length >= 2")
        self.save_hyperparameters(ignore=["task"])
        self.task = task
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        self.tokenizer = None
        self.encoded: dict[str, list[dict]] = {}
        self.stats: dict[str, int] = {}

    # -- loading ----------------------------------------------------------------
    def _raw_splits(self):
        h = self.hparams
        if h.path is None and h.data_files is None:
            return task_splits(self.task.rows("instruction")), f"task {type(self.task).__name__}"
        return load_splits(h.path, h.data_files, h.name,
                           {"train": h.train_split, "validation": h.val_split, "test": h.test_split},
                           h.val_fraction, h.seed)

    def encode_split(self, dataset, split: str, source: str) -> list[dict]:
        """Encode every row of a split; bad rows raise :class:`DataError`, dropped rows are counted."""
        h = self.hparams
        fmt = h.format if h.format != "auto" else detect_format(list(dataset.column_names), self.columns)
        used = {self.columns[k] for k in self.columns}
        out, dropped = [], Counter()
        for i, row in enumerate(dataset):
            where = Where(source, split, row.pop(ROW_COLUMN, i))  # the row's number in the source
            try:
                enc = encode_segments(row_to_segments(row, fmt, self.columns, self.tokenizer, where, h.system_prompt),
                                      self.tokenizer, h.max_length, h.truncation)
            except Dropped as d:
                dropped[d.reason] += 1
                continue
            enc["meta"] = {k: v for k, v in row.items() if k not in used and isinstance(v, _SCALARS)}
            out.append(enc)
        for reason, n in dropped.items():
            self.stats[f"data/{split}_dropped_{reason.replace(' ', '_')}"] = n
        self.stats[f"data/{split}_rows"] = len(out)
        if dropped:
            rank_zero_info(f"{source} [{split}]: dropped {dict(dropped)} of {len(dataset)} rows")
        if not out:
            raise DataError(f"{source} [{split}]: no usable rows (dropped: {dict(dropped)})")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("InstructionDataModule needs a tokenizer: from the model at setup, or set `.tokenizer`")
        if self.encoded:
            return
        splits, source = self._raw_splits()
        limit = self.hparams.max_eval_rows
        for role, ds in splits.items():
            if role != "train" and limit is not None:
                ds = ds.select(range(min(limit, len(ds))))
            self.encoded[role] = self.encode_split(ds, role, source)

    # -- loaders ----------------------------------------------------------------
    @property
    def checker(self) -> Callable[[str, dict, str], bool] | None:
        """``checker(completion, meta, reference)`` for tasks with a checkable answer."""
        if self.task is not None and self.hparams.path is None and self.hparams.data_files is None:
            return lambda completion, meta, reference: self.task.check(completion, meta["answer"])
        return None

    def _dist(self) -> tuple[int, int, int]:
        t = self.trainer
        if t is None:
            return 1, 1, 0
        return t.accumulate_grad_batches, t.world_size, t.global_rank

    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self):
        h = self.hparams
        rows = self.encoded["train"]
        pad_id = self.tokenizer.pad_token_id
        if h.packing:
            items = pack_rows([r["length"] for r in rows], h.max_length)
            collate = partial(collate_packed, pad_id=pad_id)
        else:
            items = [[i] for i in range(len(rows))]
            collate = partial(_collate_unpacked, pad_id=pad_id)
        accumulate, world, rank = self._dist()
        ds = PlannedBatches(rows, items, collate, h.micro_batch_size, shuffle=True, group_by_length=h.group_by_length,
                            seed=h.seed, accumulate=accumulate, world_size=world, rank=rank)
        return ResumableLoader(ds, progress=self._progress if self.trainer is not None else None,
                               num_workers=h.num_workers)

    def _eval_loader(self, role: str):
        if role not in self.encoded:
            return []
        _, world, rank = self._dist()
        rows = self.encoded[role][rank::world]  # each rank evaluates its share; metrics sum across ranks
        pad_id = self.tokenizer.pad_token_id
        ds = PlannedBatches(rows, [[i] for i in range(len(rows))], partial(_collate_unpacked, pad_id=pad_id),
                            self.hparams.eval_batch_size, shuffle=False, group_by_length=False,
                            with_generation=True, pad_id=pad_id)
        return ResumableLoader(ds, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return self._eval_loader("validation")

    def test_dataloader(self):
        return self._eval_loader("test")


def _collate_unpacked(packs: list[list[dict]], pad_id: int):
    return collate_rows([p[0] for p in packs], pad_id)
