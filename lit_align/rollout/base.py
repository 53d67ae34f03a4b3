"""The rollout interface: sampling settings, the abstract engine and the engine registry.

An online RL module holds one :class:`RolloutEngine`, chosen by name (``engine: hf``) or by
import path (``engine: my_pkg.engines:VLLMEngine``), and calls, before every rollout,
``engine.update_weights(model)`` and then ``engine.generate(model, prompts, sampling)``.
A new backend is a subclass of :class:`RolloutEngine`; the algorithms do not change.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_align.registry import import_object, register_into
from lit_align.rollout.batch import RolloutBatch


@dataclass
class SamplingParams:
    """How to sample completions.

    Args:
        max_new_tokens: generation limit per completion.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        n: completions per prompt (all in one batched call).
        stop_token_ids: a completion ends at the first of these ids (included in it); empty:
            the tokenizer's EOS.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not all(math.isfinite(x) for x in (self.temperature, self.top_p)):
            raise ValueError(f"sampling: temperature and top_p must be finite, got {self}")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.n < 1:
            raise ValueError(f"sampling: invalid settings {self}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise ValueError(f"sampling.stop_token_ids: need non-negative token ids, got {self.stop_token_ids}")

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end a completion: ``stop_token_ids``, or the tokenizer's EOS when empty."""
        return list(self.stop_token_ids) or [tokenizer.eos_token_id]


def default_stop_ids(tokenizer, generation_config=None, end_of_turn: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The ids a completion stops at when ``SamplingParams.stop_token_ids`` is empty: the tokenizer's
    EOS, every id of the checkpoint's ``generation_config.eos_token_id`` (an int or a list, as
    Llama 3's ``[<|end_of_text|>, <|eot_id|>]``), and ``end_of_turn`` (the chat template's
    end-of-turn ids, for data rendered with it), in that order without repeats."""
    ids: list[int] = [tokenizer.eos_token_id]
    eos = getattr(generation_config, "eos_token_id", None)
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    ids += list(end_of_turn)
    return [i for i in dict.fromkeys(ids) if isinstance(i, int) and i >= 0]


@dataclass
class EngineSpec:
    """Which rollout engine an online module builds, as YAML gives it (``engine: {name: vllm, args: {...}}``).

    Args:
        name: a registered engine (:data:`ENGINES`: ``hf``, ``vllm``) or an import path
            ``"package.module:Class"`` of a :class:`RolloutEngine` subclass.
        args: keyword arguments of the engine's constructor (besides the tokenizer and
            ``logprob_batch_size``, which the module passes).
    """

    name: str = "hf"
    args: dict[str, Any] = field(default_factory=dict)


class RolloutEngine(abc.ABC):
    """Samples completions for a batch of prompts and scores them under the sampling policy.

    Args:
        tokenizer: the policy's tokenizer (pad and EOS ids, decoding).
        logprob_batch_size: rows per forward when scoring the samples (the module passes its
            ``forward_batch_size``).

    Online RL modules build their engine as ``cls(tokenizer, logprob_batch_size=...)`` and, before
    each rollout, call :meth:`update_weights` and then :meth:`generate`, always with the live
    training model.
    """

    def __init__(self, tokenizer, logprob_batch_size: int = 32):
        if logprob_batch_size < 1:
            raise ValueError(f"logprob_batch_size: must be >= 1, got {logprob_batch_size}")
        self.tokenizer = tokenizer
        self.logprob_batch_size = logprob_batch_size
        #: ``n -> [(lo, hi), ...]``, the mini-batches a module trains a rollout of ``n`` rows in
        #: (set by the module); ``None``: one segment.
        self.segments: Callable[[int], list[tuple[int, int]]] | None = None
        #: ``False``: :meth:`generate` leaves ``RolloutBatch.logprobs`` at 0 and skips the scoring
        #: forward, for a module whose single optimizer step per rollout computes them itself
        self.score_rollouts = True

    def score(self, model: torch.nn.Module, rollout: RolloutBatch, temperature: float) -> None:
        """Set ``rollout.logprobs`` to the training forward's log-probs of the sampled tokens
        (:func:`~lit_align.rollout.chunked_logprobs` at ``temperature``, 1 for greedy), in the
        training layout (``logprob_batch_size`` rows per forward within each of :attr:`segments`),
        so that the first update's importance ratio is exactly 1."""
        from lit_align.rollout.hf import chunked_logprobs

        segments = self.segments(len(rollout)) if self.segments is not None else None
        rollout.logprobs = chunked_logprobs(model, rollout, temperature, self.logprob_batch_size, segments)

    def check(self, model_config, sampling: SamplingParams) -> None:  # noqa: B027 - a hook whose default accepts all
        """Raise ``ValueError`` for a model or sampling setting this engine cannot serve.

        Online RL modules call it at construction, before any weights load, with the policy's
        HF config (a ``transformers.PretrainedConfig``) and their sampling settings. Engines
        that serve every model and setting (HF ``generate``) keep this default, which accepts all."""

    def state_dict(self) -> dict:
        """What a rollout depends on besides the weights and the global random generators (an
        engine's own sampling generator), saved in checkpoints so that a resumed run samples
        what the uninterrupted one would have; ``{}`` for an engine that samples from torch's
        global generator (HF ``generate``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state:
            raise ValueError(f"{type(self).__name__}: a checkpoint holds engine state {sorted(state)} this engine "
                             "does not have (it was saved by another engine)")

    @abc.abstractmethod
    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next :meth:`generate` sample from ``model``'s current weights.

        An engine that holds its own copy of the weights (vLLM, a separate inference server)
        copies them here, once per rollout; an engine that generates with ``model`` itself has
        nothing to do. Collective under sharding: every rank calls it."""

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, prompts: dict, sampling: SamplingParams) -> RolloutBatch:
        """``sampling.n`` completions of each prompt.

        Args:
            model: the training policy. An engine with its own weights (synced in
                :meth:`update_weights`) may ignore it for sampling, but the returned
                ``logprobs`` must be those the training forward computes (see below).
            prompts: ``prompt_ids`` and ``prompt_mask`` ``[B, P]`` (left-padded), optional
                ``prompts`` (``B`` texts) and ``meta`` (``B`` dicts).
            sampling: temperature, top-p/top-k, ``max_new_tokens`` and ``n``.
        Returns:
            A :class:`RolloutBatch` of ``B * n`` rows, the ``n`` samples of a prompt consecutive
            (``group_size = n``), whose ``logprobs`` ``[B * n, C]`` are set by :meth:`score` (the
            training forward's, in the training layout, so that the first update's importance
            ratio is 1) and whose ``sampler_logprobs`` are the sampler's own log-probs of the same
            tokens as it computed them (its kernels, precision and processing), or ``None`` for
            an engine that cannot report them. Completions end at the first of
            ``sampling.stop_ids(tokenizer)``.
        """


