"""Entry point: ``python -m lit_align.train fit --config configs/<algo>/<recipe>.yaml``.

LightningCLI in subclass mode: ``model: {class_path: lit_align.SFT, init_args: ...}``
and ``data: {class_path: lit_align.InstructionDataModule, init_args: ...}``; several
``--config`` files compose, the last value winning. Unless the config names its own,
a run gets a TensorBoard logger in ``logs/<name>/version_N`` (with the resolved
config beside it), checkpoints in ``checkpoints/<name>/`` (``last.ckpt`` and the best
by the module's validation metric), a learning-rate monitor, and a Hugging Face
export in ``checkpoints/<name>/hf/`` at the end of fit.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_align.callbacks import HFExport
from lit_align.hardware import check_trainer


def nested_nulls(args: list[str]) -> list[str]:
    """``--a.init_args.b.c null`` (a field of a nested dataclass set to null) as ``--a.init_args.b '{c: null}'``.

    jsonargparse turns a null given to a nested dataclass field on the command line into the
    string ``"None"`` (so ``--model.init_args.model.config null`` fails to validate and a null
    tokenizer would become a tokenizer named "None"); a mapping given to the dataclass merges into
    its earlier value, which is the meaning of the override. Other arguments pass unchanged."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, value, width = None, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            key, value, width = arg[2:], args[i + 1], 2
        parent, _, field = (key or "").rpartition(".")
        if value in ("null", "None") and ".init_args." in f"{parent}." and not parent.endswith("init_args"):
            out.append(f"--{parent}={{{field}: null}}")
            i += width
        else:
            out.append(arg)
            i += 1
    return out


class AlignCLI(LightningCLI):
    """LightningCLI with the project's run layout (logs/, checkpoints/, HF export)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, args=args, run=run, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, list):
            args = nested_nulls(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        # refused before the model and data are built (some load weights at construction)
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer(cfg.get("trainer") or {})

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
                            help="also write last.ckpt every N optimizer steps (for resuming killed runs)")
        parser.add_argument("--export_hf", type=bool, default=True, help="save_pretrained the model at the end of fit")

    def _run_settings(self) -> dict:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        name = cfg.get("name") or type(self.model).__name__.lower()
        return {"name": name, "logs": cfg.get("logs_dir"), "ckpt": os.path.join(cfg.get("checkpoints_dir"), name),
                "every": cfg.get("save_every_n_steps"), "export": cfg.get("export_hf")}

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
            extra.append(ModelCheckpoint(dirpath=run["ckpt"], filename="best-step{step}", monitor=monitor, mode=mode,
                                         save_last=True, save_top_k=1, auto_insert_metric_name=False))
            if run["every"]:
                extra.append(ModelCheckpoint(dirpath=run["ckpt"], every_n_train_steps=run["every"], save_last=True,
                                             save_top_k=0))
        if config.get("logger") and not any(isinstance(c, LearningRateMonitor) for c in given + extra):
            extra.append(LearningRateMonitor(logging_interval="step"))
        if run["export"] and self.subcommand == "fit":
            extra.append(HFExport(os.path.join(run["ckpt"], "hf")))
        return self._instantiate_trainer(config, extra)


def main(args=None, run: bool = True) -> AlignCLI:
    return AlignCLI(args=args, run=run)


if __name__ == "__main__":
    main()
