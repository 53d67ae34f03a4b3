"""PNG plots of a sweep: each metric's curve per variant, the mean over seeds as a line and the
seeds' range (min to max) as a band; with a budget, the same against the cumulative budget.

Needs matplotlib (``pip install 'lit_align[plots]'``); only the report imports this module.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt

from lit_align.ablate.curves import at_steps


def seed_band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, mean, low, high)`` over seeds, on the steps any seed logged within the span every
    seed covers (a seed's value at a step is its last one logged at or before it)."""
    curves = [c for c in curves if c]
    if not curves:
        return [], [], [], []
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    steps = sorted({s for c in curves for s, _ in c if lo <= s <= hi})
    columns = list(zip(*(at_steps(c, steps) for c in curves)))
    mean = [sum(col) / len(col) for col in columns]
    return steps, mean, [min(col) for col in columns], [max(col) for col in columns]


def _plot(path: str, title: str, xlabel: str, ylabel: str,
          series: list[tuple[str, list[float], list[float], list[float], list[float]]]) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, x, mean, low, high in series:
        # markers for short curves, where a held-out metric logged once would otherwise not show
        (line,) = ax.plot(x, mean, label=name, linewidth=1.6, marker="o" if len(x) <= 20 else None, markersize=3)
        if any(a != b for a, b in zip(low, high)):
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(ablation, summaries, directory: str) -> dict[str, str]:
    """One PNG per metric (``<metric>.png``) and, with a budget, per metric against it
    (``<metric>_vs_budget.png``); returns ``{"<metric>" | "<metric> vs budget": path}``."""
    from lit_align.ablate.report import slug

    os.makedirs(directory, exist_ok=True)
    out = {}
    for metric in ablation.metrics:
        by_step, by_budget = [], []
        for s in summaries:
            runs = [o for o in s.finished if metric in o.curves]
            steps, mean, low, high = seed_band([o.curves[metric] for o in runs])
            if not steps:
                continue
            by_step.append((s.variant.name, steps, mean, low, high))
            if ablation.budget and runs and all(o.budget for o in runs):
                spent = [sum(col) / len(col) for col in zip(*(at_steps(o.budget, steps) for o in runs))]
                keep = [i for i, x in enumerate(spent) if not math.isnan(x)]
                by_budget.append((s.variant.name, *([v[i] for i in keep] for v in (spent, mean, low, high))))
        seeds = "mean over seeds, band: min to max"
        if by_step:
            path = os.path.join(directory, f"{slug(metric)}.png")
            _plot(path, f"{ablation.name}: {metric} ({seeds})", "step", metric, by_step)
            out[metric] = path
        if by_budget:
            path = os.path.join(directory, f"{slug(metric)}_vs_budget.png")
            _plot(path, f"{ablation.name}: {metric} ({seeds})",
                  f"{ablation.budget.label} (cumulative, mean over seeds)",
                  metric, by_budget)
            out[f"{metric} vs budget"] = path
    return out
