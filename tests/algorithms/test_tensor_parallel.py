"""Tensor parallelism: ModelParallelStrategy with ``data_parallel_size 1, tensor_parallel_size 2``
on 2 CPU processes (gloo), both ranks one data-parallel replica whose decoder layers are split
by :data:`lit_align.models.parallel.TP_PLAN`. SFT, DPO (frozen reference split the same way) and
the reward model each take the steps of one process on the same rows, and the HF export from rank
0 holds the full (gathered) weights."""

import os
import subprocess
import sys

import pytest
import torch

from tests.algorithms.test_strategies import _check_export, _initial, _moved, _one_process, _ranks
from tests.conftest import REPO, free_port

CASES = ["sft", "dpo", "rm"]
# the split layers sum partial products in another order (all-reduce of two halves)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _linear_adam() -> None:
    """Every case trains with Adam's eps far above |grad| (both sides): the update is then about
    lr x gradient, so float32 noise in a gradient near 0 stays noise-sized, where the default eps
    would turn it into a step of +-lr (Adam divides by the gradient's own scale)."""
    from tests.algorithms import test_strategies

    test_strategies.ADAM = test_strategies.SCALED_ADAM


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), "-m", "tests.algorithms.test_tensor_parallel", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_equals_one_process(case, tensor_parallel, tmp_path, monkeypatch):
    from tests.algorithms import test_strategies

    monkeypatch.setattr(test_strategies, "ADAM", test_strategies.ADAM)  # restored after the test
    _linear_adam()
    single = _one_process(case, tmp_path)
    start = _initial(case)
    assert _moved(start["policy"], single["state"])
    ranks = _ranks(tensor_parallel / f"{case}-tp")
    for r in ranks:
        assert r["world_size"] == 2 and r["global_step"] == single["global_step"] and r["sharded"]
        assert r["state"].keys() == single["state"].keys()
        for metric in ("train/loss", "train/grad_norm"):
            assert r["metrics"][metric] == pytest.approx(single["metrics"][metric], rel=2e-5), metric
        for name, want in single["state"].items():
            torch.testing.assert_close(r["state"][name], want, **TOLERANCE, msg=f"{case} tp {name}")
        if "reference" in start:  # frozen, split too, still the initial policy once gathered
            assert r["parts_sharded"]["reference"]
            for k, v in start["reference"].items():
                torch.testing.assert_close(r["parts"]["reference"][k], v, rtol=0, atol=0, msg=f"{case} ref {k}")
    _check_export(case, tensor_parallel / f"{case}-tp", ranks[0]["state"])


def test_split_layers_hold_half_of_each_projection():
    """The plan: q/k/v/gate/up split by output features, o/down by input features."""
    from lit_align.models.parallel import TP_PLAN

    assert {k for k, v in TP_PLAN.items() if v == "colwise"} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert {k for k, v in TP_PLAN.items() if v == "rowwise"} == {"self_attn.o_proj", "mlp.down_proj"}


if __name__ == "__main__":  # torchrun --nproc_per_node 2 -m tests.algorithms.test_tensor_parallel <directory>
    from tests.algorithms.test_strategies import run_case

    torch.set_num_threads(1)
    _linear_adam()
    for case in CASES:
        run_case(case, "tp", os.path.join(sys.argv[1], f"{case}-tp"))
