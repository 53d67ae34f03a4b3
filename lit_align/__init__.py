"""lit_align: post-training for language and vision-language models on PyTorch Lightning."""

from lit_align.algorithms import DPO, SFT, OptimSpec, RewardModel
from lit_align.data import ArithTask, InstructionDataModule, PreferenceDataModule
from lit_align.models import CausalLMSpec, LoraSpec

__all__ = ["DPO", "SFT", "RewardModel", "OptimSpec", "ArithTask", "InstructionDataModule", "PreferenceDataModule",
           "CausalLMSpec", "LoraSpec"]
