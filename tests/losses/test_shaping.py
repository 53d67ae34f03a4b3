"""overlong_penalty: DAPO soft overlong punishment."""

import pytest
import torch

from lit_align.losses import overlong_penalty


def test_band_values():
    # max_len 20, cache 4: 0 up to 16, linear to -1 at 20, -1 beyond
    out = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    assert out.dtype.is_floating_point
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_inside_band_is_linear():
    out = overlong_penalty(torch.tensor([0, 17, 19]), max_len=20, cache_len=4)
    assert out.tolist() == pytest.approx([0.0, -0.25, -0.75])
    # a band as wide as the limit starts at 0
    out = overlong_penalty(torch.tensor([0, 5, 10, 11]), max_len=10, cache_len=10)
    assert out.tolist() == pytest.approx([0.0, -0.5, -1.0, -1.0])


@pytest.mark.parametrize("cache_len", [0, -1, 21])
def test_bad_cache_len_raises(cache_len):
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([10]), max_len=20, cache_len=cache_len)
