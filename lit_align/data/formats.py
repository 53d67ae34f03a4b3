"""Turning raw rows of any supported format into text segments with a train flag.

Chat templating and label masking live here and in :mod:`lit_align.data.encode` only.
A segment with ``train=True`` is a completion / assistant turn: its tokens carry labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMATS = ("auto", "prompt_completion", "messages", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system", "tool": "tool"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
DEFAULT_COLUMNS = {
    "prompt": "prompt", "completion": "completion", "messages": "messages",
    "instruction": "instruction", "input": "input", "output": "output", "conversations": "conversations",
}


PLAIN_TEXT_SYSTEM = ("system_prompt is set, but {rows} are used as written, without the chat template that would"
                     " hold a system turn; {fix} or unset system_prompt")


class DataError(ValueError):
    """A row that cannot be used; the message names the source, row and field."""


@dataclass
class Segment:
    """A span of an example's text.

    ``train``: the span is a completion / assistant turn, whose tokens carry labels.
    ``templated``: the span was rendered by the tokenizer's chat template
    (:func:`render_messages`), so a trained span already holds the template's end of turn
    and gets no EOS appended after it; plain text (string prompt/completion, Alpaca) is
    ``False``.
    """

    text: str
    train: bool
    templated: bool = False


@dataclass
class Where:
    """Where a row comes from, for error messages."""

    source: str
    split: str
    row: int

    def __call__(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.source} [{self.split}] row {self.row}, field {field!r}: {problem}")


def renamed_columns(columns: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict[str, str]:
    """The column names a data module reads: ``defaults`` (standard name -> column) with the
    user's renames applied; a rename of a name the module does not read is refused."""
    unknown = set(columns or {}) - set(defaults)
    if unknown:
        raise ValueError(f"data.columns: unknown keys {sorted(unknown)} (known: {sorted(defaults)})")
    return {**defaults, **(columns or {})}


def lookup(row: Any, key: str, default: Any = None) -> Any:
    """``row[key]``, or for a dotted key such as ``reward_model.ground_truth`` (verl's nesting)
    the nested value; ``default`` when a level is missing or not a mapping. A key literally
    named ``key`` wins over the dotted walk."""
    if isinstance(row, Mapping) and key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def detect_format(columns: list[str], names: Mapping[str, str]) -> str:
    """The format implied by the dataset's columns."""
    if names["messages"] in columns:
        return "messages"
    if names["conversations"] in columns:
        return "sharegpt"
    if names["prompt"] in columns and names["completion"] in columns:
        return "prompt_completion"
    if names["instruction"] in columns and names["output"] in columns:
        return "alpaca"
    raise DataError(
        f"cannot tell the data format from columns {columns}: expected {names['messages']!r}, "
        f"{names['conversations']!r}, {names['prompt']!r}+{names['completion']!r} or "
        f"{names['instruction']!r}+{names['output']!r} (set `columns` to map yours)"
    )


