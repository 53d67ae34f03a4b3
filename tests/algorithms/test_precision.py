"""Every module fits a couple of steps under bf16-mixed and bf16-true on CPU: the frozen models
(reference, critic, vision tower) follow the precision of the policy, and the log-probs, losses
and advantages the modules compute are float32 whatever the weights are."""

import functools

import lightning as L
import pytest
import torch

from lit_align import (
    DPO,
    PPO,
    SFT,
    ArithTask,
    CausalLMSpec,
    ImageInstructionDataModule,
    InstructionDataModule,
    OptimSpec,
    PreferenceDataModule,
    RewardModel,
    ShapesTask,
)
from lit_align.algorithms import base, dpo, policy_gradient, ppo, reward_model, sft
from lit_align.algorithms.llava import LLaVA, LLaVADPO
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.losses import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from lit_align.models.vision import VisionTowerSpec
from lit_align.rewards import RewardSpec
from lit_align.rollout import SamplingParams, hf
from tests.conftest import arith_prompts, tiny_config

OPTIM = OptimSpec(lr=1e-3, warmup_steps=0, schedule="constant")
TOWER = VisionTowerSpec(library="timm", name="vit_tiny_patch16_224",
                        kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
LM = dict(model=CausalLMSpec(config=tiny_config(), seed=1), optim=OPTIM)
RL = dict(rewards=[RewardSpec("arith_match")], sampling=SamplingParams(max_new_tokens=4, temperature=1.0),
          num_generations=2, eval_max_new_tokens=0)
ARITH = dict(task=ArithTask(digits=2, train_size=8, val_size=4), max_length=16, micro_batch_size=4, eval_batch_size=4)


def _shapes(kind):
    return ImageInstructionDataModule(task=ShapesTask(train_size=8, val_size=4), kind=kind, max_length=160,
                                      micro_batch_size=2, eval_batch_size=2)


#: module, data module, the frozen models to check, the float32 quantities it must compute
CASES = {
    "sft": (lambda: SFT(**LM, eval_max_new_tokens=0), lambda: InstructionDataModule(**ARITH), (),
            {"token_logprobs", "aggregate_loss"}),
    "rm": (lambda: RewardModel(**LM), lambda: PreferenceDataModule(**ARITH, group_by_length=False), (),
           {"bradley_terry_loss"}),
    "dpo": (lambda: DPO(**LM, eval_max_new_tokens=0), lambda: PreferenceDataModule(**ARITH, group_by_length=False),
            ("ref_model",), {"token_logprobs", "preference_loss"}),
    "grpo": (lambda: PolicyGradient(**LM, **RL, beta=0.05), lambda: arith_prompts(2, 8), ("ref_model",),
             {"rollout_logprobs", "advantages", "policy_loss", "aggregate_loss"}),
    "ppo": (lambda: PPO(**LM, **RL, critic_optim=OPTIM, beta=0.05, ppo_epochs=1, mini_batches=1),
            lambda: arith_prompts(2, 8), ("ref_model", "critic"), {"rollout_logprobs", "gae", "policy_loss"}),
    "llava": (lambda: LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, optim=OPTIM,
                            eval_max_new_tokens=0), lambda: _shapes("instruction"), ("model.vision_tower",),
              {"token_logprobs", "aggregate_loss"}),
    "llava_dpo": (lambda: LLaVADPO(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, optim=OPTIM,
                                   eval_max_new_tokens=0), lambda: _shapes("preference"),
                  ("ref_model", "model.vision_tower"), {"token_logprobs", "preference_loss"}),
}


def _spy(monkeypatch, records: list):
    """Wrap the functions the modules compute log-probs, losses and advantages with, recording the
    floating dtypes of what each returns."""
    def wrap(name, fn):
        @functools.wraps(fn)  # keeps the attributes a module reads off a registered function
        def spied(*args, **kwargs):
            out = fn(*args, **kwargs)
            flat = out if isinstance(out, tuple) else (out,)
            records.append((name, {t.dtype for t in flat if torch.is_tensor(t) and t.is_floating_point()}))
            return out
        return spied

    monkeypatch.setattr(base, "token_logprobs", wrap("token_logprobs", base.token_logprobs))
    monkeypatch.setattr(hf, "token_logprobs", wrap("rollout_logprobs", hf.token_logprobs))
    for module in (sft, policy_gradient):
        monkeypatch.setattr(module, "aggregate_loss", wrap("aggregate_loss", module.aggregate_loss))
    monkeypatch.setattr(reward_model, "bradley_terry_loss", wrap("bradley_terry_loss", reward_model.bradley_terry_loss))
    monkeypatch.setattr(ppo, "gae", wrap("gae", ppo.gae))
    monkeypatch.setattr(dpo, "dpo_loss", wrap("preference_loss", dpo.dpo_loss))
    for key, fn in list(ADVANTAGE_ESTIMATORS.items()):
        monkeypatch.setitem(ADVANTAGE_ESTIMATORS, key, wrap("advantages", fn))
    for key, fn in list(POLICY_LOSSES.items()):
        monkeypatch.setitem(POLICY_LOSSES, key, wrap("policy_loss", fn))
    return wrap


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_module_fits_in_bf16_with_float32_math(case, precision, tmp_path, monkeypatch):
    make_module, make_data, frozen, computed = CASES[case]
    records = []
    _spy(monkeypatch, records)
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=make_data())
    assert trainer.global_step >= 2
    weights = torch.bfloat16 if precision == "bf16-true" else torch.float32
    lm = module.model.language_model if hasattr(module.model, "language_model") else module.model
    assert {p.dtype for p in lm.parameters()} == {weights}
    for name in frozen:
        assert {p.dtype for p in _get(module, name).parameters()} == {weights}, name
    assert computed <= {name for name, _ in records}, records
    wrong = [(name, dtypes) for name, dtypes in records if dtypes - {torch.float32}]
    assert not wrong, wrong
    for p in lm.parameters():
        if p.requires_grad:
            assert torch.isfinite(p.float()).all()
