"""FSDP2 settings that cannot hold fail when the module is set up, from the model's config and
before ``configure_model`` loads any weights: a family whose decoder layer class is unknown (the
message names the class to pass), and tensor parallelism, which the data layout does not count."""

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
        return type("Dim", (), {"size": lambda self: size})()


def test_tensor_parallel_size_above_one_is_refused_before_the_model_is_built():
    module = SFT(model=SPEC, eval_max_new_tokens=0)
    module._device_mesh = _Mesh((1, 2))
    with pytest.raises(ValueError, match="SFT: ModelParallelStrategy tensor_parallel_size 2 is not supported"):
        module.setup("fit")
    assert module.model is None
    module._device_mesh = _Mesh((2, 1))  # data parallel only: set up goes on
    module.setup("fit")
