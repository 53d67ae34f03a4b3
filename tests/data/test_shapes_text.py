"""ShapesTextTask: the `shapes` scenes rendered as text for the LM stage before LLaVA stage 1
(same scenes, questions and held-out split as the image rows; the grid rendering fills the
image's token positions)."""

import os

import pytest
import yaml

from lit_align import InstructionDataModule, ShapesTask, ShapesTextTask
from lit_align.data.encode import IGNORE_INDEX
from lit_align.data.tasks.shapes import PALETTE, SHAPES, scene_of
from lit_align.data.tasks.shapes_text import COLOR_LETTERS, SHAPE_LETTERS
from lit_align.models import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENE = scene_of([("circle", "red", "top left"), ("square", "blue", "bottom right")])


def test_grid_rendering_one_character_per_patch_colour_half_and_shape_half():
    task = ShapesTextTask()
    assert task.render(SCENE) == "rC..rC....bS..bS"  # rows of 4 patches: rC.. / rC.. / ..bS / ..bS
    assert ShapesTextTask(grid_size=8).render(SCENE) == ("rrCC...." * 4) + ("....bbSS" * 4)
    triangle = scene_of([("triangle", "yellow", "top right"), ("square", "green", "bottom left")])
    assert task.render(triangle) == "..yT..yTgS..gS.."
    # every palette colour and shape has its own letter, none of them the empty cell's
    letters = [COLOR_LETTERS[c] for c in PALETTE] + [SHAPE_LETTERS[s] for s in SHAPES]
    assert len(set(letters)) == len(letters) and "." not in letters


def test_description_rendering():
    assert ShapesTextTask(rendering="description").render(SCENE) == \
        "Scene: a red circle at top left and a blue square at bottom right."


def test_rows_are_the_image_rows_with_the_image_as_text():
    kwargs = dict(train_size=30, val_size=10)
    text, image = ShapesTextTask(**kwargs).rows(), ShapesTask(**kwargs)
    for split, rows in text.items():
        assert len(rows) == 2 * (30 if split == "train" else 10)  # one caption and one question per scene
        for kind in ("caption", "instruction"):
            ours = [r for r in rows if r["id"].endswith(kind)]
            theirs = image.rows(kind)[split]
            for i, (t, r) in enumerate(zip(ours, theirs, strict=True)):
                assert "image" not in t and t["id"] == f"{split}-{i}-{kind}"
                rendering = ShapesTextTask(**kwargs).render(image.scene(split, i))
                assert t["conversations"] == [{**turn, "value": turn["value"].replace("<image>", rendering)}
                                              for turn in r["conversations"]]
                assert (t["answer"], t["question_type"]) == (r["answer"], r["question_type"])
    first = text["train"][0]["conversations"]
    assert first[0]["value"].endswith("\nDescribe the image.") and "<image>" not in first[0]["value"]
    assert first[1]["value"] == text["train"][0]["answer"]


def test_held_out_scenes_never_in_training():
    task = ShapesTextTask(train_size=3000, val_size=200)
    rows = task.rows()
    rendered = {split: {r["conversations"][0]["value"].split("\n")[0] for r in split_rows}
                for split, split_rows in rows.items()}
    # the grid rendering is one-to-one with the scene, so disjoint renderings are disjoint scenes
    assert len(rendered["validation"]) > 100 and len(rendered["test"]) > 100
    assert not rendered["train"] & rendered["validation"]
    assert not rendered["train"] & rendered["test"]
    assert not rendered["validation"] & rendered["test"]
    for split in rows:
        assert all(task.scenes.split_of(task.scenes.scene(split, i)) == split for i in range(50))


def test_kinds_select_the_rows():
    rows = ShapesTextTask(train_size=5, val_size=2, kinds=["caption"]).rows()
    assert [r["question_type"] for r in rows["train"]] == ["caption"] * 5
    rows = ShapesTextTask(train_size=5, val_size=2, kinds=("instruction",)).rows()
    assert "caption" not in {r["question_type"] for r in rows["train"]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(rendering="pixels"), "rendering"),
    (dict(grid_size=2), "grid_size"),
    (dict(grid_size=6), "grid_size"),
    (dict(grid_size=0), "grid_size"),
    (dict(kinds=("caption", "preference")), "kinds"),
    (dict(kinds=()), "kinds"),
    (dict(colors=("pink",)), "colors"),
])
def test_invalid_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesTextTask(**kwargs)


def test_only_instruction_rows():
    with pytest.raises(ValueError, match="instruction"):
        ShapesTextTask(train_size=2, val_size=1).rows("caption")


def test_instruction_data_module_trains_on_the_answers_and_checks_them():
    tok = build_tokenizer("byte")
    dm = InstructionDataModule(task=ShapesTextTask(train_size=8, val_size=4), max_length=160)
    dm.tokenizer = tok
    dm.setup("fit")
    row = dm.encoded["train"][0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer) == "a red triangle at top right</s>"
    prompt = tok.decode(row["prompt_ids"])
    assert prompt == "<|user|>\n..rT..rT........\nDescribe the image.\n<|assistant|>\n"
    meta = dm.encoded["validation"][0]["meta"]
    assert dm.checker("A red triangle at top right.", meta, "") is (meta["answer"] == "a red triangle at top right")
    assert dm.checker(meta["answer"].upper(), meta, "")


def _recipe(name: str) -> dict:
    with open(os.path.join(REPO, "configs", "llava", name)) as f:
        return yaml.safe_load(f)


def test_lm_recipe_grid_fills_the_stage1_towers_image_tokens():
    """The LM stage's grid rendering has one character per patch token of stage 1's tower, and
    both stages draw their scenes alike (seed, colours, shapes, objects per scene)."""
    lm = _recipe("lm_shapes.yaml")
    stage1 = _recipe("stage1_shapes.yaml")
    text = lm["data"]["init_args"]["task"]["init_args"]
    tower = stage1["model"]["init_args"]["vision_tower"]["kwargs"]
    assert text.get("rendering", "grid") == "grid"
    assert text["grid_size"] == tower["img_size"] // tower["patch_size"]
    image = stage1["data"]["init_args"]["task"]
    for key in ("colors", "shapes", "max_objects", "seed"):
        assert text.get(key) == image.get(key), key
    assert stage1["model"]["init_args"]["freeze_language_model"] is True
    assert stage1["model"]["init_args"]["model"]["pretrained"] == f"checkpoints/{lm['name']}/hf"


def test_cli_overrides_keep_each_recipes_task():
    """A field override on the command line (as the tests' fit_recipe and users do) keeps the
    recipe's task: the LM stage's text task stays one, an arith recipe's task stays arith."""
    from lit_align import ArithTask
    from lit_align.train import main

    lm = main(["--config", os.path.join(REPO, "configs", "llava", "lm_shapes.yaml"),
               "--data.init_args.task.val_size", "4", "--data.init_args.task.kinds", "[caption]"], run=False)
    task = lm.datamodule.task
    assert isinstance(task, ShapesTextTask) and task.rendering == "grid"
    assert task.scenes.val_size == 4 and task.kinds == ("caption",)
    arith = main(["--config", os.path.join(REPO, "configs", "sft", "arith.yaml"),
                  "--data.init_args.task.val_size", "4"], run=False)
    assert isinstance(arith.datamodule.task, ArithTask) and arith.datamodule.task.val_size == 4
