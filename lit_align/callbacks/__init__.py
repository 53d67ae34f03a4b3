"""Lightning callbacks used by the entry points and the modules."""

from lit_align.callbacks.hf_export import HFExport
from lit_align.callbacks.resume import ResumeState

__all__ = ["HFExport", "ResumeState"]
