"""LLaVA model side: tiny open_clip and timm towers built offline, layer/feature selection
against block hooks, local checkpoints, freezing, projectors, image-token splicing and its
errors, generation of new tokens only, and the export round trip."""

import pytest
import torch
from PIL import Image

from lit_align.models import (
    CausalLMSpec,
    LlavaModel,
    VisionTower,
    VisionTowerSpec,
    add_image_token,
    build_causal_lm,
    build_projector,
    build_tokenizer,
    load_llava,
    save_llava,
)
from tests.conftest import tiny_config

N = 16  # (32 / 8) ** 2 patches
TIMM_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
OPEN_CLIP_KWARGS = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                        text_cfg=dict(width=32, heads=2, layers=1))


def tower_spec(library: str = "timm", **overrides) -> VisionTowerSpec:
    if library == "timm":
        base = dict(library="timm", name="vit_tiny_patch16_224", kwargs=TIMM_KWARGS)
    else:
        base = dict(library="open_clip", name="ViT-B-32", kwargs=OPEN_CLIP_KWARGS)
    return VisionTowerSpec(**{**base, **overrides})


def blocks_of(tower: VisionTower):
    return tower.model.blocks if tower.spec.library == "timm" else tower.model.transformer.resblocks


def matrix(block) -> torch.Tensor:
    """The first randomly initialised weight matrix of a block (norm weights start at ones)."""
    return next(p for p in block.parameters() if p.dim() == 2)


def images(m: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def build_llava(library: str = "timm", projector: str = "mlp2x_gelu", **tower_overrides):
    tok = build_tokenizer("byte")
    image_id = add_image_token(tok)
    lm = build_causal_lm(CausalLMSpec(config=tiny_config()), tok)
    lm.resize_token_embeddings(len(tok))
    tower = VisionTower(tower_spec(library, **tower_overrides))
    torch.manual_seed(0)
    model = LlavaModel(tower, build_projector(projector, tower.hidden_size, 32), lm, image_id)
    return model, tok


def row(tok, image_id: int, *parts) -> list[int]:
    """Token ids of text parts, ``None`` standing for one image (``N`` image-token positions)."""
    ids = []
    for part in parts:
        ids += [image_id] * N if part is None else tok(part, add_special_tokens=False).input_ids
    return ids


def two_row_batch(tok, image_id: int):
    """Row 0 holds two images, row 1 one image; right-padded with pad id 0."""
    rows = [row(tok, image_id, "hi", None, "and", None, "?"), row(tok, image_id, None, "what is it")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("library", ["timm", "open_clip"])
@pytest.mark.parametrize("feature, tokens", [("patch", N), ("cls_patch", N + 1)])
def test_tiny_tower_builds_offline_and_gives_m_n_d(library, feature, tokens):
    tower = VisionTower(tower_spec(library, select_feature=feature))
    assert (tower.num_tokens, tower.hidden_size, tower.image_size) == (tokens, 32, (32, 32))
    assert tower(images(3)).shape == (3, tokens, 32)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_selected_layer_is_the_hooked_block_output(library):
    last = VisionTower(tower_spec(library, select_layer=-1, select_feature="cls_patch"))
    penult = VisionTower(tower_spec(library, select_layer=-2))
    assert (len(blocks_of(last)), len(blocks_of(penult))) == (2, 1)  # blocks after the selected one are pruned
    captured = []
    for block in blocks_of(last):
        block.register_forward_hook(lambda module, args, out: captured.append(out))
    x = images(2)
    with torch.no_grad():
        out_last = last(x)
    assert len(captured) == 2 and captured[1].shape == (2, N + 1, 32)
    torch.testing.assert_close(out_last, captured[1], rtol=0, atol=0)  # cls_patch: prefix token kept in front
    with torch.no_grad():
        out_penult = penult(x)
    torch.testing.assert_close(out_penult, captured[0][:, 1:], rtol=0, atol=0)  # patch: CLS dropped
    assert not torch.allclose(out_penult, out_last[:, 1:])


def test_select_layer_out_of_range_and_spec_errors():
    with pytest.raises(ValueError, match="select_layer: -3 is out of range.*2 blocks"):
        VisionTower(tower_spec("timm", select_layer=-3))
    with pytest.raises(ValueError, match="library"):
        VisionTowerSpec(library="hf")
    with pytest.raises(ValueError, match="select_feature"):
        VisionTowerSpec(select_feature="cls")
    with pytest.raises(ValueError, match="select_layer"):
        VisionTowerSpec(select_layer="penultimate")
    with pytest.raises(ValueError, match="not a timm model"):
        VisionTower(VisionTowerSpec(library="timm", name="no_such_vit"))
    with pytest.raises(ValueError, match="not a ViT-style tower"):
        VisionTower(VisionTowerSpec(library="timm", name="resnet10t"))
    with pytest.raises(ValueError, match="ModifiedResNet.*only ViT"):
        VisionTower(VisionTowerSpec(name="RN50", kwargs=dict(
            embed_dim=32, vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=32),
            text_cfg=OPEN_CLIP_KWARGS["text_cfg"])))
    with pytest.raises(ValueError, match="neither an existing"):
        VisionTower(tower_spec("timm", pretrained="/no/such/file.pth"))
    with pytest.raises(ValueError, match="neither an existing file nor a pretrained tag"):
        VisionTower(tower_spec("open_clip", pretrained="/no/such/file.pt"))


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_transform_maps_any_pil_image_to_tower_size(library):
    tower = VisionTower(tower_spec(library))
    pixels = tower.transform(Image.new("RGB", (50, 40), (200, 30, 10)))
    assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, 32, 32)
    assert tower(pixels[None]).shape == (1, N, 32)


