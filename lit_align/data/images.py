"""ImageInstructionDataModule: image + text conversations for LLaVA-style training.

Each ``<image>`` placeholder of a row's text stands for one of the row's images. The text
is rendered and tokenized exactly like the text-only data (chat template untouched, loss
on assistant turns only); afterwards each placeholder token is expanded into
``num_image_tokens`` copies (labels ``-100``), where the model puts the projected image
features. Images stay paths / encoded bytes in the encoded rows and become pixels in
``collate`` (in the DataLoader workers).
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Callable

import datasets
import torch
from PIL import Image

from lit_align.data.base import TextDataModule
from lit_align.data.batching import collate_rows
from lit_align.data.encode import IGNORE_INDEX, Dropped, encode_segments
from lit_align.data.formats import (DEFAULT_COLUMNS, SHAREGPT_ROLES, DataError, Segment, Where, detect_format, normalize_messages, row_to_segments)
from lit_align.data.preference import PREFERENCE_COLUMNS, collate_pairs, encode_pair, pair_segments
from lit_align.data.tasks import ShapesTask

KINDS = ("caption", "instruction", "preference")
_TEXT_FIELD = {"sharegpt": "conversations", "messages": "messages", "prompt_completion": "prompt", "alpaca": "instruction"}
_NO_LIMIT = sys.maxsize

ImageRef = str | bytes | Image.Image  # a resolved file path, encoded image bytes, or a loaded image


def expand_image_tokens(ids: list[int], labels: list[int] | None, image_id: int, n: int) -> tuple[list[int], list[int] | None]:
    """Replace every ``image_id`` in ``ids`` by ``n`` copies of it, with label ``-100`` on each copy."""
    out_ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    for j, t in enumerate(ids):
        if t == image_id:
            out_ids += [image_id] * n
            if out_labels is not None:
                out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            if out_labels is not None:
                out_labels.append(labels[j])
    return out_ids, out_labels


def _first_user_turn(turns: list, role_key: str, user_roles: set[str]) -> int | None:
    return next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get(role_key) in user_roles), None)


class ImageInstructionDataModule(TextDataModule):
    """Conversations with images (LLaVA format) for captioning / visual instruction tuning,
    and image preference pairs for DPO.

    Args:
        task: the built-in ``shapes`` task, used when ``path`` and ``data_files`` are unset.
        kind: ``caption`` (stage 1), ``instruction`` (stage 2) or ``preference`` (DPO pairs);
            which rows a built-in task yields and how rows are encoded.
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
    or ``from``/``value``), ``chosen`` and ``rejected`` plus the image column. The number of
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
    (as :func:`~lit_align.data.preference.collate_pairs`), ``image_counts`` ``[2B]`` and
    ``pixel_values`` in the same row order (the chosen rows' images, then the same images
    again for the rejected rows). Validation / test batches also carry the left-padded
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
        if kind not in KINDS:
            raise ValueError(f"data.kind: {kind!r} is not one of {KINDS}")
        if packing:
            raise ValueError("data.packing: packing is not supported for image data (rows carry images)")
        if not image_token:
            raise ValueError("data.image_token: must be a non-empty string")
        self.save_hyperparameters(ignore=["task"])
        self.row_kind = kind
        self.group_key = group_metrics_by or ("question_type" if self.uses_task else None)
        self.image_transform: Callable[[Image.Image], torch.Tensor] | None = None
        self.num_image_tokens: int | None = None
        self._image_id: int | None = None

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
        if isinstance(self.num_image_tokens, bool) or not isinstance(self.num_image_tokens, int) or self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens: expected an int >= 1, got {self.num_image_tokens!r}")
        super().setup(stage)

    def image_token_id(self) -> int:
        """The id of ``image_token``; the tokenizer must encode the placeholder as exactly that one token."""
        tok, token = self.tokenizer, self.hparams.image_token
        token_id = tok.convert_tokens_to_ids(token)
        if token_id is None or token_id == tok.unk_token_id or tok(token, add_special_tokens=False).input_ids != [token_id]:
            raise ValueError(f"the tokenizer has no single token for {token!r}: add it with "
                             f"tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})")
        return token_id

    def encode_split(self, dataset, split: str, source: str) -> list[dict]:
        self._image_id = self.image_token_id()
        column = self.hparams.image_column
        feature = dataset.features.get(column) if dataset.features else None
        # keep images encoded (bytes / path) in the rows; they are decoded in `collate`
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            lazy = datasets.List(datasets.Image(decode=False), length=getattr(feature, "length", -1))
            dataset = dataset.cast_column(column, lazy)
        return super().encode_split(dataset, split, source)

    # -- formats ----------------------------------------------------------------
    def row_format(self, columns: list[str]) -> str:
        if self.row_kind == "preference":
            missing = [c for c in ("prompt", "chosen", "rejected") if c not in columns]
            if missing:
                raise DataError(f"image preference data needs columns {missing} (explicit prompt format); found {columns}")
            return "preference"
        return detect_format(columns, DEFAULT_COLUMNS)

    def used_columns(self) -> set[str]:
        names = PREFERENCE_COLUMNS if self.row_kind == "preference" else DEFAULT_COLUMNS
        return set(names.values()) | {self.hparams.image_column}

    # -- images -------------------------------------------------------------------
    def image_root(self) -> str:
        h = self.hparams
        if h.image_folder is not None:
            return h.image_folder
        single = h.path if h.path is not None else h.data_files if isinstance(h.data_files, str) else None
        if single is not None and os.path.isfile(single):
            return os.path.dirname(os.path.abspath(single))
        if single is not None and os.path.isdir(single):
            return single
        return os.getcwd()

    def _image_refs(self, row: dict, where: Where) -> list[ImageRef]:
        """The row's images, checked: files exist and decode (``verify``); bytes decode."""
        column = self.hparams.image_column
        value = row.get(column)
        if value is None or value == "":
            return []
        values = value if isinstance(value, (list, tuple)) else [value]
        refs: list[ImageRef] = []
        for k, v in enumerate(values):
            field = column if not isinstance(value, (list, tuple)) else f"{column}[{k}]"
            if isinstance(v, dict):  # a datasets.Image value kept encoded: {"bytes", "path"}
                v = v.get("bytes") or v.get("path")
            if isinstance(v, Image.Image):
                refs.append(v)
                continue
            if isinstance(v, str) and v:
                path = v if os.path.isabs(v) else os.path.join(self.image_root(), v)
                if not os.path.isfile(path):
                    raise where(field, f"image file {path!r} does not exist")
                _verify(lambda: Image.open(path), f"image file {path!r}", field, where)
                refs.append(path)
            elif isinstance(v, bytes):
                _verify(lambda: Image.open(io.BytesIO(v)), "image bytes", field, where)
                refs.append(v)
            else:
                raise where(field, f"expected an image path, a datasets.Image value or null, got {v!r:.60}")
        return refs

    def load_image(self, ref: ImageRef, row: dict) -> torch.Tensor:
        """One image of an encoded row, through ``image_transform``."""
        what = f"image file {ref!r}" if isinstance(ref, str) else "image"
        try:
            if isinstance(ref, str):
                with Image.open(ref) as im:
                    image = im.convert("RGB")
            elif isinstance(ref, bytes):
                with Image.open(io.BytesIO(ref)) as im:
                    image = im.convert("RGB")
            else:
                image = ref.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad row
            raise row["where"](self.hparams.image_column, f"{what} cannot be read: {e}") from e
        pixels = self.image_transform(image)
        if not torch.is_tensor(pixels) or pixels.dim() != 3:
            raise TypeError(f"image_transform must return a [3, H, W] tensor, got {getattr(pixels, 'shape', pixels)!r}")
        return pixels

    def pixels(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """``image_counts`` ``[len(rows)]`` and, when any, ``pixel_values`` ``[M, 3, H, W]`` in row order."""
        out = {"image_counts": torch.tensor([len(r["images"]) for r in rows], dtype=torch.long)}
        images = [self.load_image(ref, r) for r in rows for ref in r["images"]]
        if images:
            shapes = {tuple(p.shape) for p in images}
            if len(shapes) > 1:
                raise ValueError(f"image_transform returned images of different shapes {sorted(shapes)}: resize to one size")
            out["pixel_values"] = torch.stack(images)
        return out

    # -- encoding -------------------------------------------------------------------
    def _with_placeholders(self, row: dict, fmt: str, n: int) -> dict:
        """LLaVA's convention: a row with ``n`` images and no placeholder gets ``n`` placeholders
        (one ``"<image>\\n"`` each) before its first user turn's text (or its prompt)."""
        token = self.hparams.image_token
        lead = (token + "\n") * n
        field = _TEXT_FIELD.get(fmt, "prompt")
        value = row.get(field)
        if fmt in ("sharegpt", "messages", "preference") and isinstance(value, list):
            sharegpt = fmt == "sharegpt" or (bool(value) and isinstance(value[0], dict) and "from" in value[0])
            role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
            texts = [t.get(content_key) for t in value if isinstance(t, dict)]
            if any(isinstance(t, str) and token in t for t in texts):
                return row
            users = {k for k, v in SHAREGPT_ROLES.items() if v == "user"}
            i = _first_user_turn(value, role_key, users)
            if i is None or not isinstance(value[i].get(content_key), str):
                return row  # nothing to prepend to: the count check reports the mismatch
            turns = [dict(t) for t in value]
            turns[i][content_key] = lead + turns[i][content_key]
            return {**row, field: turns}
        if isinstance(value, str) and token not in value and not any(
                isinstance(row.get(c), str) and token in row[c] for c in ("input", "completion")):
            return {**row, field: lead + value}
        return row

    def _check_images(self, ids: list[int], labels: list[int] | None, n_images: int, field: str, where: Where) -> None:
        image_id = self._image_id
        if labels is not None and any(t == image_id and label != IGNORE_INDEX for t, label in zip(ids, labels)):
            raise where(field, f"{self.hparams.image_token!r} inside a trained response; images belong in the prompt")
        found = sum(t == image_id for t in ids)
        if found != n_images:
            raise where(self.hparams.image_column, f"{n_images} image(s) but {found} {self.hparams.image_token!r} "
                        f"placeholder(s) in {field!r}")

    def encode_row(self, row: dict, fmt: str, where: Where) -> dict:
        images = self._image_refs(row, where)
        if images:
            row = self._with_placeholders(row, fmt, len(images))
        if fmt == "preference":
            out = self._encode_pair(row, where, len(images))
        else:
            out = self._encode_conversation(row, fmt, where, len(images))
        out["images"], out["where"] = images, where
        return out

    def _encode_conversation(self, row: dict, fmt: str, where: Where, n_images: int) -> dict:
        h, n = self.hparams, self.num_image_tokens
        segments = row_to_segments(row, fmt, DEFAULT_COLUMNS, self.tokenizer, where, h.system_prompt)
        enc = encode_segments(segments, self.tokenizer, _NO_LIMIT, "drop")
        field = _TEXT_FIELD[fmt]
        self._check_images(enc["input_ids"], enc["labels"], n_images, field, where)
        self._check_images(enc["prompt_ids"], None, n_images, field, where)
        enc["input_ids"], enc["labels"] = expand_image_tokens(enc["input_ids"], enc["labels"], self._image_id, n)
        enc["prompt_ids"], _ = expand_image_tokens(enc["prompt_ids"], None, self._image_id, n)
        enc["length"] = len(enc["input_ids"])
        if enc["length"] > h.max_length:
            raise Dropped("too long")
        return enc

    def _turns(self, value: Any, field: str, where: Where, prompt: bool) -> list[dict]:
        if value and isinstance(value[0], dict) and "from" in value[0]:
            return normalize_messages(value, field, where, role_key="from", content_key="value",
                                      role_map=SHAREGPT_ROLES, require_assistant=not prompt)
        return normalize_messages(value, field, where, require_assistant=not prompt)

    def _segments(self, prompt, response, field: str, where: Where) -> tuple[list[Segment], list[Segment]]:
        """Prompt and response segments of one side of a pair, as the preference data renders them."""
        return pair_segments(prompt, response, self.tokenizer, self.hparams.system_prompt, field, where)

    def _encode_pair(self, row: dict, where: Where, n_images: int) -> dict:
        h, n, image_id = self.hparams, self.num_image_tokens, self._image_id
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            prompt = self._turns(prompt, "prompt", where, prompt=True)
        elif not isinstance(prompt, str):
            raise where("prompt", f"expected a string or a list of turns, got {prompt!r:.60}")
        sides = {}
        for name in ("chosen", "rejected"):
            value = row.get(name)
            if isinstance(value, list):
                sides[name] = self._turns(value, name, where, prompt=False)
            elif isinstance(value, str) and value.strip():
                sides[name] = value
            else:
                raise where(name, f"expected a non-empty string or a list of turns, got {value!r:.60}")
        if sides["chosen"] == sides["rejected"]:
            raise Dropped("identical responses")
        p_c, chosen = self._segments(prompt, sides["chosen"], "chosen", where)
        p_r, rejected = self._segments(prompt, sides["rejected"], "rejected", where)
        if [s.text for s in p_c] != [s.text for s in p_r]:
            raise where("rejected", "the chat template renders the shared prompt differently for chosen and rejected")
        out = encode_pair(p_c, chosen, rejected, self.tokenizer, _NO_LIMIT, "drop")
        self._check_images(out["prompt_ids"], None, n_images, "prompt", where)
        for name in ("chosen", "rejected"):
            side = out[name]
            self._check_images(side["input_ids"], side["labels"], n_images, name, where)
            side["input_ids"], side["labels"] = expand_image_tokens(side["input_ids"], side["labels"], image_id, n)
        out["prompt_ids"], _ = expand_image_tokens(out["prompt_ids"], None, image_id, n)
        out["length"] = max(len(out["chosen"]["input_ids"]), len(out["rejected"]["input_ids"]))
        if out["length"] > h.max_length:
            raise Dropped("too long")
        return out

    # -- batches --------------------------------------------------------------------
    def group_by_length(self) -> bool:
        return self.hparams.group_by_length

    def collate(self, packs: list[list[dict]]) -> dict:
        rows = [p[0] for p in packs]
        pad_id = self.tokenizer.pad_token_id
        if self.row_kind == "preference":
            batch = collate_pairs(rows, pad_id)
            pix = self.pixels(rows)
            batch["image_counts"] = torch.cat([pix["image_counts"], pix["image_counts"]])
            if "pixel_values" in pix:
                batch["pixel_values"] = torch.cat([pix["pixel_values"], pix["pixel_values"]])
            return batch
        return {**collate_rows(rows, pad_id), **self.pixels(rows)}

    def eval_collate(self, packs: list[list[dict]]) -> dict:
        batch = self.collate(packs)
        batch["prompt_image_counts"] = torch.tensor([len(p[0]["images"]) for p in packs], dtype=torch.long)
        return batch


def _verify(opener: Callable[[], Image.Image], what: str, field: str, where: Where) -> None:
    try:
        with opener() as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad row
        raise where(field, f"{what} cannot be read: {e}") from e
