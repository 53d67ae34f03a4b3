"""Settings as plain data and their differences: what resuming compares between the settings a
run is given and the ones its checkpoint was written with (module and data module alike)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: Entries of ``hyper_parameters`` that are bookkeeping of the CLI, not settings.
_BOOKKEEPING = ("_instantiator",)
_UNSET = "<unset>"


def plain(value: Any) -> Any:
    """``value`` as nested dicts, lists and scalars (dataclasses and namespaces as dicts,
    tuples as lists), so the CLI's recorded settings and a module's own compare equal."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if k not in _BOOKKEEPING}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def differences(given: Any, saved: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, given value, saved value)`` of every leaf where two plain structures differ
    (:data:`_UNSET` for a key one of them lacks)."""
    if isinstance(given, dict) and isinstance(saved, dict):
        out = []
        for key in list(given) + [k for k in saved if k not in given]:
            out += differences(given.get(key, _UNSET), saved.get(key, _UNSET), f"{prefix}{key}.")
        return out
    if given != saved:
        return [(prefix.rstrip("."), given, saved)]
    return []
