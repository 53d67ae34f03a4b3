"""Ablation files: what a sweep runs, read and checked before anything trains.

An ablation file (``configs/ablations/<name>.yaml``) names a base recipe, named variants (each
a list of delta files composed after the base, and/or CLI overrides), the seeds, the metrics to
report, the step budget every run gets, and optionally the logged budget column and the paper's
own numbers::

    name: dapo_steps                        # the sweep: logs/<name>/ (default: the file's name)
    description: DAPO's progressive table (Yu et al. 2025, Table 1) on the tiny task.
    base: configs/grpo/arith.yaml           # paths are relative to the working directory
    seeds: [0, 1, 2]
    steps:                                  # the step budget; trainer.max_steps is required
      trainer.max_steps: 100
      trainer.val_check_interval: 10
    overrides:                              # for every run (CLI option names without "--")
      export_hf: false
    metrics:                                # each metric and which way is better
      val/exact_match: max
      train/truncation_rate: min
    budget:                                 # optional: a per-variant total from the runs' logs
      metric: train/response_length/mean    # one metric or a list (multiplied per logged step)
      scale: 256                            # rows per rollout (32 prompts x 8): tokens per step
      reduce: sum                           # sum (per-step counts) or last (a cumulative counter)
      label: generated tokens
    paper:                                  # optional: the paper's column beside one metric
      source: Yu et al. 2025, Table 1
      metric: AIME 2024 avg@32
      beside: val/exact_match
    variants:
      - name: naive_grpo
        paper: 30
      - name: overlong_filtering
        overrides: {model.init_args.overlong_filtering: true}
        paper: 36
        description: truncated completions carry no loss
      - name: dr_grpo                       # delta files compose after the base, in order
        deltas: [configs/ablations/grpo/dr_grpo.yaml]

Overrides come after the delta files, the step budget after the common overrides, and a
variant's overrides last (a variant may change a common override, not the step budget).
A ``sum`` budget counts only the steps that were logged: log every step
(``trainer.log_every_n_steps: 1``, as the RL recipes do) or it undercounts. Every mistake is
reported with the file and the field (``variants[1].deltas[0]``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

#: Options the runner sets for every run itself; an override of them would be silently replaced.
RESERVED = ("name", "logs_dir", "checkpoints_dir", "seed_everything", "data.init_args.seed",
            "model.init_args.model.seed", "config")
MODES = ("max", "min")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_TOP = ("name", "description", "base", "seeds", "steps", "overrides", "metrics", "budget", "paper", "variants")
_VARIANT = ("name", "deltas", "overrides", "paper", "description")


class AblationError(ValueError):
    """A bad ablation file or sweep setting; the message names the file and the field."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: the base recipe plus ``deltas`` (``--config`` files, in order)
    plus ``overrides`` (``{"model.init_args.beta": 0.0}``), and the paper's value if any."""

    name: str
    deltas: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None
    description: str = ""


@dataclass(frozen=True)
class Budget:
    """A per-variant cost read from the runs' logs: at every step where all ``metrics`` were
    logged, their product times ``scale``; summed over the run (``reduce="sum"``, e.g. mean
    response length x rows per rollout = generated tokens) or its last value (``"last"``, for a
    logged cumulative counter)."""

    metrics: tuple[str, ...]
    scale: float = 1.0
    label: str = "budget"
    reduce: str = "sum"


@dataclass(frozen=True)
class Paper:
    """The paper's own column: ``metric`` (its name in ``source``) shown beside our ``beside``."""

    source: str
    metric: str
    beside: str


@dataclass
class Ablation:
    """A whole sweep: every variant x every seed, each one ``fit`` of the training CLI."""

    name: str
    base: str
    variants: list[Variant]
    seeds: list[int]
    metrics: dict[str, str]
    steps: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    budget: Budget | None = None
    paper: Paper | None = None
    description: str = ""
    source: str | None = None

    def files(self) -> list[str]:
        """The recipe files the runs read (the base, then every delta once)."""
        return list(dict.fromkeys([self.base, *(d for v in self.variants for d in v.deltas)]))


