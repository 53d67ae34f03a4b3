"""Sweep runner: a recipe, its ablation deltas and seeds, one summary table.

    python -m lit_align.ablate --base configs/grpo/arith.yaml \\
        --delta configs/ablations/grpo/dr_grpo.yaml --delta configs/ablations/grpo/no_kl.yaml \\
        --seeds 0 1 2 --metric val/exact_match --set trainer.max_steps=100

Every (variant, seed) is one ``fit`` of ``--config base [--config delta]`` through the same
CLI as ``lit_align.train`` (so each run has its logs, resolved config and checkpoints under
its own name ``<sweep>/<variant>/seed<k>``). The base recipe alone is the first variant
(``baseline``) unless ``--no-baseline``. A failing run is recorded with its error and the
sweep goes on. The summary (per run, and mean / std over seeds per variant) is printed and
written to ``<logs_dir>/<sweep>/summary.md`` and ``summary.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from dataclasses import dataclass, field

from lit_align.train import main as train_main


@dataclass
class RunResult:
    variant: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def _name(path: str | None) -> str:
    return "baseline" if path is None else os.path.splitext(os.path.basename(path))[0]


def seed_args(base: str, seed: int) -> list[str]:
    """What a seed changes: the global seed (sampling, dropout), the data order and, for a
    model built from an inline ``config`` (random init), its initialisation."""
    import yaml

    with open(base) as f:
        model = ((yaml.safe_load(f) or {}).get("model") or {}).get("init_args", {}).get("model") or {}
    args = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    return args + (["--model.init_args.model.seed", str(seed)] if model.get("config") else [])


def run_sweep(base: str, deltas: list[str], seeds: list[int], metrics: list[str], overrides: list[str] = (),
              sweep: str | None = None, logs_dir: str = "logs", checkpoints_dir: str = "checkpoints",
              baseline: bool = True) -> list[RunResult]:
    """Fit every variant with every seed; returns one :class:`RunResult` per run, in order.

    Args:
        base: the recipe every variant starts from.
        deltas: ablation deltas composed after it (``--config base --config delta``).
        seeds: one run per seed and variant (see :func:`seed_args`).
        metrics: logged metrics to collect at the end of each fit (missing ones are NaN).
        overrides: extra CLI arguments for every run (``--trainer.max_steps 100`` ...).
        sweep: the sweep's name (default: the base recipe's file name).
    """
    if not deltas and not baseline:
        raise ValueError("ablate: nothing to run (no deltas and --no-baseline)")
    for path in [base, *deltas]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ablate: config {path} not found")
    names = [_name(d) for d in deltas]
    if len(set(names)) != len(names) or "baseline" in names:
        raise ValueError(f"ablate: delta file names must be distinct and not 'baseline': {names}")
    sweep = sweep or _name(base)
    variants = ([None] if baseline else []) + list(deltas)
    results = []
    for delta in variants:
        for seed in seeds:
            result = RunResult(_name(delta), seed)
            args = ["fit", "--config", base, *(["--config", delta] if delta else []), *seed_args(base, seed),
                    "--name", f"{sweep}/{result.variant}/seed{seed}", "--logs_dir", logs_dir,
                    "--checkpoints_dir", checkpoints_dir, *overrides]
            start = time.perf_counter()
            try:
                cli = train_main(args)
                logged = cli.trainer.callback_metrics
                result.metrics = {m: float(logged[m]) if m in logged else math.nan for m in metrics}
            except Exception as e:  # one broken variant must not lose the others' results
                result.error = " ".join(f"{type(e).__name__}: {e}".split())  # one line for the tables
            result.seconds = time.perf_counter() - start
            results.append(result)
    return results


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: list[RunResult], metrics: list[str]) -> str:
    """A markdown table: one row per variant, each metric as mean +- std over its seeds."""
    lines = ["| variant | runs | " + " | ".join(metrics) + " | seconds |",
             "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
    for variant in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == variant]
        ok = [r for r in runs if r.error is None]
        cells = []
        for m in metrics:
            mean, std = _stats([r.metrics[m] for r in ok])
            cells.append("n/a" if math.isnan(mean) else f"{mean:.4f} +- {std:.4f}")
        failed = f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else ""
        lines.append(f"| {variant} | {len(ok)}{failed} | " + " | ".join(cells)
                     + f" | {sum(r.seconds for r in runs) / len(runs):.1f} |")
    errors = [f"- {r.variant} seed {r.seed}: {r.error}" for r in results if r.error]
    return "\n".join(lines + (["", "Failed runs:", *errors] if errors else [])) + "\n"


def write_summary(results: list[RunResult], metrics: list[str], directory: str) -> str:
    """``summary.md`` (per variant) and ``summary.csv`` (per run) in ``directory``; returns the markdown."""
    os.makedirs(directory, exist_ok=True)
    table = summarize(results, metrics)
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(table)
    with open(os.path.join(directory, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *metrics, "seconds", "error"])
        for r in results:
            writer.writerow([r.variant, r.seed, *(r.metrics.get(m, math.nan) for m in metrics), f"{r.seconds:.2f}",
                             r.error or ""])
    return table


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(prog="python -m lit_align.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the recipe every variant starts from")
    parser.add_argument("--delta", action="append", default=[], help="an ablation delta (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for every variant")
    parser.add_argument("--metric", action="append", default=None,
                        help="a logged metric to collect (repeatable; default val/exact_match)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run, e.g. trainer.max_steps=100 (repeatable)")
    parser.add_argument("--name", default=None, help="the sweep's name (default: the base recipe's)")
    parser.add_argument("--logs_dir", default="logs")
    parser.add_argument("--checkpoints_dir", default="checkpoints")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the base recipe alone")
    args = parser.parse_args(argv)
    overrides = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides += [f"--{key}", value]
    metrics = args.metric or ["val/exact_match"]
    sweep = args.name or _name(args.base)
    results = run_sweep(args.base, args.delta, args.seeds, metrics, overrides, sweep, args.logs_dir,
                        args.checkpoints_dir, args.baseline)
    print(write_summary(results, metrics, os.path.join(args.logs_dir, sweep)))
    return results


if __name__ == "__main__":
    main()
