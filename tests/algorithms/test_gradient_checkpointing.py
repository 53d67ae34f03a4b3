"""Gradient checkpointing (``model.gradient_checkpointing``) in every module: one training step
with it gives the same losses and gradients as without, and it was active, on every model that
trains (the policy, the PPO critic, the LLaVA language model; LoRA too): each decoder layer
that ran with gradients ran a second time in the backward. Rollouts sampled from a checkpointed
policy are the same and still use the KV cache."""

import dataclasses
import os

import lightning as L
import pytest
import torch

from lit_align import DPO, PPO, SFT, InstructionDataModule, PreferenceDataModule, RewardModel
from lit_align.algorithms.llava import LLaVA, LLaVADPO
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.models import CausalLMSpec, LoraSpec
from lit_align.rewards import RewardSpec
from tests.algorithms.test_precision import ARITH, OPTIM, RL, TOWER, _shapes
from tests.conftest import arith_prompts, sample_rollout, tiny_config

SPEC = CausalLMSpec(config=tiny_config(), seed=1)
ADAPTER = LoraSpec(r=4, alpha=8)
# rewards that differ within every group (the random tiny policy scores 0 on arith): advantages != 0
VARIED = dict(RL, num_generations=4,
              rewards=[RewardSpec("tests.algorithms.test_policy_gradient:fixed_reward", label="fixed")])
PREF = dict(ARITH, group_by_length=False)

PPO_ARGS = dict(optim=OPTIM, critic_optim=OPTIM, ppo_epochs=1, mini_batches=1)


def _rm_reward(rm) -> dict:
    return {**RL, "rewards": [RewardSpec("reward_model", args={"path": rm()})]}


#: module (from its policy spec, and ``rm()``: a reward-model export), data module, the attributes
#: holding the models that train
CASES = {
    "sft": (lambda spec, rm: SFT(model=spec, optim=OPTIM, eval_max_new_tokens=0),
            lambda: InstructionDataModule(**ARITH), ("model",)),
    "sft_lora": (lambda spec, rm: SFT(model=spec, optim=OPTIM, eval_max_new_tokens=0, lora=ADAPTER),
                 lambda: InstructionDataModule(**ARITH), ("model",)),
    "rm": (lambda spec, rm: RewardModel(model=spec, optim=OPTIM), lambda: PreferenceDataModule(**PREF), ("model",)),
    "dpo": (lambda spec, rm: DPO(model=spec, optim=OPTIM, eval_max_new_tokens=0),
            lambda: PreferenceDataModule(**PREF), ("model",)),
    # the HF engine samples the rollout: generation from the checkpointed policy is part of the step
    "grpo": (lambda spec, rm: PolicyGradient(model=spec, optim=OPTIM, **VARIED, beta=0.05),
             lambda: arith_prompts(2, 8), ("model",)),
    "grpo_lora": (lambda spec, rm: PolicyGradient(model=spec, optim=OPTIM, **VARIED, beta=0.05, lora=ADAPTER),
                  lambda: arith_prompts(2, 8), ("model",)),
    "ppo": (lambda spec, rm: PPO(model=spec, **RL, **PPO_ARGS, beta=0.05), lambda: arith_prompts(2, 8),
            ("model", "critic")),
    # the critic loaded from the reward model's export (no spec of its own): the actor's setting
    "ppo_rm_critic": (lambda spec, rm: PPO(model=spec, **_rm_reward(rm), **PPO_ARGS, beta=0.0),
                      lambda: arith_prompts(2, 8), ("model", "critic")),
    "llava": (lambda spec, rm: LLaVA(model=spec, vision_tower=TOWER, optim=OPTIM, eval_max_new_tokens=0),
              lambda: _shapes("instruction"), ("model",)),
    "llava_dpo": (lambda spec, rm: LLaVADPO(model=spec, vision_tower=TOWER, optim=OPTIM, eval_max_new_tokens=0),
                  lambda: _shapes("preference"), ("model",)),
}


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _log_calls(module: torch.nn.Module, log: list[bool]) -> None:
    """Append ``torch.is_grad_enabled()`` to ``log`` at every call of ``module.forward``. A
    wrapper, not a forward hook: the recompute in the backward does not run module hooks."""
    forward = module.forward

    def logged(*args, **kwargs):
        log.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    module.forward = logged


