"""ImageInstructionDataModule: image + text conversations and pairs for LLaVA-style training.

Each ``<image>`` placeholder of a row's text stands for one of the row's images. The text
is rendered and tokenized exactly like the text-only data (chat template untouched, loss
on assistant turns only); afterwards each placeholder token is expanded into
``num_image_tokens`` copies (labels ``-100``), where the model puts the projected image
features. Images stay paths / encoded bytes in the encoded rows and become pixels in
``collate`` (in the DataLoader workers). What differs between kinds of rows lives in
:mod:`lit_align.data.image_kinds`, the images in :mod:`lit_align.data.image_files`, the
placeholder in :mod:`lit_align.data.image_tokens`.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_align.data.base import TextDataModule
from lit_align.data.encode import Dropped
from lit_align.data.formats import Where
from lit_align.data.image_files import ImageTransform, image_refs, image_root, keep_encoded, pixels
from lit_align.data.image_kinds import IMAGE_KINDS
from lit_align.data.image_tokens import ImageTokens, expand_image_tokens
from lit_align.data.tasks import ShapesTask

__all__ = ["ImageInstructionDataModule", "expand_image_tokens"]


class ImageInstructionDataModule(TextDataModule):
    """Conversations with images (LLaVA format) for captioning / visual instruction tuning,
    and image preference pairs for DPO.

    Args:
        task: the built-in ``shapes`` task, used when ``path`` and ``data_files`` are unset.
        kind: ``caption`` (stage 1), ``instruction`` (stage 2) or ``preference`` (DPO pairs);
            which rows a built-in task yields and how rows are encoded and collated
            (:data:`~lit_align.data.image_kinds.IMAGE_KINDS`).
        path: hub id, local folder, or a local json/jsonl/parquet/csv file, e.g. LLaVA's
            ``llava_instruct_150k.json`` (rows with ``id``, ``image`` and ``conversations``).
        data_files: files for ``datasets``' json/csv/parquet builders (a dict maps splits to files).
        name: dataset configuration name.
        image_folder: root of relative image paths (``None``: the folder of ``path`` /
            ``data_files`` when that is one file, else the current directory).
        image_column: the column with each row's image: a file path, a ``datasets.Image``
            value, a list of those (several images in one row), or null / ``""`` (a text-only row).
        image_token: the placeholder in the text, a single special token of the tokenizer.
        system_prompt: a system turn added to conversations that have none.
        train_split / val_split / test_split / val_fraction: see :class:`~lit_align.data.base.TextDataModule`.
        max_length: longest sequence in tokens, image tokens included; longer rows are dropped
            (counted): truncation would cut through image tokens or the text they belong to.
        micro_batch_size: rows (pairs for ``preference``) per micro-batch per device.
        eval_batch_size: rows per validation / test batch.
        packing: not supported with images (must stay ``False``).
        group_by_length: batch rows of similar length together.
        max_eval_rows / num_workers / seed: see :class:`~lit_align.data.base.TextDataModule`.
        group_metrics_by: a row column (e.g. a question category) whose values split held-out
            exact match into ``val/exact_match/<value>``; default with the ``shapes`` task:
            ``question_type`` (so DPO on triplets logs ``val/exact_match/unanswerable``, the
            share of unanswerable questions declined rather than answered with a made-up fact).

    Rows: ``instruction``/``caption`` rows are a conversation (``conversations`` with
    ``from``/``value``, or ``messages``, ``prompt``/``completion``, alpaca) plus the image
    column. ``preference`` rows have ``prompt`` (a string or a list of turns, ``role``/``content``
    or ``from``/``value``), ``chosen`` and ``rejected`` (and optionally ``margin``) plus the image
    column, read as the text preference data reads explicit-prompt pairs. The number of
    ``<image>`` placeholders must equal the number of images of the row (else a
    :class:`DataError` naming the row and field). As in LLaVA, a row with images but no
    placeholder at all gets one ``"<image>\\n"`` per image prepended to its first user turn
    (or prompt). Placeholders must be in the prompt side (user / system turns), never in a
    trained response. Missing or unreadable image files fail at ``setup``.

    From the LightningModule at ``setup`` (or set by hand): ``tokenizer`` (holding
    ``image_token``), ``image_transform`` (PIL RGB image -> float tensor ``[3, H, W]``) and
    ``num_image_tokens`` (N, the positions one image takes).

    Batches (``instruction``/``caption``): ``input_ids``, ``labels``, ``attention_mask``
    ``[B, T]`` right-padded, each placeholder expanded to N image-token ids (labels ``-100``);
    ``image_counts`` ``[B]`` (long); ``pixel_values`` ``[M, 3, H, W]`` with M =
    ``image_counts.sum()``, the images of row 0, then row 1, ...; ``pixel_values`` is absent
    when the batch holds no image. ``preference``: ``[2B, T]`` chosen rows then rejected rows
    (as :func:`~lit_align.data.preference.collate_pairs`, with ``margin`` ``[B]`` when the rows have one),
    ``image_counts`` ``[2B]`` and ``pixel_values`` in the same row order (the chosen rows'
    images, then the same images again for the rejected rows). Validation / test batches also carry the left-padded
    generation prompts ``prompt_ids``/``prompt_mask`` (one per row or pair, image tokens
    expanded), ``references``, ``meta`` and ``prompt_image_counts`` ``[B]``: the prompts'
    images are the first ``prompt_image_counts.sum()`` entries of ``pixel_values``.
    """

    def __init__(self, task: ShapesTask | None = None, kind: str = "instruction", path: str | None = None,
                 data_files: str | list[str] | dict[str, Any] | None = None, name: str | None = None,
                 image_folder: str | None = None, image_column: str = "image", image_token: str = "<image>",
                 system_prompt: str | None = None, train_split: str = "train", val_split: str | None = "validation",
                 test_split: str | None = "test", val_fraction: float = 0.0, max_length: int = 1024,
                 micro_batch_size: int = 8, eval_batch_size: int = 64, packing: bool = False,
                 group_by_length: bool = False, max_eval_rows: int | None = None, num_workers: int = 0, seed: int = 0,
                 group_metrics_by: str | None = None):
        super().__init__(task=task, path=path, data_files=data_files, name=name, train_split=train_split,
                         val_split=val_split, test_split=test_split, val_fraction=val_fraction, max_length=max_length,
                         truncation="drop", micro_batch_size=micro_batch_size, eval_batch_size=eval_batch_size,
                         max_eval_rows=max_eval_rows, num_workers=num_workers, seed=seed)
        if kind not in IMAGE_KINDS:
            raise ValueError(f"data.kind: {kind!r} is not one of {tuple(IMAGE_KINDS)}")
        if packing:
            raise ValueError("data.packing: packing is not supported for image data (rows carry images)")
        if not image_token:
            raise ValueError("data.image_token: must be a non-empty string")
        self.save_hyperparameters(ignore=["task"])
        self.row_kind = kind
        self.kind = IMAGE_KINDS[kind](system_prompt)
        self.group_key = group_metrics_by or ("question_type" if self.uses_task else None)
        self.image_transform: ImageTransform | None = None
        self.num_image_tokens: int | None = None
        self.image_tokens: ImageTokens | None = None

    # -- setup --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        for attr in ("image_transform", "num_image_tokens"):
            if getattr(self, attr) is None:
                setattr(self, attr, getattr(module, attr, None))
                if getattr(self, attr) is None:
                    raise ValueError(f"{type(self).__name__} needs `{attr}`: from the model at setup, or set `.{attr}`")
        if not callable(self.image_transform):
            raise ValueError(f"image_transform: expected a callable PIL.Image -> Tensor, got {self.image_transform!r}")
        n = self.num_image_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_image_tokens: expected an int >= 1, got {n!r}")
        super().setup(stage)

    def encode_split(self, dataset, split: str, source: str) -> list[dict]:
        h = self.hparams
        self.image_tokens = ImageTokens.of(self.tokenizer, h.image_token, self.num_image_tokens, h.image_column)
        return super().encode_split(keep_encoded(dataset, h.image_column), split, source)

    def row_format(self, columns: list[str]) -> str:
        return self.kind.row_format(columns)

    def used_columns(self) -> set[str]:
        return self.kind.used_columns() | {self.hparams.image_column}

    # -- rows -----------------------------------------------------------------------
    def encode_row(self, row: dict, fmt: str, where: Where) -> dict:
        h = self.hparams
        root = image_root(h.image_folder, h.path, h.data_files)
        images = image_refs(row.get(h.image_column), h.image_column, root, where)
        if images:
            row = self.image_tokens.lead(row, self.kind.lead_field(fmt), len(images))
        out = self.kind.encode(row, fmt, where, self.tokenizer, self.image_tokens, len(images))
        if out["length"] > h.max_length:  # never cut: truncation would split images from their text
            raise Dropped("too long")
        out["images"], out["where"] = images, where
        return out

    # -- batches --------------------------------------------------------------------
    def group_by_length(self) -> bool:
        return self.hparams.group_by_length

    def collate(self, packs: list[list[dict]]) -> dict:
        rows = [p[0] for p in packs]
        batch = self.kind.collate(rows, self.tokenizer.pad_token_id)
        copies = self.kind.sequences_per_row
        for key, value in pixels(rows, self.image_transform, self.hparams.image_column).items():
            batch[key] = torch.cat([value] * copies) if copies > 1 else value
        return batch

    def eval_collate(self, packs: list[list[dict]]) -> dict:
        batch = self.collate(packs)
        batch["prompt_image_counts"] = torch.tensor([len(p[0]["images"]) for p in packs], dtype=torch.long)
        return batch
