"""Runs that lose nothing and never go silently wrong: one last.ckpt, written periodically and at
signals; resuming from `last` (corrupt, absent); non-finite settings, losses and exports refused;
the HF export replaced atomically and never by a new run unasked; command-line lists replace."""

import glob
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from lit_align.callbacks import NonFiniteError
from lit_align.callbacks.last_checkpoint import default_every_n_steps
from lit_align.train import AlignCLI, filter_harmless_warnings, main
from tests.conftest import REPO, write_tiny_export

QUICKSTART = os.path.join(REPO, "configs", "sft", "arith.yaml")
TINY = ["--trainer.val_check_interval", "100", "--data.init_args.task.val_size", "4",
        "--data.init_args.task.train_size", "64", "--data.init_args.eval_batch_size", "4",
        "--data.init_args.micro_batch_size", "4", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _dirs(tmp_path, name="t"):
    return ["--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", name]


def _run(tmp_path, *extra, steps=4, callback=None, **init):
    """The quickstart recipe fit on tiny splits for ``steps`` steps, with ``tests.markers.<callback>``."""
    cb = []
    if callback:
        cb = [f"--trainer.callbacks+=tests.markers.{callback}"] + [f"--trainer.callbacks.init_args.{k}={v}"
                                                                   for k, v in init.items()]
    return main(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", str(steps), *_dirs(tmp_path), *cb,
                 *extra])


def _callback(cli, name):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == name)


# -- command-line lists ------------------------------------------------------------------

def test_a_rewards_list_on_the_command_line_replaces_the_recipes(tmp_path):
    """The recipe's first reward has args {reverse_answer: true}; the command line's one item has none."""
    export = write_tiny_export(tmp_path / "e")
    cli = main(["--config", os.path.join(REPO, "configs", "grpo", "arith.yaml"), "--model.init_args.model.pretrained",
                export, "--model.init_args.rewards", "[{name: format}]"], run=False)
    assert [(r.name, r.args, r.weight) for r in cli.model.rewards.specs] == [("format", {}, 1.0)]


def test_a_negative_exponent_after_a_space_says_to_use_equals(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--config", QUICKSTART, "--model.init_args.optim.weight_decay", "-1e-3"], run=False)
    assert exit.value.code == 2
    assert "write --model.init_args.optim.weight_decay=-1e-3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", QUICKSTART, "--trainer.gradient_clip_val", "-.inf"], run=False)
    assert "write --trainer.gradient_clip_val=-.inf" in capsys.readouterr().err


# -- non-finite ----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("--model.init_args.optim.lr", ".inf"),
                                       ("--model.init_args.optim.grad_clip", ".nan"),
                                       ("--data.init_args.val_fraction", ".nan"),
                                       ("--trainer.gradient_clip_val", "-.inf")])
def test_non_finite_settings_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=r"^settings must be finite numbers: " + re.escape(key[2:]) + "="):
        main(["--config", QUICKSTART, f"{key}={value}"], run=False)


def test_optim_spec_refuses_non_finite_numbers():
    from lit_align.algorithms.optim import OptimSpec

    for kwargs in ({"lr": float("inf")}, {"grad_clip": float("nan")}, {"betas": (0.9, float("nan"))},
                   {"weight_decay": float("inf")}):
        with pytest.raises(ValueError, match=r"optim: .*must be a finite number"):
            OptimSpec(**kwargs)


def test_non_finite_settings_in_yaml_are_refused(tmp_path):
    delta = tmp_path / "delta.yaml"
    delta.write_text("model:\n  init_args:\n    optim:\n      lr: .inf\n      grad_clip: .nan\n")
    with pytest.raises(ValueError, match=r"model\.init_args\.optim\.lr=inf, model\.init_args\.optim\.grad_clip=nan"):
        main(["--config", QUICKSTART, "--config", str(delta)], run=False)


@pytest.mark.parametrize("option,match", [("--save_every_n_steps=0", "save_every_n_steps: must be >= 1, got 0"),
                                          ("--save_every_n_steps=-5", "save_every_n_steps: must be >= 1, got -5"),
                                          ("--save_every_minutes=0", "save_every_minutes: must be a finite number > 0"),
                                          ("--save_every_minutes=-2.5", "save_every_minutes: .* got -2.5"),
                                          ("--skip_nonfinite_steps=-1", "skip_nonfinite_steps: must be >= 0, got -1")])
