"""The policy's live weights as an inference engine loads them: the state dict's names (tied weights
under each name), LoRA merged exactly as peft merges it, FSDP2 shards gathered one tensor at a time."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_align.models import CausalLMSpec, LoraSpec, apply_lora, build_causal_lm, build_tokenizer
from lit_align.rollout.weights import policy_weights
from tests.conftest import free_port, tiny_config

TOK = build_tokenizer("byte")


def _model(model_type="llama", **overrides):
    return build_causal_lm(CausalLMSpec(config=tiny_config(model_type, **overrides)), TOK)


def _perturb_adapters(model, seed=0):
    """LoRA B starts at 0 (a no-op adapter): give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_plain_model_gives_its_checkpoint_names_and_values(tied):
    model = _model(tie_word_embeddings=tied)
    weights = dict(policy_weights(model))
    state = model.state_dict()
    assert set(weights) == set(state) and "lm_head.weight" in weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name
        assert not tensor.requires_grad


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_policy_gives_the_merged_weights(model_type):
    """Equal to peft's own ``merge_and_unload`` (gpt2's Conv1D layers are fan-in-fan-out), and the
    policy keeps its adapters."""
    model = apply_lora(_model(model_type), LoraSpec(r=4, alpha=8))
    _perturb_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(policy_weights(model))
    import copy
    merged = copy.deepcopy(model).merge_and_unload()
    expected = merged.state_dict()
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    changed = [n for n in weights if not torch.equal(weights[n], _model(model_type).state_dict()[n])]
    assert changed, "the adapters changed no weight"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_modules_to_save_and_disabled_adapters():
    model = apply_lora(_model(tie_word_embeddings=False), LoraSpec(r=4, alpha=8, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]))
    _perturb_adapters(model)
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight
    weights = dict(policy_weights(model))
    assert torch.equal(weights["lm_head.weight"], trained_head)
    with model.disable_adapter():
        base = dict(policy_weights(model))
    plain = _model(tie_word_embeddings=False).state_dict()
    assert all(torch.equal(base[k], plain[k]) for k in base)
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])


def test_fsdp_v1_is_refused():
    class FullyShardedDataParallel(torch.nn.Module):  # what the check looks for
        pass

    model = torch.nn.Sequential(FullyShardedDataParallel())
    with pytest.raises(ValueError, match=r"FSDP \(v1\).*use FSDP2"):
        list(policy_weights(model))


def _fsdp2_rank(rank, world, port, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _model(num_hidden_layers=3)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "full_tensor") for p in model.parameters())
    gathered, calls, peak = {}, [0], [0]
    real = torch.distributed.tensor.DTensor.full_tensor

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    torch.distributed.tensor.DTensor.full_tensor = counting
    try:
        for name, tensor in policy_weights(model):
            # lazy: the consumer has taken every earlier tensor and this one, nothing more is gathered
            peak[0] = max(peak[0], calls[0] - len(gathered))
            gathered[name] = tensor.clone()
    finally:
        torch.distributed.tensor.DTensor.full_tensor = real
    ok = set(gathered) == set(full) and all(torch.equal(gathered[k], full[k]) for k in gathered)
    torch.save({"ok": ok, "peak": peak[0], "n": len(gathered), "calls": calls[0]}, os.path.join(out, f"{rank}.pt"))
    # no rank tears gloo down while its peer may still be in the last all-gather (an abort at exit)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_shards_are_gathered_one_tensor_at_a_time(tmp_path):
    port = free_port()
    mp.spawn(_fsdp2_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert r["ok"], rank
        assert r["peak"] == 1 and r["calls"] == r["n"], r
