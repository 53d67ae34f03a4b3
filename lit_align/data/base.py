"""What every text data module shares: sources and splits, the tokenizer taken from the
model, row-by-row encoding with located errors and counted drops, and step-planned
resumable loaders."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_align.data.batching import PlannedBatches, ResumableLoader
from lit_align.data.encode import TRUNCATION, Dropped
from lit_align.data.formats import DataError, Where
from lit_align.data.sources import ROW_COLUMN, load_splits, task_splits
from lit_align.distributed import data_parallel
from lit_align.settings import differences, plain

SCALARS = (str, int, float, bool)


class TextDataModule(L.LightningDataModule):
    """Base of the text data modules; subclasses define how a row is encoded and collated.

    Args:
        task: a built-in task used when ``path`` and ``data_files`` are unset.
        path: hub id, local folder, or a local json/jsonl/parquet/csv file.
        data_files: files for ``datasets``' json/csv/parquet builders (a dict maps splits to files).
        name: dataset configuration name.
        train_split / val_split / test_split: split names. The train split must exist; so must a
            held-out split set to a name other than its default (``validation``, ``test``), or
            setup fails naming the splits the source has. The defaults are optional: without a
            validation split one is taken from train with ``val_fraction`` (0: none), without a
            test split there is none. ``None`` skips a held-out split.
        max_length: longest sequence in tokens.
        truncation: ``prompt`` (cut the prompt side, then the end) or ``drop`` for rows longer than
            ``max_length``. Cut rows are counted in :attr:`stats` (``data/<split>_truncated_prompt``,
            ``data/<split>_truncated_response``: a response cut at the end has lost its EOS), dropped
            rows too (``data/<split>_dropped_<reason>``).
        micro_batch_size: rows per micro-batch per device.
        eval_batch_size: rows per validation / test batch.
        max_eval_rows: cap on validation / test rows (``None``: all).
        num_workers: DataLoader workers.
        seed: shuffling seed.

    The tokenizer comes from the LightningModule (``model.tokenizer``) at ``setup``,
    so model and data always agree; set ``tokenizer`` by hand to use the module alone.
    After ``setup``, ``stats`` holds counts to log: ``data/<split>_rows`` and the truncated
    and dropped rows per split, and :attr:`chat_templated` says whether the tokenizer's chat
    template rendered any row (so generation must also stop at its end-of-turn token).
    """

    row_kind = "instruction"  # which rows a built-in task yields for this module
    group_key: str | None = None  # a row column that splits held-out exact match (see eval_groups)

    def __init__(self, task=None, path: str | None = None, data_files: str | list[str] | dict[str, Any] | None = None,
                 name: str | None = None, train_split: str = "train", val_split: str | None = "validation",
                 test_split: str | None = "test", val_fraction: float = 0.0, max_length: int = 1024,
                 truncation: str = "prompt", micro_batch_size: int = 8, eval_batch_size: int = 64,
                 max_eval_rows: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if truncation not in TRUNCATION:
            raise ValueError(f"data.truncation: {truncation!r} is not one of {TRUNCATION}")
        if task is None and path is None and data_files is None:
            raise ValueError("data: give a built-in `task`, a `path` or `data_files`")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction: {val_fraction} must be in [0, 1)")
        if micro_batch_size < 1 or eval_batch_size < 1 or max_length < 2:
            raise ValueError("data: micro_batch_size and eval_batch_size must be >= 1 and max_length >= 2")
        self.task = task
        self.tokenizer = None
        self.encoded: dict[str, list[dict]] = {}
        self.stats: dict[str, int] = {}
        self._chat_templated: bool | None = None

    @property
    def chat_templated(self) -> bool:
        """Whether any kept row of any split was rendered with the tokenizer's chat template
        (conversational rows; prompts with ``chat_template`` set). When true, a generation
        from these rows ends its turn with the template's end-of-turn token
        (:func:`~lit_align.models.tokenizer.end_of_turn_ids`), which the online RL modules add
        to the stop ids. Known after :meth:`setup`; before, a ``RuntimeError``."""
        if self._chat_templated is None:
            raise RuntimeError(f"{type(self).__name__}.chat_templated: call setup() first")
        return self._chat_templated

    # -- to define in subclasses ----------------------------------------------------
    def encode_row(self, row: dict, fmt: str, where: Where) -> dict:
        """One encoded row (with ``length`` and ``num_labels``, and optionally ``truncated``: the
        parts cut to fit, among ``"prompt"`` and ``"response"``, which are counted and removed,
        and ``templated``: whether the chat template rendered the row, recorded in
        :attr:`chat_templated` and removed); raise :class:`Dropped` to skip it."""
        raise NotImplementedError

    def row_format(self, columns: list[str]) -> str:
        """The format of a split, from its columns or the ``format`` setting. A :class:`DataError`
        raised here is reported with the split's source and name."""
        raise NotImplementedError

    def used_columns(self) -> set[str]:
        """Columns consumed by the encoding; the other scalar columns become ``meta``."""
        raise NotImplementedError

    def collate(self, packs: list[list[dict]]) -> dict:
        """Micro-batch of items (each a list of rows: one row unless packed)."""
        raise NotImplementedError

    def eval_collate(self, packs: list[list[dict]]) -> dict:
        """Validation / test micro-batch (never packed)."""
        return self.collate(packs)

    def train_items(self, rows: list[dict]) -> list[list[int]]:
        """Training items as lists of row indices (one row each unless packed)."""
        return [[i] for i in range(len(rows))]

    # -- loading ----------------------------------------------------------------
    def _raw_splits(self) -> tuple[dict[str, Any], dict[str, str]]:
        """``({role: Dataset}, {role: source})``, each source naming that split's own files."""
        h = self.hparams
        if h.path is None and h.data_files is None:
            splits = task_splits(self.task.rows(self.row_kind))
            return splits, {role: f"task {type(self.task).__name__}" for role in splits}
        return load_splits(h.path, h.data_files, h.name,
                           {"train": h.train_split, "validation": h.val_split, "test": h.test_split},
                           h.val_fraction, h.seed)

    def encode_split(self, dataset, split: str, source: str) -> list[dict]:
        """Encode every row of a split; bad rows raise :class:`DataError`, dropped and truncated
        rows are counted in :attr:`stats` and summed up in one log line."""
        try:
            fmt = self.row_format([c for c in dataset.column_names if c != ROW_COLUMN])
        except DataError as e:
            raise DataError(f"{source} [{split}]: {e}") from None
        used = self.used_columns()
        out, dropped, cut = [], Counter(), Counter()
        templated = False
        for i, row in enumerate(dataset):
            where = Where(source, split, row.pop(ROW_COLUMN, i))  # the row's number in the source
            try:
                enc = self.encode_row(row, fmt, where)
            except Dropped as d:
                dropped[d.reason] += 1
                continue
            cut.update(enc.pop("truncated", ()))
            templated |= bool(enc.pop("templated", False))
            enc["meta"] = {k: v for k, v in row.items() if k not in used and isinstance(v, SCALARS)}
            enc["index"] = len(out)  # the row's position in its encoded split: a key for per-row state
            out.append(enc)
        for reason, n in dropped.items():
            self.stats[f"data/{split}_dropped_{reason.replace(' ', '_')}"] = n
        for part, n in cut.items():
            self.stats[f"data/{split}_truncated_{part}"] = n
        self.stats[f"data/{split}_rows"] = len(out)
        notes = [f"dropped {dict(dropped)} of {len(dataset)} rows"] if dropped else []
        if cut:
            parts = {"prompt": "prompts (from the start)", "response": "responses (at the end, losing their EOS)"}
            order = [p for p in parts if p in cut] + sorted(set(cut) - set(parts))
            notes.append(f"truncated to max_length={self.hparams.max_length}: "
                         + ", ".join(f"{cut[part]} {parts.get(part, part)}" for part in order))
        if notes:
            rank_zero_info(f"{source} [{split}]: " + "; ".join(notes))
        if not out:
            raise DataError(f"{source} [{split}]: no usable rows (dropped: {dict(dropped)})")
        self._chat_templated = bool(self._chat_templated) or templated
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError(f"{type(self).__name__} needs a tokenizer: from the model at setup, "
                                 "or set `.tokenizer`")
        if self.encoded:
            return
        splits, sources = self._raw_splits()
        limit = self.hparams.max_eval_rows
        for role, ds in splits.items():
            if role != "train" and limit is not None:
                ds = ds.select(range(min(limit, len(ds))))
            self.encoded[role] = self.encode_split(ds, role, sources[role])

    def eval_groups(self) -> list[str] | None:
        """The values of ``group_key`` over the validation and test rows, sorted: the groups of
        the per-group exact match. Computed from every row before the split across processes,
        so each process holds the same groups. A row without the column is an error naming the
        row's source, split and number there when the encoded row keeps its :class:`Where`
        (``row["where"]``), else its position among the split's kept rows."""
        if self.group_key is None:
            return None
        values = set()
        for role in ("validation", "test"):
            for i, row in enumerate(self.encoded.get(role, [])):
                if self.group_key not in row["meta"]:
                    problem = f"no column to group metrics by (columns: {sorted(row['meta'])})"
                    where = row.get("where")
                    if isinstance(where, Where):
                        raise where(self.group_key, problem)
                    raise DataError(f"{role} row {i} (position after dropped rows), field {self.group_key!r}: "
                                    f"{problem}")
                values.add(str(row["meta"][self.group_key]))
        return sorted(values)

    # -- loaders ----------------------------------------------------------------
    @property
    def uses_task(self) -> bool:
        return self.task is not None and self.hparams.path is None and self.hparams.data_files is None

    @property
    def checker(self) -> Callable[[str, dict, str], bool] | None:
        """``checker(completion, meta, reference)`` for tasks with a checkable answer."""
        if self.uses_task and hasattr(self.task, "check"):
            return lambda completion, meta, reference: self.task.check(completion, meta["answer"])
        return None

    # -- checkpoints ---------------------------------------------------------------
    def settings(self) -> dict:
        """The data settings as plain data: the constructor's hyperparameters and the built-in
        task's fields (which ``hparams`` leaves out)."""
        return plain({**dict(self.hparams), "task": self.task})

    def state_dict(self) -> dict:
        # Lightning writes this into every checkpoint under the class name
        return {"settings": self.settings()}

    def load_state_dict(self, state: dict) -> None:
        """On resume, warn naming every data setting that differs from the checkpoint's: the
        given values apply, and the resumed run no longer repeats the uninterrupted one."""
        saved = state.get("settings")
        if saved is None:
            return
        diffs = differences(self.settings(), saved)
        if diffs:
            lines = "; ".join(f"data.{key}: {value!r} (checkpoint: {old!r})" for key, value, old in diffs)
            rank_zero_warn(f"{type(self).__name__}: resuming with data settings that differ from the checkpoint's; the "
                           f"given values apply, so the run will not repeat the uninterrupted one: {lines}")

    def _dist(self) -> tuple[int, int, int]:
        t = self.trainer
        if t is None:
            return 1, 1, 0
        # tensor-parallel ranks of one replica take the same rows
        return (t.accumulate_grad_batches, *data_parallel(t))

    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def group_by_length(self) -> bool:
        return False

    def train_dataloader(self):
        h = self.hparams
        rows = self.encoded["train"]
        accumulate, world, rank = self._dist()
        ds = PlannedBatches(rows, self.train_items(rows), self.collate, h.micro_batch_size, shuffle=True,
                            group_by_length=self.group_by_length(), seed=h.seed, accumulate=accumulate,
                            world_size=world, rank=rank)
        return ResumableLoader(ds, progress=self._progress if self.trainer is not None else None,
                               num_workers=h.num_workers)

    def eval_rows(self, role: str) -> list[dict]:
        """This rank's share of a validation / test split (metrics sum across ranks)."""
        _, world, rank = self._dist()
        return self.encoded.get(role, [])[rank::world]

    def _eval_loader(self, role: str):
        if role not in self.encoded:
            return []
        rows = self.eval_rows(role)
        pad_id = self.tokenizer.pad_token_id
        ds = PlannedBatches(rows, [[i] for i in range(len(rows))], self.eval_collate, self.hparams.eval_batch_size,
                            shuffle=False, group_by_length=False, with_generation=True, pad_id=pad_id)
        return ResumableLoader(ds, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return self._eval_loader("validation")

    def test_dataloader(self):
        return self._eval_loader("test")

