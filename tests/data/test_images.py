"""The shapes task and ImageInstructionDataModule: scenes and their rows, placeholder
expansion, several images per row, text-only rows, LLaVA JSON folders, `datasets` image
columns, located errors, preference collation and eval batches."""

import json
import random
import re

import datasets
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose, Resize, ToTensor

from lit_align.data import DataError, ImageInstructionDataModule, ShapesTask
from lit_align.data.encode import IGNORE_INDEX as IGN
from lit_align.data.image_kinds import IMAGE_KINDS, ImageConversations
from lit_align.data.images import expand_image_tokens
from lit_align.data.tasks.shapes import BACKGROUND, PALETTE, POSITIONS, scene_of
from lit_align.models import build_tokenizer
from tests.data.util import byte_ids, image_tokenizer, raises_located, write_jsonl

EOS_ID = 1
IMG = 384  # the byte tokenizer has 384 ids; <image> is added as the next one
N = 4
TRANSFORM = Compose([Resize((32, 32)), ToTensor()])
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
tokenizer, ids = image_tokenizer, byte_ids


def chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def png(folder, name: str, color=RED, size=(8, 8)) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(folder / name)
    return name


def solid(color) -> torch.Tensor:
    return TRANSFORM(Image.new("RGB", (8, 8), color))


def module(setup=True, **kwargs) -> ImageInstructionDataModule:
    kwargs.setdefault("max_length", 256)
    dm = ImageInstructionDataModule(**kwargs)
    dm.tokenizer, dm.image_transform, dm.num_image_tokens = tokenizer(), TRANSFORM, N
    if setup:
        dm.setup("fit")
    return dm


def batch_of(dm, rows=None, eval=False):
    rows = dm.encoded["train"] if rows is None else rows
    return (dm.eval_collate if eval else dm.collate)([[r] for r in rows])


# -- the shapes task ---------------------------------------------------------------------

def test_scenes_are_deterministic_in_seed_split_and_index():
    a, b = ShapesTask(train_size=30, val_size=10), ShapesTask(train_size=30, val_size=10)
    ra, rb = a.rows("instruction"), b.rows("instruction")
    for split in ("train", "validation", "test"):
        assert [{k: v for k, v in r.items() if k != "image"} for r in ra[split]] == \
               [{k: v for k, v in r.items() if k != "image"} for r in rb[split]]
        assert [r["image"].tobytes() for r in ra[split]] == [r["image"].tobytes() for r in rb[split]]
    # scene i does not depend on how many scenes are drawn, and the seed changes them
    assert ShapesTask(train_size=5).scene("train", 3) == a.scene("train", 3)
    assert [ShapesTask(seed=1).scene("train", i) for i in range(10)] != [a.scene("train", i) for i in range(10)]


def test_objects_sit_in_distinct_cells_and_sizes_cover_one_to_max():
    task = ShapesTask(val_size=50)
    sizes = set()
    for split, n in (("train", 300), ("validation", 50)):
        for i in range(n):
            scene = task.scene(split, i)
            cells = [o.position for o in scene]
            assert len(set(cells)) == len(cells) and set(cells) <= set(POSITIONS)
            assert sorted(cells, key=POSITIONS.index) == cells  # canonical order
            assert {o.color for o in scene} <= {"red", "green", "blue", "yellow"}
            sizes.add(len(scene))
    assert sizes == {1, 2, 3}


