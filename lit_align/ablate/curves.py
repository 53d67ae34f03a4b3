"""A run's logged curves, read back from its TensorBoard event files, and what the report takes
from each: the value at the end, the best value and its step, and the logged budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lit_align.ablate.spec import Budget

Curve = list[tuple[int, float]]  # (step, value), sorted by step, one value per step


def read_curves(log_dir: str) -> dict[str, Curve]:
    """Every scalar tag of the event files in ``log_dir`` (one TensorBoard run folder). A tag
    logged twice at one step keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every point, no sampling
    events.Reload()
    out = {}
    for tag in events.Tags().get("scalars", []):
        by_step = {}
        for e in events.Scalars(tag):
            by_step[int(e.step)] = float(e.value)
        out[tag] = sorted(by_step.items())
    return out


@dataclass
class CurveStats:
    """One metric of one run: the last logged value, the best one (``mode``) and its first step."""

    end: float
    best: float
    best_step: float

    @classmethod
    def of(cls, curve: Curve | None, mode: str) -> CurveStats:
        if not curve:
            return cls(math.nan, math.nan, math.nan)
        finite = [(s, v) for s, v in curve if math.isfinite(v)]
        if not finite:  # a run whose metric is NaN throughout: its end is NaN and it has no best
            return cls(curve[-1][1], math.nan, math.nan)
        pick = max if mode == "max" else min
        best = pick(v for _, v in finite)
        return cls(curve[-1][1], best, float(next(s for s, v in finite if v == best)))


def budget_curve(curves: dict[str, Curve], budget: Budget) -> Curve | None:
    """The budget spent by every step where all of ``budget.metrics`` were logged: their product
    times ``budget.scale``, summed up to that step (``reduce="sum"``, per-step counts) or as is
    (``"last"``, a cumulative counter); ``None`` if one was never logged."""
    series = [dict(curves.get(m) or []) for m in budget.metrics]
    if not all(series):
        return None
    total, out = 0.0, []
    for step in sorted(set.intersection(*(set(s) for s in series))):
        value = budget.scale
        for s in series:
            value *= s[step]
        total = total + value if budget.reduce == "sum" else value
        out.append((step, total))
    return out


def at_steps(curve: Curve, steps: list[int]) -> list[float]:
    """``curve``'s value at each of ``steps``: the last value logged at or before it (NaN before its first)."""
    out, i, last = [], 0, math.nan
    for step in steps:
        while i < len(curve) and curve[i][0] <= step:
            last = curve[i][1]
            i += 1
        out.append(last)
    return out