class _Checker:
    """Raises :class:`AblationError` prefixed with ``<origin>: <field>:``."""

    def __init__(self, origin: str):
        self.origin = origin

    def fail(self, where: str, message: str):
        raise AblationError(f"ablate: {self.origin}: {where}: {message}")

    def mapping(self, value, where: str, keys: tuple[str, ...] | None = None) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__} {value!r}")
        if keys is not None:
            unknown = [k for k in value if k not in keys]
            if unknown:
                self.fail(where, f"unknown key(s) {unknown}; expected some of {list(keys)}")
        return value

    def text(self, value, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, value, where: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            self.fail(where, f"must be finite, got {value}")
        if positive and value <= 0:
            self.fail(where, f"must be > 0, got {value}")
        return float(value)

    def file(self, value, where: str, what: str) -> str:
        path = self.text(value, where)
        if not os.path.isfile(path):
            self.fail(where, f"{what} {path} does not exist (paths are relative to the working directory "
                             f"{os.getcwd()})")
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as e:
            self.fail(where, f"{what} {path} is not valid YAML: {' '.join(str(e).split())}")
        if not isinstance(content, dict):
            self.fail(where, f"{what} {path} is not a YAML mapping of config sections")
        return path

    def finite(self, value, where: str) -> None:
        """No NaN or infinity anywhere in an override value (also as a string the CLI would parse)."""
        if isinstance(value, dict):
            for k, v in value.items():
                self.finite(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.finite(v, f"{where}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            self.fail(where, f"must be finite, got {value}")
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return
            if not math.isfinite(number):
                self.fail(where, f"must be finite, got {value!r}")

    def overrides(self, value, where: str) -> dict[str, Any]:
        value = self.mapping(value, where)
        for key, v in value.items():
            if not isinstance(key, str) or not key or key.startswith("-") or " " in key:
                self.fail(where, f"{key!r} is not an option name (write model.init_args.beta, without '--')")
            if key in RESERVED:
                self.fail(f"{where}.{key}", f"set by the runner for every run (one of {list(RESERVED)})")
            self.finite(v, f"{where}.{key}")
        return dict(value)


def load_ablation(path: str) -> Ablation:
    """Read and check an ablation file (schema in this module's docstring)."""
    check = _Checker(path)
    if not os.path.isfile(path):
        raise AblationError(f"ablate: ablation file {path} does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise AblationError(f"ablate: {path}: not valid YAML: {' '.join(str(e).split())}") from e
    raw = check.mapping(raw, "top level", _TOP)
    for key in ("base", "variants", "seeds", "metrics", "steps"):
        if key not in raw:
            check.fail(key, "missing (an ablation file names base, variants, seeds, metrics and steps)")
    name = check.text(raw.get("name", os.path.splitext(os.path.basename(path))[0]), "name")
    if not _NAME.match(name):
        check.fail("name", f"{name!r}: use letters, digits and _ . + - (it is a folder name)")
    base = check.file(raw["base"], "base", "recipe")
    steps = check.overrides(raw["steps"], "steps")
    if "trainer.max_steps" not in steps:
        check.fail("steps", "trainer.max_steps is required: every variant runs the same number of steps")
    max_steps = steps["trainer.max_steps"]
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        check.fail("steps.trainer.max_steps", f"expected a positive integer, got {max_steps!r}")
    overrides = check.overrides(raw.get("overrides") or {}, "overrides")
    both = sorted(set(steps) & set(overrides))
    if both:
        check.fail("overrides", f"{both} already set in steps; set each option once")
    metrics = _metrics(check, raw["metrics"])
    seeds = _seeds(check, raw["seeds"])
    budget = None if raw.get("budget") is None else _budget(check, raw["budget"])
    paper = None if raw.get("paper") is None else _paper(check, raw["paper"], metrics)
    variants = _variants(check, raw["variants"], steps)
    with_paper = [v.name for v in variants if v.paper is not None]
    if paper is None and with_paper:
        check.fail(f"variants ({', '.join(with_paper)}).paper",
                   "paper values need a top-level paper: {source, metric, beside}")
    if paper is not None and not with_paper:
        check.fail("paper", "no variant has a paper value; give some variants `paper: <number>` or drop it")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        check.fail("description", f"expected a string, got {description!r}")
    return Ablation(name=name, base=base, variants=variants, seeds=seeds, metrics=metrics, steps=steps,
                    overrides=overrides, budget=budget, paper=paper, description=description.strip(), source=path)


def _metrics(check: _Checker, value) -> dict[str, str]:
    value = check.mapping(value, "metrics")
    if not value:
        check.fail("metrics", "empty; name at least one logged metric with max or min")
    for name, mode in value.items():
        check.text(name, "metrics")
        if mode not in MODES:
            check.fail(f"metrics.{name}", f"expected max or min (which way is better), got {mode!r}")
    return dict(value)


def _seeds(check: _Checker, value) -> list[int]:
    if not isinstance(value, list) or not value:
        check.fail("seeds", f"expected a non-empty list of integers, got {value!r}")
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            check.fail(f"seeds[{i}]", f"expected a non-negative integer, got {s!r}")
    if len(set(value)) != len(value):
        check.fail("seeds", f"repeated seeds in {value}")
    return list(value)


def _budget(check: _Checker, value) -> Budget:
    value = check.mapping(value, "budget", ("metric", "scale", "label", "reduce"))
    if "metric" not in value:
        check.fail("budget.metric", "missing: the logged metric(s) whose per-step product is summed")
    metrics = value["metric"] if isinstance(value["metric"], list) else [value["metric"]]
    if not metrics:
        check.fail("budget.metric", "empty list")
    for i, m in enumerate(metrics):
        check.text(m, f"budget.metric[{i}]")
    scale = check.number(value.get("scale", 1.0), "budget.scale", positive=True)
    reduce = value.get("reduce", "sum")
    if reduce not in ("sum", "last"):
        check.fail("budget.reduce", f"expected sum (per-step counts) or last (a cumulative counter), got {reduce!r}")
    return Budget(tuple(metrics), scale, check.text(value.get("label", "budget"), "budget.label"), reduce)


def _paper(check: _Checker, value, metrics: dict[str, str]) -> Paper:
    value = check.mapping(value, "paper", ("source", "metric", "beside"))
    for key in ("source", "metric", "beside"):
        if key not in value:
            check.fail(f"paper.{key}", "missing (paper: {source, metric, beside})")
    beside = check.text(value["beside"], "paper.beside")
    if beside not in metrics:
        check.fail("paper.beside", f"{beside!r} is not one of the metrics {list(metrics)}")
    return Paper(check.text(value["source"], "paper.source"), check.text(value["metric"], "paper.metric"), beside)


def _variants(check: _Checker, value, steps: dict[str, Any]) -> list[Variant]:
    if not isinstance(value, list) or not value:
        check.fail("variants", f"expected a non-empty list of variants, got {value!r}")
    out, seen, configs = [], {}, {}
    for i, raw in enumerate(value):
        where = f"variants[{i}]"
        raw = check.mapping(raw, where, _VARIANT)
        if "name" not in raw:
            check.fail(f"{where}.name", "missing")
        name = check.text(raw["name"], f"{where}.name")
        if not _NAME.match(name):
            check.fail(f"{where}.name", f"{name!r}: use letters, digits and _ . + - (it is a folder name)")
        if name in seen:
            check.fail(f"{where}.name", f"{name!r} repeats variants[{seen[name]}].name")
        seen[name] = i
        deltas = raw.get("deltas") or []
        if not isinstance(deltas, list):
            check.fail(f"{where}.deltas", f"expected a list of delta files, got {deltas!r}")
        deltas = tuple(check.file(d, f"{where}.deltas[{j}]", "delta") for j, d in enumerate(deltas))
        overrides = check.overrides(raw.get("overrides") or {}, f"{where}.overrides")
        budget = sorted(set(overrides) & set(steps))
        if budget:
            check.fail(f"{where}.overrides", f"{budget} is the step budget, the same for every variant (steps)")
        paper = None if raw.get("paper") is None else check.number(raw["paper"], f"{where}.paper")
        description = raw.get("description") or ""
        if not isinstance(description, str):
            check.fail(f"{where}.description", f"expected a string, got {description!r}")
        key = (deltas, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key in configs:
            check.fail(where, f"{name!r} runs the same deltas and overrides as {configs[key]!r}")
        configs[key] = name
        out.append(Variant(name, deltas, overrides, paper, description.strip()))
    return out


def from_flags(base: str, deltas: list[str], seeds: list[int], metrics: list[str], sets: list[str],
               name: str | None = None, baseline: bool = True) -> Ablation:
    """The flag form (``--base R --delta D ... --seeds ... --metric m[:min] --set k=v``): the base
    alone is the variant ``baseline`` (unless ``baseline=False``), each delta a variant named
    after its file; ``--set`` values go to every run as typed."""
    check = _Checker("command line")
    check.file(base, "--base", "recipe")
    if not deltas and not baseline:
        check.fail("--no-baseline", "nothing to run (no --delta and no baseline)")
    variants = [Variant("baseline")] if baseline else []
    for d in deltas:
        check.file(d, "--delta", "delta")
        variants.append(Variant(os.path.splitext(os.path.basename(d))[0], (d,)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        check.fail("--delta", f"variant names (file names, and baseline) must be distinct: {names}")
    modes = {}
    for m in metrics:
        metric, _, mode = m.rpartition(":") if m.endswith((":max", ":min")) else (m, "", "max")
        modes[metric] = mode
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            check.fail("--set", f"{item!r}: expected KEY=VALUE")
        overrides[key] = value
    overrides = check.overrides(overrides, "--set")
    return Ablation(name=name or os.path.splitext(os.path.basename(base))[0], base=base, variants=variants,
                    seeds=_seeds(check, list(seeds)), metrics=modes, overrides=overrides)
