"""The ``shapes`` scenes as text: the same rows as :class:`~lit_align.data.tasks.shapes.ShapesTask`,
with the image replaced by a text rendering of the scene.

LLaVA's stage 1 trains the projector alone on top of a *pretrained* language model, one
that can already read and talk about what it is given. The built-in models start from
random init, so this task is the stand-in for that pretraining: a text-only SFT on these
rows teaches the LM to read a scene from its context and caption it or answer questions
about it. Stage 1 then only has to map image features to something the frozen LM reads like
the rendering.

Every row is the image row of the same scene and index (same question, same answer) with
the ``<image>`` placeholder replaced by the rendering, so the chat template renders text
and image rows alike. Scenes come from :meth:`ShapesTask.scene` with the same seed and
split rule, so held-out scenes of the image stages never occur here either.

Renderings (``rendering``):

- ``grid``: one character per vision-tower patch, ``grid_size`` x ``grid_size`` characters
  in row-major patch order (the order of the tower's patch tokens). In each of the 2x2 cells
  the left half of the patches holds the object's colour letter and the right half its
  shape letter (:data:`COLOR_LETTERS`, :data:`SHAPE_LETTERS`), ``.`` for an empty cell:
  ``"rC..rC....bS..bS"`` is a red circle at top left and a blue square at bottom right. With
  ``grid_size`` the tower's patches per side, the rendering fills exactly the image's token
  positions (the byte tokenizer has one token per character), so stage 1's projector maps
  each patch to a character-like embedding.
- ``description``: ``"Scene: <the caption>."``, the natural-language description.
"""

from __future__ import annotations

import random

from PIL import Image

from lit_align.data.tasks.shapes import POSITIONS, SHAPES, Scene, ShapesTask

RENDERINGS = ("grid", "description")
TEXT_KINDS = ("caption", "instruction")
EMPTY = "."
COLOR_LETTERS = {"red": "r", "green": "g", "blue": "b", "yellow": "y", "orange": "o", "purple": "p", "cyan": "c",
                 "black": "k"}
SHAPE_LETTERS = {"circle": "C", "square": "S", "triangle": "T"}
_NO_IMAGE = Image.new("RGB", (1, 1))  # ShapesTask.row draws the scene unless given an image


class ShapesTextTask:
    """``shapes`` scenes rendered as text, for text-only LM pretraining before LLaVA stage 1.

    A plain class, not a dataclass: a data module's ``task`` may be an ``ArithTask`` (a
    dataclass, written in YAML as a mapping) or this task (written with ``class_path``); only
    a class that needs ``class_path`` keeps the two apart when the CLI overrides one field
    (``--data.init_args.task.val_size 4``), with this type listed first in the annotation.

    Args:
        rendering: ``grid`` (one character per tower patch, see the module docstring) or
            ``description`` (``"Scene: a red circle at top left."``).
        grid_size: patches per side of the ``grid`` rendering: the tower's image size over its
            patch size (32 / 8 = 4 in the shipped recipes); a multiple of 4 (each of the 2x2
            cells covers ``grid_size / 2`` patches per side, half colour, half shape).
        kinds: the rows of each scene, one of each: ``caption`` (describe the scene) and
            ``instruction`` (one question about colour, shape, position or count).
        colors, shapes, max_objects, train_size, val_size, seed: as in :class:`ShapesTask`
            (``scenes``); the same values give the same scenes per split as the image stages.
    """

    def __init__(self, rendering: str = "grid", grid_size: int = 4, kinds: tuple[str, ...] = TEXT_KINDS,
                 colors: tuple[str, ...] = ("red", "green", "blue", "yellow"), shapes: tuple[str, ...] = SHAPES,
                 max_objects: int = 3, train_size: int = 2000, val_size: int = 200, seed: int = 0):
        self.scenes = ShapesTask(colors=colors, shapes=shapes, max_objects=max_objects, train_size=train_size,
                                 val_size=val_size, seed=seed)
        self.rendering, self.grid_size, self.kinds = rendering, grid_size, tuple(kinds)
        if rendering not in RENDERINGS:
            raise ValueError(f"shapes_text.rendering: {rendering!r} is not one of {RENDERINGS}")
        if grid_size < 4 or grid_size % 4:
            raise ValueError(f"shapes_text.grid_size: {grid_size} must be a multiple of 4 (2x2 cells, each "
                             "with a colour half and a shape half)")
        unknown = [k for k in self.kinds if k not in TEXT_KINDS]
        if not self.kinds or unknown or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"shapes_text.kinds: {list(self.kinds)} must be distinct kinds from {list(TEXT_KINDS)}")

    def __repr__(self) -> str:
        return (f"ShapesTextTask(rendering={self.rendering!r}, grid_size={self.grid_size}, kinds={self.kinds}, "
                f"scenes={self.scenes})")

    def render(self, scene: Scene) -> str:
        """The scene as text (``rendering``)."""
        if self.rendering == "description":
            return f"Scene: {self.scenes.describe(scene)}."
        objects = {o.position: o for o in scene}
        cell = self.grid_size // 2  # patches per side of a cell

        def char(row: int, col: int) -> str:
            o = objects.get(POSITIONS[(row // cell) * 2 + col // cell])
            if o is None:
                return EMPTY
            return COLOR_LETTERS[o.color] if col % cell < cell // 2 else SHAPE_LETTERS[o.shape]

        return "".join(char(r, c) for r in range(self.grid_size) for c in range(self.grid_size))

    def text_row(self, scene: Scene, kind: str, rng: random.Random) -> dict:
        """:meth:`ShapesTask.row` of ``kind`` with ``<image>`` replaced by the rendering and no image."""
        row = self.scenes.row(scene, kind, rng, _NO_IMAGE)
        del row["image"]
        text = self.render(scene)
        row["conversations"] = [{**t, "value": t["value"].replace("<image>", text)} for t in row["conversations"]]
        return row

    def rows(self, kind: str = "instruction") -> dict[str, list[dict]]:
        """Rows per split (``train``, ``validation``, ``test``): for scene ``i`` of a split, one
        row of each of ``kinds``, the same conversation as :meth:`ShapesTask.rows` gives for
        scene ``i`` of that kind, as text. Each row has ``conversations`` (ShareGPT format),
        ``answer``, ``question_type`` and ``id``. ``kind`` is what the data module asks for:
        ``instruction`` (the only kind; these are instruction rows whatever ``kinds`` holds)."""
        if kind != "instruction":
            raise ValueError(f"shapes_text: unknown row kind {kind!r} (instruction: set `kinds` to choose the rows)")
        seed = self.scenes.seed

        def scene_rows(split: str, i: int, scene: Scene) -> list[dict]:
            return [{"id": f"{split}-{i}-{k}", **self.text_row(scene, k, random.Random(f"{seed}:{split}:{i}:{k}"))}
                    for k in self.kinds]

        return self.scenes.rows_per_split(scene_rows)

    @staticmethod
    def check(completion: str, answer: str) -> bool:
        """Normalised exact match, as :meth:`ShapesTask.check`."""
        return ShapesTask.check(completion, answer)