#: Engine name -> class. ``hf`` (:class:`~lit_align.rollout.HFEngine`) is built in.
ENGINES: dict[str, type[RolloutEngine]] = {}


def _check_engine_class(cls) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, RolloutEngine)):
        raise ValueError(f"{cls!r} is not a subclass of lit_align.rollout.RolloutEngine")
    if inspect.isabstract(cls):
        raise ValueError(f"{cls.__name__} leaves abstract methods unimplemented "
                         f"({', '.join(sorted(cls.__abstractmethods__))})")


def register_engine(name: str) -> Callable[[type[RolloutEngine]], type[RolloutEngine]]:
    """Class decorator adding a :class:`RolloutEngine` subclass to :data:`ENGINES` under ``name``.

    Registering a different class under a taken name raises ``ValueError``: a silent override
    would change what an existing config runs."""
    return register_into(ENGINES, "register_engine", name, check=_check_engine_class)


def resolve_engine(name: str) -> type[RolloutEngine]:
    """The engine class of a registered ``name`` or of an import path ``"package.module:Class"``.

    Raises ``ValueError`` for an unknown name, an import path that does not import, or an
    object that is not a concrete :class:`RolloutEngine` subclass."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{name!r} is not an engine name or an import path 'package.module:Class'")
    if name in ENGINES:
        return ENGINES[name]
    if ":" not in name:
        raise ValueError(f"unknown engine {name!r}: not a built-in ({', '.join(sorted(ENGINES))}) "
                         "nor an import path 'package.module:Class'")
    try:
        obj = import_object(name)
        _check_engine_class(obj)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from e
    return obj


def build_engine(spec: EngineSpec | str, tokenizer, logprob_batch_size: int = 32, **args) -> RolloutEngine:
    """``cls(tokenizer, logprob_batch_size=..., **spec.args, **args)`` for the class
    :func:`resolve_engine` finds (``args`` given here override the spec's); a plain string is
    ``EngineSpec(name=string)``. Bad arguments raise ``ValueError``."""
    spec = EngineSpec(name=spec) if isinstance(spec, str) else spec
    if not isinstance(spec.args, dict):
        raise ValueError(f"{spec.name!r}: args must be a mapping of keyword arguments, got {type(spec.args).__name__}")
    args = {**spec.args, **args}
    cls = resolve_engine(spec.name)
    reserved = {"tokenizer", "logprob_batch_size"} & set(args)
    if reserved:
        raise ValueError(f"{spec.name!r}: args {sorted(reserved)} are set by the module (forward_batch_size), not here")
    try:
        return cls(tokenizer, logprob_batch_size=logprob_batch_size, **args)
    except TypeError as e:  # a keyword the class does not take
        raise ValueError(f"{spec.name!r}: bad args {args!r}: {e}") from e
