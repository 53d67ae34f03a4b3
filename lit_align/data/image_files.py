"""The images of a row: reading the image column (file paths, encoded bytes, loaded images),
checking them at setup, and decoding them into pixels at collate (in the DataLoader workers)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image

from lit_align.data.formats import Where

ImageRef = str | bytes | Image.Image  # a resolved file path, encoded image bytes, or a loaded image
ImageTransform = Callable[[Image.Image], torch.Tensor]


def image_root(image_folder: str | None, path: str | None, data_files: Any) -> str:
    """The root of relative image paths: ``image_folder``, else the folder of ``path`` /
    ``data_files`` when that is one file (or the folder itself), else the current directory."""
    if image_folder is not None:
        return image_folder
    single = path if path is not None else data_files if isinstance(data_files, str) else None
    if single is not None and os.path.isfile(single):
        return os.path.dirname(os.path.abspath(single))
    if single is not None and os.path.isdir(single):
        return single
    return os.getcwd()


def keep_encoded(dataset, column: str):
    """``dataset`` with a ``datasets.Image`` column (or a list of them) left undecoded (bytes /
    path), so encoded rows stay small and images are decoded in collate."""
    feature = dataset.features.get(column) if dataset.features else None
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    if isinstance(getattr(feature, "feature", None), datasets.Image):
        return dataset.cast_column(column, datasets.List(datasets.Image(decode=False),
                                                         length=getattr(feature, "length", -1)))
    return dataset


def image_refs(value: Any, column: str, root: str, where: Where) -> list[ImageRef]:
    """A row's images from its ``column`` value (one image, a list, or null / ``""`` for none),
    checked: files exist and decode (``verify``); bytes decode."""
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
            path = v if os.path.isabs(v) else os.path.join(root, v)
            if not os.path.isfile(path):
                raise where(field, f"image file {path!r} does not exist")
            _verify(lambda path=path: Image.open(path), f"image file {path!r}", field, where)
            refs.append(path)
        elif isinstance(v, bytes):
            _verify(lambda v=v: Image.open(io.BytesIO(v)), "image bytes", field, where)
            refs.append(v)
        else:
            raise where(field, f"expected an image path, a datasets.Image value or null, got {v!r:.60}")
    return refs


def load_image(ref: ImageRef, transform: ImageTransform, column: str, where: Where) -> torch.Tensor:
    """One image through ``transform`` (PIL RGB image -> ``[3, H, W]``); a file that no longer
    reads is an error naming the row (``where``) and ``column``."""
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
        raise where(column, f"{what} cannot be read: {e}") from e
    pixels = transform(image)
    if not torch.is_tensor(pixels) or pixels.dim() != 3:
        raise TypeError(f"image_transform must return a [3, H, W] tensor, got {getattr(pixels, 'shape', pixels)!r}")
    return pixels


def pixels(rows: list[dict], transform: ImageTransform, column: str) -> dict[str, torch.Tensor]:
    """``image_counts`` ``[len(rows)]`` and, when any, ``pixel_values`` ``[M, 3, H, W]``: the
    images of encoded rows (``images``, ``where``) in row order."""
    out = {"image_counts": torch.tensor([len(r["images"]) for r in rows], dtype=torch.long)}
    images = [load_image(ref, transform, column, r["where"]) for r in rows for ref in r["images"]]
    if images:
        shapes = {tuple(p.shape) for p in images}
        if len(shapes) > 1:
            raise ValueError(f"image_transform returned images of different shapes {sorted(shapes)}: "
                             "resize to one size")
        out["pixel_values"] = torch.stack(images)
    return out


def _verify(opener: Callable[[], Image.Image], what: str, field: str, where: Where) -> None:
    try:
        with opener() as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad row
        raise where(field, f"{what} cannot be read: {e}") from e
