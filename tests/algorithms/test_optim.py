"""Optimizer settings: schedule values, warm-up by default, checked settings, one clipping knob."""

import math

import lightning as L
import pytest
import torch

from lit_align import SFT, ArithTask, CausalLMSpec, InstructionDataModule, OptimSpec
from lit_align.algorithms.optim import build_optimizer, lr_factor
from tests.conftest import tiny_config


def test_warmup_then_cosine_to_the_floor():
    # warm-up (s + 1) / (w + 1), then 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    assert lr_factor(0, 4, 14, "cosine", 0.1) == pytest.approx(1 / 5)
    assert lr_factor(3, 4, 14, "cosine", 0.1) == pytest.approx(4 / 5)
    assert lr_factor(4, 4, 14, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 4, 14, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, 4, 14, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 4, 14, "cosine", 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(9, 4, 14, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(9, 4, 14, "constant", 0.0) == 1.0


def test_default_is_adamw_with_warmup_and_cosine_and_no_decay_on_1d_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    spec = OptimSpec(lr=1.0, weight_decay=0.1)
    assert spec.schedule == "cosine" and spec.warmup(1000) == 30
    conf = build_optimizer(spec, model.parameters(), total_steps=1000)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # the Linear weight; its bias and the norm's two
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 31) and lrs[30] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-4)
    assert OptimSpec(warmup_steps=0).warmup(1000) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr=0.0"), (dict(warmup_steps=-1), "warmup_steps=-1"), (dict(warmup_ratio=1.0), "warmup_ratio"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(betas=(0.9, 1.5)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(total_steps=0), "total_steps"), (dict(grad_clip=0.0), "grad_clip"), (dict(schedule="step"), "schedule"),
    (dict(impl="apex"), "impl='apex'"),
])
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimSpec(**kwargs)


def _adamw_run(impl: str, dtype=torch.float32) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).to(dtype)
    x = torch.randn(32, 8, dtype=dtype)
    opt = build_optimizer(OptimSpec(lr=1e-2, weight_decay=0.1, warmup_steps=0, impl=impl), model.parameters(),
                          total_steps=20)["optimizer"]
    for _ in range(20):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().float() for p in model.parameters()]


def test_every_adamw_kernel_takes_the_same_steps_and_auto_is_fused_on_cpu():
    opt, reference = _adamw_run("for-loop")
    assert not opt.defaults["fused"] and not opt.defaults["foreach"]
    for impl in ("foreach", "fused", "auto"):
        opt, params = _adamw_run(impl)
        assert opt.defaults["fused"] == (impl in ("fused", "auto")) and opt.defaults["foreach"] == (impl == "foreach")
        for a, b in zip(params, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # bf16 weights (bf16-true): the fused kernel takes them too
    _, bf16 = _adamw_run("fused", torch.bfloat16)
    _, bf16_loop = _adamw_run("for-loop", torch.bfloat16)
    for a, b in zip(bf16, bf16_loop):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_fused_on_parameters_without_the_kernel_is_refused_by_name():
    with pytest.raises(ValueError, match="'fused' has no kernel for parameters on meta"):
        build_optimizer(OptimSpec(impl="fused"), [torch.nn.Parameter(torch.zeros(2, 2, device="meta"))], 10)
    opt = build_optimizer(OptimSpec(), [torch.nn.Parameter(torch.zeros(2, 2, device="meta"))], 10)["optimizer"]
    assert opt.defaults["foreach"] and not opt.defaults["fused"]  # auto falls back to the multi-tensor kernel


def _fit(tmp_path, grad_clip, trainer_clip=None):
    norms = []

    class Norms(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after clipping and the step
            grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    module = SFT(model=CausalLMSpec(config=tiny_config(), seed=1),
                 optim=OptimSpec(lr=1e-3, warmup_steps=0, grad_clip=grad_clip), eval_max_new_tokens=0)
    data = InstructionDataModule(task=ArithTask(digits=2, train_size=8, val_size=4), max_length=16, micro_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=2,
                        gradient_clip_val=trainer_clip, callbacks=[Norms()], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return norms


def test_optim_grad_clip_clips_automatically_optimised_modules(tmp_path):
    unclipped = _fit(tmp_path, grad_clip=None)
    assert min(unclipped) > 0.05  # a random-init model's first gradients are larger than the clip below
    assert max(_fit(tmp_path, grad_clip=0.05)) == pytest.approx(0.05, rel=1e-4)
    # repeating it is fine
    assert max(_fit(tmp_path, grad_clip=0.05, trainer_clip=0.05)) == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(ValueError, match="gradient_clip_val=0.5 and optim.grad_clip=0.05"):
        _fit(tmp_path, grad_clip=0.05, trainer_clip=0.5)
