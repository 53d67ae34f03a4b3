"""The built-in ``chain`` task: a chain of additions and subtractions on small numbers, solved
with a written scratchpad whose length grows with the chain.

A problem is a start value and ``k`` operations (``k`` from ``min_steps`` to ``max_steps``),
every intermediate result kept in ``0 .. max_value``. The prompt states the chain; the
response works it one step per line and ends with the final answer::

    prompt      47+8-5+9\\n
    completion  47+8=55
                55-5=50
                50+9=59
                answer: 59

Each step adds about 8 tokens (one per byte), so a correct completion runs from 26 tokens
(``k = 2`` on 2-digit values, EOS not counted) to 58 (``k = 6``): the built-in task where length, truncation and
group variance matter, for the RL techniques that act on them (DAPO's overlong shaping and
dynamic sampling, Dr. GRPO's length-unbiased aggregation, GSPO's sequence-level ratio).

The checker reads only the final answer (the first ``answer: N``), so a garbled or missing
scratchpad does not matter and a completion cut before its answer line is wrong.

Training demonstrations can be noisy or partial (``noise``, ``noise_kind``): each addition that
carries drops its carry with probability ``noise`` (``carry``: ``55+8=53``, the mistake of
:class:`ArithTask`'s carry noise, which a model learns as a second mode and which then propagates
to the answer), or subtractions that borrow drop the borrow too (``carry_borrow``: ``50-5=55``),
or a step's result is off by 1..3 (``random``), or a step is done in the head, merged into the
previous line (``skip``: ``55-5+9=59``, correct but shorter). A model trained on ``carry`` demos
gets a chain right when it has no carry, and at about even odds per carry otherwise: the more
steps, the more carries, the more often the answer is wrong.

Splits are drawn first for validation, then test, then train, never repeating a problem
(checked), with the chain lengths in turn so every split holds each length equally often.
"""

from __future__ import annotations

import functools
import random
import re

_TERM = re.compile(r"([+-])(\d+)")
_QUESTION = re.compile(r"\d+(?:[+-]\d+)+")
_ANSWER = re.compile(r"answer\s*:\s*(-?\d+)", re.IGNORECASE)
ANSWER_PREFIX = "answer: "
NOISE_KINDS = ("carry", "carry_borrow", "random", "skip")
ROW_KINDS = ("instruction", "prompt")


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """``"47+8-5"`` -> ``(47, [("+", 8), ("-", 5)])``."""
    if not _QUESTION.fullmatch(question):
        raise ValueError(f"chain: {question!r} is not a chain such as '47+8-5'")
    head = re.match(r"\d+", question).group(0)
    return int(head), [(op, int(d)) for op, d in _TERM.findall(question[len(head):])]


def apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand


def needs_carry(value: int, op: str, operand: int) -> bool:
    """Whether ``value op operand`` (operand < 10) carries into, or borrows from, the tens."""
    return value % 10 + operand >= 10 if op == "+" else value % 10 < operand