@pytest.mark.parametrize("library, fmt", [("timm", "safetensors"), ("timm", "pth"), ("open_clip", "pt"),
                                          ("open_clip", "visual-only")])
def test_local_checkpoint_file_loads_through_pretrained(tmp_path, library, fmt):
    import open_clip
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    if library == "timm":
        source = timm.create_model("vit_tiny_patch16_224", **TIMM_KWARGS)
        first_block = source.blocks[0]
    else:
        source = open_clip.create_model("ViT-B-32", **OPEN_CLIP_KWARGS)
        first_block = source.visual.transformer.resblocks[0]
        if fmt == "visual-only":
            source = source.visual
    path = str(tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    else:
        torch.save(source.state_dict(), path)
    loaded = VisionTower(tower_spec(library, pretrained=path))
    fresh = VisionTower(tower_spec(library))
    for key, value in first_block.state_dict().items():
        torch.testing.assert_close(blocks_of(loaded)[0].state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(matrix(blocks_of(fresh)[0]), matrix(first_block))
    # load_weights=False (used by load_llava) skips the file: the seeded random init
    skipped = VisionTower(tower_spec(library, pretrained=path), load_weights=False)
    assert torch.equal(matrix(blocks_of(skipped)[0]), matrix(blocks_of(fresh)[0]))


def test_same_seed_same_tower():
    a, b = VisionTower(tower_spec("open_clip")), VisionTower(tower_spec("open_clip"))
    c = VisionTower(tower_spec("open_clip", seed=1))
    x = images(1)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))


def test_frozen_tower_gets_no_grads_and_stays_in_eval():
    model, tok = build_llava("open_clip")
    model.train()
    assert model.language_model.training and model.projector.training
    assert not any(m.training for m in model.vision_tower.modules())
    ids, mask = two_row_batch(tok, model.image_token_id)
    out = model(ids, mask, pixel_values=images(3), image_counts=[2, 1],
                labels=ids.masked_fill(ids == model.image_token_id, -100))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert model.language_model.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_trainable_tower_trains_and_every_parameter_is_used(library):
    model, tok = build_llava(library, freeze=False)
    model.train()
    assert model.vision_tower.training
    ids, mask = two_row_batch(tok, model.image_token_id)
    model(ids, mask, pixel_values=images(3), image_counts=[2, 1]).logits.sum().backward()
    unused = [n for n, p in model.vision_tower.named_parameters() if p.grad is None]
    assert unused == []  # pruned final norm/head/later blocks: nothing idle under DDP


def test_projector_kinds_shapes_and_parameter_counts():
    x = torch.randn(2, 5, 48)
    linear, mlp = build_projector("linear", 48, 32), build_projector("mlp2x_gelu", 48, 32)
    assert linear(x).shape == mlp(x).shape == (2, 5, 32)
    assert sum(p.numel() for p in linear.parameters()) == 48 * 32 + 32
    assert sum(p.numel() for p in mlp.parameters()) == (48 * 32 + 32) + (32 * 32 + 32)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="unknown kind 'conv'.*linear, mlp2x_gelu"):
        build_projector("conv", 48, 32)


def test_image_token_is_one_special_id_idempotent():
    tok = build_tokenizer("byte")
    image_id = add_image_token(tok)
    size = len(tok)
    assert add_image_token(tok) == image_id and len(tok) == size == 385
    a, b = tok("a", add_special_tokens=False).input_ids, tok("b", add_special_tokens=False).input_ids
    assert tok("a<image>b", add_special_tokens=False).input_ids == a + [image_id] + b
    assert tok.decode(a + [image_id] + b, skip_special_tokens=True) == "ab"


def test_splice_puts_projected_images_in_order_and_keeps_text_embeddings():
    model, tok = build_llava("timm")
    ids, mask = two_row_batch(tok, model.image_token_id)
    pixels = images(3)
    with torch.no_grad():
        embeds = model.embed(ids, pixels, image_counts=torch.tensor([2, 1]))
        projected = model.projector(model.vision_tower(pixels))  # [3, N, D]
        text = model.language_model.get_input_embeddings()(ids)
    is_image = ids == model.image_token_id
    assert is_image.sum().item() == 3 * N
    pos0 = is_image[0].nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, pos0[:N]], projected[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, pos0[N:]], projected[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1, is_image[1]], projected[2], rtol=0, atol=0)
    torch.testing.assert_close(embeds[~is_image], text[~is_image], rtol=0, atol=0)
    # the whole-model forward runs the LM on exactly these embeddings
    with torch.no_grad():
        logits = model(ids, mask, pixel_values=pixels, image_counts=[2, 1]).logits
        direct = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)


def test_image_position_mismatches_name_the_row():
    model, tok = build_llava("timm")
    image_id = model.image_token_id
    ids, _ = two_row_batch(tok, image_id)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"row 0: 32 image-token positions, expected 1 image\(s\) x 16"):
            model.embed(ids, images(2), image_counts=[1, 1])  # one image too few for row 0
        with pytest.raises(ValueError, match=r"row 1: 16 image-token positions, expected 0 image\(s\)"):
            model.embed(ids, images(2), image_counts=[2, 0])  # placeholder in row 1 but no image
        with pytest.raises(ValueError, match="row 1: has image placeholders beyond the 2 image"):
            model.embed(ids, images(2))  # no image_counts: the first row that runs out of images
        with pytest.raises(ValueError, match="row 0: has image placeholders beyond the 0 image"):
            model(ids)  # placeholders, no pixel_values
        with pytest.raises(ValueError, match="sums to 3 images but pixel_values holds 4"):
            model.embed(ids, images(4), image_counts=[2, 1])
        short = torch.tensor([row(tok, image_id, "x", None)[:-1]])  # a placeholder expanded to N - 1 tokens
        with pytest.raises(ValueError, match="row 0: 15 image-token positions, not a multiple"):
            model.embed(short, images(1))
        text_only = torch.tensor([row(tok, image_id, "plain text")])
        with pytest.raises(ValueError, match="row 0: 0 image-token positions, expected 1"):
            model(text_only, pixel_values=images(1), image_counts=[1])


def test_text_only_forward_is_the_plain_lm_forward():
    model, tok = build_llava("timm")
    ids = torch.tensor([row(tok, model.image_token_id, "no image here"),
                        row(tok, model.image_token_id, "nor here!!!!!")])
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits,
                                   model.language_model(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)


def greedy_loop(model: LlavaModel, ids: torch.Tensor, pixels: torch.Tensor, steps: int) -> list[int]:
    """Hand-written greedy decoding over embeddings for one unpadded row, no KV cache."""
    embed_tokens = model.language_model.get_input_embeddings()
    embeds, new = model.embed(ids, pixels), []
    for _ in range(steps):
        token = model.language_model(inputs_embeds=embeds).logits[0, -1].argmax()
        new.append(int(token))
        embeds = torch.cat([embeds, embed_tokens(token.view(1, 1))], dim=1)
    return new


def test_generate_returns_new_tokens_matching_a_greedy_loop():
    model, tok = build_llava("timm")
    model.eval()
    image_id = model.image_token_id
    prompts = [row(tok, image_id, "A", None, "B", None, "describe"), row(tok, image_id, None, "what?")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixels = images(3, seed=5)
    out = model.generate(ids, mask, pixel_values=pixels, image_counts=[2, 1], max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 6)
    with torch.no_grad():
        assert out[0].tolist() == greedy_loop(model, torch.tensor([prompts[0]]), pixels[:2], 6)
        assert out[1].tolist() == greedy_loop(model, torch.tensor([prompts[1]]), pixels[2:], 6)
        first = model(ids, mask, pixel_values=pixels, image_counts=[2, 1]).logits[:, -1].argmax(-1)
    assert out[:, 0].tolist() == first.tolist()


@pytest.mark.parametrize("library, projector", [("open_clip", "mlp2x_gelu"), ("timm", "linear")])
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, library, projector):
    import json

    model, tok = build_llava(library, projector=projector, select_feature="cls_patch")
    n = model.num_image_tokens  # cls_patch: N + 1 positions per image
    ids = torch.tensor([[100] + [model.image_token_id] * n + [101, 102]])
    pixels = images(1, seed=9)
    save_llava(model, str(tmp_path), tok, model.vision_tower.spec, projector)
    config = json.loads((tmp_path / "llava_config.json").read_text())
    assert config["projector"] == projector and config["num_tokens"] == n == N + 1
    assert config["image_token"] == "<image>"
    assert {"projector.safetensors", "vision_tower.safetensors", "language_model"} <= \
        {p.name for p in tmp_path.iterdir()}
    loaded, loaded_tok = load_llava(str(tmp_path))
    assert loaded.image_token_id == model.image_token_id == add_image_token(loaded_tok)
    assert loaded.vision_tower.spec == model.vision_tower.spec and not loaded.vision_tower.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="projector_kind"):
        save_llava(model, str(tmp_path / "bad"), tok, model.vision_tower.spec,
                   "linear" if projector != "linear" else "mlp2x_gelu")
