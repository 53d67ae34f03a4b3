"""LLaVA: a vision tower's patch features, projected into a causal LM's embedding space,
replace the ``<image>`` placeholder positions of the text (Liu et al. 2023, "Visual
Instruction Tuning"; LLaVA-1.5, Liu et al. 2024).

Token layout contract with the data side: each ``<image>`` placeholder of a conversation is
expanded into ``num_tokens`` (``VisionTower.num_tokens``) consecutive copies of the image
token id, and ``pixel_values`` holds the images of the batch in row order, then in order of
appearance within a row. Image positions carry label ``-100`` (the data side sets it); the
model never predicts image tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerBase

from lit_align.models.causal_lm import CausalLMSpec, build_causal_lm
from lit_align.models.lora import is_peft, merged_copy
from lit_align.models.tokenizer import build_tokenizer
from lit_align.models.vision import VisionTower, VisionTowerSpec, build_projector

IMAGE_TOKEN = "<image>"
CONFIG_FILE = "llava_config.json"
LM_DIR = "language_model"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision_tower.safetensors"


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``<image>`` as an extra special token (never split, skipped when decoding with
    ``skip_special_tokens``) and return its id. Idempotent. Resize the LM's embeddings to
    ``len(tokenizer)`` afterwards."""
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]},
            replace_extra_special_tokens=False)
        ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: {IMAGE_TOKEN!r} still encodes to {ids} "
                         "after adding it")
    return int(ids[0])


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        vision_tower: the (usually frozen) image encoder, ``[M, 3, H, W] -> [M, N, D_v]``.
        projector: ``[..., D_v] -> [..., D]`` with ``D`` the LM's hidden size.
        language_model: a Hugging Face causal LM whose vocabulary contains ``image_token_id``.
        image_token_id: id of ``<image>`` (see :func:`add_image_token`).
    """

    def __init__(self, vision_tower: VisionTower, projector: nn.Module, language_model: PreTrainedModel,
                 image_token_id: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Positions one image occupies in the token sequence (``N``)."""
        return self.vision_tower.num_tokens

    @property
    def config(self):
        return self.language_model.config

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W] -> [M, N, D]``: projected patch features."""
        return self.projector(self.vision_tower(pixel_values))

    def _check_image_positions(self, is_image: torch.Tensor, num_images: int,
                               image_counts: torch.Tensor | Sequence[int] | None) -> None:
        """Every image fills exactly ``N`` image-token positions; errors name the first bad row."""
        n = self.num_image_tokens
        per_row = is_image.sum(1).tolist()
        if image_counts is not None:
            counts = [int(c) for c in (image_counts.tolist() if torch.is_tensor(image_counts) else image_counts)]
            if len(counts) != len(per_row):
                raise ValueError(f"image_counts: {len(counts)} entries for a batch of {len(per_row)} rows")
            for row, (found, count) in enumerate(zip(per_row, counts)):
                if found != count * n:
                    raise ValueError(f"row {row}: {found} image-token positions, expected {count} image(s) x {n} "
                                     f"tokens = {count * n}; each <image> must expand to {n} image tokens and each "
                                     f"image needs one placeholder")
            if sum(counts) != num_images:
                raise ValueError(f"image_counts: sums to {sum(counts)} images but pixel_values holds {num_images}")
            return
        total = sum(per_row)
        if total == num_images * n:
            return
        images_so_far = 0
        for row, found in enumerate(per_row):
            if found % n:
                raise ValueError(f"row {row}: {found} image-token positions, not a multiple of the {n} tokens "
                                 "per image")
            images_so_far += found // n
            if images_so_far > num_images:
                raise ValueError(f"row {row}: has image placeholders beyond the {num_images} image(s) in pixel_values")
        raise ValueError(f"the batch has image-token positions for {total // n} image(s) but pixel_values holds "
                         f"{num_images}; pass image_counts to locate the row")

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_counts: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """``inputs_embeds [B, T, D]``: the LM's token embeddings, with the positions where
        ``input_ids == image_token_id`` replaced, in row-major order, by the projected features
        of the images (``[M * N, D]``: image after image, token after token).

        Args:
            input_ids: ``[B, T]``; each image occupies ``N`` consecutive image-token positions.
            pixel_values: ``[M, 3, H, W]`` the images of the batch in row order, or ``None``.
            image_counts: ``[B]`` images per row; when given, every row is checked against it.

        Raises ``ValueError`` naming the row when the image-token positions and the images disagree.
        """
        is_image = input_ids == self.image_token_id
        embeddings = self.language_model.get_input_embeddings()
        inputs_embeds = embeddings(input_ids.masked_fill(is_image, 0))
        num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        self._check_image_positions(is_image, num_images, image_counts)
        if num_images == 0:
            return inputs_embeds
        features = self.encode_images(pixel_values)
        features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_counts: torch.Tensor | Sequence[int] | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any):
        """The LM's output (``logits [B, T, V]``, ``loss`` when ``labels`` is passed) on the
        spliced embeddings. A text-only batch (no ``pixel_values``, no image tokens) is the
        plain LM forward. Extra keyword arguments go to the LM (``labels``, ``use_cache`` ...)."""
        if pixel_values is None and not bool((input_ids == self.image_token_id).any()):
            return self.language_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       **kwargs)
        inputs_embeds = self.embed(input_ids, pixel_values, image_counts)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)

    #: ``generate`` returns the new tokens only (read by :func:`lit_align.rollout.hf_generate`)
    generate_returns_prompt = False

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 image_counts: torch.Tensor | Sequence[int] | None = None, **gen_kwargs: Any):
        """Generate from left-padded prompts ``[B, P]``; returns only the new tokens ``[B', new]``
        (``B' = B * num_return_sequences``), or a generate output whose ``sequences`` are sliced
        the same way when ``return_dict_in_generate=True``. Both ``input_ids`` and the spliced
        ``inputs_embeds`` go to HF ``generate`` (the embeddings drive the first forward, the ids
        are the prefix logits processors see), so the output starts with the prompt, cut here."""
        # Under FSDP2 the root unit (this model: embeddings, final norm, head) gathers its
        # parameters only in its own forward; generation runs the LM's forward directly, so they
        # are gathered for its whole length (the tower, projector and layers gather themselves).
        sharded = hasattr(self, "unshard") and hasattr(self, "reshard")
        if sharded:
            self.unshard()
        try:
            inputs_embeds = self.embed(input_ids, pixel_values, image_counts)
            out = self.language_model.generate(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                               attention_mask=attention_mask, **gen_kwargs)
        finally:
            if sharded:
                self.reshard()
        sequences = out if torch.is_tensor(out) else out.sequences
        prompt_len = input_ids.shape[1]
        if sequences.shape[1] < prompt_len or not torch.equal(
                sequences[:, :prompt_len], input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], 0)):
            raise RuntimeError("language_model.generate did not return the prompt ids in front of the new tokens")
        if torch.is_tensor(out):
            return sequences[:, prompt_len:]
        out.sequences = sequences[:, prompt_len:]
        return out


def _projector_kind_matches(projector: nn.Module, kind: str, vision_dim: int, text_dim: int) -> bool:
    expected = build_projector(kind, vision_dim, text_dim).state_dict()
    actual = projector.state_dict()
    return expected.keys() == actual.keys() and all(expected[k].shape == actual[k].shape for k in expected)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_llava(model: LlavaModel, directory: str, tokenizer: PreTrainedTokenizerBase, spec: VisionTowerSpec,
               projector_kind: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Export a full (unsharded) :class:`LlavaModel` to ``directory``:

    - ``language_model/``: the LM (LoRA merged) and the tokenizer, ``save_pretrained`` format;
    - ``projector.safetensors`` and ``vision_tower.safetensors``: state dicts (the tower is
      always saved, so random-init, fine-tuned and pruned towers all reload exactly);
    - ``llava_config.json``: tower spec, projector kind, image token and id, dimensions.

    ``state_dict``: the model's full state dict when its own parameters are shards (FSDP2,
    gathered by the caller) or its language model has LoRA adapters (merged weights under the
    base model's names); its ``language_model.``, ``projector.`` and ``vision_tower.`` parts
    are written instead of the module's tensors.

    Returns ``directory``. Load with :func:`load_llava`.
    """
    from safetensors.torch import save_file

    tower = model.vision_tower
    text_dim = model.language_model.get_input_embeddings().embedding_dim
    if not _projector_kind_matches(model.projector, projector_kind, tower.hidden_size, text_dim):
        raise ValueError(f"save_llava: projector_kind {projector_kind!r} does not match the model's projector "
                         f"({type(model.projector).__name__})")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.image_token_id:
        raise ValueError(f"save_llava: the tokenizer's {IMAGE_TOKEN!r} id is not the model's {model.image_token_id}")
    os.makedirs(directory, exist_ok=True)
    lm_dir = os.path.join(directory, LM_DIR)
    language_model = model.language_model
    if is_peft(language_model):
        # given merged weights (see CausalLMModule.export_state_dict), the base writes them under its
        # config; otherwise a merged copy holds them
        language_model = language_model.get_base_model() if state_dict is not None else merged_copy(language_model)
    def part(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
        if state_dict is None:
            return _tensors(module)
        return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith(prefix)}

    lm_state = None if state_dict is None else part("language_model.", language_model)
    language_model.save_pretrained(lm_dir, state_dict=lm_state)
    tokenizer.save_pretrained(lm_dir)
    save_file(part("projector.", model.projector), os.path.join(directory, PROJECTOR_FILE))
    save_file(part("vision_tower.", tower), os.path.join(directory, VISION_FILE))
    config = dict(vision_tower=dataclasses.asdict(spec), projector=projector_kind, image_token=IMAGE_TOKEN,
                  image_token_id=model.image_token_id, vision_hidden_size=tower.hidden_size, text_hidden_size=text_dim,
                  num_tokens=tower.num_tokens, image_size=list(tower.image_size))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def load_llava(directory: str) -> tuple[LlavaModel, PreTrainedTokenizerBase]:
    """Rebuild a :class:`LlavaModel` and its tokenizer from a :func:`save_llava` export (no
    download: the tower is built from its spec without pretrained weights, then loaded)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    lm_dir = os.path.join(directory, LM_DIR)
    tokenizer = build_tokenizer(lm_dir)
    image_token_id = add_image_token(tokenizer)
    if image_token_id != config["image_token_id"]:
        raise ValueError(f"load_llava: tokenizer in {lm_dir} gives {IMAGE_TOKEN!r} id {image_token_id}, "
                         f"the export says {config['image_token_id']}")
    language_model = build_causal_lm(CausalLMSpec(pretrained=lm_dir), tokenizer)
    spec = VisionTowerSpec(**config["vision_tower"])
    tower = VisionTower(spec, load_weights=False)
    tower.load_state_dict(load_file(os.path.join(directory, VISION_FILE)), strict=True)
    if (tower.hidden_size, tower.num_tokens) != (config["vision_hidden_size"], config["num_tokens"]):
        raise ValueError(f"load_llava: rebuilt tower gives D_v={tower.hidden_size}, N={tower.num_tokens}; the export "
                         f"says D_v={config['vision_hidden_size']}, N={config['num_tokens']}")
    projector = build_projector(config["projector"], tower.hidden_size, config["text_hidden_size"])
    projector.load_state_dict(load_file(os.path.join(directory, PROJECTOR_FILE)), strict=True)
    return LlavaModel(tower, projector, language_model, image_token_id), tokenizer
