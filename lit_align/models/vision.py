"""Vision towers (ViTs from open_clip or timm) and the projector that maps their patch
features into a language model's embedding space, as in LLaVA (Liu et al. 2023, "Visual
Instruction Tuning") and LLaVA-1.5 (Liu et al. 2024, "Improved Baselines with Visual
Instruction Tuning": penultimate-layer patch features, two-layer GELU MLP projector)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LIBRARIES = ("open_clip", "timm")
SELECT_FEATURES = ("patch", "cls_patch")
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class VisionTowerSpec:
    """Which vision tower to build and which of its features feed the language model.

    Args:
        library: ``open_clip`` or ``timm``.
        name: model name in that library, e.g. ``ViT-B-32`` / ``ViT-L-14-336`` (open_clip) or
            ``vit_base_patch16_224`` (timm).
        pretrained: where the weights come from. open_clip: a pretrained tag (``openai``,
            ``laion2b_s34b_b79k`` ...) or a local checkpoint file (a full CLIP state dict, keys
            ``visual.*``, or a state dict of the visual tower alone). timm: a local checkpoint file
            (torch or safetensors), or ``"true"`` for timm's own pretrained weights. ``None``:
            random initialisation (seeded by ``seed``).
        kwargs: passed to the model constructor, e.g. to build a tiny tower offline. timm:
            ``{img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}``. open_clip:
            entries are deep-merged into the named model's config, e.g. ``{embed_dim: 32,
            vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 2, head_width: 16},
            text_cfg: {width: 32, heads: 2, layers: 1}}`` (the text tower is built, then dropped;
            open_clip sets ViT heads through ``head_width`` = width / heads).
        select_layer: transformer block whose output is used (Python indexing over the blocks):
            ``-1`` the last block, ``-2`` the penultimate (LLaVA-1.5; equals HF CLIP's
            ``hidden_states[-2]``), ``0`` the first block. Blocks after it are pruned.
        select_feature: ``patch`` drops the CLS (and any other prefix/register) tokens,
            ``cls_patch`` keeps them in front of the patch tokens.
        freeze: no gradients for the tower and always in eval mode (LLaVA's default).
        seed: seed of the random initialisation, so every rank and every run builds the same tower.
    """

    library: str = "open_clip"
    name: str = "ViT-B-32"
    pretrained: str | None = None
    kwargs: dict[str, Any] | None = None
    select_layer: int = -2
    select_feature: str = "patch"
    freeze: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"vision_tower.library: {self.library!r} is not one of {list(LIBRARIES)}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("vision_tower.name: give a model name of the library, e.g. ViT-B-32")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"vision_tower.select_feature: {self.select_feature!r} is not one of "
                             f"{list(SELECT_FEATURES)}")
        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, int):
            raise ValueError(f"vision_tower.select_layer: must be an int block index, got {self.select_layer!r}")
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise ValueError(f"vision_tower.kwargs: must be a mapping of constructor arguments, got {self.kwargs!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"vision_tower.pretrained: must be a non-empty string or null, got {self.pretrained!r}")
        if self.library == "timm" and self.pretrained is not None and self.pretrained.lower() == "false":
            raise ValueError("vision_tower.pretrained: use null (not 'false') for a randomly initialised timm tower")


def _deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base.get(key), value)
        return merged
    return override


def _build_open_clip(spec: VisionTowerSpec, load_weights: bool) -> tuple[nn.Module, Callable, list]:
    """The ``visual`` module of an open_clip CLIP model, its eval transform and its blocks."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    base = open_clip.get_model_config(spec.name)
    if base is None:
        raise ValueError(f"vision_tower.name: {spec.name!r} is not an open_clip model config; "
                         f"see open_clip.list_models()")
    model_kwargs = {key: _deep_merge(base.get(key), value) for key, value in (spec.kwargs or {}).items()}
    pretrained, visual_state, transform_kwargs = None, None, {}
    if spec.pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        if os.path.isfile(spec.pretrained):
            if load_weights:
                try:
                    state = open_clip.factory.load_state_dict(spec.pretrained)
                except Exception:  # e.g. a TorchScript archive: open_clip's own loader knows it
                    state = None
                if state is None or any(k.startswith("visual.") for k in state):
                    pretrained = spec.pretrained  # a full CLIP checkpoint: open_clip loads it (strict)
                else:
                    visual_state = state  # the visual tower alone, loaded strictly below
        elif tag_cfg:
            if load_weights:
                pretrained = spec.pretrained
            else:  # same preprocessing as the tag, without downloading its weights
                transform_kwargs = dict(image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
                                        image_interpolation=tag_cfg.get("interpolation"),
                                        image_resize_mode=tag_cfg.get("resize_mode"))
        else:
            raise ValueError(f"vision_tower.pretrained: {spec.pretrained!r} is neither an existing file nor a "
                             f"pretrained tag of {spec.name} (tags: "
                             f"{open_clip.list_pretrained_tags_by_model(spec.name)})")
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=pretrained, pretrained_text=False, **transform_kwargs, **model_kwargs)
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"vision_tower: open_clip model {spec.name!r} has a {type(visual).__name__} image tower; "
                         "only ViT towers (open_clip VisionTransformer) are supported (for timm-backed open_clip "
                         "models use library: timm)")
    if visual_state is not None:
        visual.load_state_dict(visual_state, strict=True)
    return visual, preprocess, visual.transformer.resblocks