def _dense(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()  # FSDP2: a DTensor


class _Record(L.Callback):
    """The gradients at every optimizer step (by parameter name), the logged losses, and per
    trained model the ``torch.is_grad_enabled()`` of every decoder-layer MLP call."""

    def __init__(self, trained: tuple[str, ...]):
        self.trained = trained
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: dict[str, float] = {}
        self.calls: dict[str, list[bool]] = {name: [] for name in trained}

    def on_fit_start(self, trainer, pl_module):  # the models are built (and sharded) by now
        for name in self.trained:
            for layer in _decoder_layers(getattr(pl_module, name)):
                _log_calls(layer.mlp, self.calls[name])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: _dense(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses = {k: float(v) for k, v in trainer.callback_metrics.items() if "loss" in k}


def _step(case: str, checkpointing: bool, tmp_path, rm, strategy="auto"):
    """One optimizer step of ``case``: the recorder and the module."""
    make_module, make_data, trained = CASES[case]
    L.seed_everything(0, verbose=False)
    module = make_module(dataclasses.replace(SPEC, gradient_checkpointing=checkpointing), rm)
    record = _Record(trained)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[record])
    trainer.fit(module, datamodule=make_data())
    return record, module


def _compare(case: str, tmp_path, rm, strategy=lambda: "auto"):
    """Checkpointing on gives the losses and gradients of checkpointing off, and was active."""
    plain, plain_module = _step(case, False, tmp_path, rm, strategy())
    ckpt, module = _step(case, True, tmp_path, rm, strategy())
    for name in CASES[case][2]:
        layers = _decoder_layers(getattr(module, name))
        assert layers and all(layer.gradient_checkpointing for layer in layers), name
        assert not any(layer.gradient_checkpointing for layer in _decoder_layers(getattr(plain_module, name)))
        # every layer forward with gradients ran again in the backward (recomputed), the others once
        with_grad = sum(plain.calls[name])
        assert with_grad > 0, name
        assert len(ckpt.calls[name]) == len(plain.calls[name]) + with_grad, name
    assert plain.losses and plain.losses.keys() == ckpt.losses.keys()
    for key, value in plain.losses.items():
        assert ckpt.losses[key] == pytest.approx(value, abs=1e-5), key
    assert len(plain.grads) == len(ckpt.grads) >= 1
    for a, b in zip(plain.grads, ckpt.grads):
        assert a.keys() == b.keys() and a
        for n in a:
            torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{case} {n}: {m}")
    return module


@pytest.mark.parametrize("case", list(CASES))
def test_same_loss_and_gradients_with_checkpointing_and_it_is_active(case, tmp_path, request):
    _compare(case, tmp_path, lambda: request.getfixturevalue("tiny_reward_export"))


@pytest.fixture
def single_process_group():
    """Lightning's process group (one rank, gloo) and environment, removed afterwards so that
    later tests in this process see no distributed run."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.parametrize("case", ["sft", "grpo"])
def test_fsdp2_same_loss_and_gradients_with_checkpointing(case, tmp_path, single_process_group):
    # one rank: the decoder layers and the root are fully_shard units (DTensor parameters, the
    # unshard / reshard hooks around each layer), and the recompute runs inside those hooks
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule

    module = _compare(case, tmp_path, None, lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    assert isinstance(module.model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in _decoder_layers(module.model))


def test_rollouts_from_a_checkpointed_policy_use_the_kv_cache_and_match():
    prompts, n, new = 4, 4, 4
    lengths = {}
    rollouts = {}
    for checkpointing in (False, True):
        module = PolicyGradient(model=dataclasses.replace(SPEC, gradient_checkpointing=checkpointing), optim=OPTIM,
                                **RL)
        module.configure_model()
        module.model.train()  # as during training: generation switches to eval mode itself
        seen = lengths[checkpointing] = []
        _decoder_layers(module.model)[0].register_forward_hook(lambda mod, args, kw, out, seen=seen: seen.append(
            (args[0] if args else kw["hidden_states"]).shape[1]), with_kwargs=True)
        rollouts[checkpointing] = sample_rollout(module, prompts, n)
        assert module.model.training
    assert lengths[True] == lengths[False]
    # generate: one prefill over the prompts, then one token per forward (the cache holds the rest);
    # the training forward that scores the samples comes after
    prefill = lengths[True][0]
    assert prefill > 1 and lengths[True][1:new] == [1] * (new - 1)
    assert torch.equal(rollouts[True].completion_ids, rollouts[False].completion_ids)
    torch.testing.assert_close(rollouts[True].logprobs, rollouts[False].logprobs, atol=1e-6, rtol=0)
