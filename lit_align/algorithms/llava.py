"""LLaVA-style multimodal training: a vision tower, a trained projector and a language model,
for caption alignment (stage 1), visual instruction tuning (stage 2) and multimodal DPO."""

from __future__ import annotations

import copy
import json
import os

import torch

from lit_align.algorithms.dpo import DPO
from lit_align.algorithms.optim import OptimSpec
from lit_align.algorithms.sft import SFT
from lit_align.models import CausalLMSpec, LoraSpec, apply_lora, build_causal_lm, is_peft
from lit_align.models.llava import (
    CONFIG_FILE,
    LM_DIR,
    PROJECTOR_FILE,
    VISION_FILE,
    LlavaModel,
    add_image_token,
    save_llava,
)
from lit_align.models.vision import VisionTower, VisionTowerSpec, build_projector


def _resolve(model: CausalLMSpec | None, vision_tower: VisionTowerSpec | None, projector: str | None,
             init_from: str | None) -> tuple[CausalLMSpec, VisionTowerSpec, str]:
    """The LM spec, tower spec and projector kind, taken from an earlier stage's export
    (``init_from``) where not given."""
    if init_from is None:
        if model is None or vision_tower is None:
            raise ValueError("LLaVA: give `model` and `vision_tower`, or `init_from` (an earlier stage's export)")
        return model, vision_tower, projector or "mlp2x_gelu"
    path = os.path.join(init_from, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"LLaVA.init_from: {path} not found (init_from must be a LLaVA export directory, "
                         "e.g. checkpoints/<stage-1 name>/hf)")
    with open(path) as f:
        saved = json.load(f)
    if projector is not None and projector != saved["projector"]:
        raise ValueError(f"LLaVA.projector: {projector!r} differs from the export's {saved['projector']!r} in "
                         f"{init_from}")
    lm_dir = os.path.join(init_from, LM_DIR)
    if model is not None and (model.pretrained is None or os.path.abspath(model.pretrained) != os.path.abspath(lm_dir)):
        # a different LM would silently throw away the stage's trained language model
        raise ValueError(f"LLaVA.model: with init_from the language model is the export's ({lm_dir}); leave `model` "
                         f"unset, or set model.pretrained to {lm_dir} to change its dtype or attention")
    model = model or CausalLMSpec(pretrained=lm_dir)
    return model, vision_tower or VisionTowerSpec(**saved["vision_tower"]), saved["projector"]


