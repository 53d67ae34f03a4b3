"""The sweep runner: every variant x seed runs, failures are recorded, the summary is right."""

import csv
import math
import os

import pytest

from lit_align.ablate import RunResult, main, summarize
from tests.conftest import REPO

QUICKSTART = os.path.join(REPO, "configs", "sft", "arith.yaml")
SMALL = ["--set", "trainer.max_steps=3", "--set", "trainer.val_check_interval=3", "--set",
         "data.init_args.task.val_size=8", "--set", "data.init_args.eval_batch_size=8", "--set",
         "data.init_args.micro_batch_size=4", "--set", "export_hf=false"]


def test_summary_is_mean_and_sample_std_over_seeds():
    results = [RunResult("a", 0, {"m": 0.5}), RunResult("a", 1, {"m": 0.7}), RunResult("b", 0, {"m": 0.1}),
               RunResult("b", 1, error="ValueError: bad")]
    table = summarize(results, ["m"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| a") or
            line.startswith("| b")}
    assert f"{0.6:.4f} +- {math.sqrt(0.02):.4f}" in rows["a"]
    assert "| 1 (1 failed) |" in rows["b"] and f"{0.1:.4f} +- 0.0000" in rows["b"]
    assert "- b seed 1: ValueError: bad" in table


def test_sweep_runs_every_variant_and_seed_and_keeps_going_after_a_failure(tmp_path):
    lr = tmp_path / "high_lr.yaml"
    lr.write_text("model:\n  init_args:\n    optim:\n      lr: 1.0e-2\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args:\n    optim:\n      lr: -1.0\n")
    results = main(["--base", QUICKSTART, "--delta", str(lr), "--delta", str(broken), "--seeds", "0", "1",
                    "--metric", "val/exact_match", "--metric", "train/loss", "--name", "sweep",
                    "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), *SMALL])
    assert [(r.variant, r.seed) for r in results] == [(v, s) for v in ("baseline", "high_lr", "broken") for s in (0, 1)]
    for r in results[:4]:
        assert r.error is None and 0.0 <= r.metrics["val/exact_match"] <= 1.0 and math.isfinite(r.metrics["train/loss"])
    assert all("lr" in r.error for r in results[4:])
    # each run has its own logs and resolved config; the seeds differ, so do the losses
    assert os.path.isfile(tmp_path / "logs" / "sweep" / "high_lr" / "seed1" / "version_0" / "config.yaml")
    assert results[0].metrics["train/loss"] != results[1].metrics["train/loss"]
    summary = (tmp_path / "logs" / "sweep" / "summary.md").read_text()
    assert "| baseline | 2 |" in summary and "| broken | 0 (2 failed) |" in summary
    with open(tmp_path / "logs" / "sweep" / "summary.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 7 and rows[0][:4] == ["variant", "seed", "val/exact_match", "train/loss"]


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        main(["--base", QUICKSTART, "--delta", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit):
        main(["--base", QUICKSTART, "--set", "no_equals_sign"])
    with pytest.raises(ValueError, match="nothing to run"):
        main(["--base", QUICKSTART, "--no-baseline"])