def test_pixel_at_each_object_centre_has_its_colour():
    task = ShapesTask(train_size=60, val_size=10)
    rows = task.rows("caption")["train"]
    for i, row in enumerate(rows):
        scene = task.scene("train", i)
        assert row["answer"] == task.describe(scene)
        image = row["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
        for position in POSITIONS:
            here = [o for o in scene if o.position == position]
            expected = PALETTE[here[0].color] if here else BACKGROUND
            assert image.getpixel(task.center(position, 32)) == expected
    # every shape and a bigger canvas, drawn without jitter
    scene = scene_of([("triangle", "green", "top left"), ("circle", "red", "top right"),
                      ("square", "blue", "bottom right")])
    image = ShapesTask(image_size=64).draw(scene)
    assert image.getpixel(ShapesTask.center("top left", 64)) == PALETTE["green"] == GREEN
    assert image.getpixel(ShapesTask.center("top right", 64)) == RED
    assert image.getpixel(ShapesTask.center("bottom right", 64)) == BLUE
    assert image.getpixel(ShapesTask.center("bottom left", 64)) == BACKGROUND
    assert image.getpixel((0, 0)) == BACKGROUND  # the cell margins stay empty


SCENE = scene_of([("square", "blue", "bottom right"), ("circle", "red", "top left")])


def test_caption_and_questions_of_a_constructed_scene():
    task = ShapesTask()
    assert [o.position for o in SCENE] == ["top left", "bottom right"]
    assert task.describe(SCENE) == "a red circle at top left and a blue square at bottom right"
    three = scene_of([("circle", "red", "top left"), ("circle", "red", "bottom left"), ("square", "blue", "top right")])
    assert task.describe(three) == \
        "a red circle at top left, a blue square at top right and a red circle at bottom left"
    assert task.questions(SCENE) == {
        "color": [("What colour is the circle?", "red"), ("What colour is the square?", "blue")],
        "shape": [("What shape is at the top left?", "circle"), ("What shape is at the bottom right?", "square")],
        "position": [("Where is the red circle?", "top left"), ("Where is the blue square?", "bottom right")],
        "count": [("How many objects are there?", "2")],
    }
    # ambiguous references are avoided: two red circles have no "where is" question
    q = task.questions(three)
    assert ("What colour is the circle at the top left?", "red") in q["color"]
    assert q["position"] == [("Where is the blue square?", "top right")]
    row = task.row(SCENE, "caption", random.Random(0))
    assert row["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image."},
                                    {"from": "gpt",
                                     "value": "a red circle at top left and a blue square at bottom right"}]
    assert row["question_type"] == "caption" and row["image"].getpixel((8, 8)) == RED
    every = {(t, qa) for t, qas in task.questions(SCENE).items() for qa in qas}
    seen = set()
    for seed in range(40):
        row = task.row(SCENE, "instruction", random.Random(seed))
        human, gpt = row["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert gpt["value"] == row["answer"]
        seen.add((row["question_type"], (human["value"][len("<image>\n"):], row["answer"])))
    assert seen <= every and {t for t, _ in seen} == {"color", "shape", "position", "count"}


def test_preference_rows_of_a_constructed_scene_reject_hallucinations():
    task = ShapesTask(refusal_fraction=0.0)
    for seed in range(40):
        row = task.row(SCENE, "preference", random.Random(seed))
        assert set(row) == {"image", "prompt", "chosen", "rejected", "answer", "question_type"}
        question = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and question.startswith("<image>\n")
        assert row["chosen"] == row["answer"] and row["rejected"] != row["chosen"]
        qtype = row["question_type"]
        hallucinated = {"color": {"green", "yellow"}, "shape": {"triangle"},
                        "position": {"top right", "bottom left"}, "count": {"1", "3", "4"}}[qtype]
        assert row["rejected"] in hallucinated, row
    assert task.unanswerable(SCENE)[:1] == [("What colour is the triangle?", "there is no triangle", "color")]
    assert ("Where is the red square?", "there is no red square", "position") in task.unanswerable(SCENE)
    assert ("What shape is at the top right?", "there is nothing at the top right", "shape") in task.unanswerable(SCENE)
    refusing = ShapesTask(refusal_fraction=1.0)
    for seed in range(20):
        row = refusing.row(SCENE, "preference", random.Random(seed))
        assert row["question_type"] == "unanswerable" and row["chosen"].startswith("there is ")
        if row["prompt"][0]["content"].startswith("<image>\nWhat colour"):
            assert row["rejected"] in {"red", "green", "blue", "yellow"}


def test_held_out_scenes_are_disjoint_from_training():
    task = ShapesTask(train_size=2000, val_size=200)
    captions = {split: {task.describe(task.scene(split, i)) for i in range(n)}
                for split, n in (("train", 2000), ("validation", 200), ("test", 200))}
    assert captions["train"].isdisjoint(captions["validation"])
    assert captions["train"].isdisjoint(captions["test"])
    assert captions["validation"].isdisjoint(captions["test"])
    rows = task.rows("caption")
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [2000, 200, 200]
    assert {r["answer"] for r in rows["train"]}.isdisjoint(r["answer"] for r in rows["test"])


def test_preference_rows_include_refusals_of_questions_the_image_cannot_answer():
    task = ShapesTask(train_size=500, val_size=50)
    rows = task.rows("preference")["train"]
    refusals = [(i, r) for i, r in enumerate(rows) if r["question_type"] == "unanswerable"]
    assert 0.12 < len(refusals) / len(rows) < 0.28
    kinds = set()
    for i, r in refusals:
        scene = task.scene("train", i)
        question = r["prompt"][0]["content"][len("<image>\n"):]
        m = re.fullmatch(r"What colour is the (\w+)\?", question)
        if m:
            kinds.add("color")
            assert m[1] not in {o.shape for o in scene} and r["chosen"] == f"there is no {m[1]}"
            assert r["rejected"] in task.colors
            continue
        m = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
        if m:
            kinds.add("position")
            assert (m[1], m[2]) not in {(o.color, o.shape) for o in scene}
            assert r["chosen"] == f"there is no {m[1]} {m[2]}"
            assert r["rejected"] in POSITIONS
            continue
        m = re.fullmatch(r"What shape is at the (\w+ \w+)\?", question)
        assert m, question
        kinds.add("shape")
        assert m[1] not in {o.position for o in scene} and r["chosen"] == f"there is nothing at the {m[1]}"
        assert r["rejected"] in task.shapes
        assert r["answer"] == r["chosen"]
    assert kinds == {"color", "position", "shape"}


def test_check_is_normalised_exact_match():
    assert ShapesTask.check("Red.", "red") and ShapesTask.check("  top-left ", "top left")
    assert ShapesTask.check("There is no triangle!", "there is no triangle") and ShapesTask.check("2\n", "2")
    assert not ShapesTask.check("dark red", "red") and not ShapesTask.check("3", "2")
    assert not ShapesTask.check("", "red")


def test_invalid_task_settings_fail_at_construction():
    with pytest.raises(ValueError, match="shapes.colors"):
        ShapesTask(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="shapes.max_objects"):
        ShapesTask(max_objects=5)
    with pytest.raises(ValueError, match="unknown row kind"):
        ShapesTask().rows("prompt")


# -- placeholder expansion ------------------------------------------------------------------

def test_expand_image_tokens():
    assert expand_image_tokens([5, IMG, 6, IMG], [7, 8, 9, 10], IMG, 3) == \
        ([5, IMG, IMG, IMG, 6, IMG, IMG, IMG], [7, IGN, IGN, IGN, 9, IGN, IGN, IGN])
    assert expand_image_tokens([5, 6], None, IMG, 3) == ([5, 6], None)


def test_placeholder_expands_to_n_image_tokens_with_labels_on_the_answer_only(tmp_path):
    png(tmp_path, "red.png")
    path = write_jsonl(tmp_path / "rows.jsonl",
                       [{"image": "red.png", "conversations": chat("<image>\nWhat colour is the circle?", "red")}])
    dm = module(data_files=path)
    enc = dm.encoded["train"][0]
    head, tail = ids("<|user|>\n"), ids("\nWhat colour is the circle?\n<|assistant|>\n")
    prompt = head + [IMG] * N + tail
    assert enc["input_ids"] == prompt + ids("red") + [EOS_ID]
    assert enc["labels"] == [IGN] * len(prompt) + ids("red") + [EOS_ID]
    assert enc["prompt_ids"] == prompt and enc["reference"] == "red"
    assert enc["length"] == len(prompt) + 4 and enc["num_labels"] == 4
    assert enc["images"] == [str(tmp_path / "red.png")]  # a path, loaded in collate
    b = batch_of(dm)
    assert b["input_ids"].tolist() == [enc["input_ids"]]
    assert b["image_counts"].tolist() == [1]
    assert b["pixel_values"].shape == (1, 3, 32, 32) and torch.equal(b["pixel_values"][0], solid(RED))


def test_two_images_in_one_row(tmp_path):
    png(tmp_path, "red.png", RED), png(tmp_path, "blue.png", BLUE)
    rows = [{"image": ["red.png", "blue.png"], "conversations": chat("<image>\n<image>\nSame colour?", "no")}]
    dm = module(data_files=write_jsonl(tmp_path / "rows.jsonl", rows))
    enc = dm.encoded["train"][0]
    prompt = ids("<|user|>\n") + [IMG] * N + ids("\n") + [IMG] * N + ids("\nSame colour?\n<|assistant|>\n")
    assert enc["input_ids"] == prompt + ids("no") + [EOS_ID]
    assert enc["labels"] == [IGN] * len(prompt) + ids("no") + [EOS_ID]
    b = batch_of(dm)
    assert b["image_counts"].tolist() == [2]
    assert torch.equal(b["pixel_values"], torch.stack([solid(RED), solid(BLUE)]))


@pytest.mark.parametrize("row,field,problem", [
    ({"image": "red.png", "conversations": chat("<image>\n<image>\nWhat?", "red")},
     "image", "1 image(s) but 2 '<image>' placeholder(s) in 'conversations'"),
    ({"image": ["red.png", "red.png"], "conversations": chat("What <image>?", "red")},
     "image", "2 image(s) but 1 '<image>' placeholder(s) in 'conversations'"),
    ({"image": None, "conversations": chat("<image>\nWhat?", "red")},
     "image", "0 image(s) but 1 '<image>' placeholder(s) in 'conversations'"),
    ({"image": "red.png", "conversations": chat("<image>\nWhat?", "a <image>")},
     "conversations", "'<image>' inside a trained response; images belong in the prompt"),
])
def test_placeholder_count_mismatch_names_the_row_and_field(tmp_path, row, field, problem):
    png(tmp_path, "red.png")
    good = {"image": "red.png", "conversations": chat("<image>\nWhat?", "red")}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, row])
    with raises_located(path, 1, field, problem):
        module(data_files=path)


