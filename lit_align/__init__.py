"""lit_align: post-training for language and vision-language models on PyTorch Lightning."""

from lit_align.algorithms import (
    DAPO,
    DPO,
    GRPO,
    GSPO,
    PPO,
    SFT,
    LLaVA,
    LLaVADPO,
    OptimSpec,
    PolicyGradient,
    RewardModel,
)
from lit_align.data import (
    ArithTask,
    ImageInstructionDataModule,
    InstructionDataModule,
    PreferenceDataModule,
    PromptDataModule,
    ShapesTask,
)
from lit_align.data.tasks import ChainTask, ShapesTextTask
from lit_align.models import CausalLMSpec, LoraSpec

__all__ = ["DAPO", "DPO", "GRPO", "GSPO", "PPO", "LLaVA", "LLaVADPO", "ImageInstructionDataModule", "ShapesTask",
           "ShapesTextTask", "PolicyGradient", "SFT", "RewardModel", "OptimSpec", "ArithTask", "InstructionDataModule",
           "PreferenceDataModule", "PromptDataModule",
           "ChainTask", "CausalLMSpec", "LoraSpec"]


def _allow_settings_in_checkpoints() -> None:
    # A module's settings (these dataclasses) are saved in its checkpoints' hyper_parameters;
    # allow-listed, a checkpoint loads with torch.load(weights_only=True), Lightning's default
    import torch

    from lit_align.algorithms.online import RolloutCorrectionSpec
    from lit_align.algorithms.ppo import AdaptiveKL
    from lit_align.models.vision import VisionTowerSpec
    from lit_align.rewards import RewardSpec
    from lit_align.rollout import EngineSpec, SamplingParams

    torch.serialization.add_safe_globals([CausalLMSpec, LoraSpec, OptimSpec, SamplingParams, EngineSpec, RewardSpec,
                                          VisionTowerSpec, AdaptiveKL, RolloutCorrectionSpec, ArithTask, ShapesTask,
                                          ShapesTextTask, ChainTask])


_allow_settings_in_checkpoints()
