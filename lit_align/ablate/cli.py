"""``python -m lit_align.ablate``: run a sweep (resuming where it stopped) and write its report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from lit_align.ablate.report import Summary, failed, write_report
from lit_align.ablate.runs import plan, run_all, todo
from lit_align.ablate.spec import Ablation, from_flags, load_ablation

USAGE = """\
python -m lit_align.ablate --config configs/ablations/<name>.yaml [--parallel N] [--rerun-failed] [--report-only]
python -m lit_align.ablate --base RECIPE [--delta DELTA ...] [--seeds S ...] [--metric NAME[:max|:min] ...]
                           [--set KEY=VALUE ...] [--name SWEEP] [--no-baseline]"""

EPILOG = """\
An ablation file names the base recipe, the variants (deltas and/or overrides), seeds, metrics,
the step budget and optionally the paper's numbers; see lit_align/ablate/spec.py for its schema.
Finished runs are skipped on a re-run; failed runs are kept as failed unless --rerun-failed.
The report goes to <logs_dir>/<sweep>/summary.md, summary.csv, runs.csv and plots/."""

FLAG_FORM = ("base", "delta", "seeds", "metric", "set", "name")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_align.ablate", usage=USAGE, epilog=EPILOG,
                                description="Sweep runner: a recipe x variants x seeds -> a report with plots.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="an ablation file (configs/ablations/<name>.yaml)")
    p.add_argument("--logs_dir", default="logs", help="root of the runs' logs and of the report")
    p.add_argument("--checkpoints_dir", default="checkpoints")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at once, each in its own process (torch threads = cores / N; one GPU each)")
    p.add_argument("--rerun-failed", dest="rerun_failed", action="store_true", help="retry runs that failed before")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="write the report from the runs' records without training")
    flags = p.add_argument_group("flag form (instead of --config)")
    flags.add_argument("--base", help="the recipe every variant starts from")
    flags.add_argument("--delta", action="append",
                       help="an ablation delta; a variant named after its file (repeatable)")
    flags.add_argument("--seeds", type=int, nargs="+", help="seeds for every variant (default 0)")
    flags.add_argument("--metric", action="append",
                       help="a logged metric, best = max unless NAME:min (repeatable; default val/exact_match)")
    flags.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="an override for every run, e.g. trainer.max_steps=100 (repeatable)")
    flags.add_argument("--name", help="the sweep's name (default: the base recipe's file name)")
    flags.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the base recipe alone")
    return p


def ablation_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> Ablation:
    given = [f"--{k}" for k in FLAG_FORM if getattr(args, k) is not None] + ([] if args.baseline else ["--no-baseline"])
    if args.config is not None:
        if given:
            p.error(f"{', '.join(given)}: with --config, put these in the ablation file {args.config}")
        return load_ablation(args.config)
    if args.base is None:
        p.error("give --config <ablation file> or --base <recipe>")
    return from_flags(args.base, args.delta or [], args.seeds or [0], args.metric or ["val/exact_match"],
                      args.set or [], args.name, args.baseline)


def main(argv: list[str] | None = None, echo=print) -> list[Summary]:
    """Run the sweep's unfinished runs and write its report; returns one summary per variant."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    ablation = ablation_of(args, p)
    runs = plan(ablation, args.logs_dir, args.checkpoints_dir)
    if not args.report_only:
        pending, notes = todo(runs, args.rerun_failed)
        for note in notes:
            echo(f"ablate: {note}")
        tracked = list(dict.fromkeys([*ablation.metrics, *(ablation.budget.metrics if ablation.budget else ())]))
        run_all(pending, tracked, args.parallel, echo)
    directory = os.path.join(args.logs_dir, ablation.name)
    summaries = write_report(ablation, runs, directory, "python -m lit_align.ablate " + shlex.join(argv), echo)
    with open(os.path.join(directory, "summary.md")) as f:
        echo(f.read())
    return summaries


def entry() -> int:
    summaries = main()
    return 1 if failed(summaries) else 0
