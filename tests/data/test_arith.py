"""The built-in arith task: disjoint splits, answer formatting and checking, the three row kinds."""

import random
import re

import pytest

from lit_align.data import ArithTask, InstructionDataModule
from tests.data.util import byte_tokenizer, labelled_texts

PROBLEM = re.compile(r"^\d+(?:[-+*]\d+)+$")


def small(**kw):
    kw.setdefault("val_size", 40)
    return ArithTask(digits=2, **kw)


def test_splits_are_disjoint_and_sized():
    s = small(train_size=300).splits()
    assert [len(s[k]) for k in ("train", "validation", "test")] == [300, 40, 40]
    for k, problems in s.items():
        assert len(set(problems)) == len(problems), k
        assert all(PROBLEM.match(p) for p in problems)
    assert set(s["train"]).isdisjoint(s["validation"])
    assert set(s["train"]).isdisjoint(s["test"])
    assert set(s["validation"]).isdisjoint(s["test"])


def test_without_train_size_train_is_every_problem_not_held_out():
    s = small().splits()
    assert len(s["train"]) == 90 * 90 - 80
    assert len(set(s["train"]) | set(s["validation"]) | set(s["test"])) == 90 * 90


def test_large_spaces_are_sampled_and_still_disjoint():
    task = ArithTask(digits=4, train_size=500, val_size=50)
    assert task.space_size == 9000 ** 2
    s = task.splits()
    assert [len(s[k]) for k in ("train", "validation", "test")] == [500, 50, 50]
    everything = s["train"] + s["validation"] + s["test"]
    assert len(set(everything)) == 600
    assert all(re.match(r"^\d{4}\+\d{4}$", p) for p in everything)


def test_deterministic_in_seed():
    assert small(train_size=50, seed=3).rows("instruction") == small(train_size=50, seed=3).rows("instruction")
    assert small(train_size=50, seed=3).splits() != small(train_size=50, seed=4).splits()


def test_operators_and_terms():
    task = ArithTask(digits=1, terms=3, operators="+-*", val_size=10)
    assert task.space_size == 10 ** 3 * 3 ** 2
    problems = task.splits()["train"]
    assert {op for p in problems for op in re.findall(r"[-+*]", p)} == {"+", "-", "*"}
    assert ArithTask.solve("2+3*4") == 14 and ArithTask.solve("2-9") == -7


@pytest.mark.parametrize("kwargs",
                         [dict(digits=1), dict(digits=1, terms=3, operators="+-"), dict(digits=2, operators="*-")])
def test_space_size_counts_the_problems(kwargs):
    task = ArithTask(val_size=10, **kwargs)
    assert task.space_size == len(set(task._all_problems()))


def test_one_digit_space_includes_zero():
    s = ArithTask(digits=1, val_size=49).splits()  # 100 problems: 0+0 .. 9+9
    assert len(s["train"]) == 2 and "0+0" in s["train"] + s["validation"] + s["test"]


@pytest.mark.parametrize("reverse,value,text", [
    (True, 95, "59"), (True, 100, "001"), (True, -12, "-21"), (True, 0, "0"), (True, 7, "7"),
    (False, 95, "95"), (False, 100, "100"), (False, -12, "-12"),
])
def test_format_and_parse_round_trip(reverse, value, text):
    task = small(reverse_answer=reverse)
    assert task.format_answer(value) == text
    assert task.parse_answer(text) == value
    assert task.check(text, value) and task.check(text, str(value))
    assert task.check(f"  {text}</s>\n", value)
    assert not task.check(task.format_answer(value + 1), value)


def test_parse_answer_takes_the_first_number():
    task = small()
    assert task.parse_answer("the answer is 59, not 60") == 95
    assert task.parse_answer("no digits here") is None
    assert not task.check("no digits here", 95)


def test_round_trip_over_many_values():
    rng = random.Random(0)
    for reverse in (True, False):
        task = small(reverse_answer=reverse)
        for value in [rng.randint(-10 ** 6, 10 ** 6) for _ in range(200)]:
            assert task.parse_answer(task.format_answer(value)) == value


