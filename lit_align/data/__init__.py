"""Data: sources, formats, chat templates and label masking, batching, built-in tasks."""

from lit_align.data.formats import DataError
from lit_align.data.images import ImageInstructionDataModule
from lit_align.data.instruction import InstructionDataModule
from lit_align.data.preference import PreferenceDataModule
from lit_align.data.prompt import PromptDataModule
from lit_align.data.tasks import ArithTask, ShapesTask

__all__ = ["DataError", "InstructionDataModule", "PreferenceDataModule", "PromptDataModule", "ArithTask",
           "ImageInstructionDataModule", "ShapesTask"]
