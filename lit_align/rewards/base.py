"""Reward specs, the registry of built-in rewards and :class:`Rewards`, which resolves specs
into callables, runs them on a batch of completions and checks what they return.

A reward function has the TRL-like signature::

    fn(prompts: list[str], completions: list[str], meta: list[dict], **context) -> list[float] | torch.Tensor

returning one value per completion. ``meta[i]`` is the row's metadata (``{"answer": "59"}``
or verl-style ``{"reward_model": {"ground_truth": "..."}}``). ``context`` always holds
``completion_lengths`` (``list[int]``, tokens per completion, EOS excluded), ``truncated``
(``list[bool]``, no EOS within the generation limit) and ``max_new_tokens`` (``int``), and may
hold ``completion_ids`` (``list[list[int]]``) and ``checker`` (the data module's
``checker(completion, meta, reference)``, or ``None`` when its data has none); rewards take
``**context`` so that new keys never break them.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_align.registry import import_object, register_into

RewardFn = Callable[..., Any]

#: Built-in reward name -> factory. A factory takes the spec's ``args`` as keyword arguments
#: and returns the reward callable.
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator adding a factory to :data:`REWARDS` under ``name``.

    Example::

        @register_reward("length")
        def length(scale: float = 1.0):
            def fn(prompts, completions, meta, **context):
                return [scale * n for n in context["completion_lengths"]]
            return fn

    Registering a different factory under a taken name raises ``ValueError``: a silent
    override would change what an existing config computes.
    """
    return register_into(REWARDS, "register_reward", name)


class RewardError(RuntimeError):
    """A reward failed on a batch; the message names the reward's label, the row and its
    completion (shortened). Raised by :class:`Rewards` and by built-ins (with ``row`` set,
    then :class:`Rewards` adds the label and the completion)."""

    def __init__(self, message: str, *, label: str | None = None, row: int | None = None):
        super().__init__(message)
        self.label = label
        self.row = row


@dataclass
class RewardSpec:
    """One reward term of the total reward.

    Args:
        name: a built-in name (a key of :data:`REWARDS`: ``task_check``, ``arith_match``, ``chain_match``,
            ``format``, ``overlong``, ``reward_model``) or an import path ``"package.module:function"``
            (a function, a callable class, or a callable object).
        weight: the term's weight in ``total = sum_i weight_i * r_i``; 0 computes and logs the
            reward without training on it.
        args: keyword arguments for the built-in factory or the imported class, or bound to the
            imported function (``functools.partial``).
        label: the name under which the raw reward is returned and logged (default: the
            built-in name, or the last component of the import path); unique across specs.
    """

    name: str
    weight: float = 1.0
    args: dict = field(default_factory=dict)
    label: str | None = None


