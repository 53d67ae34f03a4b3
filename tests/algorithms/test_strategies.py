"""Two "nodes" on one machine: two torchrun launchers (``--nnodes 2 --node_rank k``, one process
each, gloo over 127.0.0.1), launched once. In the same two processes, SFT trains through the CLI
(``--trainer.num_nodes 2 --trainer.devices 1``, DDP), then every case of :data:`RUNS` fits under
DDP or FSDP2: SFT, the reward model, DPO (frozen copy, LoRA adapters-off and precomputed
reference), GRPO, GSPO, DAPO (dynamic sampling), PPO (actor, critic and reference), LLaVA stage 1
(frozen LM) and 2, and LLaVA-DPO (tower and projector their own units, the image splice and
generation under sharding); SFT, DPO, GRPO and PPO also resume under both from a checkpoint
written half way. Each ends at the weights of one process that accumulates the same global
batch, and its HF export, written from rank 0, holds the full (gathered) weights."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lit_align import (
    DAPO,
    DPO,
    GSPO,
    PPO,
    SFT,
    ArithTask,
    CausalLMSpec,
    ImageInstructionDataModule,
    InstructionDataModule,
    OptimSpec,
    PreferenceDataModule,
    RewardModel,
)
from lit_align.algorithms.llava import LLaVA, LLaVADPO
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.distributed import is_sharded
from lit_align.rewards import RewardSpec
from lit_align.rollout import SamplingParams
from tests.conftest import REPO, arith_prompts, free_port, tiny_config

TOWER = dict(library="timm", name="vit_tiny_patch16_224",
             kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
#: (case, strategy) pairs the 2-process run fits, in this order, in the same two processes
RUNS = [("dpo", "ddp"), ("dpo", "fsdp2"), ("grpo", "fsdp2"), ("llava", "fsdp2"), ("llava", "ddp"),
        ("rm", "ddp"), ("rm", "fsdp2"), ("llava_dpo", "ddp"), ("llava_dpo", "fsdp2"), ("gspo", "fsdp2"),
        ("gspo", "ddp"), ("dapo", "fsdp2"), ("dapo", "ddp"), ("ppo", "ddp"), ("ppo", "fsdp2"), ("sft", "fsdp2"),
        ("dpo_lora", "ddp"), ("dpo_lora", "fsdp2"), ("dpo_precomputed", "ddp"), ("dpo_precomputed", "fsdp2"),
        ("sft", "ddp"), ("llava_stage1", "ddp"), ("llava_stage1", "fsdp2"), ("grpo", "ddp")]
#: resumed case -> the uninterrupted run it must end at (``_long``: twice the steps of the case)
RESUMED = {"sft_resume": "sft", "dpo_resume": "dpo", "grpo_resume": "grpo_long", "ppo_resume": "ppo_long"}
RUNS += [(c, s) for resumed, straight in RESUMED.items() for c in dict.fromkeys([straight, resumed])
         for s in ("ddp", "fsdp2") if (c, s) not in RUNS]
# float32 sums in another order (all-reduce of two halves vs one process accumulating them)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)
ADAM = OptimSpec(lr=1e-2, warmup_steps=0, schedule="constant")
# eps far above |grad|: the first Adam step shows the gradient's scale, not only its sign (a
# gradient near 0 whose float32 sum order flips its sign would move a weight by +-lr otherwise)
SCALED_ADAM = OptimSpec(lr=1e-1, eps=1.0, warmup_steps=0, schedule="constant", grad_clip=None)
RL_SAMPLING = SamplingParams(max_new_tokens=4, temperature=1.0)


def _lm() -> CausalLMSpec:
    """The tiny seeded Llama of every case (a fresh spec each time: no case sees another's)."""
    return CausalLMSpec(config=tiny_config(), seed=1)


def _rl(cls, reward: str = "fixed_reward", label: str = "fixed", **settings):
    """An online-RL case with the deterministic engine and reward of the DDP test of
    test_policy_gradient: completions depend on the prompt only, so any number of processes
    samples the same rows for the same prompts."""
    from tests.algorithms.test_policy_gradient import FIXED_ENGINE, G

    return cls(model=_lm(), engine=FIXED_ENGINE, num_generations=G, sampling=RL_SAMPLING, eval_max_new_tokens=0,
               rewards=[RewardSpec(f"tests.algorithms.test_policy_gradient:{reward}", label=label)], **settings)


def _case(name: str, world: int, rows: list[int] | None = None):
    """The module, data module and trainer settings of a case for ``world`` processes; one process
    accumulates the micro-batches the ranks take, so the global batch is the same. ``rows``
    (DAPO): train on these training prompts only. ``<case>_resume`` and ``<case>_long`` are the
    case's settings, with twice its steps where it has one rollout (GRPO, PPO)."""
    for suffix in ("_resume", "_long"):
        if name.endswith(suffix):
            module, data, settings = _case(name.removesuffix(suffix), world, rows)
            if name.startswith(("grpo", "ppo")):
                settings = {**settings, "max_steps": 2 * settings["max_steps"]}
            return module, data, settings
    if name == "sft":
        data = InstructionDataModule(task=ArithTask(digits=2, train_size=16, val_size=4), max_length=16,
                                     micro_batch_size=4, group_by_length=False, eval_batch_size=4)
        module = SFT(model=_lm(), eval_max_new_tokens=0, optim=ADAM)
        return module, data, dict(max_steps=2, accumulate_grad_batches=2 // world)
    if name in ("dpo", "rm", "dpo_lora", "dpo_precomputed"):
        from lit_align.models import LoraSpec

        # LoRA: the reference is the policy with its adapters disabled; precomputed: the reference
        # log-probs of every pair come from one pass before training, then the copy is freed.
        # LoRA's A gets no gradient while B is 0 (step 1), then a tiny one: the linear Adam
        extra = {"dpo_lora": dict(lora=LoraSpec(r=4, alpha=8), optim=SCALED_ADAM),
                 "dpo_precomputed": dict(precompute_ref_logps=True)}
        module = RewardModel(model=_lm(), optim=ADAM) if name == "rm" else \
            DPO(model=_lm(), eval_max_new_tokens=0, **{"optim": ADAM, **extra.get(name, {})})
        data = PreferenceDataModule(task=ArithTask(digits=2, train_size=16, val_size=4), max_length=16,
                                    micro_batch_size=4, group_by_length=False, eval_batch_size=4)
        return module, data, dict(max_steps=2, accumulate_grad_batches=2 // world)
    if name == "grpo":
        module = _rl(PolicyGradient, optim=SCALED_ADAM)
        return module, arith_prompts(prompts=4 // world, train_size=4), dict(max_steps=1)
    if name == "gspo":
        # two passes over one rollout: the second step's sequence-level ratios are no longer 1
        module = _rl(GSPO, num_iterations=2, optim=SCALED_ADAM)
        return module, arith_prompts(prompts=4 // world, train_size=4), dict(max_steps=2)
    if name == "dapo":
        # parity reward: groups of even answers all score 1 and are dropped, odd ones vary
        module = _rl(DAPO, reward="parity_reward", label="parity", optim=SCALED_ADAM)
        data = arith_prompts(prompts=4 // world if rows is None else len(rows), train_size=16)
        if rows is not None:  # setup keeps rows already encoded
            data.tokenizer = module.tokenizer
            data.setup("fit")
            data.encoded["train"] = [data.encoded["train"][i] for i in rows]
        return module, data, dict(max_steps=1)
    if name == "ppo":
        # one rollout, 2 epochs of one mini-batch: 2 actor and 2 critic steps, the second epoch
        # off-policy. One mini-batch: each rank cuts its own rollout, so with 2 the first step of 2
        # processes would take half of each rank's rows, other rows than one process's first half.
        module = _rl(PPO, beta=0.05, ppo_epochs=2, mini_batches=1, optim=SCALED_ADAM)
        return module, arith_prompts(prompts=4 // world, train_size=4), dict(max_steps=4)
    from lit_align import ShapesTask
    from lit_align.models.vision import VisionTowerSpec

    # stage 1: captions, the LM frozen, only the projector trains
    cls, kind, extra = {"llava": (LLaVA, "instruction", {}), "llava_stage1": (LLaVA, "caption", {
        "freeze_language_model": True}), "llava_dpo": (LLaVADPO, "preference", {})}[name]
    module = cls(model=_lm(), vision_tower=VisionTowerSpec(**TOWER), eval_max_new_tokens=0, optim=ADAM, **extra)
    data = ImageInstructionDataModule(task=ShapesTask(train_size=8, val_size=4), kind=kind, max_length=160,
                                      micro_batch_size=2, eval_batch_size=2)
    return module, data, dict(max_steps=2, accumulate_grad_batches=2 // world)


def _strategy(name: str | None):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "tp":  # both processes one data-parallel replica, each layer split over them
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    return "auto"


def _topology() -> dict:
    """``devices`` and ``num_nodes`` of the torchrun launch this process belongs to."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return dict(devices=local, num_nodes=int(os.environ.get("WORLD_SIZE", "1")) // local)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict on CPU, gathered from its shards under FSDP2 (collective; on
    every rank, not rank 0 only, so each rank's copy can be compared)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if is_sharded(model) \
        else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _parts(module) -> dict[str, torch.nn.Module]:
    """The models a case holds besides the policy: frozen reference, critic, vision tower."""
    parts = {"reference": getattr(module, "ref_model", None), "critic": getattr(module, "critic", None),
             "vision_tower": getattr(module.model, "vision_tower", None)}
    return {k: v for k, v in parts.items() if v is not None}


class FitSteps(L.Callback):
    """The global step a fit starts at and the batches it trains on."""

    def __init__(self):
        self.start, self.batches = None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def _trainer(strategy: str | None, directory: str, callbacks=(), **settings) -> L.Trainer:
    topology = _topology() if strategy is not None else dict(devices=1)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return L.Trainer(accelerator="cpu", **topology, strategy=_strategy(strategy), logger=False,
                     enable_checkpointing=checkpointing, callbacks=list(callbacks), enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False,
                     default_root_dir=directory, **settings)


def _record_kept(module, record: dict) -> None:
    """Wrap DAPO's ``collect`` to keep, per step, the dynamic-sampling statistics of this rank and
    the training rows (indices) of the groups that carry loss."""
    collect = module.collect

    def recorded(batch):
        rollout, total, parts, stats = collect(batch)
        g = module.num_generations
        index = {row["prompt"]: i for i, row in enumerate(module.trainer.datamodule.encoded["train"])}
        loss_groups = stats["loss_rows"].view(-1, g)[:, 0].tolist()
        record.setdefault("kept", []).append([index[p] for p, keep in zip(rollout.prompts[::g], loss_groups) if keep])
        record.setdefault("stats", []).append(
            {k: float(stats[k]) for k in ("rounds", "drop_rate", "surplus_groups", "filled_groups")})
        return rollout, total, parts, stats

    module.collect = recorded


def run_case(name: str, strategy: str | None, directory: str, rows: list[int] | None = None) -> None:
    """Fit case ``name`` under ``strategy`` (``None``: one process), then write the full weights of
    the policy and of the other models, whether each was sharded, and (LLaVA) greedy generations on
    images to ``directory/rank<r>.pt``, and the HF export to ``directory/hf`` (collective: every
    rank exports). A ``<case>_resume`` fits the first half of its steps writing a checkpoint with
    ModelCheckpoint (distributed under FSDP2), then resumes it with ``ckpt_path`` in a new trainer
    and module."""
    world = 1 if strategy in (None, "tp") else 2  # data-parallel replicas
    module, data, settings = _case(name, world, rows)
    record: dict = {}
    if name == "dapo":
        _record_kept(module, record)
    if name in RESUMED:
        checkpoints = os.path.join(directory, "ckpt")
        first = ModelCheckpoint(dirpath=checkpoints, filename="first", every_n_train_steps=1, save_top_k=1)
        half = settings["max_steps"] // 2
        _trainer(strategy, directory, [first], **{**settings, "max_steps": half}).fit(module, datamodule=data)
        record["checkpoint"] = os.path.join(checkpoints, "first.ckpt")
        module, data, settings = _case(name, world)
    steps = FitSteps()
    trainer = _trainer(strategy, directory, [steps], **settings)
    trainer.fit(module, datamodule=data, ckpt_path=record.get("checkpoint"))
    record.update({"fit_start": steps.start, "fit_batches": steps.batches, "world_size": trainer.world_size,
                   "global_step": trainer.global_step, "sharded": is_sharded(module.model),
                   "state": _full_state(module.model)})
    parts = _parts(module)
    record["parts_sharded"] = {k: is_sharded(v) for k, v in parts.items()}
    record["parts"] = {k: _full_state(v) for k, v in parts.items() if k in ("reference", "critic")}
    record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if name == "llava":  # the image splice under sharding: generation from images after training
        from lit_align.data.batching import collate_generation

        held_out = data.encoded["validation"][:2]
        images = data.collate([[r] for r in held_out])
        prompts = collate_generation(held_out, module.tokenizer.pad_token_id)
        record["generated"] = module.model.generate(
            prompts["prompt_ids"], prompts["prompt_mask"], pixel_values=images["pixel_values"],
            image_counts=images["image_counts"], max_new_tokens=4, do_sample=False,
            pad_token_id=module.tokenizer.pad_token_id)
    module.export_hf(os.path.join(directory, "hf"))
    os.makedirs(directory, exist_ok=True)
    torch.save(record, os.path.join(directory, f"rank{trainer.global_rank}.pt"))


def sft_cli(directory: str, num_nodes: int) -> None:
    """The SFT recipe through the CLI, as the README's multi-node commands run it, with the small
    settings and the full-weights record of the DDP equivalence test."""
    from lit_align.train import main
    from tests.algorithms.test_data_parallel import SMALL, _callbacks

    topology = ["--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.num_nodes", str(num_nodes)] \
        if num_nodes > 1 else ["--trainer.accumulate_grad_batches", "2"]
    main(["fit", "--config", os.path.join(REPO, "configs", "sft", "arith.yaml"), "--trainer.accelerator", "cpu",
          *topology, *SMALL[:-2], *_callbacks(os.path.join(directory, "record")), "--logs_dir",
          os.path.join(directory, "logs"), "--checkpoints_dir", os.path.join(directory, "ckpt"), "--name", "sft"])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = str(free_port())
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(k), "--master_addr", "127.0.0.1", "--master_port", port, "-m", "tests.algorithms.test_strategies",
         str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    try:
        outputs = [p.communicate(timeout=900) for p in launchers]
    finally:
        for p in launchers:  # a launcher left waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-6000:]
    return root


@pytest.mark.slow
def test_sft_on_two_nodes_equals_one_process(two_nodes, tmp_path):
    from transformers import AutoModelForCausalLM

    sft_cli(str(tmp_path), 1)
    single = torch.load(tmp_path / "record" / "rank0.pt", weights_only=False)
    ranks = [torch.load(two_nodes / "sft" / "record" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    # each rank normalises by the label tokens of the whole step, the other node's micro-batch included
    assert ranks[0]["step_tokens"] == ranks[1]["step_tokens"] == single["step_tokens"][::2]
    for name, want in single["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], want, **TOLERANCE, msg=name)
    from tests.algorithms.test_data_parallel import _moved_from_init

    assert _moved_from_init(single["state"])
    exported = AutoModelForCausalLM.from_pretrained(two_nodes / "sft" / "ckpt" / "sft" / "hf").state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v, ranks[0]["state"][k], rtol=0, atol=0, msg=k)


def _one_process(name, tmp_path, rows=None):
    run_case(name, None, str(tmp_path / name), rows)
    return torch.load(tmp_path / name / "rank0.pt", weights_only=False)


def _ranks(directory) -> list[dict]:
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _check(ranks, single, strategy, case):
    """Both ranks at the one-process weights (policy, critic, reference), each model sharded under
    FSDP2 and replicated under DDP on both ranks."""
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == single["global_step"]
    assert ranks[0]["sharded"] == ranks[1]["sharded"] == (strategy == "fsdp2")
    parts = single["parts_sharded"].keys()
    assert ranks[0]["parts_sharded"] == ranks[1]["parts_sharded"] == dict.fromkeys(parts, strategy == "fsdp2")
    for states in (lambda r: {"policy": r["state"]}, lambda r: r["parts"]):
        for part, want_state in states(single).items():
            for r in ranks:
                got = states(r)[part]
                assert got.keys() == want_state.keys(), (case, strategy, part)
                for name, want in want_state.items():
                    torch.testing.assert_close(got[name], want, **TOLERANCE, msg=f"{case} {strategy} {part} {name}")


def _initial(case: str) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of the case's models before training (policy and others)."""
    module = _case(case, 1)[0]
    module.configure_model()
    return {"policy": _full_state(module.model), **{k: _full_state(v) for k, v in _parts(module).items()}}


def _moved(start: dict, trained: dict) -> bool:
    """Whether training moved every attention projection (under LoRA, its adapter) away from the
    seeded initialisation."""
    lora = any("lora_B" in k for k in start)
    keys = [k for k in start if k.endswith("q_proj.lora_B.default.weight" if lora else "q_proj.weight")
            and "vision_tower" not in k]
    return bool(keys) and all(not torch.equal(start[k], trained[k]) for k in keys)


def _check_export(case: str, directory, state: dict) -> None:
    """The HF export from rank 0 is the full trained model: every tensor of rank 0's gathered state."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    llava = case.startswith("llava")
    hf_dir = directory / "hf" / ("language_model" if llava else "")
    cls = AutoModelForSequenceClassification if case == "rm" else AutoModelForCausalLM
    exported = cls.from_pretrained(hf_dir).state_dict()
    prefix = "language_model." if llava else ""
    assert {prefix + k for k in exported} <= state.keys() and len(exported) > 0
    for k, v in exported.items():
        want = state[prefix + k]
        assert v.shape == want.shape, k
        torch.testing.assert_close(v, want, rtol=0, atol=0, msg=f"{case} export {k}")
    if llava:
        for part in ("projector", "vision_tower"):
            saved = load_file(str(directory / "hf" / f"{part}.safetensors"))
            assert saved
            for k, v in saved.items():
                torch.testing.assert_close(v, state[f"{part}.{k}"], rtol=0, atol=0, msg=f"{case} export {part}.{k}")


def _check_same_export(got, want) -> None:
    from transformers import AutoModelForCausalLM

    got, want = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (got, want))
    assert got.keys() == want.keys() and not any("lora" in k for k in got)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, **TOLERANCE, msg=f"merged export {k}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sft", "rm", "dpo", "dpo_lora", "dpo_precomputed", "grpo", "gspo", "ppo", "llava",
                                  "llava_stage1", "llava_dpo"])
def test_two_processes_equal_one_process(case, two_nodes, tmp_path):
    single = _one_process(case, tmp_path)
    start = _initial(case)
    # the comparison is between trained weights: the steps moved the policy (and the critic)
    if case == "llava_stage1":  # only the projector trains; the language model stays the base
        projector = [k for k in start["policy"] if k.startswith("projector.") and k.endswith("weight")]
        assert projector and all(not torch.equal(start["policy"][k], single["state"][k]) for k in projector)
        assert all(torch.equal(v, single["state"][k]) for k, v in start["policy"].items()
                   if k.startswith("language_model."))
    else:
        assert _moved(start["policy"], single["state"])
    if case == "ppo":
        assert _moved(start["critic"], single["parts"]["critic"])
    for strategy in [s for c, s in RUNS if c == case]:
        directory = two_nodes / f"{case}-{strategy}"
        ranks = _ranks(directory)
        _check(ranks, single, strategy, case)
        if case == "dpo_lora":  # merged weights: the adapters folded into the base, as one process exports them
            _check_same_export(directory / "hf", tmp_path / case / "hf")
        else:
            _check_export(case, directory, ranks[0]["state"])
        if "reference" in start:  # frozen: gathered or replicated, still the initial policy
            for r in ranks:
                for k, v in start["reference"].items():
                    torch.testing.assert_close(r["parts"]["reference"][k], v, rtol=0, atol=0, msg=f"{case} ref {k}")
        if case.startswith("llava"):  # the frozen tower did not move on any rank
            tower = [k for k in start["policy"] if k.startswith("vision_tower.")]
            assert tower and all(torch.equal(r["state"][k], start["policy"][k]) for r in ranks for k in tower)
        if case == "llava":
            assert torch.equal(ranks[0]["generated"], ranks[1]["generated"])
            assert torch.equal(ranks[0]["generated"], single["generated"])
    metrics = single["metrics"]
    if case == "gspo":  # step 1's sequence ratios are 1 (none clipped), step 2's partly clipped
        assert 0 < metrics["train/policy/clip_frac_low"] + metrics["train/policy/clip_frac_high"] < 0.5
    if case == "ppo":  # the second epoch is off-policy: actor ratios and critic values clipped
        assert metrics["train/policy/clip_frac"] > 0 and metrics["train/value/clip_frac"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dapo_dynamic_sampling_decides_rounds_together_and_equals_one_process_on_the_kept_groups(
        strategy, two_nodes, tmp_path):
    """DAPO's dynamic sampling fills each rank's batch from its own prompts, drawing more until
    every rank has its share of groups with varied rewards: the number of sampling rounds is the
    same on both ranks (the step's losses are normalised over both ranks' tokens, and generation
    under FSDP2 is collective; a rank stopping early would leave the other waiting), so a rank that
    already had enough samples on and drops the surplus. Extra prompts are drawn per rank, so one
    process on the same 4 starting prompts would draw other ones; on the 4 groups the ranks kept,
    one process takes the same step."""
    ranks = _ranks(two_nodes / f"dapo-{strategy}")
    (s0,), (s1,) = ranks[0]["stats"], ranks[1]["stats"]
    assert s0["rounds"] == s1["rounds"] > 1
    assert s0["drop_rate"] > 0 and s1["drop_rate"] > 0
    assert s0["filled_groups"] == s1["filled_groups"] == 0  # every kept group carries loss
    # a rank that had its 2 groups sampled on for the other one, and left the surplus out
    assert max(s0["surplus_groups"], s1["surplus_groups"]) > 0
    kept = ranks[0]["kept"][0] + ranks[1]["kept"][0]
    assert len(ranks[0]["kept"][0]) == len(ranks[1]["kept"][0]) == 2
    single = _one_process("dapo", tmp_path, rows=kept)
    assert single["stats"][0]["rounds"] == 1 and sorted(single["kept"][0]) == sorted(range(4))
    assert _moved(_initial("dapo")["policy"], single["state"])
    _check(ranks, single, strategy, "dapo")
    _check_export("dapo", two_nodes / f"dapo-{strategy}", ranks[0]["state"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(RESUMED))
def test_checkpoint_resumes_on_two_processes(case, strategy, two_nodes, tmp_path):
    """A checkpoint written by ModelCheckpoint half way (SFT, DPO: after 1 of 2 steps; GRPO: 1 of 2
    rollouts; PPO: 1 of 2 rollouts, 4 actor and critic steps each), distributed under FSDP2,
    resumed with ``ckpt_path`` on 2 processes, ends where the uninterrupted 2-process run ends:
    every model's weights, the optimizers' moments, the data position and (RL) the rollout state
    restored; the HF export of the resumed run holds its gathered weights."""
    straight = _ranks(two_nodes / f"{RESUMED[case]}-{strategy}")
    resumed = _ranks(two_nodes / f"{case}-{strategy}")
    checkpoint = resumed[0]["checkpoint"]
    # FSDP2 writes a distributed checkpoint (a directory of shards), DDP one file from rank 0
    assert os.path.isfile(os.path.join(checkpoint, ".metadata")) if strategy == "fsdp2" else os.path.isfile(checkpoint)
    # the resumed fit starts at the checkpoint's step and trains on the batches left only
    steps = straight[0]["global_step"]
    assert [r["fit_start"] for r in resumed] == [steps // 2] * 2 and [r["fit_start"] for r in straight] == [0] * 2
    assert [r["fit_batches"] for r in straight] == [2 * r["fit_batches"] for r in resumed]
    assert [r["global_step"] for r in resumed] == [steps] * 2
    for part in ("state", "parts"):
        want = {"policy": straight[0]["state"]} if part == "state" else straight[0]["parts"]
        for r in resumed:
            got = {"policy": r["state"]} if part == "state" else r["parts"]
            assert got.keys() == want.keys()
            for name, state in want.items():
                for k, v in state.items():
                    torch.testing.assert_close(got[name][k], v, rtol=0, atol=0, msg=f"{case} {strategy} {name} {k}")
    assert _moved(_initial(RESUMED[case].removesuffix("_long"))["policy"], resumed[0]["state"])
    _check_export(case.removesuffix("_resume"), two_nodes / f"{case}-{strategy}", resumed[0]["state"])


if __name__ == "__main__":  # torchrun --nnodes 2 --node_rank k ... -m tests.algorithms.test_strategies <directory>
    torch.set_num_threads(1)
    chosen = sys.argv[2:]  # "sft" and case-strategy names to run (default: all)
    if not chosen or "sft" in chosen:
        sft_cli(os.path.join(sys.argv[1], "sft"), _topology()["num_nodes"])
    for case, strategy in RUNS:
        if not chosen or f"{case}-{strategy}" in chosen:
            run_case(case, strategy, os.path.join(sys.argv[1], f"{case}-{strategy}"))
