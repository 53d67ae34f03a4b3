"""The optimizer-step bookkeeping every module shares: scaling, mini-batches, clipping, metric reduction."""

import math
from types import SimpleNamespace

import pytest
import torch

from lit_align.algorithms.steps import StepMetrics, clip_grad_norm, mini_batch_bounds, step_scale
from lit_align.models import build_tokenizer
from lit_align.rollout import EngineSpec, build_engine
from lit_align.rollout.hf import HFEngine


def test_step_scale_undoes_accumulation_only_for_automatic_modules():
    trainer = SimpleNamespace(world_size=4, global_rank=0, accumulate_grad_batches=3)
    assert step_scale(trainer, automatic=True) == 12
    assert step_scale(trainer, automatic=False) == 4
    assert step_scale(None, automatic=True) == 1


def test_step_scale_counts_data_parallel_replicas_not_tensor_parallel_ranks():
    """4 processes as 2 replicas x 2-way tensor parallelism: gradients average over 2 replicas."""
    from tests.algorithms.test_sharding_settings import _Mesh

    dim = type("Dim", (), {"size": lambda self: 2, "get_local_rank": lambda self: 1})()
    mesh = type("Mesh", (_Mesh,), {"__getitem__": lambda self, name: dim})((2, 2))
    trainer = SimpleNamespace(world_size=4, global_rank=3, accumulate_grad_batches=3,
                              lightning_module=SimpleNamespace(_device_mesh=mesh))
    assert step_scale(trainer, automatic=True) == 6
    from lit_align.distributed import data_parallel

    assert data_parallel(trainer) == (2, 1)


def test_mini_batch_bounds_cover_every_row_once():
    assert mini_batch_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert mini_batch_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _grads(values):
    params = [torch.nn.Parameter(torch.zeros(len(v))) for v in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor(v)
    return params, torch.optim.SGD(params, lr=1.0)


def test_clip_grad_norm_returns_the_norm_before_clipping_and_clips_once():
    params, opt = _grads([[3.0, 0.0], [0.0, 4.0]])  # global norm 5
    norm = clip_grad_norm(opt, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
    params, opt = _grads([[3.0, 0.0], [0.0, 4.0]])
    assert clip_grad_norm(opt, None).item() == pytest.approx(5.0)  # measured, not clipped
    assert params[1].grad.tolist() == [0.0, 4.0]
    params, opt = _grads([[0.3], [0.4]])
    assert clip_grad_norm(opt, 1.0).item() == pytest.approx(0.5) and params[0].grad.item() == pytest.approx(0.3)


def test_step_metrics_reduce_shares_means_extremes_and_per_step_values():
    m = StepMetrics(shares=("loss",), mins=("low",), maxs=("high",))
    # two optimizer steps of two micro-batches each
    for loss, acc, low, high in [(0.25, 0.5, 0.9, 1.1), (0.25, 1.0, 0.8, 1.3), (0.1, 0.0, 0.95, 1.0),
                                 (0.3, 0.5, 1.0, 1.2)]:
        m.add({"loss": torch.tensor(loss), "acc": acc, "low": low, "high": high})
    m.add_step({"grad_norm": 2.0})
    m.add_step({"grad_norm": 4.0})
    out = m.result(world=2)
    # shares sum to each step's value: (0.5 + 0.4) / 2 steps, times the 2 ranks this rank stands for
    assert out["loss"].item() == pytest.approx((0.5 + 0.4) / 2 * 2)
    assert out["acc"].item() == pytest.approx(0.5)
    assert (out["low"].item(), out["high"].item()) == pytest.approx((0.8, 1.3))
    assert out["grad_norm"].item() == 3.0
    assert not math.isnan(out["acc"].item())


def test_engines_are_built_from_a_spec_with_arguments():
    tok = build_tokenizer("byte")
    engine = build_engine(EngineSpec(name="hf"), tok, logprob_batch_size=7)
    assert isinstance(engine, HFEngine) and engine.logprob_batch_size == 7
    assert isinstance(build_engine("hf", tok), HFEngine)
    with pytest.raises(ValueError, match="bad args"):
        build_engine(EngineSpec(name="hf", args={"no_such_setting": 1}), tok)
    with pytest.raises(ValueError, match="set by the module"):
        build_engine(EngineSpec(name="hf", args={"logprob_batch_size": 3}), tok)
