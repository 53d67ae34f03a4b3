"""PreferenceDataModule: (prompt, chosen, rejected) pairs for reward models and DPO."""

from __future__ import annotations

import math
from typing import Any

import torch

from lit_align.data.base import TextDataModule
from lit_align.data.batching import pad
from lit_align.data.encode import IGNORE_INDEX, Dropped, leading_bos, reference_text, tokenize_segments
from lit_align.data.formats import (
    SHAREGPT_ROLES,
    DataError,
    Segment,
    Where,
    _with_system,
    normalize_messages,
    renamed_columns,
    render_messages,
)
from lit_align.data.tasks import ArithTask

PREFERENCE_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "margin": "margin"}
PREFERENCE_FORMATS = ("auto", "explicit", "implicit")


def split_common_prefix(chosen: str, rejected: str) -> int:
    """Where an implicit prompt ends in two texts: their common prefix, moved back to the
    start of a word so neither response begins mid-word (``"= 123"`` / ``"= 128"`` split
    before ``123``, not inside it; so do ``"= 12 apples"`` / ``"= 123 apples"``)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n < max(len(chosen), len(rejected)):
        while n > 0 and chosen[n - 1].isalnum() and any(n < len(t) and not t[n].isspace() for t in (chosen, rejected)):
            n -= 1
    return n


def encode_pair(prompt: list[Segment], chosen: list[Segment], rejected: list[Segment], tokenizer, max_length: int,
                truncation: str, where: Where | None = None, fields: tuple[str, str] = ("chosen", "rejected")
                ) -> dict[str, Any]:
    """Tokenize a pair so that both sequences share exactly the same prompt tokens.

    Returns ``chosen`` and ``rejected`` (each ``input_ids``, ``labels``, ``num_labels``),
    ``prompt_ids`` (the generation prompt), ``reference`` (the chosen text), ``length``
    (the longer sequence), ``num_labels`` (both), ``truncated`` (``"prompt"`` and / or
    ``"response"``: what was cut, counted by the data module) and ``templated`` (whether a
    segment was rendered with the chat template). Too long: ``truncation="prompt"`` cuts the
    shared prompt from the left (after a leading BOS, which stays, and keeping one token
    before the responses), then both responses at the end, as TRL does (a response cut at
    the end has no EOS); ``"drop"`` drops the pair.

    ``where`` and ``fields`` (the chosen and rejected column names) locate errors; without
    ``where`` they are plain :class:`ValueError`.
    """
    p_ids, _, _ = tokenize_segments(prompt, tokenizer)
    sides = {name: tokenize_segments(prompt + segs, tokenizer)[:2]
             for name, segs in (("chosen", chosen), ("rejected", rejected))}
    for field, (ids, _) in zip(fields, sides.values()):
        if ids[: len(p_ids)] != p_ids:
            problem = ("the prompt tokenizes differently before this response than alone (a tokenizer that samples"
                       " its segmentation?): cannot find the prompt boundary")
            raise where(field, problem) if where is not None else ValueError(f"{field}: {problem}")
    longest = max(len(ids) for ids, _ in sides.values())
    cut = 0
    if longest > max_length:
        if truncation == "drop":
            raise Dropped("too long")
        cut = min(longest - max_length, max(len(p_ids) - 1, 0))
    truncated = ["prompt"] if cut else []
    if longest - cut > max_length:
        truncated.append("response")
    keep = leading_bos(p_ids, tokenizer)

    def cut_prompt(seq: list[int]) -> list[int]:
        return seq[:keep] + seq[keep + cut:]

    out: dict[str, Any] = {}
    for name, (ids, labels) in sides.items():
        ids, labels = cut_prompt(ids)[:max_length], cut_prompt(labels)[:max_length]
        labels[0] = IGNORE_INDEX
        n = sum(label != IGNORE_INDEX for label in labels)
        if n == 0:
            raise Dropped("nothing left to learn after truncation")
        out[name] = {"input_ids": ids, "labels": labels, "num_labels": n}
    out.update(prompt_ids=cut_prompt(p_ids), reference=reference_text(chosen, tokenizer),
               length=max(len(out["chosen"]["input_ids"]), len(out["rejected"]["input_ids"])),
               num_labels=out["chosen"]["num_labels"] + out["rejected"]["num_labels"], truncated=tuple(truncated),
               templated=any(seg.templated for seg in prompt + chosen + rejected))
    return out


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """``B`` pairs as one batch of ``2B`` sequences: rows ``0..B-1`` chosen, ``B..2B-1``
    rejected, so a policy scores a batch of pairs with one forward pass.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]``; ``margin`` ``[B]`` when the
    rows have one; ``index`` ``[B]`` (each pair's position in its split) when the rows have one.
    A margin on some rows only is an error: leaving the others out would drop every margin of the batch.
    """
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    batch = {
        "input_ids": pad([s["input_ids"] for s in seqs], pad_id),
        "attention_mask": pad([[1] * len(s["input_ids"]) for s in seqs], 0),
        "labels": pad([s["labels"] for s in seqs], IGNORE_INDEX),
    }
    with_margin = sum("margin" in r for r in rows)
    if 0 < with_margin < len(rows):
        raise ValueError(f"collate_pairs: {with_margin} of {len(rows)} pairs have a margin; "
                         "give every pair one or none")
    if with_margin:
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows])
    if all("index" in r for r in rows):
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    return batch


def pair_segments(prompt, response, tokenizer, system_prompt: str | None, field: str, where: Where
                  ) -> tuple[list[Segment], list[Segment]]:
    """Prompt and response segments of one side of a pair: plain strings as they are, anything
    with turns rendered with the chat template (the response as the trained assistant turns).

    ``system_prompt`` goes into the chat template, so with a plain-string pair (used as
    written) it is an error naming ``field`` rather than a setting silently left out."""
    if isinstance(prompt, str) and isinstance(response, str):
        if system_prompt:
            raise where(field, "system_prompt is set, but a prompt and response that are both strings are used as"
                        " written, without the chat template; give lists of turns or unset system_prompt")
        return [Segment(prompt, False)], [Segment(response, True)]
    turns = prompt if isinstance(prompt, list) else ([{"role": "user", "content": prompt}] if prompt else [])
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    msgs = _with_system(turns + response, system_prompt)
    segs = render_messages(msgs, tokenizer, where, field, train_from=len(msgs) - len(response))
    first = next(i for i, s in enumerate(segs) if s.train)
    return segs[:first], segs[first:]


class PairRows:
    """One preference row into a tokenized pair, for :class:`PreferenceDataModule` and the image
    preference pairs alike: read the prompt and the two responses (``explicit``: a prompt column;
    ``implicit``: the shared prefix of two conversations), drop a pair with nothing to prefer,
    render both sides (:func:`pair_segments`), tokenize them over the same prompt tokens
    (:func:`encode_pair`) and read the optional margin.

    Args:
        columns: standard name (``prompt``, ``chosen``, ``rejected``, ``margin``) -> column.
        system_prompt: a system turn added to conversational pairs (see :func:`pair_segments`).
        sharegpt_turns: also read turns written ``from``/``value`` (ShareGPT, as LLaVA data is).
    """

    def __init__(self, columns: dict[str, str], system_prompt: str | None = None, sharegpt_turns: bool = False):
        self.columns, self.system_prompt, self.sharegpt_turns = columns, system_prompt, sharegpt_turns

    def missing(self, fmt: str, columns: list[str]) -> list[str]:
        """The columns format ``fmt`` (``explicit`` / ``implicit``) reads that ``columns`` lacks."""
        need = ("prompt", "chosen", "rejected") if fmt == "explicit" else ("chosen", "rejected")
        return [self.columns[k] for k in need if self.columns[k] not in columns]

    def used_columns(self) -> set[str]:
        return set(self.columns.values())

    def turns(self, value: list, field: str, where: Where, require_assistant: bool = True) -> list[dict]:
        if self.sharegpt_turns and value and isinstance(value[0], dict) and "from" in value[0]:
            return normalize_messages(value, field, where, role_key="from", content_key="value",
                                      role_map=SHAREGPT_ROLES, require_assistant=require_assistant)
        return normalize_messages(value, field, where, require_assistant=require_assistant)

    def response(self, value: Any, field: str, where: Where) -> str | list[dict]:
        if isinstance(value, list):
            return self.turns(value, field, where)
        if not isinstance(value, str) or not value.strip():
            raise where(field, f"expected a non-empty string or a list of turns, got {value!r:.60}")
        return value

    def explicit(self, row: dict, where: Where) -> tuple[Any, Any, Any]:
        """``(prompt, chosen, rejected)`` of a row with a prompt column."""
        p_name, c_name, r_name = self.columns["prompt"], self.columns["chosen"], self.columns["rejected"]
        prompt = row.get(p_name)
        if isinstance(prompt, list):
            prompt = self.turns(prompt, p_name, where, require_assistant=False)
        elif not isinstance(prompt, str):
            raise where(p_name, f"expected a string or a list of turns, got {prompt!r:.60}")
        return prompt, self.response(row.get(c_name), c_name, where), self.response(row.get(r_name), r_name, where)

    def implicit(self, row: dict, where: Where) -> tuple[Any, Any, Any]:
        """``(prompt, chosen, rejected)`` of two whole conversations: the prompt is their shared
        prefix (of text, moved back to a word start, or of turns)."""
        c_name, r_name = self.columns["chosen"], self.columns["rejected"]
        chosen, rejected = row.get(c_name), row.get(r_name)
        for value, name in ((chosen, c_name), (rejected, r_name)):  # blame the field that is missing
            if not isinstance(value, (str, list)):
                raise where(name, f"expected a string or a list of turns, got {type(value).__name__}")
        if isinstance(chosen, str) and isinstance(rejected, str):
            if chosen == rejected:
                raise Dropped("identical responses")
            n = split_common_prefix(chosen, rejected)
            if n == 0:
                raise where(c_name, "chosen and rejected share no prompt prefix (implicit prompt format)")
            return chosen[:n], self.response(chosen[n:], c_name, where), self.response(rejected[n:], r_name, where)
        if isinstance(chosen, list) and isinstance(rejected, list):
            c = self.turns(chosen, c_name, where)
            r = self.turns(rejected, r_name, where)
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if n == 0:
                raise where(c_name, "chosen and rejected share no prompt turns (implicit prompt format)")
            for msgs, name in ((c, c_name), (r, r_name)):
                if n == len(msgs) and len(c) != len(r):
                    raise where(name, "ends where the other conversation's response begins: no response to compare")
                if n < len(msgs) and msgs[n]["role"] != "assistant":
                    raise where(f"{name}[{n}]",
                                f"the conversations diverge at a {msgs[n]['role']!r} turn; expected the assistant's")
            return c[:n], c[n:], r[n:]
        raise where(c_name, "chosen and rejected must both be strings or both be lists of turns")

    def margin(self, row: dict, where: Where) -> float | None:
        """The row's finite margin, ``None`` without a margin column."""
        m_name = self.columns["margin"]
        margin = row.get(m_name)
        if margin is None and m_name in row:  # a null among numbers: the column is there, this row lacks one
            raise where(m_name, "no margin (null); the margin column needs a number on every row")
        if margin is None:
            return None
        try:
            value = float(margin)
        except (TypeError, ValueError):
            raise where(m_name, f"expected a number, got {margin!r:.40}") from None
        if not math.isfinite(value):
            raise where(m_name, f"expected a finite number, got {margin!r}")
        return value

    def encode(self, row: dict, fmt: str, where: Where, tokenizer, max_length: int, truncation: str) -> dict:
        """The encoded pair (:func:`encode_pair`'s keys, plus ``margin`` when the row has one);
        raises :class:`Dropped` for identical responses or a pair too long to keep."""
        c_name, r_name = self.columns["chosen"], self.columns["rejected"]
        prompt, chosen, rejected = self.explicit(row, where) if fmt == "explicit" else self.implicit(row, where)
        if chosen == rejected:
            raise Dropped("identical responses")
        p_c, chosen_segs = pair_segments(prompt, chosen, tokenizer, self.system_prompt, c_name, where)
        p_r, rejected_segs = pair_segments(prompt, rejected, tokenizer, self.system_prompt, r_name, where)
        if [s.text for s in p_c] != [s.text for s in p_r]:
            raise where(r_name, "the chat template renders the shared prompt differently for chosen and rejected")
        out = encode_pair(p_c, chosen_segs, rejected_segs, tokenizer, max_length, truncation,
                          where=where, fields=(c_name, r_name))
        margin = self.margin(row, where)
        if margin is not None:
            out["margin"] = margin
        return out


class PreferenceDataModule(TextDataModule):
    """Preference pairs for :class:`~lit_align.RewardModel` and :class:`~lit_align.DPO`.

    Args:
        task: a built-in task (``arith``: chosen = the correct answer, rejected = a plausible
            wrong one) used when ``path`` and ``data_files`` are unset.
        format: ``explicit`` (a ``prompt`` column plus ``chosen``/``rejected`` responses),
            ``implicit`` (``chosen``/``rejected`` are whole conversations sharing a prefix, as in
            Anthropic HH; the prompt is that prefix) or ``auto`` (explicit when a prompt column exists).
            Each field is a string or a list of ``{role, content}`` turns.
        columns: renames of ``prompt``, ``chosen``, ``rejected``, ``margin``.
        system_prompt: a system turn added to conversational pairs (rendered with the chat template:
            either side a list of turns) that have none. Plain-string pairs are used as written,
            so a ``system_prompt`` with them is an error (as in TRL, the chat template, and with it a
            system turn, applies to conversational data only).
        group_by_length: batch pairs of similar length together.
        Other arguments: see :class:`~lit_align.data.base.TextDataModule`.

    A ``margin`` column (float) is passed to the loss per pair; when the column exists every
    row needs a number (a null margin is a located error). Pairs whose two responses
    are identical carry no preference and are dropped (counted). Rows are read and encoded by
    :class:`PairRows`.
    """

    row_kind = "preference"

    def __init__(self, task: ArithTask | None = None, path: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, name: str | None = None,
                 train_split: str = "train", val_split: str | None = "validation", test_split: str | None = "test",
                 val_fraction: float = 0.0, format: str = "auto", columns: dict[str, str] | None = None,
                 system_prompt: str | None = None, max_length: int = 1024, truncation: str = "prompt",
                 micro_batch_size: int = 8, eval_batch_size: int = 64, group_by_length: bool = True,
                 max_eval_rows: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__(task=task, path=path, data_files=data_files, name=name, train_split=train_split,
                         val_split=val_split, test_split=test_split, val_fraction=val_fraction, max_length=max_length,
                         truncation=truncation, micro_batch_size=micro_batch_size, eval_batch_size=eval_batch_size,
                         max_eval_rows=max_eval_rows, num_workers=num_workers, seed=seed)
        if format not in PREFERENCE_FORMATS:
            raise ValueError(f"data.format: {format!r} is not one of {PREFERENCE_FORMATS}")
        self.columns = renamed_columns(columns, PREFERENCE_COLUMNS)
        self.save_hyperparameters(ignore=["task"])
        self.pairs = PairRows(self.columns, system_prompt)

    def row_format(self, columns: list[str]) -> str:
        fmt = self.hparams.format
        if fmt == "auto":
            fmt = "explicit" if self.columns["prompt"] in columns else "implicit"
        missing = self.pairs.missing(fmt, columns)
        if missing:
            raise DataError(f"preference data ({fmt} prompt) needs columns {missing}; found {columns}"
                            " (map yours with `columns`)")
        return fmt

    def used_columns(self) -> set[str]:
        return self.pairs.used_columns()

    def encode_row(self, row: dict, fmt: str, where: Where) -> dict:
        h = self.hparams
        return self.pairs.encode(row, fmt, where, self.tokenizer, h.max_length, h.truncation)

    def group_by_length(self) -> bool:
        return self.hparams.group_by_length

    def collate(self, packs: list[list[dict]]) -> dict:
        return collate_pairs([p[0] for p in packs], self.tokenizer.pad_token_id)
