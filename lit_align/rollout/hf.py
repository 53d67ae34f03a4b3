"""Generation with Hugging Face ``generate`` (KV cache, left padding, batched) and the
teacher-forced log-probs of sampled completions."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lit_align import distributed
from lit_align.distributed import is_sharded
from lit_align.losses import token_entropy, token_logprobs
from lit_align.rollout.base import RolloutEngine, SamplingParams, register_engine
from lit_align.rollout.batch import RolloutBatch


def _without_autograd(fn):
    """Run ``fn(model, ...)`` under inference mode, or only under no_grad for a sharded model:
    FSDP2 allocates its unsharded parameters at the first forward and reuses them, and tensors
    made under inference mode cannot be written outside it (scoring and training forwards)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with torch.no_grad(), torch.inference_mode(not is_sharded(model)):
            return fn(model, *args, **kwargs)
    return wrapper


def generation_config(sampling: SamplingParams, stop_ids: list[int], pad_token_id: int, n: int = 1) -> GenerationConfig:
    """The sampling distribution of ``sampling`` as a complete ``GenerationConfig``.

    Every field that shapes the distribution is set (neutral where ``sampling`` has no such
    setting: no repetition penalty, no n-gram blocking, no min-p, no forced or suppressed
    tokens), and temperature / top-k / top-p are left to the processors :func:`hf_generate`
    adds, so a checkpoint's ``generation_config.json`` can add nothing. Greedy when
    ``sampling.temperature`` is 0."""
    return GenerationConfig(
        do_sample=sampling.temperature > 0, max_new_tokens=sampling.max_new_tokens, min_new_tokens=0,
        num_return_sequences=n, num_beams=1, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, length_penalty=1.0, renormalize_logits=False, eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id, use_cache=True)


@contextmanager
def clean_generation_configs(model: torch.nn.Module):
    """Swap every submodule's ``generation_config`` for an empty one during the block: ``generate``
    fills unset fields from the model's own config, which must not reach a rollout."""
    saved = [(m, m.generation_config) for m in model.modules()
             if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    try:
        for m, _ in saved:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in saved:
            m.generation_config = config


class SamplerLogprobs(LogitsProcessor):
    """Records, at each step, the log-prob of the token the sampler drew under the distribution it
    drew from (the last processor: after temperature, top-k and top-p), keeping only one step's
    ``[N, V]`` scores. :meth:`result` returns them ``[N, C]`` for the generated ids."""

    def __init__(self):
        self.last: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is not None:  # the token appended since the last call was drawn from `last`
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, completion_ids: torch.Tensor) -> torch.Tensor:
        c = completion_ids.shape[1]
        steps = self.steps[:c]
        if len(steps) < c and self.last is not None:
            steps.append(self.last.gather(-1, completion_ids[:, len(steps), None]).squeeze(-1))
        if not steps:
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
        return torch.stack(steps, dim=1)


@_without_autograd
def hf_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams,
                pad_token_id: int, eos_token_id: int | list[int], with_logprobs: bool = False,
                autocast_dtype: torch.dtype | None = None, **model_inputs):
    """Sample completions for left-padded prompts ``[B, P]``; returns ``[B * n, C]`` completion
    ids (prompt removed; the ``n`` samples of a prompt are consecutive rows), padded with
    ``pad_token_id`` after the first stop id, and with ``with_logprobs`` also the sampler's own
    log-probs ``[B * n, C]`` of the drawn tokens (:class:`SamplerLogprobs`).

    The distribution is exactly ``sampling``'s (:func:`generation_config`; the model's own
    generation config is set aside for the call); ``eos_token_id`` is one stop id or a list.
    ``autocast_dtype`` runs the sampler's forwards under autocast (a sampler with other numerics
    than training, as an inference engine has). The model is put in eval mode for the call and
    restored afterwards. Under sharding every rank keeps stepping until all ranks are done
    (``synced_gpus``), since each forward is a collective. ``model_inputs`` go to ``generate`` as
    they are (a multimodal model's ``pixel_values``); a model whose ``generate`` returns only the
    new tokens says so with ``generate_returns_prompt = False``."""
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    greedy = sampling.temperature == 0
    n = 1 if greedy else sampling.n
    if greedy:  # HF refuses num_return_sequences > 1 without sampling: repeat the prompts instead
        prompt_ids = prompt_ids.repeat_interleave(sampling.n, 0)
        prompt_mask = prompt_mask.repeat_interleave(sampling.n, 0)
    processors = LogitsProcessorList()
    if not greedy:  # transformers' own warpers, in its own order
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    recorder = SamplerLogprobs() if with_logprobs else None
    if recorder is not None:
        processors.append(recorder)
    was_training = model.training
    model.eval()
    try:
        autocast = torch.autocast(prompt_ids.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with clean_generation_configs(model), autocast:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 generation_config=generation_config(sampling, stops, pad_token_id, n),
                                 logits_processor=processors,
                                 synced_gpus=distributed.initialized() and is_sharded(model), **model_inputs)
    finally:
        model.train(was_training)
    ids = out[:, prompt_ids.shape[1]:] if getattr(model, "generate_returns_prompt", True) else out
    return (ids, recorder.result(ids)) if recorder is not None else ids


def completion_masks(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [N, C], truncated [N])``: 1 up to and including each row's first stop id (EOS, or
    any of a list of ids); a row with none is truncated and all its tokens count. Works when the
    pad id is a stop id."""
    stops = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                            device=completion_ids.device)
    is_eos = torch.isin(completion_ids, stops)
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.int().argmax(-1),
                        torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions[None, :] <= first[:, None]).long()
    return mask, ~has_eos


def completion_logits(model: torch.nn.Module, rollout: RolloutBatch) -> torch.Tensor:
    """Logits ``[N, C, V]`` that predict each completion token, from one teacher-forced forward.

    Position ids follow the attention mask, as in ``generate`` (left padding shifts nothing for
    models with absolute positions); only the completion's logits are computed (``logits_to_keep``)."""
    c = rollout.completion_ids.shape[1]
    mask = rollout.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=c + 1)
    return out.logits[:, :-1]


