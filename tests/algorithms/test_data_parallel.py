"""One process vs two (gloo, CPU): SFT's step token mean is global, so a 2-rank DDP or FSDP2
run ends at the weights of a 1-process run that accumulates the same micro-batches; the
reward model shards under FSDP2 like the policy does."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from lit_align.train import main
from tests.conftest import REPO, write_tiny_export

STRATEGIES = os.path.join(REPO, "configs", "strategy")
# 3 optimizer steps of 2 micro-batches of 4 rows: 2-digit sums have 2 or 3 answer digits, so
# micro-batches hold different label counts and a mean of per-rank means would differ
SMALL = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--data.init_args.micro_batch_size", "4",
         "--data.init_args.task.train_size", "64", "--data.init_args.task.val_size", "4",
         "--model.init_args.optim.warmup_steps", "0", "--model.init_args.optim.lr", "1e-2",
         "--trainer.enable_progress_bar", "false", "--export_hf", "false"]


class FullWeights(L.Callback):
    """Writes, per rank, the policy's full weights at the end of fit (gathered: collective under
    FSDP2), whether they were sharded, and the number of label tokens each step saw."""

    def __init__(self, directory: str):
        self.directory = directory
        self.step_tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_tokens.append(int(batch["num_label_tokens_step"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                 for k, v in pl_module.model.state_dict().items()}
        sharded = any(hasattr(p, "full_tensor") for p in pl_module.model.parameters())
        os.makedirs(self.directory, exist_ok=True)
        torch.save({"state": state, "sharded": sharded, "step_tokens": self.step_tokens,
                    "world_size": trainer.world_size}, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def _callbacks(directory) -> list[str]:
    return ["--trainer.callbacks",
            f"[{{class_path: tests.algorithms.test_data_parallel.FullWeights, init_args: {{directory: {directory}}}}}]"]


def _two_processes(recipe: str, strategy: str, tmp_path, extra=()) -> list[dict]:
    record = tmp_path / strategy
    cmd = [sys.executable, "-m", "lit_align.train", "fit", "--config", os.path.join(REPO, recipe),
           "--config", os.path.join(STRATEGIES, f"{strategy}.yaml"), "--trainer.accelerator", "cpu", *SMALL, *extra,
           *_callbacks(record), "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"),
           "--name", strategy]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [torch.load(record / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("one")
    main(["fit", "--config", os.path.join(REPO, "configs", "sft", "arith.yaml"), *SMALL,
          "--trainer.accumulate_grad_batches", "2", *_callbacks(tmp / "record"), "--logs_dir", str(tmp / "logs"),
          "--checkpoints_dir", str(tmp / "ckpt"), "--name", "one"])
    return torch.load(tmp / "record" / "rank0.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_on_two_processes_equals_one_process_accumulating(strategy, tmp_path, one_process):
    ranks = _two_processes("configs/sft/arith.yaml", strategy, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["sharded"] for r in ranks] == [strategy == "fsdp2"] * 2
    # each rank normalises by the label tokens of the whole step, both ranks' micro-batches included
    assert ranks[0]["step_tokens"] == ranks[1]["step_tokens"] == one_process["step_tokens"][::2]
    assert len(set(one_process["step_tokens"])) > 1
    for name, want in one_process["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], want, rtol=1e-4, atol=1e-5, msg=name)
    # the comparison is between trained weights, not two copies of the initialisation
    assert _moved_from_init(one_process["state"])


def _moved_from_init(state: dict) -> bool:
    """Whether 3 steps at lr 1e-2 moved every attention projection away from the seeded initialisation."""
    import yaml

    from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer

    with open(os.path.join(REPO, "configs", "sft", "arith.yaml")) as f:
        config = yaml.safe_load(f)["model"]["init_args"]["model"]["config"]
    initial = build_causal_lm(CausalLMSpec(config=config), build_tokenizer("byte")).state_dict()
    return all(not torch.equal(initial[k], state[k]) for k in initial if k.endswith("q_proj.weight"))


@pytest.mark.slow
def test_reward_model_shards_under_fsdp2(tmp_path):
    sft = write_tiny_export(tmp_path / "sft")
    ranks = _two_processes("configs/rm/arith.yaml", "fsdp2", tmp_path,
                           ["--model.init_args.model.pretrained", sft])
    assert [r["sharded"] for r in ranks] == [True, True]
    for name, v in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], v, rtol=0, atol=0, msg=name)