class LlavaMixin:
    """Model building, forward, generation and export shared by :class:`LLaVA` and :class:`LLaVADPO`.

    The tower is built at construction: its image transform and token count are what the
    data module needs at setup, before ``configure_model`` builds the language model."""

    supports_tensor_parallel = False  # the image splice under a tensor-parallel LM is unverified

    resume_invariants = ("model", "lora", "reference", "vision_tower", "projector", "init_from", "freeze_projector",
                         "freeze_language_model")

    def _init_llava(self, vision_tower: VisionTowerSpec, projector: str, init_from: str | None,
                    freeze_projector: bool, freeze_language_model: bool) -> None:
        build_projector(projector, 1, 1)  # validates the kind now
        if self.lora is not None and freeze_language_model:
            raise ValueError(f"{type(self).__name__}: lora adapts the language model, which freeze_language_model "
                             "freezes; drop one of them")
        if self.lora is not None and self.lora.export == "adapter":
            raise ValueError(f"{type(self).__name__}.lora.export: 'adapter' is not available for LLaVA exports "
                             "(projector and tower are trained or stored beside the LM); use 'merged'")
        if freeze_projector and freeze_language_model and vision_tower.freeze:
            raise ValueError(f"{type(self).__name__}: vision tower, projector and language model are all frozen: "
                             "nothing to train")
        self.tower_spec, self.projector_kind, self.init_from = vision_tower, projector, init_from
        self.freeze_projector, self.freeze_language_model = freeze_projector, freeze_language_model
        self.image_token_id = add_image_token(self.tokenizer)
        # kept out of the module tree until configure_model puts it inside the LlavaModel
        self.__dict__["_tower"] = VisionTower(vision_tower, load_weights=init_from is None)
        self.image_transform = self._tower.transform
        self.num_image_tokens = self._tower.num_tokens

    def _build_llava(self) -> LlavaModel:
        from safetensors.torch import load_file

        tower = self._tower
        lm = build_causal_lm(self.spec, self.tokenizer).train()
        # seeded like the tower and the LM: every rank (and every run) starts from the same
        # projector, which FSDP2 and DDP take as each rank's copy of the one model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tower_spec.seed)
            projector = build_projector(self.projector_kind, tower.hidden_size, lm.config.hidden_size)
        if self.init_from is not None:
            tower.load_state_dict(load_file(os.path.join(self.init_from, VISION_FILE)), strict=True)
            projector.load_state_dict(load_file(os.path.join(self.init_from, PROJECTOR_FILE)), strict=True)
        lm.requires_grad_(not self.freeze_language_model)
        if self.lora is not None:  # adapters on the LM only (peft freezes its base); projector trained in full
            lm = apply_lora(lm, self.lora)
        projector.requires_grad_(not self.freeze_projector)
        return LlavaModel(tower, projector, lm, self.image_token_id)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build_llava()
            super().configure_model()  # the DPO variant builds its reference from the unsharded model here
            self.model = self.shard(self.model)
            reference = getattr(getattr(self, "reference", None), "model", None)
            if reference is not None:
                self.reference.model = self.shard(reference)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 under ``ModelParallelStrategy``: each decoder layer, the vision tower and the
        projector are units of their own, the root :class:`LlavaModel` keeps the LM's embeddings,
        final norm and head, so the image splice (in the root's forward) sees them gathered."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or not isinstance(model, LlavaModel):
            return model
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        fully_shard(model.vision_tower, mesh=dp_mesh)
        fully_shard(model.projector, mesh=dp_mesh)
        return super().shard(model)

    def build_frozen(self, spec) -> torch.nn.Module:
        """The reference: a frozen copy of the initial multimodal model (sharded by configure_model)."""
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def lm_forward(self, batch: dict, model: torch.nn.Module | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        # the image splice keeps the sequence length: the kept positions are the text's
        return (model or self.model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                     pixel_values=batch.get("pixel_values"), image_counts=batch.get("image_counts"),
                                     use_cache=False, logits_to_keep=logits_to_keep).logits

    def generation_inputs(self, batch: dict) -> dict:
        counts = batch.get("prompt_image_counts")
        pixels = batch.get("pixel_values")
        if pixels is not None and counts is not None:
            pixels = pixels[: int(counts.sum())]  # the prompts' images come first (preference: the chosen half)
        return {"pixel_values": pixels, "image_counts": counts}

    def export_hf(self, directory: str) -> None:
        """``language_model/`` (HF format, with the tokenizer), ``projector.safetensors``,
        ``vision_tower.safetensors`` and ``llava_config.json`` (see :func:`~lit_align.models.llava.save_llava`);
        full weights gathered from the shards under FSDP2 (collective), LoRA adapters merged into
        the language model; written by rank 0."""
        from lit_align.rollout.weights import policy_weights

        state = self.gathered_state_dict()  # collective under FSDP2: every rank calls it
        if is_peft(self.model.language_model):
            # tower and projector as stored (buffers included); the LM's merged weights under its own names
            own = state if state is not None else self.model.state_dict()
            state = {k: v for k, v in own.items() if not k.startswith("language_model.")}
            for name, tensor in policy_weights(self.model.language_model):  # collective, one at a time
                state["language_model." + name] = tensor.detach().cpu()
        if self.global_rank == 0:
            save_llava(self.model, directory, self.tokenizer, self.tower_spec, self.projector_kind, state_dict=state)


class LLaVA(LlavaMixin, SFT):
    """LLaVA training (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5, Liu et al. 2024):
    next-token loss on the assistant turns, with every ``<image>`` placeholder replaced by the
    image's projected patch features.

    Stage 1 (feature alignment on captions) trains the projector only (paper lr 1e-3); stage 2
    (visual instruction tuning) trains projector and language model (paper lr 2e-5), starting
    from the stage-1 export through ``init_from``.

    Args:
        model: the language model (any HF causal LM); default with ``init_from``: the export's.
        vision_tower: the tower (:class:`~lit_align.models.vision.VisionTowerSpec`: open_clip or
            timm, layer, CLS handling, ``freeze``); default with ``init_from``: the export's.
        projector: ``linear`` or ``mlp2x_gelu``; default with ``init_from``: the export's, else ``mlp2x_gelu``.
        init_from: an earlier stage's export directory (``checkpoints/<name>/hf``): tower,
            projector and language model weights are loaded from it.
        freeze_projector, freeze_language_model: train flags (the tower's is ``vision_tower.freeze``).
        lora: LoRA adapters on the language model (:class:`~lit_align.models.LoraSpec`); the
            projector is still trained in full (unless frozen); the export merges the adapters.
        optim, eval_max_new_tokens, num_logged_samples: as in :class:`~lit_align.SFT`.

    Batches come from :class:`~lit_align.ImageInstructionDataModule`: ``input_ids``, ``labels``,
    ``attention_mask`` ``[B, T]`` with each placeholder expanded to ``num_image_tokens`` image
    tokens (labels -100), ``pixel_values`` ``[M, 3, H, W]`` and ``image_counts`` ``[B]``.
    """

    def __init__(self, *, model: CausalLMSpec | None = None, vision_tower: VisionTowerSpec | None = None,
                 projector: str | None = None, init_from: str | None = None, freeze_projector: bool = False,
                 freeze_language_model: bool = False, optim: OptimSpec | None = None, eval_max_new_tokens: int = 16,
                 num_logged_samples: int = 4, lora: LoraSpec | None = None):
        model, vision_tower, projector = _resolve(model, vision_tower, projector, init_from)
        super().__init__(model=model, optim=optim, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora)
        self._init_llava(vision_tower, projector, init_from, freeze_projector, freeze_language_model)
        self.save_hyperparameters()


class LLaVADPO(LlavaMixin, DPO):
    """DPO (Rafailov et al. 2023) on image preference triplets (an image, a question, a correct
    and a hallucinated answer), reusing :func:`~lit_align.losses.dpo_loss`; the reference is a
    frozen copy of the initial multimodal model (usually the stage-2 export via ``init_from``).

    Args: ``model``, ``vision_tower``, ``projector``, ``init_from``, ``freeze_projector``,
    ``freeze_language_model`` as in :class:`LLaVA`; ``beta``, ``loss_type``, ``label_smoothing``,
    ``sft_weight``, ``optim`` as in :class:`~lit_align.DPO`; ``lora`` as in :class:`LLaVA`, the
    reference then being the model with its adapters disabled, which is the initial model only
    when projector and tower are frozen (both are required then).

    Batches come from :class:`~lit_align.ImageInstructionDataModule` with ``kind: preference``:
    ``[2B, T]`` chosen rows then rejected rows, the images repeated in the same row order.
    """

    def __init__(self, *, model: CausalLMSpec | None = None, vision_tower: VisionTowerSpec | None = None,
                 projector: str | None = None, init_from: str | None = None, freeze_projector: bool = False,
                 freeze_language_model: bool = False, optim: OptimSpec | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 eval_max_new_tokens: int = 16, num_logged_samples: int = 4, lora: LoraSpec | None = None):
        model, vision_tower, projector = _resolve(model, vision_tower, projector, init_from)
        if lora is not None and not (freeze_projector and vision_tower.freeze):
            raise ValueError("LLaVADPO: with lora the reference is the model with its adapters disabled, which "
                             "equals the initial model only if nothing else trains; set freeze_projector: true "
                             "and vision_tower.freeze: true, or drop lora (the reference is then a frozen copy)")
        super().__init__(model=model, optim=optim, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         sft_weight=sft_weight, eval_max_new_tokens=eval_max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora)
        self._init_llava(vision_tower, projector, init_from, freeze_projector, freeze_language_model)
        # a live reference only (precomputed log-probs would need the images stored with the pairs)
        self.save_hyperparameters()
