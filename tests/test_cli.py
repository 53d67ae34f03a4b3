"""The entry point: a YAML run end to end, every shipped YAML parses, run layout."""

import glob
import os

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lit_align.train import main
from tests.conftest import REPO, stand_in_exports

QUICKSTART = os.path.join(REPO, "configs", "sft", "arith.yaml")
FAST = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.init_args.task.val_size", "8",
        "--data.init_args.eval_batch_size", "8", "--data.init_args.micro_batch_size", "4"]


def _dirs(tmp_path):
    return ["--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "t"]


def test_fit_from_yaml_writes_logs_config_checkpoints_and_hf_export(tmp_path):
    cli = main(["fit", "--config", QUICKSTART, *FAST, "--trainer.log_every_n_steps", "1", *_dirs(tmp_path)])
    assert cli.trainer.global_step == 3
    version = tmp_path / "logs" / "t" / "version_0"
    saved = yaml.safe_load(open(version / "config.yaml"))
    assert saved["model"]["class_path"] == "lit_align.SFT"
    assert saved["trainer"]["max_steps"] == 3  # the resolved config, command-line overrides included
    assert glob.glob(str(version / "events.out.tfevents.*"))
    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/tokens_per_s", "train/grad_norm", "lr/pg1", "val/loss", "val/exact_match",
                "data/train_rows", "data/validation_rows"):
        assert tag in scalars, (tag, sorted(scalars))
    assert events.Scalars("data/validation_rows")[0].value == 8
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
    assert "val/samples/text_summary" in events.Tags()["tensors"]  # generations as TensorBoard text
    assert os.path.exists(tmp_path / "ckpt" / "t" / "last.ckpt")
    assert glob.glob(str(tmp_path / "ckpt" / "t" / "best-step*.ckpt"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "t" / "hf")
    ids = torch.tensor([[54, 58, 46, 56, 59, 64]])
    cli.model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, cli.model.model(input_ids=ids).logits)


def test_validate_and_resume_from_last(tmp_path):
    main(["fit", "--config", QUICKSTART, *FAST, *_dirs(tmp_path)])
    ckpt = str(tmp_path / "ckpt" / "t" / "last.ckpt")
    cli = main(["validate", "--config", QUICKSTART, *FAST, *_dirs(tmp_path), "--ckpt_path", ckpt])
    assert "val/exact_match" in cli.trainer.callback_metrics
    # `last`, as a user resumes a killed run: Lightning finds checkpoints/<name>/last.ckpt itself
    cli = main(["fit", "--config", QUICKSTART, *FAST[:-6], "--trainer.max_steps", "5", *FAST[2:], *_dirs(tmp_path),
                "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == ckpt
    assert cli.trainer.global_step == 5


def test_print_config_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--print_config"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["init_args"]["optim"]["lr"] == 3e-3
    assert out["data"]["init_args"]["truncation"] == "prompt"


def _recipes():
    return sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                  if os.sep + "strategy" + os.sep not in p and os.sep + "precision" + os.sep not in p
                  and os.sep + "ablations" + os.sep not in p)


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_parses_and_instantiates(path, tmp_path):
    """Every recipe parses, instantiates and builds its model. Pipeline recipes start from an
    earlier stage's export under checkpoints/, absent from a fresh clone: a tiny export with
    the same layout stands in, so the recipe's own code path (load from a local dir) runs."""
    stand_ins = stand_in_exports(os.path.relpath(path, REPO), tmp_path)
    cli = main(["--config", path, *stand_ins], run=False)
    assert cli.model is not None and cli.datamodule is not None
    if "--model.init_args.model.pretrained" in stand_ins:
        assert cli.model.spec.pretrained == stand_ins[stand_ins.index("--model.init_args.model.pretrained") + 1]
    cli.model.configure_model()
    assert cli.model.model is not None


def test_without_generation_the_best_checkpoint_is_the_lowest_val_loss(tmp_path):
    cli = main(["fit", "--config", QUICKSTART, *FAST, "--model.init_args.eval_max_new_tokens", "0", *_dirs(tmp_path),
                "--export_hf", "false"])
    assert cli.model.monitor == ("val/loss", "min") and "val/exact_match" not in cli.trainer.callback_metrics
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/loss" and os.path.basename(best.best_model_path).startswith("best-step")
    assert best.best_model_score == pytest.approx(float(cli.trainer.callback_metrics["val/loss"]))


def test_nested_null_overrides_become_mappings():
    from lit_align.train import nested_nulls

    args = ["fit", "--trainer.fast_dev_run", "--model.init_args.model.config", "null",
            "--model.init_args.model.tokenizer=null", "--model.init_args.ref_model", "null", "--trainer.logger", "null"]
    assert nested_nulls(args) == ["fit", "--trainer.fast_dev_run", "--model.init_args.model={config: null}",
                                  "--model.init_args.model={tokenizer: null}", "--model.init_args.ref_model", "null",
                                  "--trainer.logger", "null"]


def test_the_real_model_override_replaces_the_inline_config(tmp_path, capsys):
    """The README's override (inline config and tokenizer set to null, a local directory) parses
    and loads that directory's model and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.models import build_tokenizer

    tokenizer = build_tokenizer("byte")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    override = ["--model.init_args.model.config", "null", "--model.init_args.model.pretrained", str(tmp_path / "m"),
                "--model.init_args.model.tokenizer", "null"]
    cli = main(["--config", QUICKSTART, *override], run=False)
    assert cli.model.spec.config is None and cli.model.spec.tokenizer is None
    assert cli.model.spec.pretrained == str(tmp_path / "m")
    cli.model.configure_model()
    assert cli.model.model.config.hidden_size == 16
    assert cli.model.spec.tokenizer_name == str(tmp_path / "m")  # the directory's own tokenizer
