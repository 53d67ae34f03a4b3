"""Pure torch math: no Lightning, no transformers, no I/O (DESIGN.md, public contracts)."""

from lit_align.losses.aggregation import AGG_MODES, aggregate_loss
from lit_align.losses.logprobs import token_entropy, token_logprobs

__all__ = ["AGG_MODES", "aggregate_loss", "token_entropy", "token_logprobs"]
