"""Resume is exact: a run killed after a checkpoint and resumed with ``--ckpt_path last``
ends with the weights of the uninterrupted run, bit for bit, and logs the same training
metrics at every step, for every method's shipped recipe."""

import io
import json
import os

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_align.train import main
from tests.conftest import REPO, stand_in_exports


class Killed(Exception):
    """The run dies here: nothing after the last checkpoint is kept."""


class KillAt(L.Callback):
    """Dies at the start of the first batch after ``step`` optimizer steps (the steps after the
    last checkpoint are done, then lost, as when the job is killed)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Killed(f"killed at step {trainer.global_step}")


def parity_reward(prompts, completions, meta, completion_ids, **context):
    """1 for completions whose first token id is odd: varies within groups sampled from an
    untrained policy, so dynamic sampling keeps some groups and drops others."""
    return [float(bool(ids) and ids[0] % 2 == 1) for ids in completion_ids]


# the arith reward is 0 for every sample of an untrained policy: no gradient, whatever was sampled
PARITY = ["--model.init_args.rewards", "[{name: 'tests.test_resume:parity_reward'}]"]
# recipe, optimizer steps per training batch, overrides making each recipe tiny
METHODS = {
    "sft": ("configs/sft/arith.yaml", 1, []),
    "rm": ("configs/rm/arith.yaml", 1, []),
    "dpo": ("configs/dpo/arith.yaml", 1, []),
    "grpo": ("configs/grpo/arith.yaml", 1, [
        "--model.init_args.num_generations", "2", "--model.init_args.mini_batches", "1",
        "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.forward_batch_size", "4", *PARITY]),
    "dapo": ("configs/dapo/arith.yaml", 1, [
        "--model.init_args.num_generations", "2", "--model.init_args.mini_batches", "1",
        "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.overlong_buffer", "1",
        "--model.init_args.overlong_filtering", "false",  # an untrained policy never stops: no loss at all
        "--model.init_args.forward_batch_size", "4", *PARITY]),
    "ppo": ("configs/ppo/arith_rm.yaml", 2, [
        "--model.init_args.ppo_epochs", "1", "--model.init_args.mini_batches", "1",
        "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.forward_batch_size", "4",
        "--model.init_args.adaptive_kl", "{target: 0.5, horizon: 10}"]),
    "llava": ("configs/llava/stage2_shapes.yaml", 1, ["--data.init_args.max_length", "96"]),
}
TIMING = ("tokens_per_s", "time/")  # wall-clock measurements differ between any two runs


def _args(method: str, tmp_path, name: str, steps: int, every: int) -> list[str]:
    """The method's recipe, tiny, with the earlier stages' exports it reads written once under
    ``tmp_path`` (every run of a test starts from the same ones)."""
    recipe, _, extra = METHODS[method]
    if not (tmp_path / "exports").exists():
        (tmp_path / "exports").mkdir()
        (tmp_path / "exports" / "args.json").write_text(json.dumps(stand_in_exports(recipe, tmp_path / "exports")))
    stand_ins = json.loads((tmp_path / "exports" / "args.json").read_text())
    return ["fit", "--config", os.path.join(REPO, recipe), *stand_ins, *extra, "--seed_everything", "7",
            "--data.init_args.task.train_size", "16", "--data.init_args.task.val_size", "4",
            "--data.init_args.micro_batch_size", "4", "--data.init_args.eval_batch_size", "4",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--save_every_n_steps", str(every), "--export_hf", "false",
            "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", name]


def _scalars(version_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
            if not any(t in tag for t in TIMING)}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_killed_and_resumed_run_equals_the_uninterrupted_one(method, tmp_path):
    per_batch = METHODS[method][1]
    # checkpoints every 2 batches; killed after batch 3, so the resumed run redoes a lost batch
    steps, every, kill = 4 * per_batch, 2 * per_batch, 3 * per_batch
    straight = main(_args(method, tmp_path, "straight", steps, every))
    assert straight.trainer.global_step == steps

    killed = _args(method, tmp_path, "t", steps, every)
    killed += ["--trainer.callbacks", f"[{{class_path: tests.test_resume.KillAt, init_args: {{step: {kill}}}}}]"]
    with pytest.raises(Killed):
        main(killed)
    assert torch.load(tmp_path / "ckpt" / "t" / "last.ckpt", weights_only=False)["global_step"] == every
    resumed = main(_args(method, tmp_path, "t", steps, every) + ["--ckpt_path", "last"])
    assert resumed.trainer.global_step == steps

    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different[:5]

    logs = tmp_path / "logs"
    want = _scalars(logs / "straight" / "version_0")
    got = _scalars(logs / "t" / "version_1")
    train_tags = sorted(t for t in want if t.startswith(("train/", "lr")))
    assert train_tags and set(train_tags) <= set(got)
    for tag in train_tags:
        resumed_steps = sorted(got[tag])
        # logged at the count of batches that stepped: the resumed run logs from the checkpoint's on
        assert resumed_steps and min(resumed_steps) == every // per_batch, (tag, resumed_steps)
        assert {s: want[tag][s] for s in resumed_steps} == got[tag], tag


def test_random_state_round_trips_and_validation_leaves_it_alone():
    import random

    import numpy as np

    from lit_align.callbacks.resume import ResumeState, rng_state, set_rng_state

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    saved = rng_state()
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    want = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(loaded)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == want[1:]
    set_rng_state(loaded)
    assert torch.equal(torch.rand(3), want[0])

    callback = ResumeState()
    set_rng_state(loaded)
    callback.on_validation_start(None, None)
    torch.rand(5), random.random(), np.random.rand()  # held-out evaluation draws
    callback.on_validation_end(None, None)
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1] and np.random.rand() == want[2]


# -- the given settings stand --------------------------------------------------------------
SFT_TINY = ["--model.init_args.model.config",
            ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,"
             " num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"),
            "--model.init_args.eval_max_new_tokens", "0"]


def _sft_checkpoint(tmp_path) -> str:
    main(_args("sft", tmp_path, "t", 2, 2) + SFT_TINY)
    return str(tmp_path / "ckpt" / "t" / "last.ckpt")


@pytest.mark.slow
def test_resume_keeps_the_given_settings_and_refuses_other_weights(tmp_path):
    ckpt = _sft_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=False)["hyper_parameters"]["optim"]["lr"]
    assert saved == 3e-3
    with pytest.warns(UserWarning, match=r"optim\.lr: 0\.005 \(checkpoint: 0\.003\)"):
        cli = main(_args("sft", tmp_path, "t", 3, 2) + SFT_TINY + ["--model.init_args.optim.lr", "5e-3",
                                                                 "--ckpt_path", ckpt])
    assert cli.model.optim.lr == 5e-3  # not the checkpoint's
    opt, sched = cli.trainer.optimizers[0], cli.trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [5e-3, 5e-3] and all(g["initial_lr"] == 5e-3 for g in opt.param_groups)
    assert sched.last_epoch == 3  # the step taken after the resume used the given rate
    assert opt.param_groups[0]["lr"] == 5e-3 * sched.lr_lambdas[0](3)

    # LoRA (or another model) on top of weights trained without it: refused, both values named
    with pytest.raises(ValueError, match=r"lora: given \{'r': 4.*\}, checkpoint None"):
        main(_args("sft", tmp_path, "t", 3, 2) + SFT_TINY + ["--model.init_args.lora", "{r: 4}", "--ckpt_path", ckpt])
    with pytest.raises(ValueError, match=r"model\.config\.hidden_size: given 64, checkpoint 32"):
        wider = SFT_TINY[1].replace("hidden_size: 32", "hidden_size: 64")
        main(_args("sft", tmp_path, "t", 3, 2) + SFT_TINY[:1] + [wider, *SFT_TINY[2:], "--ckpt_path", ckpt])


def test_resume_names_data_settings_that_differ_from_the_checkpoints(tmp_path):
    ckpt = _sft_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)["InstructionDataModule"]["settings"]
    assert saved["micro_batch_size"] == 4 and saved["task"]["train_size"] == 16
    with pytest.warns(UserWarning, match=r"data settings that differ .*data\.micro_batch_size: 2 \(checkpoint: 4\); "
                                         r"data\.task\.train_size: 24 \(checkpoint: 16\)"):
        main(_args("sft", tmp_path, "t", 3, 2) + SFT_TINY + ["--data.init_args.micro_batch_size", "2",
                                                             "--data.init_args.task.train_size", "24",
                                                             "--ckpt_path", ckpt])

# -- loading never skips a key ---------------------------------------------------------------
def test_loading_names_every_missing_and_unexpected_key_except_the_rebuilt_reference(tmp_path):
    from lit_align import DPO, SFT, CausalLMSpec
    from lit_align.models import build_causal_lm, build_tokenizer
    from tests.conftest import tiny_config

    sft = SFT(model=CausalLMSpec(config=tiny_config()), eval_max_new_tokens=0)
    sft.configure_model()
    state = sft.state_dict()
    gone = "model.model.layers.1.mlp.up_proj.weight"
    state.pop(gone)
    state["model.value_head.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys \['model\.model\.layers\.1\.mlp\.up_proj\.weight'\], "
                                           r"unexpected keys \['model\.value_head\.weight'\]"):
        sft.load_state_dict(state)

    # DPO's reference is rebuilt from its spec: absent from checkpoints, and not missed
    export = tmp_path / "export"
    tokenizer = build_tokenizer("byte")
    build_causal_lm(CausalLMSpec(config=tiny_config()), tokenizer).save_pretrained(export)
    tokenizer.save_pretrained(export)
    dpo = DPO(model=CausalLMSpec(pretrained=str(export)), eval_max_new_tokens=0)
    dpo.configure_model()
    saved = {"state_dict": dpo.state_dict()}
    dpo.on_save_checkpoint(saved)
    assert saved["state_dict"] and not any(k.startswith("reference.") for k in saved["state_dict"])
    dpo.load_state_dict(saved["state_dict"])
    saved["state_dict"].pop("model.model.norm.weight")
    with pytest.raises(RuntimeError, match=r"missing keys \['model\.model\.norm\.weight'\]"):
        dpo.load_state_dict(saved["state_dict"])

    # a frozen model never keeps a random init for a weight its files lack
    from safetensors.torch import load_file, save_file

    weights = load_file(export / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{export}: .*missing keys \['model\.norm\.weight'\]"):
        DPO(model=CausalLMSpec(config=tiny_config()), reference=CausalLMSpec(pretrained=str(export)),
            eval_max_new_tokens=0).configure_model()


def test_a_reward_model_export_without_its_head_is_refused(tmp_path, tiny_reward_export):
    import shutil

    from safetensors.torch import load_file, save_file

    from lit_align.models import load_reward_model

    export = tmp_path / "rm"
    shutil.copytree(tiny_reward_export, export)
    weights = load_file(export / "model.safetensors")
    head = [k for k in weights if k.startswith("score")]
    assert head
    for k in head:
        weights.pop(k)
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{export}: .*missing keys \['score\.weight'\]"):
        load_reward_model(str(export))


# -- frozen models are the ones the run started with --------------------------------------------
@pytest.mark.slow
def test_resume_refuses_a_reference_whose_files_changed(tmp_path):
    from transformers import AutoModelForCausalLM

    main(_args("dpo", tmp_path, "t", 2, 2))
    ckpt = str(tmp_path / "ckpt" / "t" / "last.ckpt")
    export = json.loads((tmp_path / "exports" / "args.json").read_text())
    export = export[export.index("--model.init_args.model.pretrained") + 1]
    frozen = torch.load(ckpt, weights_only=False)["frozen_models"]
    assert frozen["reference"]["path"] == export and len(frozen["reference"]["sha256"]) == 64

    model = AutoModelForCausalLM.from_pretrained(export)  # other weights, same path
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(export)
    with pytest.raises(ValueError, match=rf"frozen model files changed .*: reference at {export}"):
        main(_args("dpo", tmp_path, "t", 3, 2) + ["--ckpt_path", ckpt])
