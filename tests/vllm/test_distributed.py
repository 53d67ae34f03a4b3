"""The colocated vLLM engine on 2 processes (torchrun, gloo, CPU), each rank's engine joining the
training process group (vLLM's ``external_launcher``): GRPO fits under DDP, then under FSDP2
(``ModelParallelStrategy(data_parallel_size=2)``), in the same two processes, launched once.

At every rollout each rank records the prompts it generated for, the sampler / training-forward
log-prob gap, vLLM's greedy completions of its prompts and the full (gathered) policy weights; after
the fit the engine syncs once more and records the same. The assertions, here in the pytest
process: the ranks sampled disjoint prompts, each rank's greedy completions equal HF greedy of
the weights it held at that moment (also after optimizer steps: the sync pushes the updated,
replicated or gathered, weights), and under FSDP2 the weights stream in one gathered parameter at
a time, so at most one decoder layer's worth of gathered tensors is alive during a sync. The FSDP2
fit's engine replaces the DDP fit's (closing it), and closing an engine leaves the training
process group up."""

import os
import subprocess
import sys
import weakref

import pytest
import torch

from tests.vllm.conftest import ENGINE_ARGS, SKIP_REASON, VLLM_CONFIG

pytest.importorskip("vllm", reason=SKIP_REASON)

from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer  # noqa: E402
from lit_align.rollout import HFEngine, SamplingParams  # noqa: E402
from tests.conftest import REPO, free_port  # noqa: E402

STRATEGIES = ("ddp", "fsdp2")
G = 4  # completions per prompt
PROMPTS = 4  # prompts per rank and step
#: 2 rollouts of 2 mini-batches: 4 optimizer steps, the second rollout after 2 of them
MAX_STEPS = 4
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
LOGPROB_ATOL = 1e-4  # fp32, vLLM's CPU kernels vs PyTorch's (as in test_engine)


