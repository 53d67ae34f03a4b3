"""The kinds of image rows :class:`~lit_align.data.images.ImageInstructionDataModule` reads
(its ``kind`` setting): how a row of each kind is told apart, encoded around its images and
collated. The data module owns what every kind shares (the image column, files and pixels,
placeholder checks, the length limit); a new image format is one :class:`ImageRows` subclass
here and its entry in :data:`IMAGE_KINDS`.
"""

from __future__ import annotations

import sys

from lit_align.data.batching import collate_rows
from lit_align.data.encode import encode_segments
from lit_align.data.formats import DEFAULT_COLUMNS, DataError, Where, detect_format, row_to_segments
from lit_align.data.image_tokens import ImageTokens
from lit_align.data.preference import PREFERENCE_COLUMNS, PairRows, collate_pairs

NO_LIMIT = sys.maxsize  # rows are encoded whole; the module drops them by length after the image expansion
TEXT_FIELD = {"sharegpt": "conversations", "messages": "messages", "prompt_completion": "prompt",
              "alpaca": "instruction"}


class ImageRows:
    """One kind of image row.

    Args:
        system_prompt: a system turn added to conversations that have none.
    """

    sequences_per_row = 1  # sequences a row becomes in a batch; each carries the row's images

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def row_format(self, columns: list[str]) -> str:
        """The format of a split from its columns (a :class:`DataError` when none fits)."""
        raise NotImplementedError

    def used_columns(self) -> set[str]:
        """Text columns the encoding reads (the image column is the module's)."""
        raise NotImplementedError

    def lead_field(self, fmt: str) -> str:
        """The field that gets LLaVA's leading placeholders when a row with images has none."""
        raise NotImplementedError

    def encode(self, row: dict, fmt: str, where: Where, tokenizer, images: ImageTokens, n_images: int) -> dict:
        """The encoded row (keys as the text data's, plus ``length``), every placeholder checked
        against ``n_images`` and expanded with ``images.expand``."""
        raise NotImplementedError

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        """The text tensors of a batch of ``len(rows) * sequences_per_row`` sequences."""
        raise NotImplementedError


class ImageConversations(ImageRows):
    """A conversation about the row's images (``caption``: stage 1, ``instruction``: stage 2), in
    any format of the text instruction data (ShareGPT ``conversations`` as LLaVA's json,
    ``messages``, ``prompt``/``completion``, Alpaca), the loss on the assistant turns.
    Batches: :func:`~lit_align.data.batching.collate_rows`."""

    def row_format(self, columns: list[str]) -> str:
        return detect_format(columns, DEFAULT_COLUMNS)

    def used_columns(self) -> set[str]:
        return set(DEFAULT_COLUMNS.values())

    def lead_field(self, fmt: str) -> str:
        return TEXT_FIELD[fmt]

    def encode(self, row: dict, fmt: str, where: Where, tokenizer, images: ImageTokens, n_images: int) -> dict:
        field = TEXT_FIELD[fmt]
        segments = row_to_segments(row, fmt, DEFAULT_COLUMNS, tokenizer, where, self.system_prompt)
        enc = encode_segments(segments, tokenizer, NO_LIMIT, "drop")
        enc["input_ids"], enc["labels"] = images.expand(enc["input_ids"], enc["labels"], n_images, field, where)
        enc["prompt_ids"], _ = images.expand(enc["prompt_ids"], None, n_images, field, where)
        enc["length"] = len(enc["input_ids"])
        return enc

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        return collate_rows(rows, pad_id)


class ImagePairs(ImageRows):
    """A preference pair about the row's images (``preference``: DPO), read and encoded as the
    text preference data's explicit-prompt pairs (:class:`~lit_align.data.preference.PairRows`,
    turns also ``from``/``value``). Batches: :func:`~lit_align.data.preference.collate_pairs`,
    chosen rows then rejected rows, each with the pair's images."""

    sequences_per_row = 2

    def __init__(self, system_prompt: str | None = None):
        super().__init__(system_prompt)
        self.pairs = PairRows(PREFERENCE_COLUMNS, system_prompt, sharegpt_turns=True)

    def row_format(self, columns: list[str]) -> str:
        missing = self.pairs.missing("explicit", columns)
        if missing:
            raise DataError(f"image preference data needs columns {missing} (explicit prompt format); found {columns}")
        return "explicit"

    def used_columns(self) -> set[str]:
        return self.pairs.used_columns()

    def lead_field(self, fmt: str) -> str:
        return PREFERENCE_COLUMNS["prompt"]

    def encode(self, row: dict, fmt: str, where: Where, tokenizer, images: ImageTokens, n_images: int) -> dict:
        out = self.pairs.encode(row, fmt, where, tokenizer, NO_LIMIT, "drop")
        out["prompt_ids"], _ = images.expand(out["prompt_ids"], None, n_images, PREFERENCE_COLUMNS["prompt"], where)
        for name in ("chosen", "rejected"):
            side = out[name]
            side["input_ids"], side["labels"] = images.expand(side["input_ids"], side["labels"], n_images,
                                                              PREFERENCE_COLUMNS[name], where)
        out["length"] = max(len(out["chosen"]["input_ids"]), len(out["rejected"]["input_ids"]))
        return out

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        return collate_pairs(rows, pad_id)


IMAGE_KINDS: dict[str, type[ImageRows]] = {
    "caption": ImageConversations,
    "instruction": ImageConversations,
    "preference": ImagePairs,
}