def _build_timm(spec: VisionTowerSpec, load_weights: bool) -> tuple[nn.Module, Callable, list]:
    import timm

    if not timm.is_model(spec.name):
        raise ValueError(f"vision_tower.name: {spec.name!r} is not a timm model; see timm.list_models()")
    kwargs = dict(spec.kwargs or {})
    source = spec.pretrained
    if source is None or not load_weights:
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
    elif source.lower() == "true":
        model = timm.create_model(spec.name, pretrained=True, **kwargs)
    elif os.path.isfile(source):
        # timm's own loading path: checkpoint filters (pos-embed resizing, format conversion), strict keys
        model = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=dict(file=source), **kwargs)
    else:
        raise ValueError(f"vision_tower.pretrained: {source!r} is neither an existing checkpoint file nor 'true'")
    needed = ("blocks", "patch_embed", "num_prefix_tokens", "forward_intermediates", "prune_intermediate_layers")
    if not all(hasattr(model, attr) for attr in needed):
        raise ValueError(f"vision_tower: timm model {spec.name!r} ({type(model).__name__}) is not a ViT-style tower "
                         f"(needs {', '.join(needed)})")
    import timm.data

    img_size = getattr(model.patch_embed, "img_size", None)
    data_cfg = timm.data.resolve_data_config({"input_size": (3, *img_size)} if img_size else {}, model=model)
    return model, timm.data.create_transform(**data_cfg), model.blocks


class VisionTower(nn.Module):
    """A ViT whose selected block's token features feed the language model.

    ``forward(pixel_values [M, 3, H, W]) -> [M, N, D_v]``: the output of block
    ``spec.select_layer`` (before any final norm), CLS/prefix tokens dropped (``patch``) or
    kept in front (``cls_patch``). Blocks after the selected one, the final norm and the
    head are pruned, so no parameter is unused (DDP) and no compute is wasted.

    Attributes:
        hidden_size: ``D_v``; num_tokens: ``N`` (from a dummy forward at build);
        image_size: ``(H, W)`` the tower expects; transform: the library's eval preprocessing,
        a callable ``PIL.Image -> tensor [3, H, W]``; layer_index: absolute index of the
        selected block.

    Args:
        load_weights: ``False`` skips ``spec.pretrained`` (used when the weights are loaded
            afterwards from a saved tower); preprocessing is the same either way.
    """

    def __init__(self, spec: VisionTowerSpec, load_weights: bool = True):
        super().__init__()
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            build = _build_timm if spec.library == "timm" else _build_open_clip
            model, transform, blocks = build(spec, load_weights)
        depth = len(blocks)
        if not -depth <= spec.select_layer < depth:
            raise ValueError(f"vision_tower.select_layer: {spec.select_layer} is out of range for {spec.name!r} "
                             f"with {depth} blocks (use -{depth} .. {depth - 1})")
        self.layer_index = spec.select_layer % depth
        self.num_prefix_tokens = 1 if spec.library == "open_clip" else int(model.num_prefix_tokens)
        if spec.select_feature == "cls_patch" and self.num_prefix_tokens == 0:
            raise ValueError(f"vision_tower.select_feature: cls_patch, but {spec.name!r} has no CLS/prefix token; "
                             "use patch")
        model.prune_intermediate_layers(indices=[self.layer_index], prune_norm=True, prune_head=True)
        for unused in ("attn_pool", "attn_pool_contrastive"):  # open_clip attentional pooling: never used here
            if getattr(model, unused, None) is not None:
                setattr(model, unused, None)
        self.model = model
        self.transform = transform
        if spec.library == "timm":
            size = tuple(model.patch_embed.img_size)
        else:
            size = model.image_size if isinstance(model.image_size, (tuple, list)) else (model.image_size,) * 2
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        if spec.freeze:
            self.requires_grad_(False)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            dummy = self(torch.zeros(1, 3, *self.image_size, dtype=self.dtype))
        self.train(was_training)
        self.num_tokens: int = int(dummy.shape[1])
        self.hidden_size: int = int(dummy.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> VisionTower:
        """A frozen tower stays in eval mode whatever its parent asks (no dropout, no patch drop)."""
        return super().train(mode and not self.spec.freeze)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W] -> [M, N, D_v]`` features of the selected block."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values: expected [M, 3, H, W], got shape {tuple(pixel_values.shape)}")
        x = pixel_values.to(self.dtype)
        keep_prefix = self.spec.select_feature == "cls_patch"
        if self.spec.library == "timm":
            out = self.model.forward_intermediates(x, indices=[self.layer_index], return_prefix_tokens=keep_prefix,
                                                   norm=False, stop_early=True, output_fmt="NLC",
                                                   intermediates_only=True)[0]
            return torch.cat([out[1], out[0]], dim=1) if keep_prefix else out
        out = self.model.forward_intermediates(x, indices=[self.layer_index], stop_early=True, output_fmt="NLC",
                                               intermediates_only=True, output_extra_tokens=keep_prefix)
        patches = out["image_intermediates"][0]
        return torch.cat([out["image_intermediates_prefix"][0], patches], dim=1) if keep_prefix else patches


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """Map vision features ``[..., vision_dim]`` to the LM's embedding space ``[..., text_dim]``.

    ``linear``: one linear layer (LLaVA). ``mlp2x_gelu``: Linear, GELU, Linear (LLaVA-1.5);
    more generally ``mlp<k>x_gelu`` stacks ``k`` linear layers with GELUs between them.
    """
    if kind == "linear":
        return nn.Linear(vision_dim, text_dim)
    match = _MLP_GELU.match(kind) if isinstance(kind, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"projector: unknown kind {kind!r}; options: {', '.join(PROJECTOR_KINDS)} "
                         "(or mlp<k>x_gelu for k linear layers)")
    layers: list[nn.Module] = [nn.Linear(vision_dim, text_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(text_dim, text_dim)]
    return nn.Sequential(*layers)
