"""Named plug-ins: registration by name and lookup with a message naming the known names
(rewards, rollout engines, and the formula families of :mod:`lit_align.losses`: advantage
estimators, policy losses, importance-sampling levels, aggregation modes, preference losses and
KL estimators), and import paths ``"package.module:attr"`` for user code that is not registered."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a class or function (how two registrations are compared)."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_into(registry: dict[str, Any], kind: str, name: str,
                  check: Callable[[Any], None] | None = None) -> Callable[[Any], Any]:
    """Decorator adding the decorated object to ``registry`` under ``name``.

    Args:
        registry: the name -> object table.
        kind: what is registered, for messages (``register_reward``, ``register_engine``).
        name: a non-empty name without ``:`` (a ``:`` marks an import path).
        check: raises ``ValueError`` for an object that does not belong in this registry.

    Registering a different object under a taken name raises ``ValueError``: a silent override
    would change what an existing config runs. Re-importing the defining module (reloads,
    notebooks) registers an equal object again, which is allowed."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{kind}: name {name!r} must be a non-empty string without ':' (':' marks an import path)")

    def decorator(obj: Any) -> Any:
        if check is not None:
            check(obj)
        old = registry.get(name)
        if old is not None and qualified_name(old) != qualified_name(obj):
            raise ValueError(f"{kind}: {name!r} is already registered to {qualified_name(old)}")
        registry[name] = obj
        return obj

    return decorator


def lookup(registry: dict[str, Any], setting: str, name: Any) -> Any:
    """``registry[name]``, or ``ValueError`` naming the setting and the registered names."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{setting}: {name!r} is not one of {tuple(registry)}")
    return registry[name]


def import_object(path: str) -> Any:
    """The object an import path ``"package.module:attr"`` (or ``:Outer.inner``) names.

    Raises ``ValueError`` naming what failed (the path's form, the import, or the attribute);
    the caller puts the setting's name in front."""
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ValueError("an import path is 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj
