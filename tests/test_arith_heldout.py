"""Every arith recipe holds out the same problems: the pipeline's before / after figures are on
one split, and no stage trains on another stage's held-out rows."""

import glob
import importlib
import os

import pytest
import yaml

from lit_align import ArithTask
from tests.conftest import REPO

RECIPES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*", "arith*.yaml")))


def _data_module(recipe: str):
    """The recipe's data module as its YAML builds it (``data: class_path / init_args``), without the
    model: the split rows come from the task settings alone."""
    with open(os.path.join(REPO, recipe)) as f:
        data = yaml.safe_load(f)["data"]
    module, _, name = data["class_path"].rpartition(".")
    init = dict(data["init_args"])
    return getattr(importlib.import_module(module), name)(task=ArithTask(**init.pop("task")), **init)


@pytest.mark.slow
def test_every_arith_recipe_holds_out_the_same_prompts():
    assert {r.split(os.sep)[1] for r in RECIPES} >= {"sft", "rm", "dpo", "grpo", "gspo", "dapo", "ppo"}
    splits = {}
    for recipe in RECIPES:
        raw, _ = _data_module(recipe)._raw_splits()  # the rows every module encodes, before any tokenizer
        splits[recipe] = {role: list(ds["prompt"]) for role, ds in raw.items()}
    base = splits[os.path.join("configs", "sft", "arith_base.yaml")]
    assert len(base["validation"]) == 500 and base.get("test")
    for recipe, roles in splits.items():
        assert roles["validation"] == base["validation"], recipe
        assert roles.get("test") == base["test"], recipe
        assert not (set(roles["validation"]) | set(roles["test"])) & set(roles["train"]), recipe
