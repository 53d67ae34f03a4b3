"""Packing is exact: rows packed into one sequence (positions restart, no attention mask)
give the same summed token cross-entropy as the same rows one per sequence."""

import pytest
import torch

from lit_align import SFT, CausalLMSpec
from lit_align.data.batching import collate_packed, collate_rows
from lit_align.data.encode import encode_segments
from lit_align.data.formats import Segment
from tests.conftest import tiny_config
from tests.data.util import byte_tokenizer

PAIRS = [("12+34=", "64"), ("a longer prompt here: ", "xyz"), ("q", "an answer of some length"), ("7*8=", "56")]


def rows():
    tok = byte_tokenizer()
    return [encode_segments([Segment(p, False), Segment(c, True)], tok, 64) for p, c in PAIRS]


def summed_ce(module, batch):
    """Sum over label tokens of -log p, through the SFT module's own forward."""
    logp, mask = module.shifted(batch)
    return -(logp * mask).sum()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def module(request):
    m = SFT(model=CausalLMSpec(config=tiny_config(request.param), seed=1), eval_max_new_tokens=0)
    m.configure_model()
    return m.eval()


@torch.no_grad()
def test_packed_equals_unpacked(module):
    rs = rows()
    pad_id = module.tokenizer.pad_token_id
    unpacked = summed_ce(module, collate_rows(rs, pad_id))
    one_by_one = sum(summed_ce(module, collate_rows([r], pad_id)) for r in rs)
    packed_batch = collate_packed([rs], pad_id)
    assert "attention_mask" not in packed_batch
    packed = summed_ce(module, packed_batch)
    assert unpacked.item() > 1.0  # a random model: clearly non-zero loss
    torch.testing.assert_close(one_by_one, unpacked, rtol=0, atol=1e-4)
    torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-4)
    # several packs of different total length (the shorter one right-padded) too
    several = summed_ce(module, collate_packed([rs[:3], rs[3:]], pad_id))
    torch.testing.assert_close(several, unpacked, rtol=0, atol=1e-4)


@torch.no_grad()
def test_without_restarted_positions_rows_would_see_each_other(module):
    # the control: one causal sequence over the concatenation is not the same loss
    rs = rows()
    pad_id = module.tokenizer.pad_token_id
    batch = collate_packed([rs], pad_id)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    leaky = summed_ce(module, batch)
    unpacked = summed_ce(module, collate_rows(rs, pad_id))
    assert abs(leaky.item() - unpacked.item()) > 1e-2


@torch.no_grad()
def test_packed_training_loss_equals_unpacked_per_token_mean(module):
    # the batch keys SFT reads when training: token mean over num_label_tokens_step
    rs = rows()
    pad_id = module.tokenizer.pad_token_id
    n = sum(r["num_labels"] for r in rs)
    means = []
    for batch in (collate_rows(rs, pad_id), collate_packed([rs], pad_id)):
        logp, mask = module.shifted(batch)
        assert int(mask.sum()) == n
        means.append(-(logp * mask).sum() / n)
    torch.testing.assert_close(means[0], means[1], rtol=0, atol=1e-5)
