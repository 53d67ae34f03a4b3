"""Evaluation: metrics and generation-based checks."""

from lit_align.evaluation.metrics import ExactMatch

__all__ = ["ExactMatch"]
