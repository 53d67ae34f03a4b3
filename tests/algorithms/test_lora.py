"""LoRA (peft) for every module: only the adapters (and what a module trains in full beside them:
the reward head, the LLaVA projector, the PPO critic) move, the reference of a KL-regularised
module is the base with its adapters disabled, and the export holds the merged weights or the
adapter alone. Targets the model lacks fail at construction, before any weights load."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lit_align import PPO, SFT, InstructionDataModule, PreferenceDataModule, RewardModel
from lit_align.algorithms.llava import LLaVA, LLaVADPO
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.models import CausalLMSpec, LoraSpec, build_causal_lm
from lit_align.models.causal_lm import model_skeleton
from lit_align.models.lora import check_targets
from lit_align.models.tokenizer import build_tokenizer
from lit_align.rewards import RewardSpec
from tests.algorithms.test_precision import ARITH, LM, OPTIM, RL, TOWER, _shapes
from tests.conftest import arith_prompts, tiny_config

ADAPTER = LoraSpec(r=4, alpha=8)
VARIED = dict(engine="tests.algorithms.test_policy_gradient:FixedEngine", num_generations=4,
              rewards=[RewardSpec("tests.algorithms.test_policy_gradient:fixed_reward", label="fixed")])

#: module, data module, the parameter names trained in full beside the adapters
CASES = {
    "sft": (lambda lora: SFT(**LM, eval_max_new_tokens=0, lora=lora), lambda: InstructionDataModule(**ARITH), ()),
    "rm": (lambda lora: RewardModel(**LM, lora=lora), lambda: PreferenceDataModule(**ARITH, group_by_length=False),
           ("score",)),
    # rewards that differ within every group (the random tiny policy scores 0 on arith): advantages != 0
    "grpo": (lambda lora: PolicyGradient(**LM, **{**RL, **VARIED}, beta=0.05, lora=lora), lambda: arith_prompts(2, 8),
             ()),
    "ppo": (lambda lora: PPO(**LM, **RL, critic_optim=OPTIM, beta=0.05, ppo_epochs=1, mini_batches=1, lora=lora),
            lambda: arith_prompts(2, 8), ()),
    "llava": (lambda lora: LLaVA(model=CausalLMSpec(config=tiny_config(), seed=1), vision_tower=TOWER, optim=OPTIM,
                                 eval_max_new_tokens=0, lora=lora), lambda: _shapes("instruction"), ("projector.",)),
}


def _fit(module, data, tmp_path, steps=2):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    return trainer


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_only_the_adapters_and_the_fully_trained_parts_move(case, tmp_path):
    make_module, make_data, full = CASES[case]
    module = make_module(ADAPTER)
    module.configure_model()
    before = _snapshot(module.model)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or any(f in n for f in full) for n in trainable), trainable
    critic = _snapshot(module.critic) if case == "ppo" else None
    _fit(module, make_data(), tmp_path)
    after = _snapshot(module.model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved <= trainable, moved - trainable  # the base stays frozen
    assert any("lora_B" in n for n in moved)  # lora_B starts at 0: a step moved the adapters
    if full:  # the head / projector trained in full beside them
        assert any(any(f in n for f in full) and "lora_" not in n for n in moved), moved
    if case == "ppo":  # the critic is not an adapter model: it trains in full
        assert all(p.requires_grad for p in module.critic.parameters())
        assert sum(not torch.equal(critic[n], p) for n, p in module.critic.named_parameters()) > len(critic) // 2


@pytest.mark.parametrize("case", ["ppo", "grpo"])
def test_rl_reference_is_the_initial_policy_with_adapters_disabled(case, tmp_path):
    module = CASES[case][0](ADAPTER)
    assert module.ref_model is None  # no second copy of the weights
    _fit(module, CASES[case][1](), tmp_path)
    tokenizer = build_tokenizer("byte")
    initial = build_causal_lm(LM["model"], tokenizer).eval()
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with module.reference.policy(module) as ref:
        ref_logits = ref(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, initial(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    policy = module.model.eval()(input_ids=ids).logits
    assert (policy - ref_logits).abs().max() > 1e-4  # the trained policy itself moved away from it


@pytest.mark.parametrize("case", ["sft", "rm"])
def test_merged_export_is_a_plain_model_with_the_adapters_folded_in(case, tmp_path):
    module = CASES[case][0](ADAPTER)
    _fit(module, CASES[case][1](), tmp_path)
    module.export_hf(str(tmp_path / "hf"))
    auto = AutoModelForSequenceClassification if case == "rm" else AutoModelForCausalLM
    exported = auto.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in k for k in exported.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, module.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_adapter_export_holds_the_adapter_alone_and_reloads_on_the_base(tmp_path):
    from peft import PeftModel

    module = SFT(**LM, eval_max_new_tokens=0, lora=LoraSpec(r=4, alpha=8, export="adapter"))
    _fit(module, InstructionDataModule(**ARITH), tmp_path)
    module.export_hf(str(tmp_path / "hf"))
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    base = build_causal_lm(LM["model"], build_tokenizer("byte"))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)


def test_llava_lora_export_merges_the_language_model(tmp_path):
    from lit_align.models.llava import load_llava

    module = CASES["llava"][0](ADAPTER)
    data = CASES["llava"][1]()
    _fit(module, data, tmp_path)
    module.export_hf(str(tmp_path / "hf"))
    model, _ = load_llava(str(tmp_path / "hf"))
    assert not any("lora" in k for k in model.state_dict())
    batch = data.collate([[r] for r in data.encoded["validation"][:2]])
    module.model.eval()
    with torch.no_grad():
        want = module.lm_forward(batch)
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_counts=batch["image_counts"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- settings refused at construction -----------------------------------------------------------
def test_a_target_the_model_lacks_fails_before_weights_load(tmp_path, tiny_export, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"SFT.lora.target_modules: 'c_attn' is not a module of LlamaForCausalLM "
                                         r"\(its adaptable modules: \[.*'q_proj'"):
        SFT(model=CausalLMSpec(pretrained=tiny_export), lora=LoraSpec(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ValueError, match=r"'model.layers.0' is a LlamaDecoderLayer, which LoRA cannot wrap"):
        SFT(model=CausalLMSpec(pretrained=tiny_export), lora=LoraSpec(target_modules=["model.layers.0"]))
    with pytest.raises(ValueError, match=r"the pattern '.\*attn_c' matches no linear"):
        SFT(model=CausalLMSpec(pretrained=tiny_export), lora=LoraSpec(target_modules=".*attn_c"))
    # a regular expression and suffixes that exist pass
    check_targets(LoraSpec(target_modules=r".*\.(q|v)_proj"), model_skeleton(LM["model"], build_tokenizer("byte")))


def test_lora_settings_that_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"lora.export: 'both' is not one of \('merged', 'adapter'\)"):
        LoraSpec(export="both")
    with pytest.raises(ValueError, match="lora.target_modules: an empty list"):
        LoraSpec(target_modules=[])
    with pytest.raises(ValueError, match="lora adapts the language model, which freeze_language_model freezes"):
        LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, freeze_language_model=True, lora=ADAPTER)
    with pytest.raises(ValueError, match="LLaVA.lora.export: 'adapter' is not available"):
        LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, lora=LoraSpec(export="adapter"))
    with pytest.raises(ValueError, match="LLaVADPO: with lora the reference is the model with its adapters disabled"):
        LLaVADPO(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, lora=ADAPTER)


def test_llava_dpo_lora_reference_is_the_initial_model(tmp_path):
    module = LLaVADPO(model=CausalLMSpec(config=tiny_config(), seed=1), vision_tower=TOWER, optim=OPTIM,
                      freeze_projector=True, eval_max_new_tokens=0, lora=ADAPTER)
    data = _shapes("preference")
    module.configure_model()
    data.tokenizer, data.image_transform, data.num_image_tokens = (module.tokenizer, module.image_transform,
                                                                   module.num_image_tokens)
    data.setup("fit")
    batch = data.collate([[r] for r in data.encoded["train"][:2]])
    with torch.no_grad():
        start = module.lm_forward(batch)
    _fit(module, data, tmp_path)
    with module.reference.policy(module) as ref, torch.no_grad():
        torch.testing.assert_close(module.lm_forward(batch, ref), start, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (module.lm_forward(batch) - start).abs().max() > 1e-4


def test_adapters_initialise_from_their_own_seed_whatever_the_global_random_state():
    """Ranks whose global RNGs differ (no seed_everything, or per-rank streams) build the same A
    matrices: under FSDP2 each keeps its shard of its own initialisation, so they must agree."""
    from lit_align.models import apply_lora

    tokenizer = build_tokenizer("byte")

    def adapters(global_seed: int, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        model = apply_lora(build_causal_lm(CausalLMSpec(config=tiny_config(), seed=1), tokenizer),
                           LoraSpec(r=4, alpha=8, seed=seed))
        after = torch.rand(1)  # the global stream was left where it was
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))
        return {k: v for k, v in model.state_dict().items() if "lora_A" in k}

    first, other_rank, other_seed = adapters(0, 0), adapters(123, 0), adapters(0, 1)
    assert first and first.keys() == other_rank.keys()
    assert all(torch.equal(first[k], other_rank[k]) for k in first)
    assert all(not torch.equal(first[k], other_seed[k]) for k in first)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="lora.seed: expected an integer >= 0"):
            LoraSpec(seed=bad)
