"""Built-in synthetic tasks that run offline through the same data path as real datasets."""

from lit_align.data.tasks.arith import ArithTask
from lit_align.data.tasks.shapes import ShapesTask

TASKS = {"arith": ArithTask, "shapes": ShapesTask}

__all__ = ["ArithTask", "ShapesTask", "TASKS"]
