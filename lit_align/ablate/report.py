"""The sweep's report in ``<logs_dir>/<sweep>/``: ``summary.md``, ``summary.csv`` (per variant),
``runs.csv`` (per run) and ``plots/*.png`` (when matplotlib is installed: ``pip install
'lit_align[plots]'``).

Per variant and metric: mean ± sample std over the finished seeds of the value at the end of
each run, of its best value (max or min, as the ablation file says) and of the step of that
best. Failed, interrupted or stale runs are listed with their state and never averaged in.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

from lit_align.ablate.curves import Curve, CurveStats, budget_curve, read_curves
from lit_align.ablate.runs import FAILED, FINISHED, Run, condense
from lit_align.ablate.spec import Ablation, Variant

STATS = (("end", "end"), ("best", "best"), ("best_step", "step of best"))


@dataclass
class Outcome:
    """What one planned run left: its state, and for a finished run its curves and their stats
    (``stats[m]`` is ``None`` for a metric the run never logged)."""

    variant: str
    seed: int
    status: str
    error: str = ""
    seconds: float = math.nan
    log_dir: str | None = None
    curves: dict[str, Curve] = field(default_factory=dict)
    stats: dict[str, CurveStats | None] = field(default_factory=dict)
    budget: Curve | None = None

    @property
    def budget_total(self) -> float:
        return self.budget[-1][1] if self.budget else math.nan


def collect(ablation: Ablation, runs: list[Run]) -> list[Outcome]:
    """Each run's outcome from its record (and, if finished, its event files)."""
    out = []
    for run in runs:
        record = run.read_record()
        if record is None:
            out.append(Outcome(run.variant, run.seed, "not run"))
            continue
        if not run.is_current(record):
            out.append(Outcome(run.variant, run.seed, "stale", "settings changed since this run"))
            continue
        log_dir = record.get("log_dir")
        if log_dir and not os.path.isdir(log_dir):  # the logs folder moved: the version folder is under the run's
            log_dir = os.path.join(run.dir, os.path.basename(log_dir))
        o = Outcome(run.variant, run.seed, record.get("status", "?"), record.get("error") or "",
                    record.get("seconds", math.nan), log_dir)
        if o.status == FINISHED:
            wanted = [*ablation.metrics, *(ablation.budget.metrics if ablation.budget else ())]
            logged = read_curves(o.log_dir) if o.log_dir and os.path.isdir(o.log_dir) else {}
            o.curves = {m: logged[m] for m in wanted if m in logged}
            o.stats = {m: CurveStats.of(logged[m], mode) if m in logged else None
                       for m, mode in ablation.metrics.items()}
            o.budget = budget_curve(logged, ablation.budget) if ablation.budget else None
        out.append(o)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than 2 values); a NaN value (a
    diverged run) makes both NaN rather than being dropped."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Summary:
    """One variant: its finished runs (averaged) and the others (listed)."""

    variant: Variant
    outcomes: list[Outcome]

    @property
    def finished(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FINISHED]

    def values(self, metric: str, stat: str) -> list[float]:
        return [getattr(o.stats[metric], stat) for o in self.finished if o.stats.get(metric) is not None]

    def budgets(self) -> list[float]:
        return [o.budget_total for o in self.finished if o.budget]

    def seconds(self) -> list[float]:
        return [o.seconds for o in self.finished]


def summarize(ablation: Ablation, outcomes: list[Outcome]) -> list[Summary]:
    return [Summary(v, [o for o in outcomes if o.variant == v.name]) for v in ablation.variants]


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:.4g}"


def _cell(values: list[float], finished: int, step: bool = False) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if step:
        text = f"{mean:.0f}" if math.isnan(std) else f"{mean:.0f} ± {std:.0f}"
    else:  # the spread needs two significant digits, the mean four
        text = _num(mean) if math.isnan(std) else f"{_num(mean)} ± {std:.2g}"
    return text + (f" (n={len(values)})" if len(values) < finished else "")


def _runs_cell(s: Summary) -> str:
    n, total = len(s.finished), len(s.outcomes)
    if n == total:
        return str(n)
    states = {}
    for o in s.outcomes:
        if o.status != FINISHED:
            states[o.status] = states.get(o.status, 0) + 1
    return f"{n} of {total} (" + ", ".join(f"{k} {v}" for k, v in states.items()) + ")"


def _variant_text(v: Variant) -> str:
    parts = [f"`{d}`" for d in v.deltas] + [f"`{k}: {_show(val)}`" for k, val in v.overrides.items()]
    text = " + ".join(parts) if parts else "the base recipe"
    return text + (f"; {v.description}" if v.description else "")


