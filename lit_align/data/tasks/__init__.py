"""Built-in synthetic tasks that run offline through the same data path as real datasets."""

from lit_align.data.tasks.arith import ArithTask
from lit_align.data.tasks.chain import ChainTask
from lit_align.data.tasks.shapes import ShapesTask
from lit_align.data.tasks.shapes_text import ShapesTextTask

TASKS = {"arith": ArithTask, "chain": ChainTask, "shapes": ShapesTask, "shapes_text": ShapesTextTask}

__all__ = ["ArithTask", "ChainTask", "ShapesTask", "ShapesTextTask", "TASKS"]