def test_text_only_rows_mix_with_image_rows(tmp_path):
    png(tmp_path, "red.png", RED), png(tmp_path, "blue.png", BLUE), png(tmp_path, "green.png", GREEN)
    rows = [{"image": "red.png", "conversations": chat("<image>\nColour?", "red")},
            {"image": None, "conversations": chat("Say hi.", "hi")},
            {"image": ["blue.png", "green.png"], "conversations": chat("<image><image>Colours?", "blue, green")},
            {"image": "", "conversations": chat("Say yo.", "yo")}]
    dm = module(data_files=write_jsonl(tmp_path / "rows.jsonl", rows))
    encoded = dm.encoded["train"]
    assert encoded[1]["input_ids"] == ids("<|user|>\nSay hi.\n<|assistant|>\nhi") + [EOS_ID]
    assert encoded[1]["images"] == [] and IMG not in encoded[3]["input_ids"]
    b = batch_of(dm)
    assert b["image_counts"].tolist() == [1, 0, 2, 0]
    assert torch.equal(b["pixel_values"], torch.stack([solid(RED), solid(BLUE), solid(GREEN)]))
    assert [(row == IMG).sum().item() for row in b["input_ids"]] == [N, 0, 2 * N, 0]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in encoded]
    assert (b["labels"][b["input_ids"] == IMG] == IGN).all()
    text_only = batch_of(dm, [encoded[1], encoded[3]])
    assert "pixel_values" not in text_only and text_only["image_counts"].tolist() == [0, 0]


