"""Entry point: ``python -m lit_align.train fit --config configs/<algo>/<recipe>.yaml``.

LightningCLI in subclass mode: ``model: {class_path: lit_align.SFT, init_args: ...}``
and ``data: {class_path: lit_align.InstructionDataModule, init_args: ...}``; several
``--config`` files compose, the last value winning. Unless the config names its own,
a run gets a TensorBoard logger in ``logs/<name>/version_N`` (with the resolved
config beside it), checkpoints in ``checkpoints/<name>/`` (one ``last.ckpt``, written
periodically, at validation, at the end and at SIGTERM/SIGINT, and the best by the
module's validation metric), a learning-rate monitor, a guard against non-finite losses
and gradients, and a Hugging Face export in ``checkpoints/<name>/hf/`` at the end of fit.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import math
import os
import re
import sys
import warnings

import lightning as L
import yaml
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_align.callbacks import HFExport, LastCheckpoint, NonFiniteGuard
from lit_align.callbacks.last_checkpoint import (
    SIGNAL_EXIT,
    checkpoint_problem,
    default_every_n_steps,
    interruption,
)
from lit_align.hardware import check_trainer

log = logging.getLogger(__name__)

# Warnings every run shows that say nothing about the run: frozen reference / reward models are
# in eval mode on purpose, and the prompt streams know their length on purpose.
HARMLESS_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r".*IterableDataset.*has `__len__` defined.*",
    # main() hands LightningCLI the command line itself (rewritten), which it takes for a mix-up
    r"LightningCLI's args parameter is intended to run from within Python",
)


def filter_harmless_warnings() -> None:
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# a float written with an exponent, or a non-finite one, after a minus sign: argparse takes
# "-1e-3" for an option (its negative-number pattern is only -1 and -1.5)
_NEGATIVE = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^-\.?(inf|nan|infinity)$", re.IGNORECASE)


def negative_values(args: list[str]) -> list[str]:
    """``--x -1e-3`` pairs on the command line, as a message saying to write ``--x=-1e-3``."""
    return [f"{a} {b}: a negative number after a space is read as an option; write {a}={b}"
            for a, b in itertools.pairwise(args) if a.startswith("--") and "=" not in a and _NEGATIVE.match(b)]


def _list_item_types() -> dict[str, type]:
    from lit_align.rewards import RewardSpec

    return {"rewards": RewardSpec, "extra_rewards": RewardSpec}


def rewrite_options(args: list[str], rewrite) -> list[str]:
    """``args`` with each option ``--key value`` or ``--key=value`` for which ``rewrite(key, value)``
    returns an argument replaced by that one ``--key=...`` argument; the others pass unchanged."""
    out, i = [], 0
    while i < len(args):
        arg, key, value, width = args[i], None, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            key, value, width = arg[2:], args[i + 1], 2
        new = rewrite(key, value) if key is not None else None
        out.append(arg if new is None else new)
        i += 1 if new is None else width
    return out


def complete_list_items(args: list[str]) -> list[str]:
    """``--...rewards '[{name: f}]'`` with every field of each item written out (the dataclass's defaults).

    jsonargparse parses a list of dataclasses given on the command line item by item over the
    earlier value's items, so an item without ``args`` would keep the recipe's first item's
    ``args``. A list given on the command line replaces the recipe's list entirely: its items
    are completed with the defaults before parsing."""
    types = _list_item_types()

    def complete(key: str, value: str) -> str | None:
        cls = types.get(key.rpartition(".")[2])
        if cls is None:
            return None
        try:
            items = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
        if not (isinstance(items, list) and all(isinstance(item, dict) for item in items)):
            return None
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        full = [{**defaults, **item} for item in items]
        return f"--{key}={yaml.safe_dump(full, default_flow_style=True).strip()}"

    return rewrite_options(args, complete)


def nonfinite_settings(config, prefix: str = "") -> list[str]:
    """Dotted keys of the settings in ``config`` (a namespace or mapping, nested) that are NaN or infinite."""
    items = vars(config).items() if hasattr(config, "__dict__") and not isinstance(config, dict) else (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, (list, tuple)) else ())
    bad = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and not isinstance(key, int) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{name}={value}")
        elif not isinstance(value, (str, bytes)) and (isinstance(value, (dict, list, tuple))
                                                      or hasattr(value, "__dict__")):
            bad += nonfinite_settings(value, name)
    return bad


def nested_nulls(args: list[str]) -> list[str]:
    """``--a.init_args.b.c null`` (a field of a nested dataclass set to null) as ``--a.init_args.b '{c: null}'``.

    jsonargparse turns a null given to a nested dataclass field on the command line into the
    string ``"None"`` (so ``--model.init_args.model.config null`` fails to validate and a null
    tokenizer would become a tokenizer named "None"); a mapping given to the dataclass merges into
    its earlier value, which is the meaning of the override. Other arguments pass unchanged."""
    def null_mapping(key: str, value: str) -> str | None:
        parent, _, field = key.rpartition(".")
        if value in ("null", "None") and ".init_args." in f"{parent}." and not parent.endswith("init_args"):
            return f"--{parent}={{{field}: null}}"
        return None

    return rewrite_options(args, null_mapping)


class AlignCLI(LightningCLI):
    """LightningCLI with the project's run layout (logs/, checkpoints/, HF export)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, args=args, run=run, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, list):
            args = sys.argv[1:] if args is None else list(args)
            problems = negative_values(args)
            if problems:
                parser.error("; ".join(problems))
            args = complete_list_items(nested_nulls(args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        # refused before the model and data are built (some load weights at construction)
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer(cfg.get("trainer") or {})
        bad = nonfinite_settings({k: cfg.get(k) for k in ("model", "data", "trainer", "optimizer", "lr_scheduler")
                                  if cfg.get(k) is not None})
        if bad:
            raise ValueError(f"settings must be finite numbers: {', '.join(bad)}")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would merge the checkpoint's settings over the given ones; they stand, and
        # the module compares them with the checkpoint's when it loads (algorithms/resume.py)
        pass

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="run name: logs/<name>/version_N and checkpoints/<name>/ (default: the model class)")
        parser.add_argument("--logs_dir", type=str, default="logs", help="root of the TensorBoard logs")
        parser.add_argument("--checkpoints_dir", type=str, default="checkpoints", help="root of the checkpoints")
        parser.add_argument("--save_every_n_steps", type=int | None, default=None,
                            help="write last.ckpt every N optimizer steps (default: max_steps // 20, at most 1000)")
        parser.add_argument("--save_every_minutes", type=float | None, default=None,
                            help="also write last.ckpt every this many minutes of training")
        parser.add_argument("--skip_nonfinite_steps", type=int, default=0,
                            help="skip up to N optimizer steps with a NaN/inf loss or gradient (default: stop at the "
                                 "first); counted as train/skipped_nonfinite")
        parser.add_argument("--resume_if_absent", type=bool, default=False,
                            help="with --ckpt_path last: start afresh when the run has no checkpoint yet")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="a new run may replace an existing HF export under the same name")
        parser.add_argument("--export_hf", type=bool, default=True, help="save_pretrained the model at the end of fit")

    def _run_settings(self) -> dict:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        name = cfg.get("name") or type(self.model).__name__.lower()
        minutes = cfg.get("save_every_minutes")
        return {"name": name, "logs": cfg.get("logs_dir"), "ckpt": os.path.join(cfg.get("checkpoints_dir"), name),
                "every": cfg.get("save_every_n_steps"), "seconds": None if minutes is None else 60 * minutes,
                "export": cfg.get("export_hf"), "skip": cfg.get("skip_nonfinite_steps"),
                "overwrite": cfg.get("overwrite"), "ckpt_path": cfg.get("ckpt_path"),
                "if_absent": cfg.get("resume_if_absent")}

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        run = self._run_settings()
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(run["logs"], name=run["name"], default_hp_metric=False)
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if not any(isinstance(c, ModelCheckpoint) for c in given + extra):
            monitor, mode = getattr(self.model, "monitor", (None, "min"))
            # the best checkpoint only: last.ckpt has one writer, LastCheckpoint
            extra.append(ModelCheckpoint(dirpath=run["ckpt"], filename="best-step{step}", monitor=monitor, mode=mode,
                                         save_last=False, save_top_k=1, auto_insert_metric_name=False))
            every = run["every"] if run["every"] is not None else default_every_n_steps(config.get("max_steps") or -1)
            extra.append(LastCheckpoint(run["ckpt"], every_n_steps=every, every_seconds=run["seconds"]))
        if not any(isinstance(c, NonFiniteGuard) for c in given + extra):
            extra.append(NonFiniteGuard(max_skipped=run["skip"] or 0))
        if config.get("logger") and not any(isinstance(c, LearningRateMonitor) for c in given + extra):
            extra.append(LearningRateMonitor(logging_interval="step"))
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar)
                                                                           for c in given + extra):
            from lightning.pytorch.callbacks.progress.rich_progress import (
                _RICH_AVAILABLE,
            )

            if _RICH_AVAILABLE:
                from lit_align.callbacks.progress import StepProgressBar

                extra.append(StepProgressBar())
        if run["export"] and self.subcommand == "fit":
            hf = os.path.join(run["ckpt"], "hf")
            if os.path.isdir(hf) and os.listdir(hf) and run["ckpt_path"] is None and not run["overwrite"]:
                raise FileExistsError(f"{hf} holds the HF export of an earlier run named {run['name']!r}; give "
                                      "another --name, resume that run with --ckpt_path last, or pass --overwrite true "
                                      "to replace its export")
            extra.append(HFExport(hf))
        return self._instantiate_trainer(config, extra)

    def before_fit(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = self.resolve_last(self._run_settings())

    @staticmethod
    def resolve_last(run: dict) -> str | None:
        """The checkpoint ``--ckpt_path last`` resumes from: the newest intact ``*.ckpt`` in the run's
        checkpoint directory (``last.ckpt`` first). A corrupt newer one is reported with its path and passed over; no
        checkpoint at all is an error unless ``--resume_if_absent true`` (then: ``None``, a fresh start)."""
        directory = run["ckpt"]
        # last.ckpt holds the newest state by construction; older ones (best-step*) are fallbacks
        found = sorted(glob.glob(os.path.join(directory, "*.ckpt")), reverse=True,
                       key=lambda p: (os.path.basename(p) == LastCheckpoint.FILENAME, os.path.getmtime(p)))
        corrupt = []
        for path in found:
            problem = checkpoint_problem(path)
            if problem is None:
                if corrupt:
                    log.warning("--ckpt_path last: " + "; ".join(corrupt) + f"; resuming from the older {path}")
                return path
            corrupt.append(f"{path} is corrupt ({problem})")
        if corrupt:
            raise RuntimeError("--ckpt_path last: no intact checkpoint in " + directory + ": " + "; ".join(corrupt))
        if run["if_absent"]:
            log.warning(f"--ckpt_path last: no checkpoint in {directory}; starting afresh (--resume_if_absent true)")
            return None
        raise FileNotFoundError(f"--ckpt_path last: no checkpoint in {directory} (run name {run['name']!r}); check "
                                "--name and --checkpoints_dir, or pass --resume_if_absent true to start afresh")


def main(args=None, run: bool = True) -> AlignCLI:
    """Run the CLI. A run stopped by SIGTERM or SIGINT exits with 128 + the signal's number after
    writing ``last.ckpt``."""
    filter_harmless_warnings()
    try:
        return AlignCLI(args=args, run=run)
    except SIGTERMException:
        signame, path = interruption()
        signame = signame or "SIGTERM"
        print(f"{signame}: stopped; {'wrote ' + path if path else 'no checkpoint written (step 0)'}", file=sys.stderr)
        raise SystemExit(SIGNAL_EXIT[signame]) from None


if __name__ == "__main__":
    main()
