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
from lit_align.data.tasks import ShapesTextTask
from lit_align.models import CausalLMSpec, LoraSpec

__all__ = ["DAPO", "DPO", "GRPO", "GSPO", "PPO", "LLaVA", "LLaVADPO", "ImageInstructionDataModule", "ShapesTask",
           "ShapesTextTask", "PolicyGradient", "SFT", "RewardModel", "OptimSpec", "ArithTask", "InstructionDataModule",
           "PreferenceDataModule", "PromptDataModule",
           "CausalLMSpec", "LoraSpec"]