def digit_reward(prompts, completions, meta, **context):
    """Share of a completion's characters that are digits: varies within a group from random init."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# -- in each of the two processes ---------------------------------------------------------
def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's whole state dict, gathered from its shards under FSDP2 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lit_align.distributed import is_sharded

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if is_sharded(model) \
        else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _greedy(generate, model, prompts: dict) -> dict:
    out = generate(model, prompts, GREEDY)
    return {"prompt_ids": prompts["prompt_ids"].cpu(), "prompt_mask": prompts["prompt_mask"].cpu(),
            "completion_ids": out.completion_ids.cpu(), "completion_mask": out.completion_mask.cpu()}


def _record_rollouts(module, records: list) -> None:
    """Wrap the engine's ``generate``: after each rollout the module asks for (its weights just
    synced), record what was sampled and for which prompts, vLLM's greedy completions of those
    prompts and the weights the engine was given."""
    engine = module.engine
    generate = engine.generate

    def recorded(model, prompts, sampling):
        rollout = generate(model, prompts, sampling)
        mask = rollout.completion_mask.bool()
        records.append({
            "batch_prompts": list(prompts["prompts"]), "rollout_prompts": list(rollout.prompts),
            "completions": list(rollout.completions),
            "logprob_gap": float((rollout.logprobs - rollout.sampler_logprobs).abs()[mask].max()),
            "greedy": _greedy(generate, model, prompts),
            "state": _full_state(model),  # collective under FSDP2: every rank is here, in step
        })
        return rollout

    engine.generate = recorded


class _SyncTracker:
    """Wraps :func:`~lit_align.rollout.weights.policy_weights` as the engine calls it and records the
    bytes of gathered tensors still alive (referenced by anyone, vLLM's load buffers included)
    each time the stream hands out the next one."""

    def __init__(self):
        import lit_align.rollout.vllm as engine_module

        self.module, self.original = engine_module, engine_module.policy_weights
        self.syncs: list[dict] = []
        engine_module.policy_weights = self

    def __call__(self, model):
        local = {(p.to_local() if hasattr(p, "to_local") else p).data_ptr() for p in model.parameters()}
        alive: list[tuple[str, int, weakref.ref]] = []
        record = {"names": [], "peak_bytes": 0, "peak_names": [], "gathered": 0, "local": []}
        self.syncs.append(record)
        for name, tensor in self.original(model):
            if tensor.data_ptr() not in local:  # a gathered copy, not a local shard
                record["gathered"] += 1
                alive.append((name, tensor.nbytes, weakref.ref(tensor.untyped_storage())))
            else:
                record["local"].append(name)
            alive = [a for a in alive if a[2]() is not None]
            live = sum(a[1] for a in alive)
            if live > record["peak_bytes"]:
                record["peak_bytes"], record["peak_names"] = live, [a[0] for a in alive]
            record["names"].append(name)
            yield name, tensor


def _run(strategy: str, directory: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lit_align import GRPO, OptimSpec
    from lit_align.distributed import is_sharded
    from lit_align.rewards import RewardSpec
    from lit_align.rollout import EngineSpec
    from tests.conftest import arith_prompts

    tracker = _SyncTracker() if strategy == "fsdp2" else None
    module = GRPO(model=CausalLMSpec(config=VLLM_CONFIG, seed=1), beta=0.0, num_generations=G, mini_batches=2,
                  sampling=SamplingParams(max_new_tokens=6, temperature=1.0), eval_max_new_tokens=0,
                  rewards=[RewardSpec("tests.vllm.test_distributed:digit_reward")],
                  optim=OptimSpec(lr=3e-2, warmup_steps=0, schedule="constant"),
                  engine=EngineSpec("vllm", {**ENGINE_ARGS, "seed": 0}))
    records: list = []
    _record_rollouts(module, records)
    ddp = DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=MAX_STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, inference_mode=False, default_root_dir=directory,
                        strategy=ddp if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2,
                                                                                      tensor_parallel_size=1))
    trainer.fit(module, datamodule=arith_prompts(prompts=PROMPTS, train_size=16))
    engine, model = module.engine, module.model
    generate = type(engine).generate.__get__(engine)  # unrecorded
    # the last optimizer steps came after the last rollout: the engine still serves older weights
    prompts = records[-1]["greedy"]
    batch = {"prompt_ids": prompts["prompt_ids"], "prompt_mask": prompts["prompt_mask"]}
    stale = _greedy(generate, model, batch)
    engine.update_weights(model)  # collective under FSDP2
    final = {"stale": stale, "greedy": _greedy(generate, model, batch), "state": _full_state(model)}
    result = {"rollouts": records, "final": final, "world_size": trainer.world_size, "sharded": is_sharded(model),
              "global_step": trainer.global_step,
              "executor": engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend}
    if strategy == "ddp":
        # uneven work: rank 0 decodes 3 prompts for 12 tokens, rank 1 one prompt for 2 tokens, then
        # another: the engines take no collective step together (only the weight gathers are collective)
        rank = trainer.global_rank
        rows = slice(0, 3) if rank == 0 else slice(0, 1)
        uneven = {"prompt_ids": prompts["prompt_ids"][rows], "prompt_mask": prompts["prompt_mask"][rows]}
        runs = [(12, uneven)] if rank == 0 else [(2, uneven), (2, uneven)]
        result["uneven"] = [{"max_new_tokens": k, **{key: v.cpu() for key, v in p.items()},
                             "completion_ids": generate(model, p, SamplingParams(max_new_tokens=k,
                                                                                 temperature=0.0)).completion_ids}
                            for k, p in runs]
    if tracker is not None:
        result["syncs"] = tracker.syncs
        tracker.module.policy_weights = tracker.original
    if strategy == STRATEGIES[-1]:
        # vLLM's shutdown destroys torch's default process group; the engine keeps the training's
        engine.close()
        total = torch.ones(1)
        torch.distributed.all_reduce(total)
        result["after_close"] = (torch.distributed.is_initialized(), int(total))
    os.makedirs(directory, exist_ok=True)
    torch.save(result, os.path.join(directory, f"rank{trainer.global_rank}.pt"))


# -- the pytest process -------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.vllm.test_distributed", str(root)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return {s: [torch.load(root / s / f"rank{r}.pt", weights_only=False) for r in (0, 1)] for s in STRATEGIES}


TOK = build_tokenizer("byte", padding_side="left")


def _hf_greedy(state: dict, prompt_ids, prompt_mask, max_new_tokens: int = GREEDY.max_new_tokens) -> torch.Tensor:
    """HF ``generate`` greedy completions of a plain (unsharded) model holding ``state``."""
    model = build_causal_lm(CausalLMSpec(config=VLLM_CONFIG, seed=1), TOK)
    model.load_state_dict(state, strict=True)
    out = HFEngine(TOK, 8).generate(model, {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask},
                                    SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return out.completion_ids


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = max(a.shape[1], b.shape[1])  # trimmed to the longest completion: pad to compare
    pad = TOK.pad_token_id
    a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in (a, b))
    return torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_rank_generates_its_own_prompts_with_the_synced_weights(two_ranks, strategy):
    ranks = two_ranks[strategy]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["sharded"] for r in ranks] == [strategy == "fsdp2"] * 2
    assert [r["executor"] for r in ranks] == ["external_launcher"] * 2
    assert [(r["global_step"], len(r["rollouts"])) for r in ranks] == [(MAX_STEPS, 2)] * 2
    for step, (mine, theirs) in enumerate(zip(ranks[0]["rollouts"], ranks[1]["rollouts"])):
        for r in (mine, theirs):
            # the rollout holds G completions of each of this rank's prompts, sampled from the
            # weights the training forward scores them with
            assert len(r["batch_prompts"]) == PROMPTS
            assert r["rollout_prompts"] == [p for p in r["batch_prompts"] for _ in range(G)]
            assert len(r["completions"]) == PROMPTS * G
            assert r["logprob_gap"] < LOGPROB_ATOL, (strategy, step, r["logprob_gap"])
        assert not set(mine["batch_prompts"]) & set(theirs["batch_prompts"]), "the ranks sampled the same prompts"
        # DDP replicas and FSDP2 shards of one model: both ranks synced the same weights
        for name, v in mine["state"].items():
            torch.testing.assert_close(theirs["state"][name], v, rtol=0, atol=0, msg=name)
    for rank, record in enumerate(ranks):
        rollouts = record["rollouts"]
        # the second rollout came after two optimizer steps: its sync carried new weights
        assert any(not torch.equal(rollouts[1]["state"][k], v) for k, v in rollouts[0]["state"].items())
        for step, r in enumerate(rollouts):
            g = r["greedy"]
            want = _hf_greedy(r["state"], g["prompt_ids"], g["prompt_mask"])
            assert _same(g["completion_ids"], want), (strategy, rank, step)
        # ... and the engine serves them: the first rollout's weights answer its prompts otherwise
        g = rollouts[1]["greedy"]
        assert not _same(g["completion_ids"], _hf_greedy(rollouts[0]["state"], g["prompt_ids"], g["prompt_mask"]))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_after_training_the_sync_serves_the_trained_weights(two_ranks, strategy):
    ranks = two_ranks[strategy]
    for name, v in ranks[0]["final"]["state"].items():
        torch.testing.assert_close(ranks[1]["final"]["state"][name], v, rtol=0, atol=0, msg=name)
    for rank, record in enumerate(ranks):
        final = record["final"]
        assert any(not torch.equal(record["rollouts"][-1]["state"][k], v) for k, v in final["state"].items())
        g = final["greedy"]
        want = _hf_greedy(final["state"], g["prompt_ids"], g["prompt_mask"])
        assert _same(g["completion_ids"], want), (strategy, rank)
        # before this sync the engine served the last rollout's weights, two optimizer steps older
        assert _same(final["stale"]["completion_ids"], record["rollouts"][-1]["greedy"]["completion_ids"])
        assert not _same(final["stale"]["completion_ids"], g["completion_ids"])


@pytest.mark.slow
def test_closing_an_engine_leaves_the_training_process_group_up(two_ranks):
    # the FSDP2 fit ran after the DDP fit's engine was closed; this is after closing the FSDP2 fit's
    assert [r["after_close"] for r in two_ranks[STRATEGIES[-1]]] == [(True, 2)] * 2


@pytest.mark.slow
def test_ranks_decode_uneven_work_independently(two_ranks):
    for rank, record in enumerate(two_ranks["ddp"]):
        assert [u["max_new_tokens"] for u in record["uneven"]] == ([12] if rank == 0 else [2, 2])
        for u in record["uneven"]:
            want = _hf_greedy(record["final"]["state"], u["prompt_ids"], u["prompt_mask"], u["max_new_tokens"])
            assert _same(u["completion_ids"], want), rank


@pytest.mark.slow
def test_fsdp2_sync_gathers_one_parameter_at_a_time(two_ranks):
    """Every sync (2 rollouts and the one after training) hands vLLM every parameter as a full
    tensor, in the checkpoint's names, the sharded ones gathered one at a time, and the gathered
    tensors alive at once never exceed one decoder layer's parameters: vLLM loads each layer as its
    pieces arrive and drops them. (After the fit FSDP2 has left the root module's parameters, the
    embedding, final norm and tied head, unsharded: they come as they are.)"""
    layer_bytes = {}
    model = build_causal_lm(CausalLMSpec(config=VLLM_CONFIG, seed=1), TOK)
    for name, p in model.named_parameters():
        unit = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        layer_bytes[unit] = layer_bytes.get(unit, 0) + p.nbytes
    one_layer = max(layer_bytes.values())
    total = sum(p.nbytes for p in model.parameters())
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for record in two_ranks["fsdp2"]:
        assert len(record["syncs"]) == 3
        for i, sync in enumerate(record["syncs"]):
            assert sync["names"] == names and sync["gathered"] + len(sync["local"]) == len(names)
            assert not any(n.startswith("model.layers.") for n in sync["local"]), sync["local"]
            if i < 2:  # inside the fit everything is sharded
                assert sync["local"] == []
            assert sync["peak_bytes"] <= one_layer < total / 2, (sync["peak_bytes"], sync["peak_names"], one_layer)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 -m tests.vllm.test_distributed <directory>
    torch.set_num_threads(1)
    for s in sys.argv[2:] or STRATEGIES:
        _run(s, os.path.join(sys.argv[1], s))
