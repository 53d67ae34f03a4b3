"""InstructionDataModule: instruction / chat data for SFT."""

from __future__ import annotations

from typing import Any

from lit_align.data.base import TextDataModule
from lit_align.data.batching import collate_packed, collate_rows, pack_rows
from lit_align.data.encode import encode_segments
from lit_align.data.formats import DEFAULT_COLUMNS, FORMATS, Where, detect_format, renamed_columns, row_to_segments
from lit_align.data.tasks import ArithTask, ChainTask, ShapesTextTask


class InstructionDataModule(TextDataModule):
    """Instruction and chat data with the loss on completion / assistant tokens only.

    Args:
        task: a built-in task (``arith``, ``chain``, or ``shapes`` rendered as text: the LM stage
            before LLaVA stage 1) used when ``path`` and ``data_files`` are unset. A task with a
            ``group_key`` (``chain``: ``steps``) also reports held-out exact match per group.
        path: hub id, local folder, or a local json/jsonl/parquet/csv file.
        data_files: files for ``datasets``' json/csv/parquet builders (a dict maps splits to files).
        name: dataset configuration name.
        train_split / val_split / test_split: split names; a split set to a name other than its
            default must exist. A missing ``validation`` split is taken from train with
            ``val_fraction``; a missing ``test`` split is none.
        format: ``auto`` (from the columns), ``prompt_completion``, ``messages``,
            ``alpaca`` (instruction/input/output) or ``sharegpt`` (conversations with from/value).
        columns: renames of the standard columns, e.g. ``{prompt: question, completion: answer}``.
        system_prompt: a system turn added to conversations (messages, sharegpt, prompt/completion
            given as lists of turns) that have none. String prompt/completion and Alpaca rows are
            used as written, not rendered with the chat template (as in TRL), so a ``system_prompt``
            with them is an error: at construction with ``format: alpaca``, else at setup.
        max_length: longest sequence in tokens (packed sequences too).
        truncation: ``prompt`` (cut the prompt side, then the end, which loses the EOS) or ``drop``
            for rows longer than ``max_length``; both are counted in ``stats``.
        micro_batch_size: rows (or packed sequences) per micro-batch per device.
        eval_batch_size: rows per validation / test batch.
        packing: pack several rows into each sequence, with no attention across rows.
        group_by_length: batch rows of similar length together (less padding).
        max_eval_rows: cap on validation / test rows (``None``: all).
        num_workers: DataLoader workers.
        seed: shuffling seed.

    Batches: ``input_ids``, ``labels`` (``-100`` off the response) and ``attention_mask``
    ``[B, T]``, or ``position_ids`` instead of the mask when packed; for validation also
    left-padded ``prompt_ids``/``prompt_mask``, ``references`` and ``meta``.
    """

    def __init__(self, task: ChainTask | ShapesTextTask | ArithTask | None = None, path: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, name: str | None = None,
                 train_split: str = "train", val_split: str | None = "validation", test_split: str | None = "test",
                 val_fraction: float = 0.0, format: str = "auto", columns: dict[str, str] | None = None,
                 system_prompt: str | None = None, max_length: int = 1024, truncation: str = "prompt",
                 micro_batch_size: int = 8, eval_batch_size: int = 64, packing: bool = False,
                 group_by_length: bool = True, max_eval_rows: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__(task=task, path=path, data_files=data_files, name=name, train_split=train_split,
                         val_split=val_split, test_split=test_split, val_fraction=val_fraction, max_length=max_length,
                         truncation=truncation, micro_batch_size=micro_batch_size, eval_batch_size=eval_batch_size,
                         max_eval_rows=max_eval_rows, num_workers=num_workers, seed=seed)
        if format not in FORMATS:
            raise ValueError(f"data.format: {format!r} is not one of {FORMATS}")
        if format == "alpaca" and system_prompt:
            raise ValueError("data: system_prompt needs chat-templated rows; format 'alpaca' uses the fixed Alpaca"
                             " prompt as written (convert the rows to messages, or unset system_prompt)")
        self.columns = renamed_columns(columns, DEFAULT_COLUMNS)
        self.save_hyperparameters(ignore=["task"])
        self.group_key = getattr(task, "group_key", None) if self.uses_task else None

    def row_format(self, columns: list[str]) -> str:
        return self.hparams.format if self.hparams.format != "auto" else detect_format(columns, self.columns)

    def used_columns(self) -> set[str]:
        return set(self.columns.values())

    def encode_row(self, row: dict, fmt: str, where: Where) -> dict:
        h = self.hparams
        segments = row_to_segments(row, fmt, self.columns, self.tokenizer, where, h.system_prompt)
        return encode_segments(segments, self.tokenizer, h.max_length, h.truncation)

    def train_items(self, rows: list[dict]) -> list[list[int]]:
        if self.hparams.packing:
            return pack_rows([r["length"] for r in rows], self.hparams.max_length)
        return super().train_items(rows)

    def group_by_length(self) -> bool:
        return self.hparams.group_by_length

    def collate(self, packs: list[list[dict]]) -> dict:
        if self.hparams.packing:
            return collate_packed(packs, self.tokenizer.pad_token_id)
        return self.eval_collate(packs)

    def eval_collate(self, packs: list[list[dict]]) -> dict:
        return collate_rows([p[0] for p in packs], self.tokenizer.pad_token_id)