def test_instruction_rows():
    task = small(train_size=100, template="What is {question}?\n")
    rows = task.rows("instruction")
    for split in ("train", "validation", "test"):
        for row in rows[split]:
            assert set(row) == {"prompt", "completion", "answer"}
            q = re.fullmatch(r"What is (.+)\?\n", row["prompt"]).group(1)
            assert row["answer"] == str(ArithTask.solve(q))
            assert row["completion"] == task.format_answer(int(row["answer"]))
            assert task.check(row["completion"], row["answer"])
    assert [r["prompt"] for r in rows["validation"]] == [f"What is {q}?\n" for q in task.splits()["validation"]]


def test_preference_rows():
    task = small(train_size=200)
    rows = task.rows("preference")
    for row in rows["train"] + rows["validation"]:
        assert set(row) == {"prompt", "chosen", "rejected", "answer"}
        value = ArithTask.solve(row["prompt"].rstrip("="))
        assert row["answer"] == str(value)
        assert row["chosen"] == task.format_answer(value)
        assert task.check(row["chosen"], row["answer"])
        assert row["rejected"] != row["chosen"]
        assert not task.check(row["rejected"], row["answer"])
        assert 1 <= abs(task.parse_answer(row["rejected"]) - value) <= 100


def test_prompt_rows_carry_the_ground_truth():
    task = small(train_size=50)
    rows = task.rows("prompt")
    assert [r["prompt"] for r in rows["train"]] == [q + "=" for q in task.splits()["train"]]
    for row in rows["train"] + rows["test"]:
        assert set(row) == {"prompt", "answer"}
        assert int(row["answer"]) == ArithTask.solve(row["prompt"][:-1])


def test_noise_only_touches_training_completions():
    task = small(train_size=400, noise=0.5)
    rows = task.rows("instruction")
    wrong = [r for r in rows["train"] if not task.check(r["completion"], r["answer"])]
    assert 120 < len(wrong) < 280
    assert all(task.check(r["completion"], r["answer"]) for r in rows["validation"] + rows["test"])


def test_carry_noise_is_the_sum_without_carries():
    assert ArithTask.carry_free_sum("57+68") == 15
    assert ArithTask.carry_free_sum("99+1") == 90
    assert ArithTask.carry_free_sum("12+34") == 46
    task = small(train_size=300, noise=0.5, noise_kind="carry")
    for row in task.rows("instruction")["train"]:
        q = row["prompt"][:-1]
        assert task.parse_answer(row["completion"]) in (ArithTask.solve(q), ArithTask.carry_free_sum(q))


@pytest.mark.parametrize("kwargs,message", [
    (dict(digits=0), "need digits >= 1"),
    (dict(terms=1), "terms >= 2"),
    (dict(operators="/"), "must be a non-empty subset"),
    (dict(template="{q}="), "has no {question} field"),
    (dict(noise_kind="carry", operators="+-"), "'carry' needs operators '+'"),
    (dict(noise=1.0), "must be in"),
    (dict(digits=1, val_size=60), "distinct problems cannot hold"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ArithTask(**kwargs)
    with pytest.raises(ValueError, match="unknown row kind"):
        small().rows("chat")


def test_task_through_the_instruction_module():
    task = small(train_size=20, val_size=5)
    dm = InstructionDataModule(task=task, max_length=32)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    assert dm.stats == {"data/train_rows": 20, "data/validation_rows": 5, "data/test_rows": 5}
    rows = task.rows("instruction")
    tok = byte_tokenizer()
    for enc, row in zip(dm.encoded["validation"], rows["validation"]):
        assert tok.decode(enc["prompt_ids"]) == row["prompt"]
        assert labelled_texts(enc, tok) == [row["completion"] + "</s>"]
        assert enc["reference"] == row["completion"] and enc["meta"] == {"answer": row["answer"]}
        assert dm.checker(row["completion"], enc["meta"], enc["reference"])
        assert not dm.checker(task.format_answer(int(row["answer"]) + 1), enc["meta"], enc["reference"])