def test_too_long_rows_are_dropped_never_cut_through_images(tmp_path):
    png(tmp_path, "red.png")
    rows = [{"image": "red.png", "conversations": chat("<image>\nWhat colour is it?", "red")},
            {"image": "red.png", "conversations": chat("<image>\nColour?", "red")}]
    # "<|user|>\n" + 4 image tokens + "\n<question>\n<|assistant|>\n" + "red</s>": row 0 is
    # 9 + 4 + 34 + 4 = 51 tokens (47 without the expansion), row 1 is 9 + 4 + 23 + 4 = 40
    dm = module(data_files=write_jsonl(tmp_path / "rows.jsonl", rows), max_length=40)
    assert [e["length"] for e in dm.encoded["train"]] == [40]
    assert dm.encoded["train"][0]["input_ids"].count(IMG) == N
    assert dm.stats == {"data/train_dropped_too_long": 1, "data/train_rows": 1}


# -- sources ----------------------------------------------------------------------------------

def test_llava_json_folder(tmp_path):
    images = tmp_path / "images"
    png(images, "000.png", RED), png(images, "001.png", BLUE, size=(20, 12))
    rows = [{"id": "000", "image": "000.png", "conversations": chat("<image>\nWhat colour?", "red")},
            {"id": "001", "image": "001.png", "conversations": chat("What colour?", "blue")},  # no placeholder
            {"id": "002", "conversations": chat("Say hi.", "hi")}]  # text-only: no image key
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    dm = module(path=str(path), image_folder=str(images))
    encoded = dm.encoded["train"]
    assert [e["meta"] for e in encoded] == [{"id": "000"}, {"id": "001"}, {"id": "002"}]
    # LLaVA's convention: an image row without a placeholder gets "<image>\n" before its first human turn
    assert encoded[1]["input_ids"] == encoded[0]["input_ids"][:-4] + ids("blue") + [EOS_ID]
    assert encoded[1]["prompt_ids"] == ids("<|user|>\n") + [IMG] * N + ids("\nWhat colour?\n<|assistant|>\n")
    b = batch_of(dm)
    assert b["image_counts"].tolist() == [1, 1, 0]
    assert torch.equal(b["pixel_values"], torch.stack([solid(RED), solid(BLUE)]))
    # image_folder defaults to the json file's folder
    (tmp_path / "rel.json").write_text(json.dumps([{"image": "images/000.png",
                                                    "conversations": chat("<image>x", "y")}]))
    assert module(path=str(tmp_path / "rel.json")).encoded["train"][0]["images"] == \
        [str(tmp_path / "images" / "000.png")]


