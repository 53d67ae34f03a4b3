"""DPO: one concatenated forward, reference variants, step-mean invariance, every loss through the CLI, learning."""

import glob
import math
import os

import lightning as L
import pytest
import torch

from lit_align import DPO, ArithTask, CausalLMSpec, OptimSpec, PreferenceDataModule
from lit_align.data.batching import collate_rows
from lit_align.models import LoraSpec, build_tokenizer
from tests.conftest import REPO, fit_recipe, tiny_config


def _module(**kw):
    kw.setdefault("optim", OptimSpec(lr=1e-3, warmup_steps=0))
    m = DPO(model=CausalLMSpec(config=tiny_config(), seed=1), eval_max_new_tokens=0, **kw)
    m.configure_model()
    return m


def _data(rows=8, micro=8, **kw):
    dm = PreferenceDataModule(task=ArithTask(digits=2, train_size=rows, val_size=4), max_length=16,
                              micro_batch_size=micro, group_by_length=False, eval_batch_size=4, **kw)
    dm.tokenizer = build_tokenizer("byte")
    dm.setup("fit")
    return dm


def _batch(dm, n=4):
    return dm.collate([[r] for r in dm.encoded["train"][:n]])


def test_concatenated_forward_equals_separate_forwards():
    m, dm = _module(), _data()
    batch = _batch(dm)
    chosen, rejected, _ = m._pair_logps(m.model, batch)
    rows = dm.encoded["train"][:4]
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        sep = collate_rows([r[side] for r in rows], dm.tokenizer.pad_token_id)
        logp, mask = m.shifted(sep)
        torch.testing.assert_close(got, (logp * mask).sum(-1), rtol=1e-5, atol=1e-5)
    # and the sums cover exactly the response tokens (answer digits + EOS)
    assert [r["chosen"]["num_labels"] for r in rows] == [len(r["reference"]) + 1 for r in rows]


def test_initial_loss_is_log_two_and_rewards_zero():
    m, dm = _module(), _data()
    losses = m._step(_batch(dm), "train")
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2.0)))


def test_precomputed_reference_equals_live_reference():
    live, dm = _module(), _data()
    live_c, live_r = live.reference_logps(_batch(dm))
    pre = _module(precompute_ref_logps=True)
    assert pre.ref_model is None
    pre.model.requires_grad_(False)
    for p in pre.model.parameters():  # move the policy: the precomputed values must not come from it
        p.add_(0.1)
    pre.precompute_reference(dm)
    batch = _batch(dm)
    pre_c, pre_r = pre.reference_logps(batch, "train")  # looked up by the pairs' row index
    torch.testing.assert_close(pre_c, live_c)
    torch.testing.assert_close(pre_r, live_r)
    assert set(pre.reference.tables) == set(dm.encoded)  # every split, once
    assert not any("ref_chosen" in r for rows in dm.encoded.values() for r in rows)  # the rows are left alone


def test_lora_reference_is_the_base_with_adapters_disabled():
    m, dm = _module(lora=LoraSpec(r=4, alpha=8)), _data()
    assert m.ref_model is None
    batch = _batch(dm)
    base_c, base_r = m.reference_logps(batch)
    plain = _module()
    torch.testing.assert_close(base_c, plain.reference_logps(batch)[0])
    with torch.no_grad():  # move the adapters: the policy changes, the reference must not
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    pol_c, _, _ = m._pair_logps(m.model, batch)
    assert (pol_c - base_c).abs().max() > 1e-3
    torch.testing.assert_close(m.reference_logps(batch)[0], base_c)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


class GradCapture(L.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone()
                           for n, p in pl_module.model.named_parameters() if p.grad is not None})


def _step_grads(tmp_path, micro, accumulate, **kw):
    capture = GradCapture()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=1,
                        accumulate_grad_batches=accumulate, callbacks=[capture], default_root_dir=str(tmp_path))
    # sft_weight adds a per-pair NLL term: the step mean must hold for it too
    module = DPO(model=CausalLMSpec(config=tiny_config(), seed=1), optim=OptimSpec(lr=1e-3, warmup_steps=0),
                 eval_max_new_tokens=0, sft_weight=0.5, **kw)
    dm = PreferenceDataModule(task=ArithTask(digits=2, train_size=8, val_size=4), max_length=16,
                              micro_batch_size=micro, group_by_length=False)
    trainer.fit(module, datamodule=dm)
    return capture.grads[0]


def test_one_micro_batch_equals_accumulated_micro_batches(tmp_path):
    full = _step_grads(tmp_path, 8, 1)
    split = _step_grads(tmp_path, 2, 4)
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-6)


def test_invalid_settings_fail_at_construction():
    spec = CausalLMSpec(config=tiny_config())
    for kw, match in ((dict(loss_type="kto"), "loss_type"), (dict(beta=0.0), "beta"),
                      (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
                      (dict(lora=LoraSpec(), reference=spec), "reference")):
        with pytest.raises(ValueError, match=match):
            DPO(model=spec, **kw)


DELTAS = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "dpo", "*.yaml")))


@pytest.mark.parametrize("delta", [None, *DELTAS], ids=lambda p: "base" if p is None else os.path.basename(p))
def test_every_dpo_config_trains_through_the_cli(tmp_path, tiny_export, delta):
    extra = ["--config", delta] if delta else []
    cli = fit_recipe("configs/dpo/arith.yaml", tmp_path, tiny_export, max_steps=2, extra=extra)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "train/rewards/chosen"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert os.path.exists(tmp_path / "ckpt" / "t" / "hf" / "config.json")


@pytest.mark.slow
def test_dpo_reward_accuracy_rises(tmp_path):
    """From a random tiny model, held-out implicit-reward accuracy climbs from chance (0.5 at
    init: policy = reference) to >= 0.8: the policy learns to prefer correct sums."""
    module = DPO(model=CausalLMSpec(config=tiny_config(hidden_size=64, intermediate_size=128), seed=0),
                 optim=OptimSpec(lr=3e-3, warmup_steps=10), beta=0.1, eval_max_new_tokens=0)
    data = PreferenceDataModule(task=ArithTask(digits=1, val_size=20), max_length=16, micro_batch_size=32,
                                eval_batch_size=40)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=150, val_check_interval=150,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["val/rewards/accuracies"] >= 0.8
    assert trainer.callback_metrics["val/rewards/margins"] > 0
