"""Two "nodes" on one machine: two torchrun launchers (``--nnodes 2 --node_rank k``, one process
each, gloo over 127.0.0.1), launched once. In the same two processes, SFT trains through the CLI
(``--trainer.num_nodes 2 --trainer.devices 1``, DDP), then DPO (frozen copy reference) under DDP
and FSDP2, GRPO under FSDP2 and LLaVA stage 2 under FSDP2 (tower and projector their own units,
the image splice and generation under sharding). Each ends at the weights of one process that
accumulates the same global batch, and its HF export, written from rank 0, holds the full
(gathered) weights."""

import os
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lit_align import (
    DPO,
    ArithTask,
    CausalLMSpec,
    ImageInstructionDataModule,
    OptimSpec,
    PreferenceDataModule,
)
from lit_align.algorithms.llava import LLaVA
from lit_align.algorithms.policy_gradient import PolicyGradient
from lit_align.rewards import RewardSpec
from lit_align.rollout import SamplingParams
from tests.conftest import REPO, arith_prompts, tiny_config

TOWER = dict(library="timm", name="vit_tiny_patch16_224",
             kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
#: (case, strategy) pairs the 2-process run fits, in this order, in the same two processes
RUNS = [("dpo", "ddp"), ("dpo", "fsdp2"), ("grpo", "fsdp2"), ("llava", "fsdp2")]
# float32 sums in another order (all-reduce of two halves vs one process accumulating them)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _case(name: str, world: int):
    """The module, data module and trainer settings of a case for ``world`` processes; one process
    accumulates the micro-batches the ranks take, so the global batch is the same."""
    if name == "dpo":
        module = DPO(model=CausalLMSpec(config=tiny_config(), seed=1), eval_max_new_tokens=0,
                     optim=OptimSpec(lr=1e-2, warmup_steps=0, schedule="constant"))
        data = PreferenceDataModule(task=ArithTask(digits=2, train_size=16, val_size=4), max_length=16,
                                    micro_batch_size=4, group_by_length=False, eval_batch_size=4)
        return module, data, dict(max_steps=2, accumulate_grad_batches=2 // world)
    if name == "grpo":
        # the deterministic engine and reward of the DDP test: any number of processes sees the same rows
        from tests.algorithms.test_policy_gradient import FIXED_ENGINE, G

        module = PolicyGradient(
            model=CausalLMSpec(config=tiny_config(), seed=1), engine=FIXED_ENGINE, num_generations=G,
            rewards=[RewardSpec("tests.algorithms.test_policy_gradient:fixed_reward", label="fixed")],
            sampling=SamplingParams(max_new_tokens=4, temperature=1.0), eval_max_new_tokens=0,
            # eps far above |grad|: the first Adam step shows the gradient's scale, not only its sign
            optim=OptimSpec(lr=1e-1, eps=1.0, warmup_steps=0, schedule="constant", grad_clip=None))
        return module, arith_prompts(prompts=4 // world, train_size=4), dict(max_steps=1)
    from lit_align import ShapesTask
    from lit_align.models.vision import VisionTowerSpec

    module = LLaVA(model=CausalLMSpec(config=tiny_config(), seed=1), vision_tower=VisionTowerSpec(**TOWER),
                   eval_max_new_tokens=0, optim=OptimSpec(lr=1e-2, warmup_steps=0, schedule="constant"))
    data = ImageInstructionDataModule(task=ShapesTask(train_size=8, val_size=4), kind="instruction", max_length=160,
                                      micro_batch_size=2, eval_batch_size=2)
    return module, data, dict(max_steps=2, accumulate_grad_batches=2 // world)


def _strategy(name: str | None):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "auto"


def _topology() -> dict:
    """``devices`` and ``num_nodes`` of the torchrun launch this process belongs to."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return dict(devices=local, num_nodes=int(os.environ.get("WORLD_SIZE", "1")) // local)


def run_case(name: str, strategy: str | None, directory: str) -> None:
    """Fit case ``name`` under ``strategy`` (``None``: one process), then write the full weights,
    whether the policy was sharded, and (LLaVA) greedy generations on images to
    ``directory/rank<r>.pt``, and the HF export to ``directory/hf`` (collective: every rank exports)."""
    world = 1 if strategy is None else 2
    module, data, settings = _case(name, world)
    topology = _topology() if strategy is not None else dict(devices=1)
    trainer = L.Trainer(accelerator="cpu", **topology, strategy=_strategy(strategy), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False,
                        default_root_dir=directory, **settings)
    trainer.fit(module, datamodule=data)
    sharded = any(hasattr(p, "full_tensor") for p in module.model.parameters())
    state = module.gathered_state_dict()
    state = state if state is not None else {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    record = {"world_size": trainer.world_size, "global_step": trainer.global_step, "sharded": sharded,
              "state": state}
    if name == "llava":  # the image splice under sharding: generation from images after training
        from lit_align.data.batching import collate_generation

        rows = data.encoded["validation"][:2]
        images = data.collate([[r] for r in rows])
        prompts = collate_generation(rows, module.tokenizer.pad_token_id)
        record["generated"] = module.model.generate(
            prompts["prompt_ids"], prompts["prompt_mask"], pixel_values=images["pixel_values"],
            image_counts=images["image_counts"], max_new_tokens=4, do_sample=False,
            pad_token_id=module.tokenizer.pad_token_id)
    module.export_hf(os.path.join(directory, "hf"))
    os.makedirs(directory, exist_ok=True)
    torch.save(record, os.path.join(directory, f"rank{trainer.global_rank}.pt"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = str(_port())
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(k), "--master_addr", "127.0.0.1", "--master_port", port, "-m", "tests.algorithms.test_strategies",
         str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600) for p in launchers]
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


def _one_process(name, tmp_path):
    run_case(name, None, str(tmp_path / name))
    return torch.load(tmp_path / name / "rank0.pt", weights_only=False)


def _check(ranks, single, strategy, case):
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["global_step"] == single["global_step"]
    assert ranks[0]["sharded"] == ranks[1]["sharded"] == (strategy == "fsdp2")
    assert ranks[0]["state"].keys() == single["state"].keys()
    for name, want in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], want, **TOLERANCE, msg=f"{case} {strategy} {name}")


@pytest.mark.slow
def test_dpo_grpo_llava_on_two_processes_equal_one_process(two_nodes, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    singles = {name: _one_process(name, tmp_path) for name in ("dpo", "grpo", "llava")}
    for case, strategy in RUNS:
        directory = two_nodes / f"{case}-{strategy}"
        ranks = [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        single = singles[case]
        _check(ranks, single, strategy, case)
        # the comparison is between trained weights: the step moved the policy
        initial = _case(case, 1)[0]
        initial.configure_model()
        lm_prefix = "language_model." if case == "llava" else ""
        start = initial.model.state_dict()
        assert any(not torch.equal(start[k], single["state"][k]) for k in start if k.endswith("q_proj.weight"))
        # the HF export from rank 0 is the full trained model
        hf_dir = directory / "hf" / ("language_model" if case == "llava" else "")
        exported = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
        for k, v in exported.items():
            want = ranks[0]["state"][lm_prefix + k]
            assert v.shape == want.shape, k
            torch.testing.assert_close(v, want, rtol=0, atol=0, msg=f"{case} {strategy} export {k}")
        if case == "llava":
            projector = load_file(str(directory / "hf" / "projector.safetensors"))
            for k, v in projector.items():
                torch.testing.assert_close(v, ranks[0]["state"]["projector." + k], rtol=0, atol=0)
            assert load_file(str(directory / "hf" / "vision_tower.safetensors")).keys()
            assert torch.equal(ranks[0]["generated"], ranks[1]["generated"])
            assert torch.equal(ranks[0]["generated"], single["generated"])


if __name__ == "__main__":  # torchrun --nnodes 2 --node_rank k ... -m tests.algorithms.test_strategies <directory>
    torch.set_num_threads(1)
    chosen = sys.argv[2:]  # "sft" and case-strategy names to run (default: all)
    if not chosen or "sft" in chosen:
        sft_cli(os.path.join(sys.argv[1], "sft"), _topology()["num_nodes"])
    for case, strategy in RUNS:
        if not chosen or f"{case}-{strategy}" in chosen:
            run_case(case, strategy, os.path.join(sys.argv[1], f"{case}-{strategy}"))