def test_missing_and_corrupt_image_files_fail_at_setup_naming_the_file_and_row(tmp_path):
    png(tmp_path, "ok.png")
    rows = [{"image": "ok.png", "conversations": chat("<image>a", "b")},
            {"image": "gone.png", "conversations": chat("<image>a", "b")}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    missing = str(tmp_path / "gone.png")
    with pytest.raises(DataError,
                       match=re.escape(f"{path} [train] row 1, field 'image': image file {missing!r} does not exist")):
        module(path=str(path))
    (tmp_path / "gone.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError,
                       match=re.escape(f"{path} [train] row 1, field 'image': image file {missing!r} cannot be read")):
        module(path=str(path))


def test_image_that_breaks_after_setup_fails_in_collate_naming_the_file_and_row(tmp_path):
    png(tmp_path, "ok.png")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"image": "ok.png", "conversations": chat("<image>a", "b")}])
    dm = module(data_files=path)
    (tmp_path / "ok.png").write_bytes(b"broken")
    file = str(tmp_path / "ok.png")
    with pytest.raises(DataError,
                       match=re.escape(f"{path} [train] row 0, field 'image': image file {file!r} cannot be read")):
        batch_of(dm)


def test_datasets_sources_with_an_image_column_of_paths_or_images(tmp_path):
    png(tmp_path, "red.png", RED), png(tmp_path, "blue.png", BLUE)
    convs = [chat("<image>\nColour?", "red"), chat("<image>\nColour?", "blue")]
    paths = datasets.Dataset.from_list([{"picture": p, "conversations": c}
                                        for p, c in zip(["red.png", "blue.png"], convs)])
    paths.to_parquet(str(tmp_path / "paths.parquet"))
    dm = module(data_files=str(tmp_path / "paths.parquet"), image_column="picture")
    assert dm.encoded["train"][1]["images"] == [str(tmp_path / "blue.png")]
    assert torch.equal(batch_of(dm)["pixel_values"], torch.stack([solid(RED), solid(BLUE)]))
    # a datasets.Image column (encoded bytes in the parquet file), one row text-only
    pil = datasets.Dataset.from_list([{"image": Image.new("RGB", (8, 8), BLUE), "conversations": convs[1]},
                                      {"image": None, "conversations": chat("hi", "yo")}])
    assert isinstance(pil.features["image"], datasets.Image)
    pil.to_parquet(str(tmp_path / "pil.parquet"))
    dm = module(data_files=str(tmp_path / "pil.parquet"))
    assert isinstance(dm.encoded["train"][0]["images"][0], bytes)  # kept encoded until collate
    b = batch_of(dm)
    assert b["image_counts"].tolist() == [1, 0] and torch.equal(b["pixel_values"], solid(BLUE)[None])