def _show(value) -> str:
    """A setting as it goes to the training CLI (strings as typed, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def slug(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in metric)


def markdown(ablation: Ablation, summaries: list[Summary], command: str, plots: dict[str, str],
             plot_note: str = "") -> str:
    """``summary.md``: the settings, one table per metric (with the paper's column beside its
    metric), the plots, and every run that did not finish with its state and error."""
    lines = [f"# Ablation: {ablation.name}", ""]
    if ablation.description:
        lines += [ablation.description, ""]
    steps = ", ".join(f"`{k}={_show(v)}`" for k, v in ablation.steps.items()) or "the recipe's own"
    common = ", ".join(f"`{k}={_show(v)}`" for k, v in ablation.overrides.items())
    lines += [f"- command: `{command}`", f"- base recipe: `{ablation.base}`",
              f"- seeds: {', '.join(map(str, ablation.seeds))}", f"- step budget: {steps}"]
    if common:
        lines.append(f"- every run: {common}")
    lines += ["", ("Mean ± sample std over the finished seeds; *best* is each run's best logged value and *step of "
                   "best* the step where it first reached it. Steps are the logger's: training batches, so rollouts "
                   "for the online-RL modules (whose `trainer.max_steps` counts optimizer steps). Runs that did not "
                   "finish are listed below and not averaged in."), "", "## Variants", ""]
    header = ["variant", "what it changes", "runs"]
    if ablation.budget:
        header.append(f"{ablation.budget.label} (total per run)")
    header.append("seconds per run")
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for s in summaries:
        row = [s.variant.name, _variant_text(s.variant), _runs_cell(s)]
        if ablation.budget:
            row.append(_cell(s.budgets(), len(s.finished)))
        row.append(_cell(s.seconds(), len(s.finished)))
        lines.append("| " + " | ".join(row) + " |")
    if ablation.budget:
        b = ablation.budget
        what = " x ".join(f"`{m}`" for m in b.metrics) + (f" x {_num(b.scale)}" if b.scale != 1 else "")
        lines += ["", f"{b.label}: " + (f"the sum over logged steps of {what}." if b.reduce == "sum"
                                         else f"the last logged value of {what}.")]
    for metric, mode in ablation.metrics.items():
        paper = ablation.paper if ablation.paper and ablation.paper.beside == metric else None
        header = ["variant", "runs"] + ([f"paper: {paper.metric}"] if paper else []) + [label for _, label in STATS]
        lines += ["", f"## {metric} ({'higher' if mode == 'max' else 'lower'} is better)", ""]
        if paper:
            lines += [f"The paper's column is {paper.metric} from {paper.source}.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for s in summaries:
            row = [s.variant.name, _runs_cell(s)]
            if paper:
                row.append("—" if s.variant.paper is None else _num(s.variant.paper))
            n = len(s.finished)
            row += [_cell(s.values(metric, stat), n, step=stat == "best_step") for stat, _ in STATS]
            lines.append("| " + " | ".join(row) + " |")
        missing = [s.variant.name for s in summaries if s.finished and not s.values(metric, "end")]
        if missing:
            lines += ["", f"Not logged by: {', '.join(missing)}."]
        for key in (metric, f"{metric} vs budget"):
            if key in plots:
                lines += ["", f"![{key}]({plots[key]})"]
    if plot_note:
        lines += ["", plot_note]
    others = [o for s in summaries for o in s.outcomes if o.status != FINISHED]
    if others:
        lines += ["", "## Runs that did not finish", ""]
        for o in others:
            error = condense(o.error)
            lines.append(f"- {o.variant} seed {o.seed}: {o.status}" + (f": {error}" if error else ""))
    return "\n".join(lines) + "\n"


def write_csvs(ablation: Ablation, summaries: list[Summary], directory: str) -> None:
    """``summary.csv`` (one row per variant: ``<metric>:<stat>_mean/_std/_n``) and ``runs.csv``
    (one row per run, with its state and error)."""
    metric_cols = [f"{m}:{stat}" for m in ablation.metrics for stat, _ in STATS]
    with open(os.path.join(directory, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "finished", "runs", "paper", "budget_mean", "budget_std", "seconds_mean",
                    *(f"{c}_{x}" for c in metric_cols for x in ("mean", "std", "n"))])
        for s in summaries:
            row = [s.variant.name, len(s.finished), len(s.outcomes), "" if s.variant.paper is None else s.variant.paper,
                   *mean_std(s.budgets()), mean_std(s.seconds())[0]]
            for m in ablation.metrics:
                for stat, _ in STATS:
                    values = s.values(m, stat)
                    row += [*mean_std(values), len(values)]
            w.writerow(row)
    with open(os.path.join(directory, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "status", "seconds", "budget", *metric_cols, "log_dir", "error"])
        for s in summaries:
            for o in s.outcomes:
                cells = []
                for m in ablation.metrics:
                    st = o.stats.get(m)
                    cells += [math.nan if st is None else getattr(st, stat) for stat, _ in STATS]
                w.writerow([o.variant, o.seed, o.status, o.seconds, o.budget_total, *cells, o.log_dir or "", o.error])


def write_report(ablation: Ablation, runs: list[Run], directory: str, command: str, echo=print) -> list[Summary]:
    """Collect every run, write the tables and plots into ``directory``; returns the summaries."""
    os.makedirs(directory, exist_ok=True)
    summaries = summarize(ablation, collect(ablation, runs))
    plots, note = {}, ""
    try:
        from lit_align.ablate.plots import plot_curves
    except ImportError as e:
        note = (f"No plots: matplotlib is not installed ({e}); `pip install 'lit_align[plots]'` "
                f"(or `pip install matplotlib`) and re-run with --report-only.")
        echo(f"ablate: {note}")
    else:
        plots = plot_curves(ablation, summaries, os.path.join(directory, "plots"))
        plots = {k: os.path.relpath(p, directory) for k, p in plots.items()}
    write_csvs(ablation, summaries, directory)
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(markdown(ablation, summaries, command, plots, note))
    return summaries


def failed(summaries: list[Summary]) -> list[Outcome]:
    return [o for s in summaries for o in s.outcomes if o.status == FAILED]
