"""The ``<image>`` placeholder: LLaVA's leading placeholders, the count check against a row's
images, and the expansion of each placeholder into the positions the image features take."""

from __future__ import annotations

from dataclasses import dataclass

from lit_align.data.encode import IGNORE_INDEX
from lit_align.data.formats import SHAREGPT_ROLES, Where

_USER_ROLES = {k for k, v in SHAREGPT_ROLES.items() if v == "user"}
_OTHER_TEXT = ("input", "completion")  # text columns beside the lead field that may hold the placeholder


def expand_image_tokens(ids: list[int], labels: list[int] | None, image_id: int, n: int
                        ) -> tuple[list[int], list[int] | None]:
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


@dataclass(frozen=True)
class ImageTokens:
    """A tokenizer's image placeholder and the positions one image takes.

    Args:
        token: the placeholder text (``<image>``).
        id: its token id.
        per_image: positions per image (the model's ``num_image_tokens``).
        column: the image column, named in count errors.
    """

    token: str
    id: int
    per_image: int
    column: str

    @classmethod
    def of(cls, tokenizer, token: str, per_image: int, column: str) -> ImageTokens:
        """The placeholder of ``tokenizer``, which must encode ``token`` as exactly one token."""
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (token_id is None or token_id == tokenizer.unk_token_id
                or tokenizer(token, add_special_tokens=False).input_ids != [token_id]):
            raise ValueError(f"the tokenizer has no single token for {token!r}: add it with "
                             f"tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})")
        return cls(token, token_id, per_image, column)

    def lead(self, row: dict, field: str, n_images: int) -> dict:
        """LLaVA's convention: a row with ``n_images`` images and no placeholder gets one
        ``"<image>\\n"`` per image before the text of ``field`` (a string), or of its first user
        turn (a list of ``role``/``content`` or ``from``/``value`` turns)."""
        lead = (self.token + "\n") * n_images
        value = row.get(field)
        if isinstance(value, list):
            sharegpt = bool(value) and isinstance(value[0], dict) and "from" in value[0]
            role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
            if any(isinstance(t, dict) and isinstance(t.get(content_key), str) and self.token in t[content_key]
                   for t in value):
                return row
            i = next((i for i, t in enumerate(value) if isinstance(t, dict) and t.get(role_key) in _USER_ROLES), None)
            if i is None or not isinstance(value[i].get(content_key), str):
                return row  # nothing to prepend to: the count check reports the mismatch
            turns = [dict(t) for t in value]
            turns[i][content_key] = lead + turns[i][content_key]
            return {**row, field: turns}
        if isinstance(value, str) and self.token not in value and not any(
                isinstance(row.get(c), str) and self.token in row[c] for c in _OTHER_TEXT):
            return {**row, field: lead + value}
        return row

    def expand(self, ids: list[int], labels: list[int] | None, n_images: int, field: str, where: Where
               ) -> tuple[list[int], list[int] | None]:
        """``ids`` (and ``labels``) with each placeholder expanded to ``per_image`` positions,
        after checking there is one placeholder per image and none in a trained response."""
        if labels is not None and any(t == self.id and label != IGNORE_INDEX for t, label in zip(ids, labels)):
            raise where(field, f"{self.token!r} inside a trained response; images belong in the prompt")
        found = sum(t == self.id for t in ids)
        if found != n_images:
            raise where(self.column, f"{n_images} image(s) but {found} {self.token!r} placeholder(s) in {field!r}")
        return expand_image_tokens(ids, labels, self.id, self.per_image)
