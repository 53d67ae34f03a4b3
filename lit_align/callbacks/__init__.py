"""Lightning callbacks used by the entry points."""

from lit_align.callbacks.hf_export import HFExport
from lit_align.callbacks.last_checkpoint import LastCheckpoint
from lit_align.callbacks.nonfinite import NonFiniteError, NonFiniteGuard

__all__ = ["HFExport", "LastCheckpoint", "NonFiniteError", "NonFiniteGuard"]
