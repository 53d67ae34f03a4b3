"""Per-token log-probabilities and entropies from logits, without a float32 [B, T, V] copy.

Both are custom autograd functions: the forward walks chunks of rows in float32 and keeps only
the input logits (their own dtype) plus a float32 value per row; the backward recomputes each
chunk's softmax in float32 and writes the gradient in the logits' dtype. Written with plain ops
per chunk, autograd would keep every chunk's float32 upcast alive for the backward, which adds up
to a full float32 ``[B*T, V]`` (twice the size of bf16 logits) -- the copy this avoids.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


def _row_blocks(x: torch.Tensor, chunk_size: int):
    """``(start, stop, block)`` over the rows of ``x`` ``[..., V]`` read as ``[N, V]`` in row-major
    order, each ``block`` a ``[<= chunk_size, V]`` view: no copy of ``x`` even when it is a
    non-contiguous slice (``logits[:, :-1]``); such leading dimensions are walked one by one."""
    v = x.shape[-1]
    try:
        flat = x.view(-1, v)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, flat.shape[0], chunk_size):
            stop = min(start + chunk_size, flat.shape[0])
            yield start, stop, flat[start:stop]
        return
    inner = math.prod(x.shape[1:-1])
    for i in range(x.shape[0]):
        for start, stop, block in _row_blocks(x[i], chunk_size):
            yield i * inner + start, i * inner + stop, block


def _scaled(block: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """A fresh ``dtype`` copy of ``block / temperature`` (safe to modify in place)."""
    z = block.to(dtype, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for half types and float32; float64 stays float64 (for gradcheck)
    return torch.promote_types(dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    """``z_y / t - logsumexp(z / t)`` per row of ``[N, V]`` logits, chunked; saves logits, ids, lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, temperature: float, chunk_size: int):
        dtype = _compute_dtype(logits.dtype)
        n = ids.numel()
        out = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for start, stop, block in _row_blocks(logits, chunk_size):
            z = _scaled(block, dtype, temperature)
            lse[start:stop] = torch.logsumexp(z, dim=-1)
            out[start:stop] = z.gather(-1, ids[start:stop, None]).squeeze(-1) - lse[start:stop]
            del z
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, ids, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        t = ctx.temperature
        dtype = lse.dtype
        # d/dx_j [x_y / t - logsumexp(x / t)] = (1[j = y] - softmax(x / t)_j) / t
        scale = grad_out.reshape(-1).to(dtype) / t
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(-1, logits.shape[-1])
        for start, stop, block in _row_blocks(logits, ctx.chunk_size):
            p = _scaled(block, dtype, t).sub_(lse[start:stop, None]).exp_()  # softmax(x / t)
            p.neg_().scatter_add_(-1, ids[start:stop, None], torch.ones_like(p[:, :1]))
            grad_flat[start:stop] = p.mul_(scale[start:stop, None])
            del p
        return grad, None, None, None


class _TokenEntropy(torch.autograd.Function):
    """``H(softmax(z / t))`` per row of ``[N, V]`` logits, chunked; saves logits and H."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float, chunk_size: int):
        dtype = _compute_dtype(logits.dtype)
        n = math.prod(logits.shape[:-1])
        out = torch.empty(n, dtype=dtype, device=logits.device)
        for start, stop, block in _row_blocks(logits, chunk_size):
            logp = torch.log_softmax(_scaled(block, dtype, temperature), dim=-1)
            out[start:stop] = -(logp.exp() * logp).sum(-1)
            del logp
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        t = ctx.temperature
        dtype = entropy.dtype
        # H = -sum_k p_k log p_k, p = softmax(x / t): dH/dx_j = -p_j (log p_j + H) / t
        scale = grad_out.reshape(-1).to(dtype) / -t
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(-1, logits.shape[-1])
        for start, stop, block in _row_blocks(logits, ctx.chunk_size):
            logp = torch.log_softmax(_scaled(block, dtype, t), dim=-1)
            p = logp.exp()
            logp.add_(entropy[start:stop, None]).mul_(p).mul_(scale[start:stop, None])
            grad_flat[start:stop] = logp
            del logp, p
        return grad, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log p(label_t) under ``softmax(logits_t / temperature)``.

    Args:
        logits: ``[B, T, V]`` (any float dtype), already aligned with ``labels`` (the caller shifts).
        labels: ``[B, T]`` token ids; positions the caller masks out may hold any valid id
            (``-100`` is read as 0 here so the gather stays in range; mask the result).
        temperature: sampling temperature, so the log-probs match those of the sampler.
        chunk_size: rows of the flattened ``[B*T, V]`` upcast to float32 at a time.
    Returns:
        ``[B, T]`` float32 log-probs (float64 for float64 logits), differentiable with respect
        to ``logits``.

    ``log p = z_label - logsumexp(z)``, ``z = logits / temperature``, computed per chunk of rows
    in float32. The backward keeps only the logits themselves (their own dtype) and the float32
    ``logsumexp`` per row, and recomputes each chunk's softmax; its gradient
    ``(onehot(label) - softmax(z)) / temperature`` is written in the logits' dtype. The peak extra
    memory is one float32 ``[chunk_size, V]`` block, in the forward and the backward, instead of a
    float32 ``[B, T, V]`` log-softmax.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    ids = labels.reshape(-1).clamp(min=0)
    return _TokenLogprobs.apply(logits, ids, float(temperature), int(chunk_size)).view(labels.shape)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy ``H(softmax(logits_t / temperature))`` per position: ``[B, T, V]`` -> ``[B, T]`` float32
    (float64 for float64 logits).

    Chunked as :func:`token_logprobs`, and differentiable (an entropy bonus) the same way: the
    backward keeps the logits and ``H`` per row and recomputes each chunk's log-softmax; the
    gradient ``-p (log p + H) / temperature`` is written in the logits' dtype."""
    if temperature <= 0:
        raise ValueError(f"token_entropy: temperature must be > 0, got {temperature}")
    return _TokenEntropy.apply(logits, float(temperature), int(chunk_size)).view(logits.shape[:-1])