# -- preference -------------------------------------------------------------------------------

def test_preference_pairs_collate_chosen_then_rejected_with_duplicated_pixels(tmp_path):
    png(tmp_path, "red.png", RED), png(tmp_path, "blue.png", BLUE)
    rows = [{"image": "red.png", "prompt": [{"role": "user", "content": "<image>\nColour?"}], "chosen": "red",
             "rejected": "green", "answer": "red"},
            {"image": "blue.png", "prompt": [{"from": "human", "value": "<image>\nColour?"}], "chosen": "blue",
             "rejected": "a yellow one", "answer": "blue"},
            {"image": None, "prompt": "Say hi: ", "chosen": "hi", "rejected": "no"}]
    dm = module(data_files=write_jsonl(tmp_path / "pairs.jsonl", rows), kind="preference")
    enc = dm.encoded["train"][0]
    prompt = ids("<|user|>\n") + [IMG] * N + ids("\nColour?\n<|assistant|>\n")
    assert enc["prompt_ids"] == prompt
    assert enc["chosen"] == {"input_ids": prompt + ids("red") + [EOS_ID],
                             "labels": [IGN] * len(prompt) + ids("red") + [EOS_ID],
                             "num_labels": 4}
    assert enc["rejected"]["input_ids"] == prompt + ids("green") + [EOS_ID]
    assert enc["rejected"]["labels"] == [IGN] * len(prompt) + ids("green") + [EOS_ID]
    assert enc["length"] == len(prompt) + 6 and enc["meta"] == {"answer": "red"}
    b = batch_of(dm)
    assert b["input_ids"].shape[0] == 6
    texts = [tokenizer().decode([t for t in row.tolist() if t != 0]) for row in b["input_ids"]]
    assert [t.rsplit("\n", 1)[-1] if "\n" in t else t for t in texts] == \
        ["red</s>", "blue</s>", "Say hi: hi</s>", "green</s>", "a yellow one</s>", "Say hi: no</s>"]
    assert b["image_counts"].tolist() == [1, 1, 0, 1, 1, 0]
    assert torch.equal(b["pixel_values"], torch.stack([solid(RED), solid(BLUE), solid(RED), solid(BLUE)]))
    assert (b["labels"][b["input_ids"] == IMG] == IGN).all()
    e = batch_of(dm, eval=True)
    assert e["prompt_image_counts"].tolist() == [1, 1, 0]


