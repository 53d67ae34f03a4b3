"""What every language-model algorithm shares: building the policy in
``configure_model`` (so strategies can shard it), the optimizer, held-out
exact-match evaluation by greedy generation, and the Hugging Face export."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import Metric
from transformers import GenerationConfig

from lit_align.algorithms.optim import OptimSpec, build_optimizer
from lit_align.algorithms.reference import PREFIX as REFERENCE_PREFIX
from lit_align.algorithms.resume import check_fingerprints as check_frozen_fingerprints
from lit_align.algorithms.resume import check_settings, fingerprint, optimizer_settings, reapply_optimizer_settings
from lit_align.algorithms.steps import clip_grad_norm, step_scale
from lit_align.callbacks.resume import ResumeState
from lit_align.data.encode import IGNORE_INDEX
from lit_align.distributed import is_sharded, tensor_parallel_size, use_device_mesh
from lit_align.evaluation import ExactMatch, GroupedExactMatch
from lit_align.losses import token_logprobs
from lit_align.models import CausalLMSpec, LoraSpec, apply_lora, build_causal_lm, load_tokenizer
from lit_align.models.causal_lm import check_shardable, decoder_layer_classes, model_skeleton, router_aux_loss_coef
from lit_align.models.lora import check_targets, find_peft
from lit_align.models.parallel import apply_tensor_parallel, check_tensor_parallel
from lit_align.models.tokenizer import end_of_turn_ids
from lit_align.rollout import SamplingParams, decode_completions, default_stop_ids, hf_generate


class CausalLMModule(L.LightningModule):
    """Base LightningModule holding ``self.model`` (an HF causal LM) and ``self.tokenizer``.

    Args:
        model: which causal LM to build (:class:`~lit_align.models.CausalLMSpec`).
        optim: optimizer and schedule (:class:`~lit_align.algorithms.optim.OptimSpec`).
        eval_max_new_tokens: generation limit for held-out exact match (``0`` disables it).
        num_logged_samples: generations written to TensorBoard as text at each validation.
        lora: train low-rank adapters instead of the full model (:class:`~lit_align.models.LoraSpec`).
    """

    # without generation there is no exact match: keep the best held-out loss instead
    fallback_monitor = ("val/loss", "min")
    # modules whose training loss adds a mixture-of-experts model's router load-balancing loss
    # (``output_router_logits: true``); the others refuse such a config rather than ignore it
    supports_router_aux_loss = False

    @property
    def monitor(self) -> tuple[str | None, str]:
        """``(metric, mode)`` the best checkpoint is chosen by (``checkpoints/<name>/best-step*.ckpt``)."""
        return ("val/exact_match", "max") if self.eval_max_new_tokens > 0 else self.fallback_monitor

    def __init__(self, *, model: CausalLMSpec, optim: OptimSpec | None = None, eval_max_new_tokens: int = 32,
                 num_logged_samples: int = 4, lora: LoraSpec | None = None):
        super().__init__()
        self.spec = model
        self.optim = optim or OptimSpec()
        self.eval_max_new_tokens = eval_max_new_tokens
        self.num_logged_samples = num_logged_samples
        self.lora = lora
        self.tokenizer = load_tokenizer(model)
        self.router_aux_loss_coef = router_aux_loss_coef(model, self.tokenizer)
        if self.router_aux_loss_coef is not None and not self.supports_router_aux_loss:
            raise ValueError(f"{type(self).__name__}: model config sets output_router_logits: true, but this module "
                             "does not add the router load-balancing loss (SFT and DPO do); set "
                             "model.extra.output_router_logits: false")
        self._router_aux: list[torch.Tensor] = []
        if lora is not None:  # from the config alone: a wrong target fails before weights load
            check_targets(lora, model_skeleton(model, self.tokenizer), f"{type(self).__name__}.lora.target_modules")
        self.model = None
        self.val_exact_match = ExactMatch()
        self.test_exact_match = ExactMatch()
        # per-group exact match (``{stage}/exact_match/<group>``), built at the first held-out
        # batch of a data module that names a grouping column (its groups are known only then)
        self.grouped_exact_match = torch.nn.ModuleDict()
        self._tick = None

    # -- model ------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            # from_pretrained returns eval mode and Lightning keeps submodule modes as they are
            self.model = build_causal_lm(self.spec, self.tokenizer).train()
            if self.router_aux_loss_coef is not None:
                # router logits only in training forwards (lm_forward asks for them): generation's
                # cached steps would pair them with the whole attention mask, and scoring needs none
                self.model.config.output_router_logits = False
            if self.lora is not None:
                self.model = apply_lora(self.model, self.lora)
            self.model = self.shard(self.model)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each decoder layer, then the
        root, over the data-parallel mesh dimension. Other strategies wrap the module themselves."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return model
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        layers = decoder_layer_classes(model, self.spec.decoder_layer_classes)
        if tensor_parallel_size(mesh) > 1:  # split inside each layer first, then shard over replicas
            apply_tensor_parallel(model, mesh["tensor_parallel"], layers)
        for module in model.modules():
            if type(module) in layers:
                fully_shard(module, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model

    def step_loss(self, share: torch.Tensor) -> torch.Tensor:
        """The tensor to backpropagate for a micro-batch's ``share`` of its optimizer step's loss
        (see :mod:`lit_align.algorithms.steps` for the normalisation, stated once)."""
        return share * step_scale(self._trainer, self.automatic_optimization)

    def build_frozen(self, spec: CausalLMSpec) -> torch.nn.Module:
        """A frozen copy (eval mode, no grad) of the model ``spec`` describes: a reference policy.
        Loaded strictly: a weight the directory lacks would stay at its random init forever."""
        frozen = build_causal_lm(spec, self.tokenizer, strict=True).to(self.device)
        return self.shard(frozen.eval().requires_grad_(False))

    @contextmanager
    def adapters_disabled(self):
        """The LoRA policy with its adapters off and in eval mode: the frozen base, used as the
        reference without holding a second copy of the weights."""
        peft = find_peft(self.model)
        if peft is None:
            raise RuntimeError("adapters_disabled: the policy has no LoRA adapters")
        was_training = self.model.training
        self.model.eval()
        try:
            with peft.disable_adapter():
                yield self.model
        finally:
            self.model.train(was_training)

    def lm_forward(self, batch: dict, model: torch.nn.Module | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``model`` (default the policy), or of the last ``logits_to_keep``
        positions only ``[B, K, V]`` (0: all); packed batches come without attention mask, with
        position ids."""
        router = self.router_aux_loss_coef is not None and (model is None or model is self.model) \
            and torch.is_grad_enabled() and self.training
        kwargs = {"output_router_logits": True} if router else {}
        out = (model or self.model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"), use_cache=False,
                                    logits_to_keep=logits_to_keep, **kwargs)
        if router:
            self._router_aux.append(out.aux_loss)  # taken by the micro-batch's router_aux_share
        return out.logits

    def router_aux_share(self) -> torch.Tensor | float:
        """This micro-batch's share of the step's router load-balancing loss: ``coef`` times the
        mean of its training forwards' ``aux_loss`` (each over the forward's unpadded tokens),
        divided by the step's micro-batches and data-parallel replicas, so the step adds
        ``coef`` times the mean over micro-batches (see :mod:`lit_align.algorithms.steps`).
        Logs ``train/router_aux_loss``. 0 for a model without router logits."""
        if not self._router_aux:
            return 0.0
        aux = torch.stack(self._router_aux).mean()
        self._router_aux.clear()
        self.log("train/router_aux_loss", aux.detach(), batch_size=1)
        return self.router_aux_loss_coef * aux / step_scale(self._trainer, self.automatic_optimization)

    def shifted(self, batch: dict, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs ``[B, L]`` of each next label under ``model`` (default the
        policy), and the label mask ``[B, L]``: the last ``L`` of the ``T - 1`` shifted positions,
        from the first position of the batch with a label on (the prompts before it carry none).

        Only those positions get logits (``logits_to_keep``): the LM head's ``[B, T, V]`` product
        and its log-softmax are not computed over the prompts, which at a 32k-150k vocabulary
        are most of a short model's compute and of its activation memory."""
        labels = batch["labels"][:, 1:]
        # one host sync: argmax of an all-false row is 0, which keeps every position (a batch with
        # no labels has an all-zero mask either way)
        first = int((labels != IGNORE_INDEX).any(0).int().argmax())
        labels = labels[:, first:]
        # logits at positions first .. T-2 predict labels first+1 .. T-1: the last L + 1 positions, minus the last
        logits = self.lm_forward(batch, model, logits_to_keep=labels.shape[1] + 1)[:, :-1]
        return token_logprobs(logits, labels.clamp(min=0)), labels != IGNORE_INDEX

    def on_fit_start(self) -> None:
        self._frozen = {label: {"path": path, "sha256": fingerprint(path)}
                        for label, path in self.frozen_sources().items()}
        self._check_frozen()
        # the optimizers as this run's settings build them, before a checkpoint's states replace them
        self._configured_optimizers = optimizer_settings(self.trainer)
        clip = self.trainer.gradient_clip_val
        if self.automatic_optimization and clip is not None and clip != self.optim.grad_clip:
            raise ValueError(f"gradient clipping set twice: trainer.gradient_clip_val={clip} and "
                             f"optim.grad_clip={self.optim.grad_clip}; set optim.grad_clip (null: no clipping)")

    def on_train_start(self) -> None:
        configured = getattr(self, "_configured_optimizers", None)
        if self.trainer.ckpt_path and configured:
            # the restored optimizer states carry the checkpoint's lr, betas and weight decay
            reapply_optimizer_settings(self.trainer, configured, type(self).__name__)
        # the data module's row counts (kept, dropped and truncated per split and reason): in the
        # logs beside the run, not only in the console
        stats = getattr(getattr(self.trainer, "datamodule", None), "stats", None)
        if stats and self.logger is not None and self.global_rank == 0:
            self.logger.log_metrics({k: float(v) for k, v in stats.items()}, step=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # one setting for every module: optim.grad_clip (manual ones clip in their own step loop)
        self.log_dict({f"train/{k}": v for k, v in self.clip_and_measure(optimizer, self.optim.grad_clip).items()})

    def clip_and_measure(self, optimizer, max_norm: float | None, name: str = "") -> dict[str, torch.Tensor]:
        """Clip ``optimizer``'s gradients to ``max_norm`` and return ``grad_norm{name}`` (the norm
        before clipping, computed once for both) and ``grad_clipped{name}`` (1 when the clip was
        active)."""
        norm = clip_grad_norm(optimizer, max_norm, self.model if self.model is not None else None)
        clipped = norm > max_norm if max_norm is not None else torch.zeros((), dtype=torch.bool)
        return {f"grad_norm{name}": norm, f"grad_clipped{name}": clipped.float()}

    def configure_optimizers(self):
        return build_optimizer(self.optim, self.model.parameters(), int(self.trainer.estimated_stepping_batches))

    def on_validation_epoch_start(self) -> None:
        # trainer.validate() runs in inference mode and resets metrics there, leaving their states
        # as inference tensors; validation inside fit() runs under no_grad, where updating those
        # in place fails. Such states hold nothing yet (a reset just made them): renew them.
        if torch.is_inference_mode_enabled():
            return
        for metric in self.modules():
            if isinstance(metric, Metric) and any(
                    isinstance(v, torch.Tensor) and v.is_inference() for v in metric.metric_state.values()):
                metric.reset()

    # -- throughput and gradient logging ------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._tick = time.perf_counter()

    def log_throughput(self, batch: dict) -> None:
        """Ask for ``train/tokens_per_s`` of this micro-batch (non-pad tokens over the time from
        the batch's start to its end: forward, backward and, on the last micro-batch of a step,
        the optimizer step). Logged in ``on_train_batch_end``, once that time is known."""
        tokens = batch["input_ids"].numel() if "attention_mask" not in batch else batch["attention_mask"].sum()
        self._tokens = float(tokens)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        tokens, self._tokens = getattr(self, "_tokens", None), None
        if self._tick is not None and tokens is not None:
            self.log("train/tokens_per_s", tokens / max(time.perf_counter() - self._tick, 1e-9))

    # -- held-out exact match -------------------------------------------------------
    def stop_ids(self) -> list[int]:
        """The ids a generated completion ends at (rollouts and held-out generation): the module's
        ``sampling.stop_token_ids`` when given, else :func:`~lit_align.rollout.default_stop_ids`:
        the tokenizer's EOS, the checkpoint's ``generation_config.eos_token_id`` ids, and the chat
        template's end-of-turn ids when the data module rendered rows with the chat template
        (``chat_templated``). Resolved once per trainer stage (:meth:`setup` resets it)."""
        given = getattr(getattr(self, "sampling", None), "stop_token_ids", None)
        if given:
            return list(given)
        if getattr(self, "_stops", None) is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            templated = bool(getattr(dm, "chat_templated", False))
            configs = [m.generation_config for m in (self.model.modules() if self.model is not None else [])
                       if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
            self._stops = default_stop_ids(self.tokenizer, configs[0] if configs else None,
                                           end_of_turn_ids(self.tokenizer) if templated else ())
        return self._stops

    def setup(self, stage: str) -> None:
        self._stops = None  # the data module (and whether it renders chat) may differ per stage
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and self.model is None:
            skeleton = model_skeleton(self.spec, self.tokenizer)
            # FSDP2 (ModelParallelStrategy) shards per decoder layer: a family without known layer
            # classes fails here, from its config, before configure_model loads any weights
            check_shardable(self.spec, skeleton, f"{type(self).__name__}.model")
            size = tensor_parallel_size(mesh)
            if size > 1:
                self.check_tensor_parallel(skeleton, size)
        use_device_mesh(mesh)  # all-reduces sum over the data-parallel replicas only

    #: whether the module runs under a device mesh with a tensor-parallel dimension (see
    #: :meth:`check_tensor_parallel`)
    supports_tensor_parallel: bool = False

    def check_tensor_parallel(self, skeleton: torch.nn.Module, size: int) -> None:
        """Raise ``ValueError`` unless ``size``-way tensor parallelism applies: a module that
        supports it, no LoRA (the plan splits plain linear layers), and a model whose heads and MLP
        ``size`` divides (:func:`~lit_align.models.parallel.check_tensor_parallel`)."""
        name = type(self).__name__
        if not self.supports_tensor_parallel:
            # sampling (HF generate) and the multimodal splice are not verified to draw the same
            # tokens on every tensor-parallel rank: refused rather than silently diverging
            raise ValueError(f"{name}: ModelParallelStrategy tensor_parallel_size {size} is not supported for "
                             f"{name} (tensor parallelism serves SFT, DPO and RewardModel); set "
                             "tensor_parallel_size: 1 and data_parallel_size to the number of devices")
        if self.lora is not None:
            raise ValueError(f"{name}: lora with ModelParallelStrategy tensor_parallel_size {size}: the "
                             "tensor-parallel plan splits plain linear layers, not LoRA-wrapped ones; use "
                             "tensor_parallel_size: 1 (FSDP2 shards LoRA models) or drop lora")
        check_tensor_parallel(skeleton, decoder_layer_classes(skeleton, self.spec.decoder_layer_classes), size,
                              f"{name}.model")

    def generation_inputs(self, batch: dict) -> dict:
        """Extra inputs of ``generate`` for a held-out batch (a multimodal model's images)."""
        return {}

    def greedy_ids(self, batch: dict) -> torch.Tensor:
        """``[B, C]`` greedy completion ids of a held-out batch (up to ``eval_max_new_tokens``)."""
        stops = self.stop_ids()
        sampling = SamplingParams(max_new_tokens=self.eval_max_new_tokens, temperature=0.0, stop_token_ids=stops)
        return hf_generate(self.model, batch["prompt_ids"], batch["prompt_mask"], sampling,
                           self.tokenizer.pad_token_id, stops, **self.generation_inputs(batch))

    def generate_greedy(self, batch: dict) -> list[str]:
        return decode_completions(self.tokenizer, self.greedy_ids(batch), self.stop_ids())

    def judge(self, batch: dict, completions: list[str], completion_ids: torch.Tensor, stage: str) -> list[bool]:
        """Which held-out completions are correct: the data module's checker for tasks with a
        checkable answer, else equality with the reference (stripped). Online RL modules judge
        data without a checker by their correctness reward instead."""
        checker = getattr(getattr(self.trainer, "datamodule", None), "checker", None)
        if checker is not None:
            return [checker(c, m, r) for c, m, r in zip(completions, batch["meta"], batch["references"])]
        return [c.strip() == r.strip() for c, r in zip(completions, batch["references"])]

    def evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """One held-out batch of ``stage`` (``val`` or ``test``; validation and test run the same
        step): greedy generations scored by the data module's checker. Modules with a held-out
        loss log it here too."""
        self.score_generations(batch, stage, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "test")

    def score_generations(self, batch: dict, stage: str, batch_idx: int) -> list[str] | None:
        """Greedy generations against the references (or the task's checker), into the metric;
        returns the completions."""
        if self.eval_max_new_tokens <= 0 or "prompt_ids" not in batch:
            return None
        ids = self.greedy_ids(batch)
        completions = decode_completions(self.tokenizer, ids, self.stop_ids())
        dm = getattr(self.trainer, "datamodule", None)
        correct = self.judge(batch, completions, ids, stage)
        metric = self.val_exact_match if stage == "val" else self.test_exact_match
        metric.update(correct)
        self.log(f"{stage}/exact_match", metric, on_step=False, on_epoch=True, batch_size=len(correct))
        grouped = self._grouped_metric(dm, stage)
        if grouped is not None:
            grouped.update(correct, [str(m[dm.group_key]) for m in batch["meta"]])
        if (batch_idx == 0 and self.num_logged_samples and isinstance(self.logger, TensorBoardLogger)
                and self.global_rank == 0):
            prompts = self.tokenizer.batch_decode(batch["prompt_ids"][: self.num_logged_samples],
                                                  skip_special_tokens=True)
            lines = [f"**prompt** `{p!r}`  \n**generated** `{c!r}`  \n**reference** `{r!r}`  \n**correct** {ok}"
                     for p, c, r, ok in zip(prompts, completions, batch["references"], correct)]
            self.logger.experiment.add_text(f"{stage}/samples", "\n\n---\n\n".join(lines), self.global_step)
        return completions

    def _grouped_metric(self, dm, stage: str) -> GroupedExactMatch | None:
        groups = dm.eval_groups() if dm is not None and hasattr(dm, "eval_groups") else None
        if not groups:
            return None
        if stage not in self.grouped_exact_match or self.grouped_exact_match[stage].groups != groups:
            self.grouped_exact_match[stage] = GroupedExactMatch(groups).to(self.device)
        return self.grouped_exact_match[stage]

    def _log_grouped(self, stage: str) -> None:
        # computed (summed over processes) and reset here: its groups are only known at run time,
        # so it cannot go through self.log as a Metric object the way the overall exact match does
        if stage in self.grouped_exact_match:
            metric = self.grouped_exact_match[stage]
            values = metric.compute()
            metric.reset()
            self.log_dict({f"{stage}/exact_match/{g}": v for g, v in values.items()}, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        self._log_grouped("val")

    def on_test_epoch_end(self) -> None:
        self._log_grouped("test")

    # -- checkpoints ------------------------------------------------------------------
    def configure_callbacks(self):
        # the random generators (and a rollout engine's own sampler) go into every checkpoint,
        # so that a resumed run takes the steps the uninterrupted one would have
        return [ResumeState()]

    #: State-dict prefixes of frozen models rebuilt from their specs at every start (the reference
    #: policy): not written to checkpoints (except distributed ones), expected missing when one is
    #: loaded.
    rebuilt_prefixes: tuple[str, ...] = (REFERENCE_PREFIX,)
    #: Settings the checkpoint's weights depend on: loading a checkpoint trained with other
    #: values is refused (:func:`~lit_align.algorithms.resume.check_settings`).
    resume_invariants: tuple[str, ...] = ("model", "lora", "reference")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_settings(self, checkpoint, self.resume_invariants)
        self._saved_frozen = checkpoint.get("frozen_models", {})
        self._check_frozen()

    def frozen_sources(self) -> dict[str, str]:
        """``{label: local path}`` of the frozen models built from files at every start and never
        saved in checkpoints (the reference copy, reward models); a fingerprint of each goes
        into every checkpoint and a resume whose files changed is refused."""
        out = {}
        ref = getattr(self, "reference", None)
        if ref is not None and ref.source in ("copy", "precomputed"):
            source = getattr(self, "init_from", None) or (ref.spec.pretrained if ref.spec is not None else None)
            if source:
                out["reference"] = source
        rewards = getattr(self, "rewards", None)
        for label, spec in zip(getattr(rewards, "names", []), getattr(rewards, "specs", [])):
            if spec.name == "reward_model" and spec.args.get("path"):
                out[f"reward {label}"] = str(spec.args["path"])
        return out

    def _check_frozen(self) -> None:
        # whichever of checkpoint loading and fit start comes second compares (strategies differ)
        saved, current = getattr(self, "_saved_frozen", None), getattr(self, "_frozen", None)
        if saved and current is not None:
            check_frozen_fingerprints(type(self).__name__, saved, current)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "_frozen", None):
            checkpoint["frozen_models"] = self._frozen
        state = checkpoint["state_dict"]
        if any(hasattr(v, "device_mesh") for v in state.values()):
            # a distributed (FSDP2) checkpoint keeps them: torch.distributed.checkpoint's load plans
            # every key of the module's state dict and fails on one the files lack, whatever
            # `strict` says. Each rank writes only its shard of them.
            return
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(self.rebuilt_prefixes)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, where keys of :attr:`rebuilt_prefixes` may be missing;
        with ``strict`` any other missing or unexpected key is an error naming it."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self.rebuilt_prefixes)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"{type(self).__name__}: the checkpoint does not match the model: missing keys "
                               f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                               f"{result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''}")
        return result

    # -- export ---------------------------------------------------------------------
    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict gathered to CPU when it is sharded (FSDP2), else ``None``
        (the module's own weights are complete). Collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not is_sharded(self.model):
            return None
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The weights the HF export writes, in the names of the exported model: a LoRA policy's
        merged weights (``W + alpha / r * B A``, see :func:`~lit_align.rollout.weights.policy_weights`),
        or the gathered shards, each on CPU; ``None`` when the module's own plain weights are it.
        Collective under FSDP2: every rank calls it."""
        from lit_align.rollout.weights import policy_weights

        if find_peft(self.model) is None:
            return self.gathered_state_dict()
        # one gathered tensor at a time: rank 0 keeps the merged copy, the others drop theirs
        state = {}
        for name, tensor in policy_weights(self.model):
            if self.global_rank == 0:
                state[name] = tensor.detach().cpu().clone()
        return state

    def export_hf(self, directory: str) -> None:
        """Save the model and tokenizer with ``save_pretrained`` (gathers sharded weights).

        A LoRA policy exports its merged weights (a plain HF model), or with ``lora.export:
        adapter`` the adapter alone (peft's ``adapter_config.json`` + ``adapter_model.safetensors``,
        applied to the base with ``peft.PeftModel.from_pretrained``). Collective under sharding:
        every rank calls it, rank 0 writes."""
        peft = find_peft(self.model)
        if peft is not None and self.lora.export == "adapter":
            state = self.gathered_state_dict()  # peft picks the adapter's entries out of the full state
            if self.global_rank == 0:
                os.makedirs(directory, exist_ok=True)
                peft.save_pretrained(directory, state_dict=state)
                self.tokenizer.save_pretrained(directory)
            return
        state = self.export_state_dict()
        if self.global_rank == 0:
            os.makedirs(directory, exist_ok=True)
            model = peft.get_base_model() if peft is not None else self.model
            model.save_pretrained(directory, state_dict=state)
            if self.router_aux_loss_coef is not None:  # the config as given, not as training ran it
                config = type(model.config).from_pretrained(directory)
                config.output_router_logits = True
                config.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
