"""Lightning callbacks used by the entry points and the modules."""

from lit_align.callbacks.hf_export import HFExport
from lit_align.callbacks.last_checkpoint import LastCheckpoint
from lit_align.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from lit_align.callbacks.resume import ResumeState

__all__ = ["HFExport", "LastCheckpoint", "NonFiniteError", "NonFiniteGuard", "ResumeState"]
