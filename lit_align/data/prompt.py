"""PromptDataModule: prompts (and reference answers) for online RL: GRPO, GSPO, DAPO, PPO."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import datasets
from jinja2.exceptions import TemplateError
from lightning.pytorch.utilities import rank_zero_only

from lit_align.data.base import SCALARS, TextDataModule
from lit_align.data.batching import collate_generation
from lit_align.data.encode import Dropped, leading_bos, tokenize_segments
from lit_align.data.formats import (
    DataError,
    Segment,
    Where,
    _with_system,
    lookup,
    normalize_messages,
    renamed_columns,
)
from lit_align.data.sources import ROW_COLUMN
from lit_align.data.tasks import ArithTask, ChainTask
from lit_align.distributed import data_parallel

PROMPT_COLUMNS = {"prompt": "prompt"}
PROMPT_FORMATS = ("auto", "string", "messages")
_JSON = getattr(datasets, "Json", None)  # the feature of dict columns whose rows differ in keys


# the share of a split's prompts that may be truncated to max_length before a warning
TRUNCATED_SHARE = 0.1
# a split of at least this many rows whose every prompt is cut from the left is refused (fewer: a warning)
REFUSE_ALL_CUT_ROWS = 8


def json_like(value: Any) -> bool:
    """True for values made only of dicts with string keys, lists, scalars and ``None``."""
    if value is None or isinstance(value, SCALARS):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and json_like(v) for k, v in value.items())
    if isinstance(value, list):
        return all(json_like(v) for v in value)
    return False


class PromptDataModule(TextDataModule):
    """Prompts for online RL (:class:`~lit_align.GRPO`, ``GSPO``, ``DAPO``, :class:`~lit_align.PPO`):
    the policy generates from each prompt and a reward function scores the result against
    the row's reference answer and metadata.

    Args:
        task: a built-in task (``arith`` or ``chain``: prompt + ground-truth answer) used when
            ``path`` and ``data_files`` are unset. A task with a ``group_key`` (``chain``:
            ``steps``) also reports held-out exact match per group.
        path: hub id, local folder, or a local json/jsonl/parquet/csv file.
        data_files: files for ``datasets``' json/csv/parquet builders (a dict maps splits to files).
        name: dataset configuration name.
        train_split / val_split / test_split: split names; a split set to a name other than its
            default must exist. A missing ``validation`` split is taken from train with
            ``val_fraction``; a missing ``test`` split is none.
        format: ``string`` (the prompt is text), ``messages`` (a list of ``{role, content}``
            turns; a string prompt becomes one user turn) or ``auto`` (each split's first row
            decides: a string -> ``string``, a list -> ``messages``; every row must agree).
        columns: rename of the prompt column, e.g. ``{prompt: question}``.
        answer_key: the column with the reference answer, dotted for nested columns
            (``reward_model.ground_truth`` as in verl data); copied to ``meta["answer"]``.
            ``None``: no reference (reward functions that need none).
        system_prompt: a system turn added to chat-templated prompts that have none.
        chat_template: render prompts with the tokenizer's chat template, ending with the
            generation prompt. ``None``: message prompts yes, string prompts only with
            ``format: messages`` (so the arith prompt ``37+58=`` is used verbatim).
        max_length: longest prompt in tokens.
        truncation: ``prompt`` keeps the end of a longer prompt, where generation continues
            (message prompts first lose whole leading turns after the system turn, up to a
            user turn; then tokens are cut from the left, keeping BOS; counted as
            ``data/<split>_truncated_prompt``), or ``drop`` (counted).
        micro_batch_size: prompts per rollout batch per device.
        eval_batch_size: prompts per validation / test batch.
        max_eval_rows: cap on validation / test rows (``None``: all).
        num_workers: DataLoader workers.
        seed: shuffling seed; also seeds :meth:`extra_prompts`.

    Batches (training, validation and test alike): ``prompt_ids`` and ``prompt_mask``
    ``[B, P]`` left-padded (pad id, 0 in the mask), ``prompts`` (``B`` texts as given to the
    model), ``references`` (``B`` answers, ``""`` without ``answer_key``), ``meta`` (``B``
    dicts: the row's other columns, nested dicts included, and ``answer``); also
    ``num_label_tokens_step`` / ``num_seqs_step`` (prompts in the optimizer step).
    Prompt ids carry no EOS and at most one BOS (the tokenizer's, or the chat template's when
    it writes one). After ``setup``, :attr:`chat_templated` is true when any prompt was rendered
    with the chat template.
    """

    row_kind = "prompt"

    def __init__(self, task: ChainTask | ArithTask | None = None, path: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, name: str | None = None,
                 train_split: str = "train", val_split: str | None = "validation", test_split: str | None = "test",
                 val_fraction: float = 0.0, format: str = "auto", columns: dict[str, str] | None = None,
                 answer_key: str | None = "answer", system_prompt: str | None = None,
                 chat_template: bool | None = None, max_length: int = 1024, truncation: str = "prompt",
                 micro_batch_size: int = 8, eval_batch_size: int = 64, max_eval_rows: int | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(task=task, path=path, data_files=data_files, name=name, train_split=train_split,
                         val_split=val_split, test_split=test_split, val_fraction=val_fraction, max_length=max_length,
                         truncation=truncation, micro_batch_size=micro_batch_size, eval_batch_size=eval_batch_size,
                         max_eval_rows=max_eval_rows, num_workers=num_workers, seed=seed)
        if format not in PROMPT_FORMATS:
            raise ValueError(f"data.format: {format!r} is not one of {PROMPT_FORMATS}")
        if answer_key is not None and not answer_key:
            raise ValueError("data.answer_key: give a column name, or null for no reference answer")
        if format == "messages" and chat_template is False:
            raise ValueError("data: format 'messages' needs the chat template; chat_template: false contradicts it")
        if format == "string" and system_prompt and not chat_template:
            raise ValueError("data: system_prompt needs chat-templated prompts; format 'string' uses prompts as"
                             " written (set chat_template: true to wrap them as a user turn)")
        self.columns = renamed_columns(columns, PROMPT_COLUMNS)
        self.save_hyperparameters(ignore=["task"])
        self.group_key = getattr(task, "group_key", None) if self.uses_task else None
        self._split_format: str | None = None
        self._cut_starts = 0  # prompts of the split being encoded cut from the left

    # -- splits ---------------------------------------------------------------
    def _check_answer_column(self, features: Mapping[str, Any], source: str, split: str) -> None:
        key = self.hparams.answer_key
        if key is None or key in features:
            return
        feature: Any = features
        for part in key.split("."):
            if _JSON is not None and isinstance(feature, _JSON):
                return  # dicts of differing keys: each row is checked instead
            if not isinstance(feature, Mapping) or part not in feature:
                columns = [c for c in features if c != ROW_COLUMN]
                raise DataError(f"{source} [{split}]: no answer column {key!r} (columns: {columns}); set `answer_key`"
                                " to the column with the reference answer (dotted for nested fields), or null for none")
            feature = feature[part]

    def _detect_format(self, dataset, source: str, split: str) -> str | None:
        h = self.hparams
        fmt = h.format
        if fmt == "auto" and len(dataset):
            first = dataset[0].get(self.columns["prompt"])
            fmt = "string" if isinstance(first, str) else "messages" if isinstance(first, list) else None
        if fmt == "messages" and h.chat_template is False:
            raise DataError(f"{source} [{split}]: the prompts are lists of turns, which need the chat template"
                            " (chat_template: false)")
        if fmt == "string" and h.system_prompt and not h.chat_template:
            raise DataError(f"{source} [{split}]: system_prompt needs chat-templated prompts; string prompts are"
                            " used as written (set chat_template: true to wrap them as a user turn)")
        return fmt  # None: the first row's prompt is invalid, and encoding it says so

    def encode_split(self, dataset, split: str, source: str) -> list[dict]:
        self._check_answer_column(dataset.features, source, split)
        self._split_format = self._detect_format(dataset, source, split)
        self._cut_starts = 0
        rows = super().encode_split(dataset, split, source)
        for enc in rows:  # nested (JSON-like) columns and the answer join the base's scalar meta
            enc["meta"] = {**enc["meta"], **enc.pop("_meta")}
        self._check_truncation(rows, split, source)
        return rows

    def _check_truncation(self, rows: list[dict], split: str, source: str) -> None:
        """The truncation check: more than :data:`TRUNCATED_SHARE` of a
        split's prompts cut to ``max_length`` warns with the counts; every prompt of a split of at
        least :data:`REFUSE_ALL_CUT_ROWS` rows cut from the left (each losing its start) is refused."""
        cut = self.stats.get(f"data/{split}_truncated_prompt", 0)
        # _cut_starts counts prompts cut from the left (dropping whole leading turns keeps the question)
        if self._cut_starts and self._cut_starts == len(rows) >= REFUSE_ALL_CUT_ROWS:
            raise DataError(f"{source} [{split}]: every prompt ({cut} of {cut}) is longer than data.max_length="
                            f"{self.hparams.max_length} and would lose its start; raise data.max_length "
                            "(and the sampling max_new_tokens for the answers) to fit your data")
        if cut > TRUNCATED_SHARE * len(rows) and rank_zero_only.rank == 0:
            warnings.warn(f"{source} [{split}]: {cut} of {len(rows)} prompts ({cut / len(rows):.0%}, more than "
                           f"{TRUNCATED_SHARE:.0%}) are longer than data.max_length={self.hparams.max_length} and "
                           "lose their start; raise data.max_length to fit your data", stacklevel=2)

    def row_format(self, columns: list[str]) -> str | None:
        return self._split_format

    def used_columns(self) -> set[str]:
        return {self.columns["prompt"]}

    # -- rows -----------------------------------------------------------------
    def _prompt_value(self, row: dict, fmt: str | None, where: Where) -> str | list[dict]:
        col = self.columns["prompt"]
        if col not in row:
            raise where(col, f"missing column (columns: {sorted(row)})")
        value = row[col]
        if value is None:
            raise where(col, "missing (null)")
        auto = self.hparams.format == "auto"
        like_first = " like the split's first row" if auto else ""
        if fmt == "string" and not isinstance(value, str):
            raise where(col, f"expected a string{like_first}, got {type(value).__name__}")
        if fmt == "messages" and not isinstance(value, list) and (auto or not isinstance(value, str)):
            raise where(col, f"expected a list of turns{like_first}, got {type(value).__name__}")
        if not isinstance(value, (str, list)):
            raise where(col, f"expected a string or a list of turns, got {type(value).__name__}")
        if isinstance(value, list):
            value = normalize_messages(value, col, where, require_assistant=False)
            if not any(t["content"].strip() for t in value):
                raise where(col, "is empty")
        elif not value.strip():
            raise where(col, "is empty")
        return value

    def _render(self, messages: list[dict], where: Where) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError) as e:
            raise where(self.columns["prompt"], f"the chat template cannot render these turns: {e}") from None

    def _ids(self, text: str) -> list[int]:
        return tokenize_segments([Segment(text, False)], self.tokenizer)[0]

    def encode_row(self, row: dict, fmt: str | None, where: Where) -> dict:
        h = self.hparams
        value = self._prompt_value(row, fmt, where)
        truncated = False
        templated = fmt == "messages" or (isinstance(value, str) and bool(h.chat_template))
        if templated:
            msgs = _with_system(value if isinstance(value, list) else [{"role": "user", "content": value}],
                                h.system_prompt)
            text = self._render(msgs, where)
            ids = self._ids(text)
            head = next((i for i, t in enumerate(msgs) if t["role"] != "system"), len(msgs))
            cuts = [i for i in range(head + 1, len(msgs)) if msgs[i]["role"] == "user"]
            if len(ids) > h.max_length and h.truncation == "prompt":
                for cut in cuts:  # drop whole leading turns, up to a user turn, while too long
                    text = self._render(msgs[:head] + msgs[cut:], where)
                    ids, truncated = self._ids(text), True
                    if len(ids) <= h.max_length:
                        break
        else:
            text = value
            ids = self._ids(text)
        if len(ids) > h.max_length:
            if h.truncation == "drop":
                raise Dropped("too long")
            bos = leading_bos(ids, self.tokenizer)  # keep BOS, then the end of the prompt
            ids = ids[:bos] + ids[len(ids) - (h.max_length - bos):]
            # the text keeps the BOS when it wrote one (a chat template's), not when the tokenizer added it
            written = bos and text.startswith(self.tokenizer.bos_token)
            text, truncated = self.tokenizer.decode(ids if written else ids[bos:]), True
            self._cut_starts += 1  # tokens cut from the left: the prompt lost its first words
        extra = {k: v for k, v in row.items() if k not in self.used_columns() and isinstance(v, (dict, list))
                 and json_like(v)}
        reference = ""
        if h.answer_key is not None:
            answer = lookup(row, h.answer_key)
            if answer is None:
                raise where(h.answer_key, "no reference answer (the value is null or missing)")
            extra["answer"] = answer
            reference = answer if isinstance(answer, str) else str(answer)
        return {"prompt_ids": ids, "prompt": text, "reference": reference, "length": len(ids), "num_labels": 1,
                "_meta": extra, "truncated": ("prompt",) if truncated else (), "templated": templated}

    # -- batches --------------------------------------------------------------
    def collate(self, packs: list[list[dict]]) -> dict:
        rows = [p[0] for p in packs]
        batch = collate_generation(rows, self.tokenizer.pad_token_id)
        batch["prompts"] = [r["prompt"] for r in rows]
        if all("index" in r for r in rows):  # rows of an encoded split (dynamic sampling excludes them)
            batch["index"] = [r["index"] for r in rows]
        return batch

    def eval_collate(self, packs: list[list[dict]]) -> dict:
        return self.collate(packs)

    def extra_prompts(self, step: int, round: int, n: int, exclude=()) -> dict:
        """A batch of ``n`` training prompts (keys as :meth:`collate`) for dynamic sampling,
        drawn from ``(seed, step, round, global rank)`` only, so a resumed run draws the same
        ones. Prompts are distinct within a draw, and none of ``exclude`` (row indices: the
        step's own prompts and earlier rounds'), unless ``n`` exceeds the training rows left."""
        if "train" not in self.encoded:
            raise RuntimeError("extra_prompts: call setup() first")
        if n < 1:
            raise ValueError(f"extra_prompts: n={n} must be >= 1")
        rank = data_parallel(self.trainer)[1]
        rows = self.encoded["train"]
        rng = random.Random(f"extra_prompts:{self.hparams.seed}:{step}:{round}:{rank}")  # str seeds hash stably
        taken = {int(i) for i in exclude}
        fresh = [i for i in range(len(rows)) if i not in taken]
        picks = rng.sample(fresh, min(n, len(fresh)))
        while len(picks) < n:  # fewer fresh rows than asked: repeat, never more often than needed
            picks += rng.sample(range(len(rows)), min(n - len(picks), len(rows)))
        return self.collate([[rows[i]] for i in picks])