def test_preference_prompt_and_image_mismatch_is_located(tmp_path):
    png(tmp_path, "red.png")
    rows = [{"image": "red.png", "prompt": "<image> Colour?", "chosen": "red", "rejected": "blue"},
            {"image": None, "prompt": "<image> Colour?", "chosen": "red", "rejected": "blue"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with raises_located(path, 1, "image", "0 image(s) but 1 '<image>' placeholder(s) in 'prompt'"):
        module(data_files=path, kind="preference")


def test_image_pairs_are_read_like_text_pairs_margin_included(tmp_path):
    png(tmp_path, "red.png", RED)
    rows = [{"image": "red.png", "prompt": "Colour? ", "chosen": "red", "rejected": "blue", "margin": 0.5},
            {"image": "red.png", "prompt": "Colour? ", "chosen": "red", "rejected": "red", "margin": 1.0},
            {"image": "red.png", "prompt": "Colour? ", "chosen": [{"from": "gpt", "value": "red"}],
             "rejected": [{"from": "gpt", "value": "pink"}], "margin": 2.0}]
    dm = module(data_files=write_jsonl(tmp_path / "pairs.jsonl", rows), kind="preference")
    first, second = dm.encoded["train"]
    assert first["margin"] == 0.5 and second["margin"] == 2.0
    assert dm.stats["data/train_dropped_identical_responses"] == 1
    assert first["chosen"]["input_ids"] == [IMG] * N + ids("\nColour? red") + [EOS_ID]  # "<image>\n" led the prompt
    assert second["prompt_ids"] == ids("<|user|>\n") + [IMG] * N + ids("\nColour? \n<|assistant|>\n")  # ShareGPT turns
    assert second["chosen"]["labels"][-4:] == ids("red") + [EOS_ID]
    assert batch_of(dm)["margin"].tolist() == [0.5, 2.0]
    bad = dict(rows[0], margin="lots")
    with raises_located(write_jsonl(tmp_path / "bad.jsonl", [bad]), 0, "margin", "expected a number, got 'lots'"):
        module(data_files=str(tmp_path / "bad.jsonl"), kind="preference")


def test_conversational_prompt_completion_rows_get_the_leading_placeholder(tmp_path):
    png(tmp_path, "red.png", RED)
    rows = [{"image": "red.png", "prompt": [{"role": "user", "content": "Colour?"}],
             "completion": [{"role": "assistant", "content": "red"}]}]
    enc = module(data_files=write_jsonl(tmp_path / "rows.jsonl", rows)).encoded["train"][0]
    assert enc["prompt_ids"] == ids("<|user|>\n") + [IMG] * N + ids("\nColour?\n<|assistant|>\n")
    assert enc["labels"][-4:] == ids("red") + [EOS_ID]


def test_a_new_kind_of_image_row_is_one_class_in_the_kinds_table(tmp_path, monkeypatch):
    class QuestionAnswer(ImageConversations):
        """``question``/``answer`` columns, read as a prompt and a completion."""

        def row_format(self, columns):
            return "prompt_completion"

        def used_columns(self):
            return {"question", "answer"}

        def encode(self, row, fmt, where, tokenizer, images, n_images):
            qa = {"prompt": row["question"], "completion": row["answer"]}
            return super().encode(qa, fmt, where, tokenizer, images, n_images)

    monkeypatch.setitem(IMAGE_KINDS, "question_answer", QuestionAnswer)
    png(tmp_path, "red.png", RED)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"image": "red.png", "question": "<image>Colour? ", "answer": "red"}])
    dm = module(data_files=path, kind="question_answer")
    enc = dm.encoded["train"][0]
    assert enc["input_ids"] == [IMG] * N + ids("Colour? red") + [EOS_ID] and enc["meta"] == {}
    assert batch_of(dm)["image_counts"].tolist() == [1]