def _short(text: Any, limit: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _instantiate(obj: Any, args: dict) -> RewardFn:
    if inspect.isclass(obj):
        instance = obj(**args)
        if not callable(instance):
            raise ValueError(f"an instance of class {obj.__name__} is not callable (define __call__)")
        return instance
    if not callable(obj):
        raise ValueError(f"{type(obj).__name__} object is not callable")
    if args:
        try:
            inspect.signature(obj).bind_partial(**args)
        except TypeError as e:
            raise ValueError(f"cannot bind args {sorted(args)}: {e}") from e
        except ValueError:  # no signature (C functions): binding is checked at the first call
            pass
        return functools.partial(obj, **args)
    return obj


def _check_signature(fn: RewardFn) -> None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    # Context keys are always passed, so a reward without **context would fail at its first call.
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError("a reward must accept (prompts, completions, meta, **context); it takes no **context")


def _row_context(context: dict, i: int, n: int) -> dict:
    out = {}
    for key, value in context.items():
        if isinstance(value, (list, tuple)) and len(value) == n:
            value = type(value)([value[i]])
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            value = value[i: i + 1]
        out[key] = value
    return out


class Rewards:
    """The weighted sum of several rewards.

    Args:
        specs: the reward terms (:class:`RewardSpec`, or dicts with its fields as a YAML config
            gives them). Every spec is resolved here, so a config mistake fails before training:
            an unknown name, an import path that does not import, an object that is not
            callable or takes no ``**context``, bad ``args``, a non-finite weight or a
            duplicate label raises ``ValueError`` naming the spec (``rewards[1] 'pkg.mod:fn': ...``).

    Attributes:
        names: the labels, in spec order.
        weights: the weights, in spec order.
    """

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ValueError("rewards: no reward specs given; an RL run needs at least one reward")
        self.specs: list[RewardSpec] = []
        self.fns: list[RewardFn] = []
        self.names: list[str] = []
        self.weights: list[float] = []
        for i, spec in enumerate(specs):
            if isinstance(spec, dict):
                try:
                    spec = RewardSpec(**spec)
                except TypeError as e:
                    raise ValueError(f"rewards[{i}] {spec!r}: {e}") from e
            if not isinstance(spec, RewardSpec):
                raise ValueError(f"rewards[{i}]: expected a RewardSpec, got {type(spec).__name__}")
            where = f"rewards[{i}] {spec.name!r}"
            fn, label = self._resolve(spec, where)
            if label in self.names:
                raise ValueError(f"{where}: label {label!r} is already used by rewards[{self.names.index(label)}]; "
                                 "set a distinct `label`")
            self.specs.append(spec)
            self.fns.append(fn)
            self.names.append(label)
            self.weights.append(float(spec.weight))

    @staticmethod
    def _resolve(spec: RewardSpec, where: str) -> tuple[RewardFn, str]:
        if not isinstance(spec.weight, numbers.Real) or isinstance(spec.weight, bool) \
                or not math.isfinite(spec.weight):
            raise ValueError(f"{where}: weight {spec.weight!r} is not a finite number")
        if not isinstance(spec.args, dict):
            raise ValueError(f"{where}: args must be a dict of keyword arguments, got {type(spec.args).__name__}")
        if spec.label is not None and (not isinstance(spec.label, str) or not spec.label):
            raise ValueError(f"{where}: label {spec.label!r} must be a non-empty string")
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"{where}: name must be a built-in reward or 'package.module:function'")
        try:
            if spec.name in REWARDS:
                fn, default_label = REWARDS[spec.name](**spec.args), spec.name
                if not callable(fn):
                    raise ValueError(f"the factory returned a non-callable {type(fn).__name__}")
            elif ":" in spec.name:
                obj, default_label = import_object(spec.name), spec.name.rpartition(":")[2].split(".")[-1]
                fn = _instantiate(obj, spec.args)
            else:
                raise ValueError(f"unknown reward: not a built-in ({', '.join(sorted(REWARDS))}) "
                                 "nor an import path 'package.module:function'")
            _check_signature(fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        except TypeError as e:  # bad keyword arguments for a factory or class
            raise ValueError(f"{where}: bad args {spec.args!r}: {e}") from e
        return fn, spec.label or default_label

    def setup(self, device: torch.device | str | None = None) -> None:
        """Load heavy state (reward models) onto ``device``: calls ``setup(device)`` on every
        reward that has one. Idempotent; rewards that need it also load lazily on first use."""
        for fn in self.fns:
            hook = getattr(fn, "setup", None)
            if callable(hook):
                hook(device)

    def __call__(self, prompts: list[str], completions: list[str], meta: list[dict],
                 **context: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score ``N`` completions with every reward.

        Args:
            prompts, completions: ``N`` texts each.
            meta: ``N`` dicts of row metadata (ground truth etc.).
            context: passed to every reward: ``completion_lengths``, ``truncated``,
                ``max_new_tokens``, optionally ``completion_ids`` and future keys.
        Returns:
            ``(total, raw)``: ``total`` ``[N]`` float32 ``= sum_i weight_i * r_i`` and
            ``raw = {label: r_i [N] float32}``, all on CPU.
        Raises:
            RewardError: a reward raised, returned the wrong number of values, a non-numeric
                value, NaN or inf; the message names the label, the row and its completion.
        """
        n = len(completions)
        if len(prompts) != n or len(meta) != n:
            raise ValueError(f"rewards: got {len(prompts)} prompts, {n} completions and {len(meta)} meta rows; "
                             "need one of each per completion")
        raw: dict[str, torch.Tensor] = {}
        total = torch.zeros(n, dtype=torch.float64)
        for fn, label, weight in zip(self.fns, self.names, self.weights):
            values = self._run(fn, label, prompts, completions, meta, context)
            raw[label] = values
            total += weight * values.double()
        return total.float(), raw

    def score_one(self, label: str, prompts: list[str], completions: list[str], meta: list[dict],
                  **context: Any) -> torch.Tensor:
        """``[N]`` float32 values of the one reward labelled ``label`` (checked as in ``__call__``)."""
        i = self.names.index(label)
        return self._run(self.fns[i], label, prompts, completions, meta, context)

    def _run(self, fn: RewardFn, label: str, prompts: list[str], completions: list[str], meta: list[dict],
             context: dict) -> torch.Tensor:
        n = len(completions)

        def at(row: int) -> str:
            return f"reward {label!r}, row {row} (completion {_short(completions[row])})"

        try:
            out = fn(prompts, completions, meta, **context)
        except RewardError as e:
            if e.row is not None and 0 <= e.row < n:
                raise RewardError(f"{at(e.row)}: {e}", label=label, row=e.row) from e
            raise RewardError(f"reward {label!r}: {e}", label=label) from e
        except Exception as e:
            row = self._failing_row(fn, prompts, completions, meta, context)
            where = at(row) if row is not None else f"reward {label!r} (batch of {n}; no single row fails alone)"
            raise RewardError(f"{where}: raised {type(e).__name__}: {e}", label=label, row=row) from e
        return self._to_tensor(out, label, completions, at)

    @staticmethod
    def _failing_row(fn: RewardFn, prompts, completions, meta, context) -> int | None:
        """The first row on which ``fn`` raises when called on that row alone, so the error can
        name it; rewards are called again only on the failure path."""
        n = len(completions)
        for i in range(n):
            try:
                fn([prompts[i]], [completions[i]], [meta[i]], **_row_context(context, i, n))
            except Exception:
                return i
        return None

    @staticmethod
    def _to_tensor(out: Any, label: str, completions: list[str], at: Callable[[int], str]) -> torch.Tensor:
        n = len(completions)
        if isinstance(out, torch.Tensor):
            if out.dim() != 1:
                raise RewardError(f"reward {label!r}: returned a tensor of shape {list(out.shape)}; "
                                  f"expected one value per completion, shape [{n}]", label=label)
            if out.is_complex():
                raise RewardError(f"reward {label!r}: returned a {out.dtype} tensor, not real numbers", label=label)
            # clone: a tensor made under inference_mode cannot be used by later in-place ops
            values = out.detach().to("cpu", torch.float32).clone()
        elif isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise RewardError(f"reward {label!r}: returned {type(out).__name__}; expected a list of {n} floats "
                              "or a tensor [N]", label=label)
        else:
            items = list(out)
            if len(items) == n:
                for i, x in enumerate(items):
                    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
                        items[i] = x.item()
                    elif not isinstance(x, numbers.Real):
                        raise RewardError(f"{at(i)}: returned the non-numeric value {_short(x)} "
                                          f"({type(x).__name__})", label=label, row=i)
                values = torch.tensor([float(x) for x in items], dtype=torch.float32)
            else:
                values = torch.empty(len(items))
        if values.shape[0] != n:
            raise RewardError(f"reward {label!r}: returned {values.shape[0]} values for {n} completions",
                              label=label)
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            row = int(bad[0])
            raise RewardError(f"{at(row)}: returned {values[row].item()} (not finite)", label=label, row=row)
        return values