def _text(row: Mapping[str, Any], column: str, where: Where, allow_empty: bool = False) -> str:
    if column not in row:
        raise where(column, "missing column")
    value = row[column]
    if value is None or not isinstance(value, str):
        raise where(column, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise where(column, "is empty")
    return value


def normalize_messages(messages: Any, field: str, where: Where, role_key: str = "role",
                       content_key: str = "content", role_map: Mapping[str, str] | None = None,
                       require_assistant: bool = True) -> list[dict]:
    """Validate a list of turns and return ``[{"role", "content"}]`` with standard roles.

    ``require_assistant=False`` accepts turns with no assistant turn (the prompt half of a
    conversational prompt/completion row)."""
    if not isinstance(messages, list) or not messages:
        raise where(field, "expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise where(f"{field}[{i}]", f"each turn needs {role_key!r} and {content_key!r}")
        role = turn[role_key]
        role = role_map.get(role, role) if role_map else role
        if role not in ROLES:
            raise where(f"{field}[{i}].{role_key}",
                        f"unknown role {turn[role_key]!r} (allowed: {', '.join(role_map or ROLES)})")
        content = turn[content_key]
        if not isinstance(content, str):
            raise where(f"{field}[{i}].{content_key}", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise where(f"{field}[{i}].{content_key}", "empty assistant turn")
        out.append({"role": role, "content": content})
    if require_assistant and not any(t["role"] == "assistant" for t in out):
        raise where(field, "no assistant turn to learn from")
    return out


def _apply_template(tokenizer, messages: list[dict], where: Where, field: str, generation_prompt: bool) -> str:
    """The chat template's text of ``messages``; a template that refuses them is a located error.

    An empty conversation (the generation prompt before a first assistant turn), which
    ``apply_chat_template`` refuses in recent transformers, is rendered by the same jinja
    renderer directly, as long as the template itself can render it."""
    try:
        if messages:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except ValueError:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=[[]], chat_template=tokenizer.get_chat_template(),
                                                add_generation_prompt=generation_prompt,
                                                **tokenizer.special_tokens_map)
            return rendered[0]
    except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja's TemplateError, ValueError)
        what = ("an empty conversation: the first turn is the assistant's, and the template cannot render the"
                " generation prompt before it (start with a user turn, or give a non-empty prompt)") if not messages \
            else f"turns {[m['role'] for m in messages]}"
        raise where(field, f"the chat template cannot render {what}: {type(e).__name__}: {e}") from None


def render_messages(messages: list[dict], tokenizer, where: Where, field: str, train_from: int = 0) -> list[Segment]:
    """Render turns with the tokenizer's chat template, one segment per span, each marked
    ``templated``.

    Assistant turns from index ``train_from`` on are trained; earlier ones (the prompt of a
    conversational prompt/completion row) are context only.

    Each assistant turn is found by rendering the conversation up to it with
    ``add_generation_prompt=True`` and up to and including it: the difference is
    exactly the assistant's text with the template's end of turn (``<|im_end|>\\n``,
    ``<|eot_id|>``), so loss masking is right for any template that renders a conversation's
    prefix as a prefix of the whole. A conversation may start with an assistant turn when
    the template renders the generation prompt of an empty conversation; a template that
    cannot render a row is an error naming ``where`` and ``field``.
    """
    segments: list[Segment] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prefix = _apply_template(tokenizer, messages[:i], where, field, generation_prompt=True)
        full = _apply_template(tokenizer, messages[: i + 1], where, field, generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise where(field, "the chat template does not render a conversation's prefix as a prefix of the whole;"
                        " use a prefix-consistent template")
        if prefix[len(done):]:
            segments.append(Segment(prefix[len(done):], train=False, templated=True))
        segments.append(Segment(full[len(prefix):], train=i >= train_from, templated=True))
        done = full
    return segments


def row_to_segments(row: Mapping[str, Any], fmt: str, names: Mapping[str, str], tokenizer, where: Where,
                    system_prompt: str | None = None) -> list[Segment]:
    """Segments of one row in format ``fmt`` (not ``auto``).

    ``system_prompt`` is added to conversations rendered with the chat template. Plain-text
    rows (string prompt/completion, Alpaca) are used as written, never templated (as TRL
    treats non-conversational data), so a ``system_prompt`` with them is a located error
    rather than a setting silently left out."""
    if fmt == "prompt_completion":
        prompt, completion = row.get(names["prompt"]), row.get(names["completion"])
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
            p = normalize_messages(prompt, names["prompt"], where, require_assistant=False) if prompt else []
            c = normalize_messages(completion, names["completion"], where)
            msgs = _with_system(p + c, system_prompt)
            return render_messages(msgs, tokenizer, where, names["completion"], train_from=len(msgs) - len(c))
        segments = [Segment(_text(row, names["prompt"], where, allow_empty=True), False),
                    Segment(_text(row, names["completion"], where), True)]
        if system_prompt:
            raise where(names["prompt"], PLAIN_TEXT_SYSTEM.format(rows="string prompt/completion rows",
                                                                  fix="give prompt and completion as lists of turns"))
        return segments
    if fmt == "messages":
        if names["messages"] not in row:
            raise where(names["messages"], "missing column")
        msgs = normalize_messages(row[names["messages"]], names["messages"], where)
        return render_messages(_with_system(msgs, system_prompt), tokenizer, where, names["messages"])
    if fmt == "sharegpt":
        if names["conversations"] not in row:
            raise where(names["conversations"], "missing column")
        msgs = normalize_messages(row[names["conversations"]], names["conversations"], where,
                                  role_key="from", content_key="value", role_map=SHAREGPT_ROLES)
        return render_messages(_with_system(msgs, system_prompt), tokenizer, where, names["conversations"])
    if fmt == "alpaca":
        if system_prompt:
            raise where(names["instruction"], PLAIN_TEXT_SYSTEM.format(rows="Alpaca rows",
                                                                       fix="convert the rows to messages"))
        instruction = _text(row, names["instruction"], where)
        inp = row.get(names["input"]) or ""
        if not isinstance(inp, str):
            raise where(names["input"], f"expected a string, got {type(inp).__name__}")
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if inp.strip() else "",
            instruction=instruction, input_block=f"### Input:\n{inp}\n\n" if inp.strip() else "")
        return [Segment(prompt, False), Segment(_text(row, names["output"], where), True)]
    raise ValueError(f"format: {fmt!r} is not one of {FORMATS}")


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages
