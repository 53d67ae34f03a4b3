"""LLaVA: freeze flags in both stages, the stage 1 -> stage 2 -> DPO chain through the CLI,
the export round trip and invalid settings."""

import os
from collections import Counter

import pytest
import torch

from lit_align import CausalLMSpec, ImageInstructionDataModule, LLaVA, ShapesTask
from lit_align.models.llava import load_llava
from lit_align.models.vision import VisionTowerSpec
from tests.conftest import fit_recipe, tiny_config, write_tiny_export

TOWER = VisionTowerSpec(library="timm", name="vit_tiny_patch16_224",
                        kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))


def _module(**kw):
    m = LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, projector="mlp2x_gelu",
              eval_max_new_tokens=0, **kw)
    m.configure_model()
    return m


def _batch(m, kind="caption"):
    dm = ImageInstructionDataModule(task=ShapesTask(train_size=16, val_size=4), kind=kind, max_length=160,
                                    micro_batch_size=4)
    dm.tokenizer, dm.image_transform, dm.num_image_tokens = m.tokenizer, m.image_transform, m.num_image_tokens
    dm.setup("fit")
    return dm.collate([[r] for r in dm.encoded["train"][:4]])


def _trained(m) -> set[str]:
    m.model.zero_grad()
    logp, mask = m.shifted(_batch(m))
    (-(logp * mask).sum()).backward()
    parts = set()
    for name, p in m.model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts.add(name.split(".")[0])
    return parts


@pytest.mark.parametrize("freeze_lm, expected", [(True, {"projector"}), (False, {"projector", "language_model"})])
def test_freeze_flags_decide_what_gets_gradients(freeze_lm, expected):
    """Stage 1 (projector only) and stage 2 (projector + LM); the tower never gets gradients."""
    m = _module(freeze_language_model=freeze_lm)
    assert _trained(m) == expected
    trainable = {n.split(".")[0] for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable == expected


@pytest.mark.parametrize("freeze_lm, freeze_projector, expected", [
    (False, False, {"projector", "language_model"}), (True, False, {"projector"}), (False, True, {"language_model"})])
def test_freeze_flags_of_a_stage_started_from_an_export(tmp_path, freeze_lm, freeze_projector, expected):
    """Stage 2 (and DPO) start from an earlier stage's export: it loads that stage's weights,
    and its own freeze flags decide what trains."""
    from tests.conftest import write_tiny_llava_export

    export = write_tiny_llava_export(tmp_path / "stage1")
    m = LLaVA(init_from=export, freeze_language_model=freeze_lm, freeze_projector=freeze_projector,
              eval_max_new_tokens=0)
    m.configure_model()
    saved, _ = load_llava(export)
    for part in ("vision_tower", "projector", "language_model"):
        want = getattr(saved, part).state_dict()
        for k, v in getattr(m.model, part).state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=f"{part}.{k}")
    assert _trained(m) == expected
    assert {n.split(".")[0] for n, p in m.model.named_parameters() if p.requires_grad} == expected


def test_image_positions_carry_no_labels_and_images_change_the_loss():
    m = _module()
    batch = _batch(m)
    image = batch["input_ids"] == m.image_token_id
    assert int(image.sum()) == int(batch["image_counts"].sum()) * m.num_image_tokens
    assert (batch["labels"][image] == -100).all()
    logp, mask = m.shifted(batch)
    generator = torch.Generator().manual_seed(0)
    other = dict(batch, pixel_values=torch.rand(batch["pixel_values"].shape, generator=generator))
    logp2, _ = m.shifted(other)
    # a random-init model barely looks at the image: compare per label token, far above float noise
    change = ((logp - logp2).abs() * mask).max()
    assert change > 1e-4, change
    torch.testing.assert_close(m.shifted(batch)[0], logp, rtol=0, atol=1e-6)  # and the same images give the same


def test_invalid_settings():
    with pytest.raises(ValueError, match="all frozen"):
        LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, freeze_projector=True,
              freeze_language_model=True)
    with pytest.raises(ValueError, match="llava_config.json"):
        LLaVA(init_from="/nonexistent/stage1")
    with pytest.raises(ValueError, match="projector"):
        LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=TOWER, projector="mlp9")


