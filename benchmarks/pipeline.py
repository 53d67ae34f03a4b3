"""Runs the shipped CPU recipes in pipeline order and writes one table of what they reach.

    python benchmarks/pipeline.py                       # every stage, in order
    python benchmarks/pipeline.py --only sft/arith.yaml --only dpo/arith.yaml

Each stage is the command a user types, ``python -m lit_align.train fit --config <recipe>``,
timed from launch to exit (imports, data, training, validation and export included). A stage
that starts from an earlier stage's export is first run with ``validate`` on the same recipe,
which scores the starting model on the same held-out split: the "before" figure. The metric
history is read back from the run's TensorBoard events, so the table shows the curve (first,
best, last) that the logs hold, not numbers typed by hand. The table goes to stdout and to
``<logs_dir>/benchmarks/pipeline.md``.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Stage:
    recipe: str                   # under configs/
    metrics: tuple[str, ...]      # logged scalars to report, the first is the headline
    before: bool = False          # validate the starting model first
    start: str = "random init"    # what the stage starts from, when it is not validated first


STAGES = (
    Stage("sft/arith.yaml", ("val/exact_match", "val/loss")),
    Stage("sft/arith_base.yaml", ("val/exact_match",)),
    Stage("dpo/arith.yaml", ("val/exact_match", "val/rewards/accuracies", "val/rewards/margins"), before=True),
    Stage("rm/arith.yaml", ("val/accuracy", "val/margin"), before=True),
    Stage("grpo/arith.yaml", ("val/exact_match", "train/reward/mean"), before=True),
    Stage("gspo/arith.yaml", ("val/exact_match", "train/reward/mean"), before=True),
    Stage("dapo/arith.yaml", ("val/exact_match", "train/reward/mean", "train/dynamic_sampling/rounds"), before=True),
    Stage("ppo/arith_rule.yaml", ("val/exact_match", "train/score"), before=True),
    Stage("ppo/arith_rm.yaml", ("val/exact_match", "train/score"), before=True),
    Stage("llava/lm_shapes.yaml", ("val/exact_match", "val/loss")),
    Stage("llava/stage1_shapes.yaml", ("val/exact_match", "val/loss"), start="LM stage export, random projector"),
    Stage("llava/stage2_shapes.yaml", ("val/exact_match", "val/exact_match/count", "val/loss"),
          start="stage 1 export"),
    Stage("llava/dpo_shapes.yaml", ("val/exact_match", "val/exact_match/unanswerable", "val/rewards/accuracies"),
          before=True),
)


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def newest_version(logs_dir: str, name: str) -> str:
    versions = glob.glob(os.path.join(logs_dir, name, "version_*"))
    if not versions:
        raise RuntimeError(f"benchmark: no TensorBoard run under {os.path.join(logs_dir, name)}")
    return max(versions, key=lambda p: int(p.rsplit("_", 1)[1]))


def run_name(recipe: str) -> str:
    import yaml

    with open(os.path.join(REPO, "configs", recipe)) as f:
        return yaml.safe_load(f)["name"]


def launch(subcommand: str, recipe: str, logs_dir: str, extra: list[str]) -> float:
    """Run one CLI command to completion; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "lit_align.train", subcommand, "--config", os.path.join("configs", recipe),
           "--logs_dir", logs_dir, "--trainer.enable_progress_bar", "false", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"benchmark: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def describe(metric: str, series: list[tuple[int, float]]) -> str:
    """``first (step) -> best (step) -> last (step)``; best is the lowest of a loss."""
    if not series:
        return "not logged"
    (s0, v0), (s1, v1) = series[0], series[-1]
    pick = min if "loss" in metric else max
    best_step, best = pick(series, key=lambda sv: sv[1])
    return f"{v0:.3f} (step {s0}) -> best {best:.3f} (step {best_step}) -> {v1:.3f} (step {s1})"


def run_stage(stage: Stage, logs_dir: str, extra: list[str]) -> list[str]:
    name = run_name(stage.recipe)
    cells = []
    if stage.before:
        launch("validate", stage.recipe, logs_dir, extra)
        start = scalars(newest_version(logs_dir, name))
        cells.append(", ".join(f"{m} {start[m][-1][1]:.3f}" for m in stage.metrics if m in start) or "n/a")
    else:
        cells.append(stage.start)
    seconds = launch("fit", stage.recipe, logs_dir, extra)
    logged = scalars(newest_version(logs_dir, name))
    curves = "<br>".join(f"`{m}` {describe(m, logged.get(m, []))}" for m in stage.metrics)
    return [f"`{stage.recipe}`", f"{seconds:.0f} s", cells[0], curves]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=None, help="a recipe under configs/ (repeatable)")
    parser.add_argument("--logs_dir", default="logs")
    parser.add_argument("extra", nargs="*", help="CLI overrides for every stage (after --)")
    args = parser.parse_args(argv)
    known = {s.recipe: s for s in STAGES}
    for recipe in args.only or []:
        if recipe not in known:
            parser.error(f"--only {recipe!r}: not one of {sorted(known)}")
    stages = [known[r] for r in args.only] if args.only else list(STAGES)
    rows = ["| recipe | wall time | before (held-out) "
            "| logged curve: first -> best -> last (steps are optimizer steps) |",
            "| --- | --- | --- | --- |"]
    out_dir = os.path.join(REPO, args.logs_dir, "benchmarks")
    os.makedirs(out_dir, exist_ok=True)
    for stage in stages:
        rows.append("| " + " | ".join(run_stage(stage, args.logs_dir, args.extra)) + " |")
        print(rows[-1], flush=True)
        with open(os.path.join(out_dir, "pipeline.md"), "w") as f:  # rewritten per stage: a killed sweep keeps its rows
            f.write("\n".join(rows) + "\n")
    table = "\n".join(rows) + "\n"
    print(table)
    return table


if __name__ == "__main__":
    main()
