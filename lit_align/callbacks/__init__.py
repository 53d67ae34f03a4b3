"""Lightning callbacks used by the entry points."""

from lit_align.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
