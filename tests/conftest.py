import os
import socket

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    """A tiny random-init causal LM config of the given family."""
    if model_type == "gpt2":
        cfg = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, tie_word_embeddings=True)
    else:
        cfg = dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def repo_root() -> str:
    return REPO


def write_tiny_export(directory) -> str:
    """A tiny Llama + byte tokenizer saved with ``save_pretrained``, laid out as a pipeline
    stage's HF export (``checkpoints/<name>/hf``), which a fresh clone does not have."""
    from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer

    tokenizer = build_tokenizer("byte")
    build_causal_lm(CausalLMSpec(config=tiny_config()), tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    return write_tiny_export(tmp_path_factory.mktemp("sft_export"))


def fit_recipe(recipe: str, tmp_path, pretrained: str | None = None, max_steps: int = 4, extra: list[str] = ()):
    """Run a shipped recipe (``configs/...``) for a few steps on tiny data through the CLI,
    logs and checkpoints under ``tmp_path`` (the run is named ``t``); returns the CLI."""
    from lit_align.train import main

    args = ["fit", "--config", os.path.join(REPO, recipe), *extra]
    if pretrained is not None:
        args += ["--model.init_args.model.pretrained", pretrained]
    return main(args + ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "2",
                        "--data.init_args.task.val_size", "4", "--data.init_args.eval_batch_size", "4",
                        "--data.init_args.micro_batch_size", "4", "--trainer.num_sanity_val_steps", "0",
                        "--trainer.enable_progress_bar", "false", "--logs_dir", str(tmp_path / "logs"),
                        "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "t"])


def write_tiny_reward_export(directory) -> str:
    """A tiny reward model (scalar head) + byte tokenizer, laid out as ``RewardModel``'s HF export."""
    from lit_align.models import CausalLMSpec, build_reward_model, build_tokenizer

    tokenizer = build_tokenizer("byte")
    build_reward_model(CausalLMSpec(config=tiny_config()), tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_tiny_llava_export(directory) -> str:
    """A tiny LLaVA (timm ViT, MLP projector, tiny Llama) export, as a LLaVA stage writes it."""
    from lit_align import LLaVA
    from lit_align.models import CausalLMSpec
    from lit_align.models.vision import VisionTowerSpec

    tower = VisionTowerSpec(library="timm", name="vit_tiny_patch16_224",
                            kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    module = LLaVA(model=CausalLMSpec(config=tiny_config()), vision_tower=tower, projector="mlp2x_gelu")
    module.configure_model()
    module.export_hf(str(directory))
    return str(directory)


def stand_in_exports(recipe: str, tmp_path) -> list[str]:
    """CLI overrides replacing every earlier stage's export a recipe reads under ``checkpoints/``
    (absent from a fresh clone) by a tiny one of the same kind, so the recipe's own loading
    code runs: the policy (``model.pretrained``), a LLaVA stage (``init_from``), the critic
    (``value_model.pretrained``) and reward-model rewards."""
    import yaml

    with open(os.path.join(REPO, recipe)) as f:
        init = yaml.safe_load(f)["model"].get("init_args", {})
    late = lambda v: isinstance(v, str) and v.startswith("checkpoints/")  # noqa: E731
    args = []
    if late((init.get("model") or {}).get("pretrained")):
        args += ["--model.init_args.model.pretrained", write_tiny_export(tmp_path / "sft_export")]
    if late(init.get("init_from")):
        args += ["--model.init_args.init_from", write_tiny_llava_export(tmp_path / "llava_export")]
    rewards = init.get("rewards") or []
    if late((init.get("value_model") or {}).get("pretrained")) or any(late((r.get("args") or {}).get("path"))
                                                                       for r in rewards):
        rm = write_tiny_reward_export(tmp_path / "rm_export")
        if late((init.get("value_model") or {}).get("pretrained")):
            args += ["--model.init_args.value_model.pretrained", rm]
        swapped = [dict(r, args={**(r.get("args") or {}), "path": rm}) if late((r.get("args") or {}).get("path"))
                   else r for r in rewards]
        args += ["--model.init_args.rewards", yaml.safe_dump(swapped, default_flow_style=True).strip()]
    return args


def arith_prompts(prompts: int = 4, train_size: int = 16, **kwargs):
    """A PromptDataModule over small 2-digit addition splits."""
    from lit_align import ArithTask, PromptDataModule

    return PromptDataModule(task=ArithTask(digits=2, train_size=train_size, val_size=4), max_length=16,
                            micro_batch_size=prompts, eval_batch_size=4, **kwargs)


def sample_rollout(module, prompts: int = 4, n: int = 4, seed: int = 0):
    """``n`` sampled completions (4 new tokens, temperature 1) for each of the first ``prompts``
    arith training prompts, from an online-RL module's policy and engine, scored by the training
    forward (also where the module's own step would skip that and reuse its forward's)."""
    from lit_align.rollout import SamplingParams

    dm = arith_prompts(prompts)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = dm.collate([[r] for r in dm.encoded["train"][:prompts]])
    torch.manual_seed(seed)
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, n=n)
    rollout = module.engine.generate(module.model, batch, sampling)
    if not module.engine.score_rollouts:
        module.engine.score(module.model, rollout, sampling.temperature)
    return rollout


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, str]:
    """``{name: directory}`` of the real-format checkpoint zoo (:mod:`tests.zoo`): ``qwen2_instruct``,
    ``qwen2_base``, ``llama3_instruct``, ``gpt2``, ``moe`` and ``qwen2_instruct_rep13`` (the
    weights of ``qwen2_instruct`` with ``repetition_penalty`` 1.3), built once per test run."""
    from tests.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_reward_export(tmp_path_factory) -> str:
    return write_tiny_reward_export(tmp_path_factory.mktemp("rm_export"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a test's own process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
