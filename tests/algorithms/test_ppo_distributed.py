"""Strategy deltas (configs/strategy/*.yaml) composed with the PPO recipe, and PPO trained on
2 CPU processes (gloo) under DDP and FSDP2 through the CLI."""

import glob
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from transformers import AutoModelForCausalLM

from lit_align.train import AlignCLI, main
from tests.conftest import REPO

RECIPE = os.path.join(REPO, "configs", "ppo", "arith_rule.yaml")
STRATEGIES = os.path.join(REPO, "configs", "strategy")


def test_every_strategy_delta_is_tested():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(STRATEGIES, "*.yaml"))) == \
        ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml", "fsdp2.yaml"]


def test_ddp_delta_builds_a_two_device_ddp_trainer(tiny_export):
    cli = main(["--config", RECIPE, "--config", os.path.join(STRATEGIES, "ddp.yaml"), "--trainer.accelerator", "cpu",
                "--model.init_args.model.pretrained", tiny_export], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy) and type(cli.trainer.strategy) is DDPStrategy
    assert cli.trainer.num_devices == 2 and cli.trainer.num_nodes == 1
    assert cli.trainer.max_steps == 1600  # the recipe's own settings stay


def test_fsdp2_delta_builds_a_data_parallel_model_parallel_strategy(tiny_export):
    cli = main(["--config", RECIPE, "--config", os.path.join(STRATEGIES, "fsdp2.yaml"), "--trainer.accelerator", "cpu",
                "--model.init_args.model.pretrained", tiny_export], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    assert cli.trainer.num_devices == 2 and cli.trainer.fit_loop.epoch_loop.val_loop.inference_mode is False


class _ParseOnly(AlignCLI):
    """Parses and validates a config without building the trainer (FSDP1 needs CUDA to build one,
    and the start-up check refuses it here)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def test_fsdp_delta_parses_to_a_gpu_fsdp_strategy(tiny_export):
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cli = _ParseOnly(args=["--config", RECIPE, "--config", os.path.join(STRATEGIES, "fsdp.yaml"),
                           "--model.init_args.model.pretrained", tiny_export], run=False)
    trainer = cli.config.trainer
    assert (trainer.accelerator, trainer.devices, trainer.max_steps) == ("gpu", 2, 1600)
    assert trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    strategy = cli.parser.instantiate(cli.config).trainer.strategy
    assert type(strategy) is FSDPStrategy
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and LlamaDecoderLayer in policy._module_classes


# -- 2 processes -------------------------------------------------------------------------------
class RankRecord(L.Callback):
    """Writes, per rank, the prompts it trained on, whether each model is sharded, the full
    weights at the end of fit (gathered: collective under FSDP2) and the final metrics."""

    def __init__(self, directory: str):
        self.directory = directory
        self.prompts: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts.append(list(batch["prompts"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        def full(model):
            return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                    for k, v in model.state_dict().items()}

        record = {
            "prompts": self.prompts, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "sharded": {name: any(hasattr(p, "full_tensor") for p in getattr(pl_module, name).parameters())
                        for name in ("model", "critic", "ref_model")},
            "model": full(pl_module.model), "critic": full(pl_module.critic), "kl_coef": float(pl_module.kl_coef),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        os.makedirs(self.directory, exist_ok=True)
        torch.save(record, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def _run(strategy, tmp_path, tiny_export):
    record = tmp_path / "record"
    callbacks = (f"[{{class_path: tests.algorithms.test_ppo_distributed.RankRecord, "
                 f"init_args: {{directory: {record}}}}}]")
    cmd = [sys.executable, "-m", "lit_align.train", "fit", "--config", RECIPE,
           "--config", os.path.join(STRATEGIES, f"{strategy}.yaml"), "--trainer.accelerator", "cpu",
           "--model.init_args.model.pretrained", tiny_export,
           # 2 optimizer steps per rollout (actor + critic, one epoch of one mini-batch): 2 rollouts
           "--trainer.max_steps", "4", "--model.init_args.ppo_epochs", "1", "--model.init_args.mini_batches", "1",
           "--model.init_args.optim.lr", "1e-3", "--trainer.val_check_interval", "2",
           "--data.init_args.task.val_size", "4", "--data.init_args.eval_batch_size", "2",
           "--data.init_args.micro_batch_size", "4", "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks", callbacks,
           "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "t"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [torch.load(record / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ppo_trains_on_two_cpu_processes(strategy, tmp_path, tiny_export):
    """PPO from the recipe on 2 gloo ranks: each rank trains on its own prompts, the replicas
    (or the gathered shards) agree at the end, the weights moved, and the HF export loads."""
    ranks = _run(strategy, tmp_path, tiny_export)
    for r in ranks:
        assert r["world_size"] == 2 and r["global_step"] == 4 and len(r["prompts"]) == 2
        # FSDP2 shards every model (the frozen reference too); DDP replicates them
        assert r["sharded"] == dict.fromkeys(("model", "critic", "ref_model"), strategy == "fsdp2")
    assert not set(ranks[0]["prompts"][0]) & set(ranks[1]["prompts"][0])  # data parallel: different prompts
    for name in ("model", "critic"):
        for k, v in ranks[0][name].items():
            torch.testing.assert_close(ranks[1][name][k], v, rtol=0, atol=0, msg=f"{name}.{k}")
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"] == pytest.approx(0.02)
    metrics = ranks[0]["metrics"]
    for key in ("train/score", "train/kl", "train/value/loss", "train/explained_variance", "val/exact_match"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "t" / "hf")
    initial = AutoModelForCausalLM.from_pretrained(tiny_export).state_dict()
    exported = hf.state_dict()
    assert exported.keys() == initial.keys()
    moved = [k for k in initial if not torch.equal(exported[k], initial[k])]
    assert len(moved) >= len(initial) // 2, moved
    for k, v in exported.items():  # the export is the trained actor
        torch.testing.assert_close(v, ranks[0]["model"][k], rtol=0, atol=0, msg=k)