# -- the shapes task through the module, eval batches ------------------------------------------

def test_shapes_task_eval_batches(tmp_path):
    dm = module(task=ShapesTask(train_size=16, val_size=6), kind="instruction", eval_batch_size=4)
    assert [len(dm.encoded[s]) for s in ("train", "validation", "test")] == [16, 6, 6]
    e = next(iter(dm.val_dataloader()))
    assert set(e) == {"input_ids", "labels", "attention_mask", "pixel_values", "image_counts", "prompt_image_counts",
                      "prompt_ids", "prompt_mask", "references", "meta", "num_label_tokens_step", "num_seqs_step"}
    assert e["pixel_values"].shape == (4, 3, 32, 32) and e["image_counts"].tolist() == [1, 1, 1, 1]
    assert e["prompt_image_counts"].tolist() == [1, 1, 1, 1]
    assert ((e["prompt_ids"] == IMG).sum(1) == N).all()
    assert e["prompt_ids"].shape == e["prompt_mask"].shape
    assert e["prompt_mask"][:, -1].tolist() == [1, 1, 1, 1]  # left-padded
    task = dm.task
    first = task.rows("instruction")["validation"][0]
    assert e["references"][0] == first["answer"] and e["meta"][0]["answer"] == first["answer"]
    assert e["meta"][0]["question_type"] == first["question_type"]
    prompt = tokenizer().decode([t for t in e["prompt_ids"][0].tolist() if t != 0])
    question = first["conversations"][0]["value"][len("<image>"):]
    assert prompt == "<|user|>\n" + "<image>" * N + question + "\n<|assistant|>\n"
    # the image in the batch is the task's drawing
    assert torch.equal(e["pixel_values"][0], TRANSFORM(first["image"]))
    assert dm.checker(first["answer"].upper() + ".", e["meta"][0], e["references"][0])
    assert not dm.checker("purple", e["meta"][0], e["references"][0])


def test_shapes_task_preference_and_caption_through_the_module():
    dm = module(task=ShapesTask(train_size=12, val_size=4), kind="preference", eval_batch_size=4)
    e = next(iter(dm.val_dataloader()))
    assert e["input_ids"].shape[0] == 8 and e["prompt_ids"].shape[0] == 4
    assert e["image_counts"].tolist() == [1] * 8 and e["prompt_image_counts"].tolist() == [1] * 4
    assert torch.equal(e["pixel_values"][:4], e["pixel_values"][4:])
    assert [m["answer"] for m in e["meta"]] == e["references"]
    dm = module(task=ShapesTask(train_size=12, val_size=4), kind="caption")
    b = next(iter(dm.train_dataloader()))
    assert b["pixel_values"].shape == (8, 3, 32, 32) and b["image_counts"].tolist() == [1] * 8


def test_settings_and_missing_pieces_fail_with_a_message(tmp_path):
    with pytest.raises(ValueError, match="packing is not supported"):
        ImageInstructionDataModule(task=ShapesTask(), packing=True)
    with pytest.raises(ValueError, match="data.kind"):
        ImageInstructionDataModule(task=ShapesTask(), kind="prompt")
    dm = ImageInstructionDataModule(task=ShapesTask(train_size=4, val_size=2))
    dm.tokenizer, dm.num_image_tokens = tokenizer(), N
    with pytest.raises(ValueError, match="needs `image_transform`"):
        dm.setup("fit")
    dm = ImageInstructionDataModule(task=ShapesTask(train_size=4, val_size=2))
    dm.tokenizer, dm.image_transform, dm.num_image_tokens = build_tokenizer("byte"), TRANSFORM, N
    with pytest.raises(ValueError, match="the tokenizer has no single token for '<image>'"):
        dm.setup("fit")
