"""Generation with Hugging Face ``generate`` (KV cache, left padding, batched) and the
teacher-forced log-probs of sampled completions."""

from __future__ import annotations

import functools

import torch

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


@_without_autograd
def hf_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams,
                pad_token_id: int, eos_token_id: int | list[int]) -> torch.Tensor:
    """Sample completions for left-padded prompts ``[B, P]``; returns ``[B * n, C]`` completion
    ids (prompt removed; the ``n`` samples of a prompt are consecutive rows), padded with
    ``pad_token_id`` after EOS. The model is put in eval mode for the call and restored
    afterwards. Under sharding every rank keeps stepping until all ranks are done
    (``synced_gpus``), since each forward is a collective."""
    was_training = model.training
    model.eval()
    try:
        greedy = sampling.temperature == 0
        kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_token_id,
                      eos_token_id=eos_token_id, num_return_sequences=sampling.n, use_cache=True,
                      synced_gpus=distributed.initialized() and is_sharded(model))
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)  # 0 turns the top-k filter off
        else:  # HF refuses num_return_sequences > 1 without sampling: repeat the prompts instead
            kwargs.update(temperature=None, top_p=None, top_k=None, num_return_sequences=1)
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(sampling.n, 0), prompt_mask.repeat_interleave(sampling.n, 0)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
    return out[:, prompt_ids.shape[1]:]


def completion_masks(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [N, C], truncated [N])``: 1 up to and including each row's first stop id (EOS, or
    any of a list of ids); a row with none is truncated and all its tokens count. Works when the
    pad id is a stop id."""
    stops = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                            device=completion_ids.device)
    is_eos = torch.isin(completion_ids, stops)
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, completion_ids.shape[1], dtype=torch.long))
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
                        with_entropy: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
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
def chunked_logprobs(model: torch.nn.Module, rollout: RolloutBatch, temperature: float, batch_size: int) -> torch.Tensor:
    """:func:`completion_logprobs` of every row, ``batch_size`` rows per forward, each chunk
    trimmed as :meth:`RolloutBatch.trimmed` does (the layout training micro-batches use)."""
    was_training = model.training
    model.eval()
    try:
        out = torch.zeros_like(rollout.completion_ids, dtype=torch.float32)
        for rows, chunk in rollout.chunks(batch_size):
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

    ``generate(model, prompts, sampling)`` samples ``sampling.n`` completions for each prompt of
    a prompt batch (``prompt_ids``/``prompt_mask`` ``[B, P]`` left-padded, optional ``prompts``
    and ``meta`` lists) in one batched call and returns a :class:`RolloutBatch` whose
    ``logprobs`` come from :func:`chunked_logprobs` at ``sampling.temperature``. The weights
    are the training model's, so :meth:`update_weights` has nothing to copy.
    """

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation uses the live training weights."""

    def generate(self, model: torch.nn.Module, prompts: dict, sampling: SamplingParams) -> RolloutBatch:
        tok = self.tokenizer
        stops = sampling.stop_ids(tok)
        ids = hf_generate(model, prompts["prompt_ids"], prompts["prompt_mask"], sampling, tok.pad_token_id, stops)
        ids = ids.clone()  # out of inference mode: the training forward's embedding saves these indices
        mask, truncated = completion_masks(ids, stops)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
        n = sampling.n
        rollout = RolloutBatch(
            prompt_ids=prompts["prompt_ids"].repeat_interleave(n, 0),
            prompt_mask=prompts["prompt_mask"].repeat_interleave(n, 0),
            completion_ids=ids, completion_mask=mask, logprobs=torch.zeros(ids.shape, device=ids.device),
            truncated=truncated,
            prompts=[p for p in prompts.get("prompts", [""] * len(prompts["prompt_ids"])) for _ in range(n)],
            completions=decode_completions(tok, ids, stops),
            meta=[m for m in prompts.get("meta", [{}] * len(prompts["prompt_ids"])) for _ in range(n)],
            group_size=n,
        ).trimmed()
        rollout.logprobs = chunked_logprobs(model, rollout, sampling.temperature, self.logprob_batch_size)
        return rollout
