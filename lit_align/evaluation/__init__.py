"""Evaluation: metrics and generation-based checks."""

from lit_align.evaluation.metrics import ExactMatch, GroupedExactMatch

__all__ = ["ExactMatch", "GroupedExactMatch"]
