"""The built-in ``arith`` task: arithmetic questions with a checkable numeric answer.

One problem generator feeds every training style (DESIGN.md, built-in tasks):
instruction rows (``prompt``/``completion``), preference rows (``chosen`` = correct,
``rejected`` = a plausible wrong answer) and RL prompt rows (``prompt`` + ``answer``).
Held-out splits are drawn first and never appear in training.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

_OPS = set("+-*")
_NUMBER = re.compile(r"-?\d+")


@dataclass
class ArithTask:
    """Arithmetic problems such as ``37+58=``.

    Args:
        digits: digits of every operand (operands range over ``10**(digits-1) .. 10**digits - 1``).
        terms: number of operands.
        operators: the operators drawn from, a subset of ``+-*`` (precedence as in Python).
        reverse_answer: write the answer's digits least significant first (``95`` -> ``59``),
            the order in which carries are computed, which a tiny model learns much faster.
        template: prompt template with a ``{question}`` field, e.g. ``"What is {question}?\\n"``.
        train_size: training problems (``None``: every problem not held out).
        val_size: held-out problems in each of the validation and test splits.
        noise: fraction of training completions replaced by a wrong answer (noisy
            demonstrations, for a base model that plateaus below 100%).
        noise_kind: ``random`` (a plausible wrong answer, see :meth:`wrong_answer`) or
            ``carry`` (the sum computed without carries, a consistent mistake that a
            model learns as a second mode; addition only).
        seed: the seed of the split and of the sampling.
    """

    digits: int = 2
    terms: int = 2
    operators: str = "+"
    reverse_answer: bool = True
    template: str = "{question}="
    train_size: int | None = None
    val_size: int = 500
    noise: float = 0.0
    noise_kind: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.digits < 1 or self.terms < 2:
            raise ValueError(f"arith: need digits >= 1 and terms >= 2, got digits={self.digits}, terms={self.terms}")
        if not self.operators or set(self.operators) - _OPS:
            raise ValueError(f"arith.operators: {self.operators!r} must be a non-empty subset of '+-*'")
        if "{question}" not in self.template:
            raise ValueError(f"arith.template: {self.template!r} has no {{question}} field")
        if self.noise_kind not in ("random", "carry"):
            raise ValueError(f"arith.noise_kind: {self.noise_kind!r} is not one of ('random', 'carry')")
        if self.noise_kind == "carry" and set(self.operators) != {"+"}:
            raise ValueError("arith.noise_kind: 'carry' needs operators '+'")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"arith.noise: {self.noise} must be in [0, 1)")
        if 2 * self.val_size + (self.train_size or 1) > self.space_size:
            raise ValueError(
                f"arith: {self.space_size} distinct problems cannot hold 2 x val_size={self.val_size} held-out"
                f" plus train_size={self.train_size} training problems"
            )

    # -- problems ---------------------------------------------------------------
    @property
    def space_size(self) -> int:
        n = 10 if self.digits == 1 else 9 * 10 ** (self.digits - 1)  # one digit includes 0, as the problems do
        return n**self.terms * len(set(self.operators)) ** (self.terms - 1)

    def _random_problem(self, rng: random.Random) -> str:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        if self.digits == 1:
            lo = 0
        parts = [str(rng.randint(lo, hi))]
        for _ in range(self.terms - 1):
            parts += [rng.choice(self.operators), str(rng.randint(lo, hi))]
        return "".join(parts)

    def _all_problems(self) -> list[str]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits
        if self.digits == 1:
            lo = 0
        numbers = [str(n) for n in range(lo, hi)]
        ops = sorted(set(self.operators))
        out = []
        for operands in itertools.product(numbers, repeat=self.terms):
            for chosen_ops in itertools.product(ops, repeat=self.terms - 1):
                out.append(operands[0] + "".join(o + x for o, x in zip(chosen_ops, operands[1:])))
        return out

    def splits(self) -> dict[str, list[str]]:
        """Disjoint problem lists for ``train``, ``validation`` and ``test`` (deterministic in ``seed``)."""
        rng = random.Random(self.seed)
        if self.space_size <= 200_000:
            problems = self._all_problems()
            rng.shuffle(problems)
            val = problems[: self.val_size]
            test = problems[self.val_size : 2 * self.val_size]
            rest = problems[2 * self.val_size :]
            train = rest if self.train_size is None else rest[: self.train_size]
            return {"train": train, "validation": val, "test": test}
        seen: set[str] = set()

        def draw(n: int) -> list[str]:
            out = []
            while len(out) < n:
                p = self._random_problem(rng)
                if p not in seen:
                    seen.add(p)
                    out.append(p)
            return out

        val, test = draw(self.val_size), draw(self.val_size)
        return {"train": draw(self.train_size or 100_000), "validation": val, "test": test}

    # -- answers ----------------------------------------------------------------
    @staticmethod
    def solve(question: str) -> int:
        # Only digits and + - * reach eval: the problem strings are generated here.
        return int(eval(question, {"__builtins__": {}}, {}))  # noqa: S307

    def format_answer(self, value: int) -> str:
        sign, digits = ("-", str(-value)) if value < 0 else ("", str(value))
        return sign + (digits[::-1] if self.reverse_answer else digits)

    def parse_answer(self, completion: str) -> int | None:
        """The integer a completion states (first number in it), or ``None``."""
        match = _NUMBER.search(completion)
        if match is None:
            return None
        text = match.group(0)
        sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
        return int(sign + (digits[::-1] if self.reverse_answer else digits))

    def check(self, completion: str, answer: str | int) -> bool:
        """True when ``completion`` states the correct ``answer`` (an int or its decimal string)."""
        return self.parse_answer(completion.strip()) == int(answer)

    @staticmethod
    def carry_free_sum(question: str) -> int:
        """Digit-wise sum modulo 10 of the operands of an addition: the answer with every carry dropped."""
        operands = [int(x) for x in question.split("+")]
        width = max(len(str(x)) for x in operands)
        return int("".join(str(sum(x // 10**k % 10 for x in operands) % 10) for k in reversed(range(width))))

    def noisy_answer(self, question: str, value: int, rng: random.Random) -> int:
        if self.noise_kind == "carry":
            return self.carry_free_sum(question)
        return self.wrong_answer(value, rng)

    def wrong_answer(self, value: int, rng: random.Random) -> int:
        """A plausible wrong answer: off by 1..20, or an off-by-ten carry slip."""
        while True:
            wrong = value + rng.choice([-1, 1]) * (rng.choice([10, 100]) if rng.random() < 0.3 else rng.randint(1, 20))
            if wrong != value:
                return wrong

    # -- rows -------------------------------------------------------------------
    def rows(self, kind: str = "instruction") -> dict[str, list[dict]]:
        """Rows per split. ``kind``: ``instruction`` (prompt, completion, answer),
        ``preference`` (prompt, chosen, rejected, answer) or ``prompt`` (prompt, answer)."""
        if kind not in ("instruction", "preference", "prompt"):
            raise ValueError(f"arith: unknown row kind {kind!r} (instruction, preference, prompt)")
        rng = random.Random(self.seed + 1)
        out: dict[str, list[dict]] = {}
        for split, problems in self.splits().items():
            rows = []
            for q in problems:
                value = self.solve(q)
                row = {"prompt": self.template.format(question=q), "answer": str(value)}
                if kind == "instruction":
                    noisy = split == "train" and rng.random() < self.noise
                    row["completion"] = self.format_answer(self.noisy_answer(q, value, rng) if noisy else value)
                elif kind == "preference":
                    row["chosen"] = self.format_answer(value)
                    row["rejected"] = self.format_answer(self.wrong_answer(value, rng))
                rows.append(row)
            out[split] = rows
        return out
