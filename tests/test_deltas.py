"""Strategy and precision deltas (configs/strategy/, configs/precision/) composed with a recipe:
what Lightning instantiates from each, and the start-up refusal of those this CPU machine
cannot run (FSDP1, DeepSpeed, float16), raised before any module is built."""

import glob
import os

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_align import SFT
from lit_align.train import AlignCLI, main
from tests.conftest import REPO

RECIPE = os.path.join(REPO, "configs", "sft", "arith.yaml")
CONFIGS = os.path.join(REPO, "configs")


def _delta(kind: str, name: str) -> str:
    return os.path.join(CONFIGS, kind, f"{name}.yaml")


def test_every_precision_delta_is_tested():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "precision", "*.yaml"))) == \
        ["16-mixed.yaml", "32-true.yaml", "bf16-mixed.yaml", "bf16-true.yaml"]


@pytest.mark.parametrize("name, plugin, dtype", [("bf16-mixed", MixedPrecision, torch.bfloat16),
                                                  ("bf16-true", HalfPrecision, torch.bfloat16),
                                                  ("32-true", Precision, None)])
def test_cpu_precision_deltas_build_their_plugin(name, plugin, dtype):
    cli = main(["--config", RECIPE, "--config", _delta("precision", name)], run=False)
    assert cli.trainer.precision == name and type(cli.trainer.precision_plugin) is plugin
    if plugin is MixedPrecision:
        assert cli.trainer.precision_plugin.device == "cpu"
        with cli.trainer.precision_plugin.forward_context():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    if plugin is HalfPrecision:
        assert cli.trainer.precision_plugin._desired_input_dtype == dtype
    assert cli.trainer.max_steps == 1500  # the recipe's own settings stay


def test_strategy_and_precision_deltas_compose():
    cli = main(["--config", RECIPE, "--config", _delta("strategy", "fsdp2"),
                "--config", _delta("precision", "bf16-true"), "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy) and cli.trainer.num_devices == 2
    assert cli.trainer.precision == "bf16-true"


class _ParseOnly(AlignCLI):
    """Parses a config without the start-up check and without building anything."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_deltas_build_a_zero_strategy(stage, monkeypatch):
    """Lightning's DeepSpeedStrategy builds its ZeRO config before it touches deepspeed (only to set
    its log level); with the package stubbed (it is not installed on this CPU machine) the delta
    instantiates."""
    import logging
    import sys
    import types

    import lightning.pytorch.strategies.deepspeed as ds

    stub = types.SimpleNamespace(utils=types.SimpleNamespace(logging=types.SimpleNamespace(
        logger=logging.getLogger("deepspeed-stub"))))
    monkeypatch.setitem(sys.modules, "deepspeed", stub)

    cli = _ParseOnly(args=["--config", RECIPE, "--config", _delta("strategy", f"deepspeed_zero{stage}")], run=False)
    trainer = cli.config.trainer
    assert (trainer.accelerator, trainer.devices, trainer.max_steps) == ("gpu", 2, 1500)
    assert trainer.strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    monkeypatch.setattr(ds, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(ds, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    # jsonargparse imports the class's module chain to instantiate it: build it from the parsed arguments
    strategy = ds.DeepSpeedStrategy(**trainer.strategy.init_args.as_dict())
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    if stage == 3:
        assert "offload_optimizer" not in zero and "offload_param" not in zero
    else:
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000


@pytest.mark.parametrize("delta, message", [
    (("strategy", "fsdp"), r"trainer\.strategy: FSDPStrategy \(fsdp\) runs on CUDA GPUs only"),
    (("strategy", "deepspeed_zero2"), r"trainer\.strategy: DeepSpeedStrategy needs the `deepspeed` package"),
    (("strategy", "deepspeed_zero3"), r"trainer\.strategy: DeepSpeedStrategy needs the `deepspeed` package"),
    (("precision", "16-mixed"), r"trainer\.precision: '16-mixed' \(float16\) runs on CUDA GPUs only"),
])
def test_gpu_only_deltas_are_refused_on_cpu_before_the_module_is_built(delta, message, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    built = []
    monkeypatch.setattr(SFT, "__init__", lambda self, **kw: built.append(kw) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match=message):
        main(["--config", RECIPE, "--config", _delta(*delta)], run=False)
    assert built == []


def test_deepspeed_on_cpu_is_refused_by_name_once_installed(monkeypatch):
    """With deepspeed importable, the CPU refusal names DeepSpeedStrategy (not Lightning's accelerator error)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r"DeepSpeedStrategy \(deepspeed\) runs on CUDA GPUs only.*fsdp2\.yaml"):
        main(["--config", RECIPE, "--config", _delta("strategy", "deepspeed_zero3"), "--trainer.accelerator", "cpu"],
             run=False)


@pytest.mark.parametrize("trainer, refused", [
    ({"strategy": "fsdp", "accelerator": "cpu"}, "FSDPStrategy"),
    ({"strategy": "fsdp_cpu_offload", "accelerator": "auto"}, "FSDPStrategy"),
    ({"strategy": {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "accelerator": "cpu"}, "FSDPStrategy"),
    ({"strategy": "deepspeed_stage_3_offload"}, "DeepSpeedStrategy"),
    ({"precision": 16, "accelerator": "cpu"}, "precision: 16"),
    ({"strategy": "ddp", "accelerator": "cpu", "precision": "bf16-true"}, None),
    ({"strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "accelerator": "cpu"}, None),
    ({"strategy": "ddp_spawn", "precision": "16-true", "accelerator": "cpu"}, None),
])
def test_check_trainer_names_what_this_machine_cannot_run(trainer, refused):
    from lit_align.hardware import check_trainer

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if refused is None:
        check_trainer(trainer)
    else:
        with pytest.raises(ValueError, match=refused):
            check_trainer(trainer)