def without_carry(value: int, op: str, operand: int) -> int:
    """``value op operand`` with the carry or borrow dropped: the tens stay as they were
    (``55+8`` -> ``53``, ``50-5`` -> ``55``)."""
    return value - value % 10 + apply(value % 10, op, operand) % 10


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Raise ``AssertionError`` naming the splits and a problem when two splits share a problem
    (problems compared by their text, which identifies them)."""
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(splits[a]) & set(splits[b])
            if shared:
                raise AssertionError(f"chain: splits {a} and {b} share {len(shared)} problems, e.g. "
                                     f"{sorted(shared)[0]!r}")


def _moves(value: int, max_value: int, max_operand: int, operators: str) -> list[tuple[str, int]]:
    return [(op, d) for op in sorted(set(operators)) for d in range(1, max_operand + 1)
            if 0 <= apply(value, op, d) <= max_value]


@functools.cache
def _space(k: int, max_value: int, max_operand: int, operators: str) -> int:
    ways = [1] * (max_value + 1)  # chains of 0 steps from each value
    for _ in range(k):
        ways = [sum(ways[apply(v, op, d)] for op, d in _moves(v, max_value, max_operand, operators))
                for v in range(max_value + 1)]
    return sum(ways)


class ChainTask:
    """Chains of additions and subtractions with a one-step-per-line scratchpad.

    A plain class written with ``class_path`` in YAML, as :class:`ShapesTextTask` (see there):
    the data modules list it before :class:`ArithTask` in their ``task`` annotation.

    Args:
        min_steps: fewest operations in a chain (>= 1).
        max_steps: most operations in a chain; chain lengths are spread evenly over
            ``min_steps .. max_steps`` in every split.
        max_value: largest start value and intermediate result (results stay in ``0 .. max_value``).
        max_operand: largest operand (operands range over ``1 .. max_operand``, at most 9).
        operators: the operators drawn from, a non-empty subset of ``+-``.
        template: prompt template with a ``{question}`` field.
        train_size: training problems.
        val_size: held-out problems in each of the validation and test splits.
        noise: in training demonstrations, the probability per step of a noisy step (per step
            that carries for ``carry``, per step that carries or borrows for ``carry_borrow``); 0 for
            clean demonstrations.
        noise_kind: ``carry`` (an addition's carry dropped), ``carry_borrow`` (a subtraction's
            borrow too), ``random`` (the result off by 1..3) or ``skip`` (the step merged into the
            previous line, still correct).
        seed: the seed of the splits and of the noise.

    Attributes:
        group_key: the row column (``steps``) by which held-out exact match is also reported,
            ``val/exact_match/<k>`` per chain length.
    """

    group_key = "steps"

    def __init__(self, min_steps: int = 2, max_steps: int = 6, max_value: int = 99, max_operand: int = 9,
                 operators: str = "+-", template: str = "{question}\n", train_size: int = 20000,
                 val_size: int = 500, noise: float = 0.0, noise_kind: str = "carry", seed: int = 0):
        self.min_steps, self.max_steps, self.max_value, self.max_operand = min_steps, max_steps, max_value, max_operand
        self.operators, self.template, self.train_size, self.val_size = operators, template, train_size, val_size
        self.noise, self.noise_kind, self.seed = noise, noise_kind, seed
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"chain: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        if not 1 <= max_operand <= 9 or max_value < max_operand:
            raise ValueError(f"chain: need 1 <= max_operand <= 9 and max_value >= max_operand, got "
                             f"max_operand={max_operand}, max_value={max_value}")
        if not operators or set(operators) - set("+-"):
            raise ValueError(f"chain.operators: {operators!r} must be a non-empty subset of '+-'")
        if "{question}" not in template:
            raise ValueError(f"chain.template: {template!r} has no {{question}} field")
        if noise_kind not in NOISE_KINDS:
            raise ValueError(f"chain.noise_kind: {noise_kind!r} is not one of {NOISE_KINDS}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"chain.noise: {noise} must be in [0, 1)")
        if train_size < 0 or val_size < 0:
            raise ValueError(f"chain: train_size={train_size} and val_size={val_size} must be >= 0")
        for k in self.lengths:
            need = self._per_length(train_size, k) + 2 * self._per_length(val_size, k)
            # drawn without repeats by rejection: at most half of the space keeps that quick
            if 2 * need > self.space_size(k):
                raise ValueError(f"chain: {self.space_size(k)} distinct {k}-step problems cannot hold the {need} "
                                 f"that train_size={train_size} and 2 x val_size={val_size} ask for (at most half "
                                 "of them); lower the sizes or raise min_steps / max_value")

    def as_dict(self) -> dict:
        return {"min_steps": self.min_steps, "max_steps": self.max_steps, "max_value": self.max_value,
                "max_operand": self.max_operand, "operators": self.operators, "template": self.template,
                "train_size": self.train_size, "val_size": self.val_size, "noise": self.noise,
                "noise_kind": self.noise_kind, "seed": self.seed}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChainTask) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        return "ChainTask(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    # -- problems -------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """The chain lengths, ``min_steps .. max_steps``."""
        return list(range(self.min_steps, self.max_steps + 1))

    def _per_length(self, n: int, k: int) -> int:
        # problems of length k among n dealt out in turn over the lengths
        i, count = self.lengths.index(k), len(self.lengths)
        return n // count + (1 if i < n % count else 0)

    def moves(self, value: int) -> list[tuple[str, int]]:
        """The operations allowed from ``value``: results stay in ``0 .. max_value``."""
        return _moves(value, self.max_value, self.max_operand, self.operators)

    def space_size(self, k: int) -> int:
        """Distinct problems of ``k`` steps."""
        return _space(k, self.max_value, self.max_operand, "".join(sorted(set(self.operators))))

    def _random_problem(self, rng: random.Random, k: int) -> str | None:
        value = rng.randint(0, self.max_value)
        text = str(value)
        for _ in range(k):
            moves = self.moves(value)
            if not moves:
                return None  # a dead end (only "+" and value at max_value): draw again
            op, d = rng.choice(moves)
            value = apply(value, op, d)
            text += f"{op}{d}"
        return text

    def splits(self) -> dict[str, list[str]]:
        """Disjoint problem lists for ``train``, ``validation`` and ``test``, deterministic in ``seed``.

        Raises:
            AssertionError: a problem occurs in two splits (by its text, which identifies it).
        """
        rng = random.Random(self.seed)
        seen: set[str] = set()

        def draw(n: int) -> list[str]:
            out = []
            while len(out) < n:
                problem = self._random_problem(rng, self.lengths[len(out) % len(self.lengths)])
                if problem is not None and problem not in seen:
                    seen.add(problem)
                    out.append(problem)
            return out

        out = {"validation": draw(self.val_size), "test": draw(self.val_size)}
        out["train"] = draw(self.train_size)
        check_disjoint(out)
        return {"train": out["train"], "validation": out["validation"], "test": out["test"]}

    # -- answers ----------------------------------------------------------------------
    @staticmethod
    def num_steps(question: str) -> int:
        return len(parse_question(question)[1])

    @staticmethod
    def solve(question: str) -> int:
        """The chain's value, worked left to right."""
        value, ops = parse_question(question)
        for op, d in ops:
            value = apply(value, op, d)
        return value

    def response(self, question: str, rng: random.Random | None = None, noise: float = 0.0) -> str:
        """The worked completion: one line ``a+d=b`` per step, then ``answer: N``. With ``noise``
        (and ``rng``), a demonstration with noisy steps of ``noise_kind`` (see the module docstring)."""
        value, ops = parse_question(question)
        lines: list[str] = []
        for i, (op, d) in enumerate(ops):
            noisy = noise > 0 and rng is not None
            if noisy and self.noise_kind == "skip" and i > 0 and rng.random() < noise:
                head, _, _ = lines.pop().rpartition("=")
                value = apply(value, op, d)
                lines.append(f"{head}{op}{d}={value}")
                continue
            result = apply(value, op, d)
            # (after a noisy step the value may leave 0 .. max_value: the demonstration carries on from it)
            if noisy and self.noise_kind in ("carry", "carry_borrow") and value >= 0 \
                    and (op == "+" or self.noise_kind == "carry_borrow") and needs_carry(value, op, d) \
                    and rng.random() < noise:
                result = without_carry(value, op, d)
            elif noisy and self.noise_kind == "random" and rng.random() < noise:
                result = max(0, result + rng.choice([-1, 1]) * rng.randint(1, 3))
                if result == apply(value, op, d):
                    result += 1
            lines.append(f"{value}{op}{d}={result}")
            value = result
        return "\n".join([*lines, f"{ANSWER_PREFIX}{value}"])

    @staticmethod
    def parse_answer(completion: str) -> int | None:
        """The final answer a completion states (the number after its first ``answer:``,
        any case), or ``None`` when it states none. The scratchpad is not read."""
        match = _ANSWER.search(completion)
        return int(match.group(1)) if match else None

    def check(self, completion: str, answer: str | int) -> bool:
        """True when ``completion`` states the correct final ``answer`` (an int or its decimal string)."""
        return self.parse_answer(completion) == int(answer)

    # -- rows -------------------------------------------------------------------------
    def rows(self, kind: str = "instruction") -> dict[str, list[dict]]:
        """Rows per split, each with ``prompt``, ``answer`` (the decimal string) and ``steps`` (the
        chain length). ``kind``: ``instruction`` adds ``completion`` (noisy in train only, with
        ``noise``), ``prompt`` is for online RL."""
        if kind not in ROW_KINDS:
            raise ValueError(f"chain: unknown row kind {kind!r} ({', '.join(ROW_KINDS)})")
        rng = random.Random(self.seed + 1)
        out: dict[str, list[dict]] = {}
        for split, problems in self.splits().items():
            rows = []
            for q in problems:
                row = {"prompt": self.template.format(question=q), "answer": str(self.solve(q)),
                       "steps": self.num_steps(q)}
                if kind == "instruction":
                    row["completion"] = self.response(q, rng, self.noise if split == "train" else 0.0)
                rows.append(row)
            out[split] = rows
        return out
