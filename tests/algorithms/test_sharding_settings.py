"""FSDP2 settings that cannot hold fail when the module is set up, from the model's config and
before ``configure_model`` loads any weights: a family whose decoder layer class is unknown (the
message names the class to pass), and tensor parallelism where it does not apply."""

import pytest

from lit_align import SFT
from lit_align.models import CausalLMSpec
from lit_align.models.causal_lm import check_shardable, model_skeleton
from lit_align.models.tokenizer import build_tokenizer
from tests.conftest import tiny_config

SPEC = CausalLMSpec(config=tiny_config())


def test_fsdp2_on_a_family_without_known_decoder_layers_names_the_setting(monkeypatch):
    from transformers.models.llama import modeling_llama

    tokenizer = build_tokenizer("byte")
    skeleton = model_skeleton(SPEC, tokenizer)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}  # no weights were allocated
    check_shardable(SPEC, skeleton)  # llama declares LlamaDecoderLayer
    # a family that declares none (transformers copies the class's list onto each instance at init)
    monkeypatch.setattr(modeling_llama.LlamaPreTrainedModel, "_no_split_modules", [])
    skeleton = model_skeleton(SPEC, tokenizer)
    with pytest.raises(ValueError, match=r"model: FSDP2 shards per decoder layer, but for LlamaForCausalLM its "
                                         r"_no_split_modules \(\[\]\) name no class it has; name the transformer "
                                         r"block class with model.decoder_layer_classes, e.g. \[LlamaDecoderLayer\]"):
        check_shardable(SPEC, skeleton)
    spec = CausalLMSpec(config=tiny_config(), decoder_layer_classes=["LlamaDecoderLayer"])
    check_shardable(spec, skeleton)  # the setting names the class: sharding can go on
    with pytest.raises(ValueError, match=r"decoder_layer_classes \['Block'\] match none of its classes"):
        check_shardable(CausalLMSpec(config=tiny_config(), decoder_layer_classes=["Block"]), skeleton)


def test_module_setup_under_a_device_mesh_checks_the_decoder_layers(monkeypatch):
    from transformers.models.llama import modeling_llama

    module = SFT(model=CausalLMSpec(config=tiny_config()), eval_max_new_tokens=0)
    monkeypatch.setattr(modeling_llama.LlamaPreTrainedModel, "_no_split_modules", [])
    module._device_mesh = _Mesh((2, 1))  # what ModelParallelStrategy sets before the setup hook
    with pytest.raises(ValueError, match="SFT.model: FSDP2 shards per decoder layer"):
        module.setup("fit")
    assert module.model is None  # refused before configure_model built anything


class _Mesh:
    """What the module reads of ModelParallelStrategy's device mesh: dimension names and sizes."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, sizes):
        self.sizes = dict(zip(self.mesh_dim_names, sizes))

    def __getitem__(self, name):
        size = self.sizes[name]
        return type("Dim", (), {"size": lambda self: size, "get_group": lambda self: None})()


def test_tensor_parallel_is_checked_before_the_model_is_built():
    """SFT, DPO and RewardModel accept a tensor-parallel dimension that divides the heads and the
    MLP; online RL, LLaVA, LoRA and a size that does not divide are refused at setup, naming the
    setting, before configure_model builds anything."""
    from lit_align import DPO, RewardModel
    from lit_align.algorithms.llava import LLaVA
    from lit_align.algorithms.policy_gradient import PolicyGradient
    from lit_align.models import LoraSpec
    from lit_align.models.vision import VisionTowerSpec
    from lit_align.rewards import RewardSpec
    from tests.algorithms.test_policy_gradient import FIXED_ENGINE

    for cls in (SFT, DPO, RewardModel):
        module = cls(model=SPEC) if cls is RewardModel else cls(model=SPEC, eval_max_new_tokens=0)
        module._device_mesh = _Mesh((1, 2))
        module.setup("fit")
        assert module.model is None
    refused = {
        "PolicyGradient: ModelParallelStrategy tensor_parallel_size 2 is not supported for PolicyGradient":
            PolicyGradient(model=SPEC, engine=FIXED_ENGINE, num_generations=2, eval_max_new_tokens=0,
                           rewards=[RewardSpec("tests.algorithms.test_policy_gradient:fixed_reward")]),
        "LLaVA: ModelParallelStrategy tensor_parallel_size 2 is not supported for LLaVA": LLaVA(
            model=SPEC, eval_max_new_tokens=0, vision_tower=VisionTowerSpec(
                library="timm", name="vit_tiny_patch16_224",
                kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))),
        "SFT: lora with ModelParallelStrategy tensor_parallel_size 2":
            SFT(model=SPEC, eval_max_new_tokens=0, lora=LoraSpec(r=2)),
    }
    for message, module in refused.items():
        module._device_mesh = _Mesh((1, 2))
        with pytest.raises(ValueError, match=message):
            module.setup("fit")
        assert module.model is None
    # 2 heads, 64 MLP features: 3 ranks cannot hold equal shares
    module = SFT(model=SPEC, eval_max_new_tokens=0)
    module._device_mesh = _Mesh((1, 3))
    with pytest.raises(ValueError, match=r"SFT.model: tensor_parallel_size 3 does not divide the model's "
                                         r"num_attention_heads \(2\)"):
        module.setup("fit")


def test_tensor_parallel_plan_needs_llama_style_projections():
    from lit_align.models.causal_lm import decoder_layer_classes, model_skeleton
    from lit_align.models.parallel import check_tensor_parallel

    spec = CausalLMSpec(config=tiny_config("gpt2"))
    skeleton = model_skeleton(spec, build_tokenizer("byte"))
    with pytest.raises(ValueError, match=r"GPT2Block lacks \['self_attn.q_proj'"):
        check_tensor_parallel(skeleton, decoder_layer_classes(skeleton, None), 2, "SFT.model")