def completion_logprobs(model: torch.nn.Module, rollout: RolloutBatch, temperature: float = 1.0,
                        with_entropy: bool = False,
                        entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[N, C]`` (float32, 0 off the completion mask) of the sampled tokens under
    ``softmax(logits / temperature)``, and their entropy ``[N, C]`` if asked (differentiable
    with ``entropy_grad``, for an entropy bonus).

    The same function scores rollouts (old log-probs), the reference and the training forward,
    so on the first update the importance ratio is exactly 1."""
    logits = completion_logits(model, rollout)
    t = temperature if temperature > 0 else 1.0
    mask = rollout.completion_mask
    logp = token_logprobs(logits, rollout.completion_ids, temperature=t) * mask
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = token_entropy(logits if entropy_grad else logits.detach(), temperature=t) * mask
    return logp, entropy


@torch.no_grad()
def chunked_logprobs(model: torch.nn.Module, rollout: RolloutBatch, temperature: float, batch_size: int,
                     segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """:func:`completion_logprobs` of every row, ``batch_size`` rows per forward, each chunk
    trimmed as :meth:`RolloutBatch.trimmed` does: the layout training micro-batches use. With
    ``segments`` (the ``[lo, hi)`` mini-batches of training), chunks restart at each segment,
    exactly as training's micro-batches do, so the same rows meet the same padding and the first
    update's ratio is exactly 1."""
    was_training = model.training
    model.eval()
    try:
        out = torch.zeros_like(rollout.completion_ids, dtype=torch.float32)
        for lo, hi in segments or [(0, len(rollout))]:
            for rows, chunk in rollout.chunks(batch_size, lo, hi):
                logp, _ = completion_logprobs(model, chunk, temperature)
                out[rows[0]: rows[-1] + 1, : logp.shape[1]] = logp
    finally:
        model.train(was_training)
    return out


def decode_completions(tokenizer, completion_ids: torch.Tensor, stop_ids: list[int] | None = None) -> list[str]:
    """Text of each completion up to (not including) its first stop id (default: the EOS)."""
    stops = set(stop_ids or [tokenizer.eos_token_id])
    texts = []
    for row in completion_ids.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


@register_engine("hf")
class HFEngine(RolloutEngine):
    """The rollout engine on the training model itself with HF ``generate`` (KV cache on).

    Args:
        tokenizer: supplies the pad and EOS ids and decodes completions.
        logprob_batch_size: rows per forward when scoring the samples.
        autocast_dtype: ``bfloat16`` / ``float16``: sample under autocast at that dtype (a faster
            sampler whose numerics differ from the training forward's, as an inference engine's
            do; the rollout-correction metrics measure the gap); ``None``: the model's own dtype.

    ``generate(model, prompts, sampling)`` samples ``sampling.n`` completions for each prompt of
    a prompt batch (``prompt_ids``/``prompt_mask`` ``[B, P]`` left-padded, optional ``prompts``
    and ``meta`` lists) in one batched call and returns a :class:`RolloutBatch` whose
    ``sampler_logprobs`` are the sampler's (after temperature, top-k and top-p) and whose
    ``logprobs`` come from :meth:`~lit_align.rollout.RolloutEngine.score` at
    ``sampling.temperature``: the training forward's, under the unfiltered softmax (as verl
    and TRL score), so top-p / top-k sampling is slightly off-policy and the mismatch metrics
    show by how much. The weights are the training model's, so :meth:`update_weights` has
    nothing to copy.
    """

    def __init__(self, tokenizer, logprob_batch_size: int = 32, autocast_dtype: str | None = None):
        super().__init__(tokenizer, logprob_batch_size)
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
        if autocast_dtype is not None and autocast_dtype not in dtypes:
            raise ValueError(f"hf engine: autocast_dtype {autocast_dtype!r} is not one of {sorted(dtypes)} or null")
        self.autocast_dtype = dtypes.get(autocast_dtype)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation uses the live training weights."""

    def generate(self, model: torch.nn.Module, prompts: dict, sampling: SamplingParams) -> RolloutBatch:
        tok = self.tokenizer
        stops = sampling.stop_ids(tok)
        ids, sampler_logp = hf_generate(model, prompts["prompt_ids"], prompts["prompt_mask"], sampling,
                                        tok.pad_token_id, stops, with_logprobs=True,
                                        autocast_dtype=self.autocast_dtype)
        ids = ids.clone()  # out of inference mode: the training forward's embedding saves these indices
        mask, truncated = completion_masks(ids, stops)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
        n = sampling.n
        rollout = RolloutBatch(
            prompt_ids=prompts["prompt_ids"].repeat_interleave(n, 0),
            prompt_mask=prompts["prompt_mask"].repeat_interleave(n, 0),
            completion_ids=ids, completion_mask=mask, logprobs=torch.zeros(ids.shape, device=ids.device),
            sampler_logprobs=sampler_logp.clone() * mask, truncated=truncated,
            prompts=[p for p in prompts.get("prompts", [""] * len(prompts["prompt_ids"])) for _ in range(n)],
            completions=decode_completions(tok, ids, stops),
            meta=[m for m in prompts.get("meta", [{}] * len(prompts["prompt_ids"])) for _ in range(n)],
            group_size=n,
        ).trimmed()
        if self.score_rollouts:
            self.score(model, rollout, sampling.temperature)
        return rollout
