"""Built-in synthetic tasks that run offline through the same data path as real datasets."""

from lit_align.data.tasks.arith import ArithTask

TASKS = {"arith": ArithTask}

__all__ = ["ArithTask", "TASKS"]
