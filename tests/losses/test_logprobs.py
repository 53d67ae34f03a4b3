"""token_logprobs and token_entropy against hand values and a plain log_softmax + gather."""

import math

import pytest
import torch

from lit_align.losses import token_entropy, token_logprobs


def _reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The naive computation: a full float32 [B, T, V] log-softmax, then gather."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)


def test_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    out = token_logprobs(logits, labels)
    expected = [3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)), -math.log(3.0)]
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_values_with_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    labels = torch.tensor([[0]])
    # softmax(z / 2) with z / 2 = [0.5, 1.0, 1.5]
    expected = 0.5 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert token_logprobs(logits, labels, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_log_softmax_gather_with_chunking(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 11
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    # chunk_size 3 < B*T = 10 and does not divide it: several full chunks and a partial last one
    out = token_logprobs(logits, labels, temperature=temperature, chunk_size=3)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out, _reference(logits, labels, temperature), atol=1e-5, rtol=1e-5)
    # the chunk size does not change the result
    torch.testing.assert_close(out, token_logprobs(logits, labels, temperature=temperature), atol=1e-6, rtol=1e-6)


def test_ignore_index_labels_do_not_crash():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 5], [1, 6, -100, -100]])
    out = token_logprobs(logits, labels, chunk_size=3)
    assert torch.isfinite(out).all()
    valid = labels != -100
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gradient_equals_reference_gradient(dtype, tol):
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 4, 9
    base = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g)

    a = base.clone().requires_grad_(True)
    (token_logprobs(a, labels, temperature=0.8, chunk_size=5) * weights).sum().backward()
    b = base.clone().requires_grad_(True)
    (_reference(b, labels, temperature=0.8) * weights).sum().backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


def test_gradient_hand_value():
    # d log p(y) / d z_j = 1[j = y] - p_j ; logits [0, 0] -> p = [1/2, 1/2]
    z = torch.zeros(1, 1, 2, requires_grad=True)
    token_logprobs(z, torch.tensor([[1]])).sum().backward()
    assert z.grad.flatten().tolist() == pytest.approx([-0.5, 0.5])


def test_empty_batch_and_bad_arguments():
    out = token_logprobs(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 3)
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


def _hand_entropy(z):
    norm = sum(math.exp(v) for v in z)
    p = [math.exp(v) / norm for v in z]
    return -sum(q * math.log(q) for q in p)


def test_entropy_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [100.0, 0.0, 0.0]]])
    out = token_entropy(logits, chunk_size=2)
    assert out.dtype == torch.float32 and out.shape == (1, 3)
    expected = [_hand_entropy([1.0, 2.0, 3.0]), math.log(3.0), 0.0]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_entropy_with_temperature_and_bfloat16():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.bfloat16)
    out = token_entropy(logits, temperature=2.0)
    assert out.item() == pytest.approx(_hand_entropy([0.5, 1.0, 1.5, 2.0]), abs=1e-5)


def _reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _inputs(dtype, B=3, T=5, V=13, seed=3):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # masked positions, read as id 0
    labels[-1, -1] = -100
    weights = torch.randn(B, T, generator=g)
    return logits, labels, weights


def _grads(fn, base, weights):
    x = base.clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])  # N = 15: 4 and 7 leave a partial last chunk
def test_values_and_gradients_equal_the_log_softmax_reference(dtype, chunk_size):
    logits, labels, weights = _inputs(dtype)
    t = 0.7
    out, grad = _grads(lambda x: token_logprobs(x, labels, temperature=t, chunk_size=chunk_size), logits, weights)
    ref, ref_grad = _grads(lambda x: _reference(x, labels, temperature=t), logits, weights)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # masked rows included: log p(id 0)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    else:  # both are the float32 gradient rounded to bf16: equal up to one rounding step
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=1e-3, rtol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_values_and_gradients_equal_the_log_softmax_reference(dtype):
    logits, _, weights = _inputs(dtype)
    out, grad = _grads(lambda x: token_entropy(x, temperature=1.3, chunk_size=4), logits, weights)
    ref, ref_grad = _grads(lambda x: _reference_entropy(x, temperature=1.3), logits, weights)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


def test_non_contiguous_logits_slice():
    # the callers pass out.logits[:, :-1]: a view that cannot be flattened without a copy
    logits, labels, weights = _inputs(torch.float32, T=6)
    full = torch.cat([logits, logits[:, :1]], dim=1)
    view = full[:, :-1]
    assert not view.is_contiguous()
    out, grad = _grads(lambda x: token_logprobs(x[:, :-1], labels, temperature=0.9, chunk_size=4), full, weights)
    ref, ref_grad = _grads(lambda x: _reference(x[:, :-1], labels, temperature=0.9), full, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    out, grad = _grads(lambda x: token_entropy(x[:, :-1], chunk_size=4), full, weights)
    ref, ref_grad = _grads(lambda x: _reference_entropy(x[:, :-1]), full, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert token_logprobs(logits, labels).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, temperature=0.7, chunk_size=4), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, temperature=0.7, chunk_size=4), (logits,))


def _saved_for_backward(fn, x):
    """(numel, dtype) of every tensor autograd saves while ``fn(x)`` runs, and the output."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return saved, out


@pytest.mark.parametrize("fn", ["logprobs", "entropy"])
def test_bf16_backward_saves_no_float32_logits(fn):
    B, T, V = 2, 8, 64
    n, nv = B * T, B * T * V
    logits, labels, _ = _inputs(torch.bfloat16, B=B, T=T, V=V)
    x = logits.requires_grad_(True)
    if fn == "logprobs":
        new, old = (lambda z: token_logprobs(z, labels, chunk_size=5)), (lambda z: _reference(z, labels))
    else:
        new, old = (lambda z: token_entropy(z, chunk_size=5)), _reference_entropy
    saved, out = _saved_for_backward(new, x)
    float32_saved = sum(numel for numel, dtype in saved if dtype == torch.float32)
    assert float32_saved <= n, saved  # a float32 value per row at most
    assert (nv, torch.bfloat16) in saved  # the logits themselves, in their own dtype
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # the hooks do see the plain log-softmax's float32 [N, V]: what the function avoids
    saved, _ = _saved_for_backward(old, x)
    assert sum(numel for numel, dtype in saved if dtype == torch.float32) >= nv
