"""Held-out exact match, overall and per group."""

import pytest
import torch

from lit_align.evaluation import ExactMatch, GroupedExactMatch


def test_grouped_exact_match_counts_each_group_and_skips_empty_ones():
    m = GroupedExactMatch(["color", "count", "unanswerable"])
    m.update([True, False, True], ["color", "color", "unanswerable"])
    m.update([False, False], ["unanswerable", "color"])
    got = m.compute()
    assert set(got) == {"color", "unanswerable"}  # no count rows: no figure, rather than 0
    assert got["color"].item() == pytest.approx(1 / 3)
    assert got["unanswerable"].item() == pytest.approx(0.5)
    overall = ExactMatch()
    overall.update([True, False, True, False, False])
    # the groups weighted by their row counts give back the overall figure
    assert (got["color"] * 3 + got["unanswerable"] * 2).item() / 5 == pytest.approx(overall.compute().item())
    m.reset()
    assert torch.equal(m.total, torch.zeros(3))


def test_grouped_exact_match_rejects_unknown_groups_and_mismatched_lengths():
    m = GroupedExactMatch(["a", "b"])
    with pytest.raises(ValueError, match=r"\['c'\] are not among \['a', 'b'\]"):
        m.update([True], ["c"])
    with pytest.raises(ValueError, match="2 results for 1 group names"):
        m.update([True, False], ["a"])
