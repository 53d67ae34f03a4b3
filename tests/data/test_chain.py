"""The built-in chain task: disjoint stratified splits, scratchpads whose length grows with the
chain, the final-answer checker, noisy demonstrations, the data modules, the reward and the recipes."""

import io
import itertools
import os
import re
import statistics

import pytest
import torch

from lit_align import ArithTask, ChainTask, InstructionDataModule, PromptDataModule
from lit_align.data.tasks.chain import check_disjoint, needs_carry, parse_question, without_carry
from lit_align.rewards import Rewards, RewardSpec
from tests.conftest import REPO, stand_in_exports
from tests.data.util import byte_tokenizer, labelled_texts

PROBLEM = re.compile(r"^\d+(?:[+-]\d)+$")
STEP = re.compile(r"^(-?\d+)([+-])(\d)=(-?\d+)$")
RECIPES = ["configs/sft/chain_base.yaml", "configs/grpo/chain.yaml", "configs/dapo/chain.yaml",
           "configs/gspo/chain.yaml"]


def small(**kw):
    kw.setdefault("train_size", 500)
    kw.setdefault("val_size", 50)
    return ChainTask(**kw)


def test_splits_are_disjoint_sized_and_cover_every_length_evenly():
    s = small().splits()
    assert [len(s[k]) for k in ("train", "validation", "test")] == [500, 50, 50]
    for name, problems in s.items():
        assert len(set(problems)) == len(problems), name
        assert all(PROBLEM.match(p) for p in problems)
        assert {k: sum(ChainTask.num_steps(p) == k for p in problems) for k in range(2, 7)} == \
            {k: len(problems) // 5 for k in range(2, 7)}, name
    for a, b in itertools.combinations(s.values(), 2):
        assert set(a).isdisjoint(b)


def test_disjointness_is_checked_by_problem():
    check_disjoint({"train": ["1+2", "3-1"], "validation": ["4+4"], "test": ["5-5"]})
    with pytest.raises(AssertionError, match=r"splits train and test share 1 problems, e\.g\. '3-1'"):
        check_disjoint({"train": ["1+2", "3-1"], "validation": ["4+4"], "test": ["3-1"]})


def test_intermediate_results_stay_in_range():
    task = small(max_value=30, max_operand=5, min_steps=3, max_steps=4)
    for p in sum(task.splits().values(), []):
        value, ops = parse_question(p)
        assert 0 <= value <= 30 and all(1 <= d <= 5 for _, d in ops)
        for op, d in ops:
            value = value + d if op == "+" else value - d
            assert 0 <= value <= 30


def test_deterministic_in_seed():
    assert small(seed=3, noise=0.5).rows("instruction") == small(seed=3, noise=0.5).rows("instruction")
    assert small(seed=3).rows("prompt") == small(seed=3).rows("prompt")
    assert small(seed=3).splits() != small(seed=4).splits()
    # the splits depend on the seed and sizes only: noise changes the demonstrations, not the problems
    assert small(seed=3, noise=0.5).splits() == small(seed=3).splits()


def test_space_size_counts_the_problems():
    task = ChainTask(max_value=12, max_operand=3, min_steps=1, max_steps=3, train_size=0, val_size=0)
    for k in (1, 2, 3):
        brute = 0
        for start in range(13):
            for ops in itertools.product([("+", d) for d in (1, 2, 3)] + [("-", d) for d in (1, 2, 3)], repeat=k):
                value, ok = start, True
                for op, d in ops:
                    value = value + d if op == "+" else value - d
                    ok &= 0 <= value <= 12
                brute += ok
        assert task.space_size(k) == brute


def test_the_worked_response():
    task = small()
    assert ChainTask.solve("47+8-5+9") == 59
    assert task.response("47+8-5+9") == "47+8=55\n55-5=50\n50+9=59\nanswer: 59"
    assert task.response("5-5") == "5-5=0\nanswer: 0"


def test_correct_response_lengths_grow_with_the_chain():
    task = ChainTask(train_size=0, val_size=500)
    rows = task.rows("instruction")["validation"]
    tok = byte_tokenizer()
    lengths = {k: [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows if r["steps"] == k]
               for k in range(2, 7)}
    means = [statistics.mean(lengths[k]) for k in range(2, 7)]
    assert all(b - a > 6 for a, b in zip(means, means[1:])), means  # about 8 tokens per step
    assert [min(lengths[k]) for k in range(2, 7)] == sorted(min(lengths[k]) for k in range(2, 7))
    assert max(lengths[2]) == 26 and max(lengths[6]) == 58  # "answer: NN" and 8 tokens per 2-digit step
    for r in rows:
        lines = r["completion"].split("\n")
        assert len(lines) == r["steps"] + 1 and all(STEP.match(line) for line in lines[:-1])


@pytest.mark.parametrize("completion, verdict", [
    ("47+8=55\n55-5=50\n50+9=59\nanswer: 59", True),             # right
    ("47+8=55\n55-5=50\n50+9=58\nanswer: 58", False),            # a wrong step carried to the answer
    ("47+8=53\n53-5=48\nanswer: 59", True),                      # wrong scratchpad, right answer
    ("answer: 59", True),                                        # no scratchpad
    ("@@##5 9 ??\nAnswer:59", True),                             # garbled scratchpad, any case, no space
    ("47+8=55\n55-5=50\n50+9=59\nansw", False),                  # truncated before the answer
    ("47+8=55\n55-5=50\n50+9=59", False),                        # no answer line
    ("47+8=55\n55-5=50\n50+9=59\nanswer: 5", False),             # truncated inside the answer
    ("answer: 59\nanswer: 60", True),                            # the first stated answer counts
    ("answer: 60\nanswer: 59", False),
    ("answer: 590", False),
    ("", False),
])
def test_checker(completion, verdict):
    task = small()
    assert task.check(completion, "59") is verdict
    assert task.check(completion, 59) is verdict


def test_checker_reads_negative_answers_and_none():
    assert ChainTask.parse_answer("answer: -3") == -3
    assert ChainTask.parse_answer("no answer here 12") is None


def test_carry_helpers():
    assert needs_carry(55, "+", 8) and not needs_carry(51, "+", 8)
    assert needs_carry(50, "-", 5) and not needs_carry(58, "-", 5)
    assert without_carry(55, "+", 8) == 53 and without_carry(50, "-", 5) == 55 and without_carry(19, "+", 1) == 10


def _wrong_share(rows):
    task = small()
    return statistics.mean(not task.check(r["completion"], r["answer"]) for r in rows)


@pytest.mark.parametrize("kind, noisy_ops", [("carry", "+"), ("carry_borrow", "+-")])
def test_carry_noise_drops_carries_in_training_demonstrations_only(kind, noisy_ops):
    task = small(train_size=2000, noise=0.5, noise_kind=kind)
    rows = task.rows("instruction")
    for r in rows["validation"] + rows["test"]:
        assert r["completion"] == task.response(r["prompt"].rstrip("\n"))
    steps_seen = dropped = 0
    for r in rows["train"]:
        value, ops = parse_question(r["prompt"].rstrip("\n"))
        lines = r["completion"].split("\n")
        assert len(lines) == r["steps"] + 1
        for (op, d), line in zip(ops, lines):
            a, op_, d_, b = STEP.match(line).groups()
            assert (int(a), op_, int(d_)) == (value, op, d)
            right = value + d if op == "+" else value - d
            if op in noisy_ops and value >= 0 and needs_carry(value, op, d):
                steps_seen += 1
                dropped += int(b) != right
                assert int(b) in (right, without_carry(value, op, d))
            else:
                assert int(b) == right
            value = int(b)
        assert lines[-1] == f"answer: {value}"
    assert 0.4 < dropped / steps_seen < 0.6
    # the more steps, the more carries, the more demonstrations end in a wrong answer
    shares = [_wrong_share([r for r in rows["train"] if r["steps"] == k]) for k in range(2, 7)]
    assert shares == sorted(shares) and shares[0] > 0.15 and shares[-1] > shares[0] + 0.2, shares


def test_random_noise_leaves_wrong_steps():
    rows = small(train_size=1000, noise=0.2, noise_kind="random").rows("instruction")
    assert 0.3 < _wrong_share(rows["train"]) < 0.9
    assert _wrong_share(rows["validation"]) == 0


def test_skip_noise_merges_steps_and_keeps_the_answer():
    task = small(train_size=1000, noise=0.3, noise_kind="skip")
    rows = task.rows("instruction")["train"]
    assert _wrong_share(rows) == 0
    merged = [r for r in rows if r["completion"].count("\n") < r["steps"]]
    assert 0.3 < len(merged) / len(rows) < 0.95
    r = merged[0]
    assert task.check(r["completion"], r["answer"]) and len(r["completion"]) < len(task.response(r["prompt"][:-1]))


def test_row_kinds():
    task = small(template="Work out {question}\n")
    inst, prompt = task.rows("instruction"), task.rows("prompt")
    for split in ("train", "validation", "test"):
        assert [r["prompt"] for r in inst[split]] == [r["prompt"] for r in prompt[split]]
        for r in prompt[split]:
            assert set(r) == {"prompt", "answer", "steps"}
            q = re.fullmatch(r"Work out (.+)\n", r["prompt"]).group(1)
            assert r["answer"] == str(ChainTask.solve(q)) and r["steps"] == ChainTask.num_steps(q)
        assert all(set(r) == {"prompt", "answer", "steps", "completion"} for r in inst[split])
    with pytest.raises(ValueError, match="unknown row kind 'preference'"):
        task.rows("preference")


@pytest.mark.parametrize("kwargs,message", [
    (dict(min_steps=0), "need 1 <= min_steps <= max_steps"),
    (dict(min_steps=4, max_steps=3), "need 1 <= min_steps <= max_steps"),
    (dict(max_operand=10), "1 <= max_operand <= 9"),
    (dict(operators="*"), "must be a non-empty subset of '+-'"),
    (dict(template="{q}\n"), "has no {question} field"),
    (dict(noise_kind="swap"), "is not one of"),
    (dict(noise=1.0), "must be in [0, 1)"),
    (dict(min_steps=1, max_steps=1, max_value=9, train_size=100), "distinct 1-step problems cannot hold"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        small(**kwargs)


def test_settings_as_plain_data_and_in_checkpoints():
    task = small(noise=0.25)
    assert task == small(noise=0.25) and task != small(noise=0.5)
    assert task.as_dict()["noise"] == 0.25 and "noise=0.25" in repr(task)
    buffer = io.BytesIO()
    torch.save({"task": task}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["task"] == task


def test_task_through_the_instruction_module():
    task = small(train_size=20, val_size=10, noise=0.5)
    dm = InstructionDataModule(task=task, max_length=96)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert dm.stats == {"data/train_rows": 20, "data/validation_rows": 10, "data/test_rows": 10}
    assert dm.group_key == "steps" and dm.eval_groups() == ["2", "3", "4", "5", "6"]
    assert InstructionDataModule(task=ArithTask(digits=1, val_size=5)).group_key is None  # a task without groups
    tok = byte_tokenizer()
    for enc, row in zip(dm.encoded["validation"], task.rows("instruction")["validation"]):
        assert tok.decode(enc["prompt_ids"]) == row["prompt"]
        assert labelled_texts(enc, tok) == [row["completion"] + "</s>"]
        assert enc["meta"] == {"answer": row["answer"], "steps": row["steps"]}
        assert dm.checker(row["completion"], enc["meta"], enc["reference"])
        assert not dm.checker(row["completion"].rpartition("\n")[0], enc["meta"], enc["reference"])


def test_task_through_the_prompt_module_and_the_rewards():
    task = small(train_size=16, val_size=5)
    dm = PromptDataModule(task=task, max_length=32, micro_batch_size=4, eval_batch_size=5)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert dm.group_key == "steps"
    rows = dm.encoded["train"][:4]
    meta = [r["meta"] for r in rows]
    questions = [r["prompt"].rstrip("\n") for r in task.rows("prompt")["train"][:4]]
    assert [m["answer"] for m in meta] == [str(ChainTask.solve(q)) for q in questions]
    completions = [task.response(questions[0]), task.response(questions[1]).replace("answer: ", "answer: 1"),
                   task.response(questions[2])[:-12], "answer: " + meta[3]["answer"]]
    expected = [1.0, 0.0, 0.0, 1.0]
    _, raw = Rewards([RewardSpec("task_check"), RewardSpec("chain_match")])(
        ["p"] * 4, completions, meta, completion_lengths=[len(c) for c in completions], truncated=[False] * 4,
        max_new_tokens=64, checker=dm.checker)
    assert raw["task_check"].tolist() == expected and raw["chain_match"].tolist() == expected
    # not a built-in-task data module: its grouping is off
    assert PromptDataModule(path="x.jsonl").group_key is None


def test_chain_match_names_a_missing_answer():
    from lit_align.rewards import RewardError

    with pytest.raises(RewardError, match=r"meta has no 'answer'"):
        Rewards([RewardSpec("chain_match")])(["p"], ["answer: 3"], [{}], completion_lengths=[9], truncated=[False],
                                             max_new_tokens=8)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_parse_and_share_the_task(recipe, tmp_path):
    from lit_align.train import main

    cli = main(["--config", os.path.join(REPO, recipe), *stand_in_exports(recipe, tmp_path)], run=False)
    task = cli.datamodule.task
    assert isinstance(task, ChainTask) and cli.datamodule.group_key == "steps"
    base = ChainTask(min_steps=2, max_steps=6, max_value=99, max_operand=9, train_size=20000, val_size=500)
    assert {k: v for k, v in task.as_dict().items() if k not in ("noise", "noise_kind")} == \
        {k: v for k, v in base.as_dict().items() if k not in ("noise", "noise_kind")}  # same held-out split
    longest = 58 + 1  # a 6-step chain of 2-digit values, with its EOS
    if recipe.startswith("configs/sft"):
        assert task.noise > 0 and cli.model.eval_max_new_tokens >= longest
    else:
        assert cli.model.sampling.max_new_tokens < longest <= cli.model.eval_max_new_tokens
        assert cli.model.spec.pretrained.endswith("sft_export")  # the stand-in of checkpoints/sft_chain_base/hf