def test_bad_checkpoint_and_skip_intervals_are_refused_when_the_trainer_is_built(tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        main(["--config", QUICKSTART, *_dirs(tmp_path), option], run=False)


@pytest.mark.slow
def test_a_non_finite_gradient_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    last = tmp_path / "ckpt" / "t" / "last.ckpt"
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at global step 3 \(set --skip_nonfinite_steps"
                                             r" N .*\); last good checkpoint: " + str(last) + "$"):
        _run(tmp_path, "--save_every_n_steps", "2", "--export_hf", "false", steps=6, callback="PoisonGrad", step=3)
    assert torch.load(last, weights_only=False)["global_step"] == 2  # not overwritten at the error


@pytest.mark.slow
def test_skipped_non_finite_steps_are_counted_and_leave_the_weights(tmp_path):
    cli = _run(tmp_path, "--skip_nonfinite_steps", "1", "--export_hf", "false", steps=4, callback="PoisonGrad", step=2)
    poison = _callback(cli, "PoisonGrad")
    assert poison.done and cli.trainer.global_step == 4
    assert float(cli.trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)  # AdamW left every weight
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


@pytest.mark.slow
def test_a_non_finite_export_is_refused_and_the_previous_export_kept(tmp_path):
    hf = tmp_path / "ckpt" / "t" / "hf"
    hf.mkdir(parents=True)
    (hf / "marker.txt").write_text("previous export")
    with pytest.raises(FileExistsError, match=f"{hf} holds the HF export of an earlier run named 't'.*--overwrite"):
        _run(tmp_path, steps=1)
    with pytest.raises(RuntimeError, match=r"HF export to .*hf refused: tensors with NaN or inf \(model.safetensors:"):
        _run(tmp_path, "--overwrite", "true", steps=1, callback="InfWeightAtEnd")
    assert os.listdir(hf) == ["marker.txt"] and not os.path.exists(f"{hf}.tmp")
    _run(tmp_path, "--overwrite", "true", steps=1)  # a finite model replaces it whole
    assert "marker.txt" not in os.listdir(hf) and "model.safetensors" in os.listdir(hf)


# -- checkpoints ---------------------------------------------------------------------------

def test_default_periodic_interval():
    assert [default_every_n_steps(s) for s in (-1, 5, 200, 1500, 10 ** 6)] == [1000, 1, 10, 75, 1000]


@pytest.mark.slow
def test_one_last_ckpt_written_periodically_without_validation(tmp_path):
    # no validation at all: a crash at step 5 keeps the periodic checkpoint of step 4
    with pytest.raises(RuntimeError, match="crash"):
        _run(tmp_path, "--trainer.limit_val_batches", "0", "--save_every_n_steps", "2", "--export_hf", "false",
             steps=8, callback="FailAt", step=5)
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt" / "t" / "*")))
    assert files == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "t" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_ckpt_path_last_skips_a_corrupt_newest_and_refuses_none(tmp_path, caplog):
    run = {"ckpt": str(tmp_path), "name": "t", "if_absent": False}
    with pytest.raises(FileNotFoundError, match=f"--ckpt_path last: no checkpoint in {tmp_path}.*--resume_if_absent"):
        AlignCLI.resolve_last(run)
    assert AlignCLI.resolve_last(dict(run, if_absent=True)) is None
    torch.save({"global_step": 2}, tmp_path / "best-step2.ckpt")
    torch.save({"global_step": 4, "w": torch.ones(1000)}, tmp_path / "last.ckpt")
    assert AlignCLI.resolve_last(run) == str(tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed mid-write
    with caplog.at_level("WARNING"):
        assert AlignCLI.resolve_last(run) == str(tmp_path / "best-step2.ckpt")
    assert f"{tmp_path / 'last.ckpt'} is corrupt" in caplog.text and "resuming from the older" in caplog.text
    (tmp_path / "best-step2.ckpt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=f"no intact checkpoint in {tmp_path}: .*last.ckpt is corrupt.*best-step2"):
        AlignCLI.resolve_last(run)


@pytest.mark.slow
def test_fit_with_ckpt_path_last_and_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        main(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", "1", *_dirs(tmp_path), "--ckpt_path",
              "last", "--export_hf", "false"])
    cli = main(["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", "1", *_dirs(tmp_path), "--ckpt_path",
                "last", "--resume_if_absent", "true", "--export_hf", "false"])
    assert cli.trainer.global_step == 1 and cli.trainer.ckpt_path is None


# -- console -------------------------------------------------------------------------------

def test_harmless_warnings_are_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_harmless_warnings()
        warnings.warn("Found 2 module(s) in eval mode at the start of training. This may lead to ...", stacklevel=1)
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_the_progress_bar_counts_steps_in_step_limited_runs():
    from types import SimpleNamespace

    from lit_align.callbacks.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=200, max_epochs=-1, global_step=12)
    assert bar._get_train_description(0).strip() == "Step 12/200"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=3, global_step=12)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


# -- signals -------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_and_sigint_write_last_ckpt_and_exit_non_zero(tmp_path):
    """Two runs in child processes, one sent SIGTERM and one SIGINT once they have trained a step;
    both exit with 128 + the signal's number, leaving a last.ckpt written at the signal."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        marker = tmp_path / f"{sig.name}.step"
        args = [sys.executable, "-m", "lit_align.train", "fit", "--config", QUICKSTART, *TINY,
                "--trainer.max_steps", "100000", "--save_every_n_steps", "100000", "--export_hf", "false",
                *_dirs(tmp_path, sig.name), "--trainer.callbacks+=tests.markers.StepFile",
                f"--trainer.callbacks.init_args.path={marker}"]
        procs[sig] = (subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                      marker)
    try:
        deadline = time.time() + 150  # start-up on a loaded machine
        for sig, (proc, marker) in procs.items():
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert marker.exists(), f"{sig.name} run did not train a step (rc {proc.poll()})"
            proc.send_signal(sig)
        for sig, (proc, marker) in procs.items():
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 128 + sig, err.decode()[-3000:]
            ckpt = torch.load(tmp_path / "ckpt" / sig.name / "last.ckpt", weights_only=False)
            assert ckpt["global_step"] >= int(marker.read_text()) >= 1
            assert sorted(os.listdir(tmp_path / "ckpt" / sig.name)) == ["last.ckpt"]
            assert f"{sig.name}: stopped; wrote" in err.decode()
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
