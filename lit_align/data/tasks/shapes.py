"""The built-in ``shapes`` task: procedurally drawn images of coloured shapes.

One scene generator feeds the three LLaVA stages (DESIGN.md, built-in tasks):
``caption`` rows (stage 1: describe the image), ``instruction`` rows (stage 2: one
question about colour, shape, position or count) and ``preference`` rows (DPO: the
correct answer against a hallucinated one, plus questions the image cannot answer,
where the chosen answer is a short refusal).

A scene is 1..``max_objects`` objects on a 2x2 grid, at most one per cell. Scene
``index`` of a split is drawn from ``(seed, split, index)`` alone. Every possible scene
belongs to exactly one split (a hash of its description and the seed puts 10% in
validation, 10% in test, the rest in train), so held-out scenes never occur in training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageDraw

POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell i is at row i // 2, column i % 2
PALETTE = {
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 215, 0),
    "orange": (255, 128, 0), "purple": (128, 0, 160), "cyan": (0, 200, 200), "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
HELD_OUT = 0.1  # share of all scenes reserved for validation, and again for test
QUESTION_TYPES = ("color", "shape", "position", "count")
_PUNCT = re.compile(r"[^\w\s]")


class SceneObject(NamedTuple):
    shape: str
    color: str
    position: str  # one of POSITIONS


Scene = tuple[SceneObject, ...]  # objects in canonical order: by cell, top left first


def normalize(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed: ``"Top-left."`` -> ``"top left"``."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def scene_of(objects) -> Scene:
    """A scene from ``(shape, color, position)`` triples, in canonical order."""
    scene = tuple(sorted((SceneObject(*o) for o in objects), key=lambda o: POSITIONS.index(o.position)))
    if len({o.position for o in scene}) != len(scene):
        raise ValueError(f"shapes: two objects share a cell in {scene}")
    return scene


@dataclass
class ShapesTask:
    """Coloured shapes on a plain canvas, with captions, questions and preference pairs.

    Args:
        image_size: side of the square RGB image in pixels (each grid cell is half of it).
        colors: colour names drawn from (known: red, green, blue, yellow, orange, purple, cyan, black).
        shapes: shapes drawn from (circle, square, triangle).
        max_objects: at most this many objects per scene (1..4, one per cell of the 2x2 grid).
        train_size: training scenes (one row each).
        val_size: held-out scenes in each of the validation and test splits.
        refusal_fraction: share of preference rows asking what the image cannot answer
            ("What colour is the triangle?" with no triangle): chosen = a short refusal
            ("there is no triangle"), rejected = a made-up answer.
        seed: the seed of the split and of the sampling.
    """

    image_size: int = 32
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    max_objects: int = 3
    train_size: int = 2000
    val_size: int = 200
    refusal_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        self.colors, self.shapes = tuple(self.colors), tuple(self.shapes)
        unknown = [c for c in self.colors if c not in PALETTE]
        if not self.colors or unknown or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"shapes.colors: {list(self.colors)} must be distinct names from {list(PALETTE)}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if not self.shapes or unknown or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes.shapes: {list(self.shapes)} must be distinct names from {list(SHAPES)}")
        if not 1 <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"shapes.max_objects: {self.max_objects} must be in 1..{len(POSITIONS)}")
        if self.image_size < 8:
            raise ValueError(f"shapes.image_size: {self.image_size} must be >= 8")
        if self.train_size < 1 or self.val_size < 0:
            raise ValueError(f"shapes: train_size={self.train_size} must be >= 1 and val_size={self.val_size} >= 0")
        if not 0.0 <= self.refusal_fraction <= 1.0:
            raise ValueError(f"shapes.refusal_fraction: {self.refusal_fraction} must be in [0, 1]")
        if len(self.colors) * len(self.shapes) * len(POSITIONS) < 20:
            raise ValueError("shapes: too few colours and shapes for disjoint train / validation / test scenes")

    # -- scenes -----------------------------------------------------------------
    def describe(self, scene: Scene) -> str:
        """The canonical caption: ``"a red circle at top left and a blue square at bottom right"``."""
        parts = [f"a {o.color} {o.shape} at {o.position}" for o in scene]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def split_of(self, scene: Scene) -> str:
        """The one split a scene may appear in (fixed by the seed and the scene's description)."""
        digest = hashlib.sha256(f"{self.seed}:{self.describe(scene)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return "validation" if u < HELD_OUT else "test" if u < 2 * HELD_OUT else "train"

    def random_scene(self, rng: random.Random, k: int) -> Scene:
        cells = rng.sample(range(len(POSITIONS)), k)
        return scene_of((rng.choice(self.shapes), rng.choice(self.colors), POSITIONS[c]) for c in cells)

    def scene(self, split: str, index: int) -> Scene:
        """Scene ``index`` of ``split`` (``train``, ``validation`` or ``test``): the number of
        objects is uniform in 1..max_objects in every split, then a scene of that size is
        drawn among those that belong to the split."""
        rng = random.Random(f"{self.seed}:{split}:{index}")
        for _ in range(100):
            k = rng.randint(1, self.max_objects)
            for _ in range(1000):  # a size with few scenes may have none in this split: draw another size
                scene = self.random_scene(rng, k)
                if self.split_of(scene) == split:
                    return scene
        raise RuntimeError(f"shapes: found no {split} scene; use more colours or shapes")

    def draw(self, scene: Scene, rng: random.Random | None = None) -> Image.Image:
        """The scene as an RGB image; ``rng`` varies each object's size a little (the centre
        pixel of an object's cell always has its colour)."""
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        pen = ImageDraw.Draw(image)
        cell = self.image_size // 2
        for o in scene:
            row, col = divmod(POSITIONS.index(o.position), 2)
            margin = max(1, cell // 8) + (rng.randint(0, max(0, cell // 8)) if rng is not None else 0)
            x0, y0 = col * cell + margin, row * cell + margin
            x1, y1 = (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin
            color = PALETTE[o.color]
            if o.shape == "circle":
                pen.ellipse((x0, y0, x1, y1), fill=color)
            elif o.shape == "square":
                pen.rectangle((x0, y0, x1, y1), fill=color)
            else:
                pen.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=color)
        return image

    @staticmethod
    def center(position: str, image_size: int) -> tuple[int, int]:
        """The pixel ``(x, y)`` at the centre of a position's cell."""
        row, col = divmod(POSITIONS.index(position), 2)
        cell = image_size // 2
        return col * cell + cell // 2, row * cell + cell // 2

    # -- questions ----------------------------------------------------------------
    def questions(self, scene: Scene) -> dict[str, list[tuple[str, str]]]:
        """Every unambiguous ``(question, answer)`` about a scene, by question type."""
        shape_count = {s: sum(o.shape == s for o in scene) for s in self.shapes}
        pair_count = {(o.color, o.shape): sum((p.color, p.shape) == (o.color, o.shape) for p in scene) for o in scene}
        out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
        for o in scene:
            where = "" if shape_count[o.shape] == 1 else f" at the {o.position}"
            out["color"].append((f"What colour is the {o.shape}{where}?", o.color))
            out["shape"].append((f"What shape is at the {o.position}?", o.shape))
            if pair_count[(o.color, o.shape)] == 1:
                out["position"].append((f"Where is the {o.color} {o.shape}?", o.position))
        out["count"].append(("How many objects are there?", str(len(scene))))
        return out

    def unanswerable(self, scene: Scene) -> list[tuple[str, str, str]]:
        """Questions the image cannot answer: ``(question, refusal, kind of a made-up answer)``."""
        present = {o.shape for o in scene}
        pairs = {(o.color, o.shape) for o in scene}
        cells = {o.position for o in scene}
        out = [(f"What colour is the {s}?", f"there is no {s}", "color") for s in self.shapes if s not in present]
        out += [(f"Where is the {c} {s}?", f"there is no {c} {s}", "position")
                for s in self.shapes for c in self.colors if (c, s) not in pairs]
        out += [(f"What shape is at the {p}?", f"there is nothing at the {p}", "shape")
                for p in POSITIONS if p not in cells]
        return out

    def hallucination(self, scene: Scene, kind: str, answer: str, rng: random.Random) -> str:
        """A wrong answer of ``kind`` that the image does not support: a colour or shape absent
        from the image, an empty cell, a wrong count (anything but ``answer`` when all are present)."""
        if kind == "color":
            options, absent = self.colors, [c for c in self.colors if c not in {o.color for o in scene}]
        elif kind == "shape":
            options, absent = self.shapes, [s for s in self.shapes if s not in {o.shape for o in scene}]
        elif kind == "position":
            options, absent = POSITIONS, [p for p in POSITIONS if p not in {o.position for o in scene}]
        else:
            options = absent = [str(n) for n in range(1, len(POSITIONS) + 1) if n != len(scene)]
        choices = [x for x in absent if x != answer] or [x for x in options if x != answer]
        if not choices:
            raise ValueError(f"shapes: no wrong {kind} answer exists besides {answer!r}; add colours or shapes")
        return rng.choice(choices)

    # -- rows ---------------------------------------------------------------------
    def row(self, scene: Scene, kind: str, rng: random.Random, image: Image.Image | None = None) -> dict:
        """One row of ``kind`` (``caption``, ``instruction`` or ``preference``) about ``scene``."""
        image = image if image is not None else self.draw(scene)
        if kind == "caption":
            caption = self.describe(scene)
            return {"image": image, "conversations": _conversation("Describe the image.", caption),
                    "answer": caption, "question_type": "caption"}
        options = {t: qs for t, qs in self.questions(scene).items() if qs}
        if kind == "instruction":
            qtype = rng.choice(sorted(options))
            question, answer = rng.choice(options[qtype])
            return {"image": image, "conversations": _conversation(question, answer), "answer": answer,
                    "question_type": qtype}
        if kind != "preference":
            raise ValueError(f"shapes: unknown row kind {kind!r} (caption, instruction, preference)")
        refusals = self.unanswerable(scene)
        if refusals and rng.random() < self.refusal_fraction:
            question, answer, wrong_kind = rng.choice(refusals)
            qtype, rejected = "unanswerable", self.hallucination(scene, wrong_kind, "", rng)
        else:
            qtype = rng.choice(sorted(options))
            question, answer = rng.choice(options[qtype])
            rejected = self.hallucination(scene, qtype, answer, rng)
        return {"image": image, "prompt": [{"role": "user", "content": f"<image>\n{question}"}],
                "chosen": answer, "rejected": rejected, "answer": answer, "question_type": qtype}

    def rows(self, kind: str = "instruction") -> dict[str, list[dict]]:
        """Rows per split (``train``, ``validation``, ``test``), one per scene, each with
        ``image`` (PIL), ``answer``, ``question_type``, ``id`` and either ``conversations``
        (LLaVA format, for ``caption`` and ``instruction``) or ``prompt``/``chosen``/``rejected``
        (``preference``, the explicit-prompt format of the preference data)."""
        if kind not in ("caption", "instruction", "preference"):
            raise ValueError(f"shapes: unknown row kind {kind!r} (caption, instruction, preference)")

        def scene_rows(split: str, i: int, scene: Scene) -> list[dict]:
            image = self.draw(scene, random.Random(f"{self.seed}:{split}:{i}:image"))
            rng = random.Random(f"{self.seed}:{split}:{i}:{kind}")
            return [{"id": f"{split}-{i}", **self.row(scene, kind, rng, image)}]

        return self.rows_per_split(scene_rows)

    def rows_per_split(self, scene_rows) -> dict[str, list[dict]]:
        """``{split: rows}`` with ``scene_rows(split, i, scene) -> list[dict]`` called for scene
        ``i`` of every split (``train_size`` training scenes, ``val_size`` held-out ones each)."""
        sizes = {"train": self.train_size, "validation": self.val_size, "test": self.val_size}
        return {split: [row for i in range(n) for row in scene_rows(split, i, self.scene(split, i))]
                for split, n in sizes.items()}

    @staticmethod
    def check(completion: str, answer: str) -> bool:
        """Normalised exact match (lowercase, no punctuation, collapsed whitespace)."""
        return normalize(completion) == normalize(str(answer))


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