def test_a_language_model_besides_init_from_is_refused(tmp_path):
    """A different LM would silently replace the stage's trained one; the export's own LM
    directory may be given (to change its dtype or attention)."""
    from tests.conftest import write_tiny_llava_export

    export = write_tiny_llava_export(tmp_path / "stage1")
    with pytest.raises(ValueError, match="language model is the export's"):
        LLaVA(init_from=export, model=CausalLMSpec(config=tiny_config()))
    m = LLaVA(init_from=export, model=CausalLMSpec(pretrained=os.path.join(export, "language_model"),
                                                   attn_implementation="eager"))
    assert m.spec.attn_implementation == "eager"


def test_every_rank_builds_the_same_projector():
    """The projector's random init is seeded (as the tower's and the LM's): processes whose global
    RNG differs still start from one model, which DDP and FSDP2 take for granted."""
    states = []
    for draws in (0, 5):
        torch.rand(draws)
        m = _module()
        states.append(m.model.projector.state_dict())
    for k, v in states[0].items():
        assert torch.equal(states[1][k], v), k


TINY = ["--model.init_args.vision_tower.kwargs",
        '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "--data.init_args.task.train_size", "32", "--model.init_args.eval_max_new_tokens", "4"]


def test_stage1_stage2_dpo_chain_through_the_cli(tmp_path):
    # stage 1 reads the LM stage's export: a tiny text LM stands in for it
    lm = write_tiny_export(tmp_path / "lm")
    s1 = fit_recipe("configs/llava/stage1_shapes.yaml", tmp_path / "s1", pretrained=lm, max_steps=2, extra=TINY)
    # the recipe's stage 1 trains the projector alone, as in the paper
    assert {n.split(".")[0] for n, p in s1.model.model.named_parameters() if p.requires_grad} == {"projector"}
    export1 = str(tmp_path / "s1" / "ckpt" / "t" / "hf")
    assert s1.trainer.global_step == 2 and torch.isfinite(s1.trainer.callback_metrics["val/exact_match"])
    # the export rebuilds the whole model with the same outputs
    loaded, _ = load_llava(export1)
    batch = _batch(s1.model)
    s1.model.model.eval()
    torch.testing.assert_close(loaded(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                               "image_counts")}).logits,
                               s1.model.lm_forward(batch), rtol=0, atol=0)
    common = ["--model.init_args.init_from", export1, "--data.init_args.task.train_size", "32",
              "--model.init_args.eval_max_new_tokens", "4"]
    s2 = fit_recipe("configs/llava/stage2_shapes.yaml", tmp_path / "s2", max_steps=2, extra=common)
    assert s2.trainer.global_step == 2
    # stage 2 starts from stage 1's projector
    proj1 = loaded.projector.state_dict()
    export2 = str(tmp_path / "s2" / "ckpt" / "t" / "hf")
    common[1] = export2
    dpo = fit_recipe("configs/llava/dpo_shapes.yaml", tmp_path / "dpo", max_steps=2, extra=common)
    metrics = dpo.trainer.callback_metrics
    for key in ("val/rewards/accuracies", "val/rewards/margins", "train/rewards/chosen", "val/exact_match"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # exact match per question type (unanswerable: refusals); weighted by the types' row counts
    # the groups give back the overall figure
    counts = Counter(r["meta"]["question_type"] for r in dpo.datamodule.encoded["validation"])
    overall = sum(metrics[f"val/exact_match/{g}"].item() * n for g, n in counts.items()) / sum(counts.values())
    assert overall == pytest.approx(metrics["val/exact_match"].item())
    assert os.path.exists(tmp_path / "dpo" / "ckpt" / "t" / "hf" / "llava_config.json")
    # the DPO reference is the stage-2 model, frozen
    ref = dpo.model.ref_model
    assert not any(p.requires_grad for p in ref.parameters())
    stage2, _ = load_llava(export2)
    torch.testing.assert_close(ref.projector.state_dict()["0.weight"], stage2.projector.state_dict()["0.weight"])
    assert not torch.equal(proj1["0.weight"], stage2.projector.state_dict()["0.weight"])
