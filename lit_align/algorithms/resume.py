"""Resuming honestly: the settings a run is given stand, a checkpoint never replaces them.

A checkpoint records the settings it was trained with (``hyper_parameters``). When a run
loads it, the two are compared: a difference that makes the checkpoint's weights mean
something else (the model, its adapters, the frozen reference) is refused with both values
named; any other difference is reported and the given value applies, including in the
optimizers, whose restored state would otherwise bring back the checkpoint's learning rate,
betas and weight decay."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_align.settings import differences, plain


def check_settings(module, checkpoint: dict, invariants: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """Compare ``module.hparams`` (this run's settings) with ``checkpoint["hyper_parameters"]``.

    Raises ``ValueError`` naming every differing setting under one of ``invariants`` (top-level
    names) with both values, or a different module class; returns the other differences,
    after warning about them: the given values apply."""
    saved = checkpoint.get("hyper_parameters")
    if not saved:
        return []
    given, saved = plain(dict(module.hparams)), plain(dict(saved))
    name = type(module).__name__
    given_class, saved_class = given.pop("_class_path", None), saved.pop("_class_path", None)
    if given_class and saved_class and given_class != saved_class:
        raise ValueError(f"{name}: the checkpoint is a {saved_class} checkpoint, this run's model is {given_class}")
    diffs = differences(given, saved)
    bad = [d for d in diffs if d[0].split(".")[0] in invariants]
    if bad:
        lines = "; ".join(f"{key}: given {value!r}, checkpoint {old!r}" for key, value, old in bad)
        raise ValueError(f"{name}: the checkpoint was trained with other model settings, which its weights depend "
                         f"on ({lines}); give the checkpoint's values to resume it, or start a new run")
    others = [d for d in diffs if d not in bad]
    if others:
        lines = "; ".join(f"{key}: {value!r} (checkpoint: {old!r})" for key, value, old in others)
        rank_zero_warn(f"{name}: resuming with settings that differ from the checkpoint's; the given values "
                       f"apply: {lines}")
    return others


def optimizer_settings(trainer) -> list[list[dict]]:
    """Every optimizer's param-group settings (all but the parameters), as built from this
    run's configuration."""
    return [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            for opt in trainer.optimizers]


def reapply_optimizer_settings(trainer, configured: list[list[dict]], name: str) -> list[str]:
    """After a checkpoint's optimizer and scheduler states are restored, put back this run's
    configured settings where they differ: every param-group setting, and for ``LambdaLR``
    schedules the base learning rate with the current rate recomputed from this run's schedule
    at the restored step. Returns the changes made (also warned about); none when the
    configuration equals the checkpoint's, so such a resume is exact."""
    changes = []
    schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
    for i, (opt, groups) in enumerate(zip(trainer.optimizers, configured)):
        scheduler = schedulers.get(id(opt))
        lambdas = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        for j, (group, want) in enumerate(zip(opt.param_groups, groups)):
            where = f"optimizer {i} group {j}"
            for key, value in want.items():
                if key in ("lr", "initial_lr") and lambdas:
                    continue
                if key in group and _differs(group[key], value):
                    changes.append(f"{where} {key}: {value!r} (checkpoint: {group[key]!r})")
                    group[key] = value
            if lambdas and "initial_lr" in want:
                base = want["initial_lr"]
                lr = base * scheduler.lr_lambdas[j](scheduler.last_epoch)
                if _differs(scheduler.base_lrs[j], base) or _differs(group["lr"], lr):
                    changes.append(f"{where} lr at step {scheduler.last_epoch}: {lr!r} from base {base!r} "
                                   f"(checkpoint: {group['lr']!r} from base {scheduler.base_lrs[j]!r})")
                    scheduler.base_lrs[j], group["initial_lr"], group["lr"] = base, base, lr
                    scheduler._last_lr = [g["lr"] for g in opt.param_groups]
    if changes:
        rank_zero_warn(f"{name}: the optimizers follow this run's settings, not the checkpoint's: "
                       + "; ".join(changes))
    return changes


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return plain(a) != plain(b)


# -- frozen models ---------------------------------------------------------------------------
def fingerprint(path: str) -> str | None:
    """sha256 over the files of a local model (a file, or every file under a directory with
    its relative name), or ``None`` for what is not a local path (a hub id)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = sorted((os.path.relpath(os.path.join(root, f), path), os.path.join(root, f))
                       for root, _, names in os.walk(path) for f in names)
    digest = hashlib.sha256()
    for name, full in files:
        digest.update(name.encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                digest.update(block)
    return digest.hexdigest()


def check_fingerprints(name: str, saved: dict[str, dict], current: dict[str, dict]) -> None:
    """Refuse a resume whose frozen models (``{label: {"path", "sha256"}}``) changed on disk
    since the checkpointed run loaded them: they are rebuilt from their paths, not saved."""
    changed = [f"{label} at {s['path']}" for label, s in saved.items()
               if label in current and s.get("sha256") and current[label]["path"] == s["path"]
               and current[label]["sha256"] != s["sha256"]]
    if changed:
        raise ValueError(f"{name}: the frozen model files changed since the checkpoint was written: "
                         f"{'; '.join(changed)}; the resumed run would train against other weights. Restore "
                         "those files, or start a new run")
