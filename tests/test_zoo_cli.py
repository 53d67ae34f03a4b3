"""Every shipped arith recipe through the training CLI on the real-format checkpoint zoo
(tests/zoo.py), with exactly the README's real-model overrides, for 2 optimizer steps.

A covering design rather than every algorithm x model x precision: each algorithm runs once on
a chat checkpoint (rotating qwen2_instruct / llama3_instruct / qwen2_base, GSPO on the MoE) and
once on GPT-2 (no chat template, dropout, plain prompt/completion text), one of the two runs in
fp32 and the other in ``bf16-mixed``. The RL recipes on chat checkpoints render their prompts
with the chat template (``--data.init_args.chat_template true``), as a README user does, so the
rollouts must stop at the template's end of turn.
"""

import math
import os

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RECIPES = {"sft": "configs/sft/arith.yaml", "rm": "configs/rm/arith.yaml", "dpo": "configs/dpo/arith.yaml",
           "grpo": "configs/grpo/arith.yaml", "gspo": "configs/gspo/arith.yaml", "dapo": "configs/dapo/arith.yaml",
           "ppo": "configs/ppo/arith_rule.yaml"}
RL = ("grpo", "gspo", "dapo", "ppo")
LOSS = {"sft": "train/loss", "rm": "train/loss", "dpo": "train/loss", "grpo": "train/pg_loss",
        "gspo": "train/pg_loss", "dapo": "train/pg_loss", "ppo": "train/policy/pg_loss"}
# (algorithm, zoo model, precision): both precisions for every algorithm across its two runs
CASES = [
    ("sft", "llama3_instruct", "32-true"), ("sft", "gpt2", "bf16-mixed"),
    ("rm", "qwen2_instruct", "bf16-mixed"), ("rm", "gpt2", "32-true"),
    ("dpo", "qwen2_base", "32-true"), ("dpo", "gpt2", "bf16-mixed"),
    ("grpo", "qwen2_instruct", "bf16-mixed"), ("grpo", "gpt2", "32-true"),
    ("gspo", "moe", "32-true"), ("gspo", "gpt2", "bf16-mixed"),
    ("dapo", "llama3_instruct", "bf16-mixed"), ("dapo", "gpt2", "32-true"),
    ("ppo", "qwen2_base", "32-true"), ("ppo", "gpt2", "bf16-mixed"),
]
# the end-of-turn token a chat-templated rollout must stop at, per zoo model
TURN_END = {"qwen2_instruct": "<|im_end|>", "qwen2_base": "<|im_end|>", "moe": "<|im_end|>",
            "llama3_instruct": "<|eot_id|>"}
MAX_NEW_TOKENS = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Models of hidden size 32 gain nothing from a second thread, and on a shared machine two
    OpenMP threads per process make every matmul wait on the other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _args(algo: str, path: str, precision: str, tmp_path, chat: bool) -> list[str]:
    args = ["fit", "--config", os.path.join(REPO, RECIPES[algo]),
            # the README's real-model overrides ("Real models and data")
            "--model.init_args.model.config", "null", "--model.init_args.model.pretrained", path,
            "--model.init_args.model.tokenizer", "null",
            "--trainer.precision", precision, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.micro_batch_size", "2", "--data.init_args.task.train_size", "16",
            "--data.init_args.task.val_size", "4", "--data.init_args.max_length", "96",
            "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "t"]
    if algo in RL:
        args += ["--model.init_args.sampling.max_new_tokens", str(MAX_NEW_TOKENS)]
        if chat:
            args += ["--data.init_args.chat_template", "true"]
    if algo in ("grpo", "gspo", "dapo"):  # 2 prompts x 2 samples in the recipe's 2 mini-batches: 2 steps
        args += ["--model.init_args.num_generations", "2"]
    if algo == "dapo":
        # A random model never answers right, so every group's task_check rewards are equal, dynamic
        # sampling keeps no group and every mini-batch is filler that takes no optimizer step: the
        # run would never reach 2 steps. A zero-weight reward that differs within each group is
        # what the filter looks at instead; the training reward stays the recipe's. Likewise its
        # completions rarely stop within 4 tokens, and under overlong filtering an all-truncated
        # rollout carries no loss either: filtering is off here (tests/algorithms cover it).
        args += ["--model.init_args.max_generation_rounds", "2", "--model.init_args.overlong_filtering", "false",
                 "--model.init_args.rewards",
                 "[{name: task_check}, {name: 'tests.test_zoo_cli:alternating', weight: 0}]",
                 "--model.init_args.dynamic_sampling_metric", "alternating"]
    if algo == "ppo":  # one actor and one critic step
        args += ["--model.init_args.ppo_epochs", "1", "--model.init_args.mini_batches", "1"]
    return args


def alternating(prompts, completions, meta, **context):
    """0, 1, 0, 1, ...: a reward that differs within every group of 2."""
    return [float(i % 2) for i in range(len(completions))]


def _check_stops(module, rollouts, stops: set[int]) -> None:
    """No completion goes on past a stop id; one that is not truncated ends with a stop id, a
    truncated one has ``max_new_tokens`` tokens and none of them."""
    assert rollouts
    for rollout in rollouts:
        for i in range(len(rollout)):
            n = int(rollout.lengths[i])
            ids = rollout.completion_ids[i, :n].tolist()
            assert rollout.completion_mask[i, n:].sum() == 0
            assert not any(t in stops for t in ids[:-1]), (ids, stops)
            if bool(rollout.truncated[i]):
                assert n == MAX_NEW_TOKENS and ids[-1] not in stops
            else:
                assert ids[-1] in stops


@pytest.mark.parametrize("algo, name, precision", CASES, ids=[f"{a}-{n}-{p}" for a, n, p in CASES])
def test_recipe_runs_two_steps_on_the_zoo(zoo, tmp_path, monkeypatch, algo, name, precision):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lit_align.models import load_reward_model
    from lit_align.rollout import HFEngine
    from lit_align.train import main

    rollouts = []
    generate = HFEngine.generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        rollouts.append(out)
        return out

    monkeypatch.setattr(HFEngine, "generate", recording)
    chat = name != "gpt2"
    cli = main(_args(algo, zoo[name], precision, tmp_path, chat))
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2
    loss = trainer.callback_metrics[LOSS[algo]]
    assert math.isfinite(float(loss)), (LOSS[algo], loss)

    # the export is the zoo model's architecture and tokenizer
    export = str(tmp_path / "ckpt" / "t" / "hf")
    source = AutoConfig.from_pretrained(zoo[name])
    if algo == "rm":
        model, tokenizer = load_reward_model(export)
        assert model.score.out_features == 1
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.config.model_type == source.model_type
    assert model.config.hidden_size == source.hidden_size
    assert model.config.num_hidden_layers == source.num_hidden_layers
    zoo_tokenizer = AutoTokenizer.from_pretrained(zoo[name])
    assert tokenizer.eos_token == zoo_tokenizer.eos_token and len(tokenizer) == len(zoo_tokenizer)

    if algo not in RL:
        assert not rollouts
        return
    tok = module.tokenizer
    stops = module.stop_ids()
    assert tok.eos_token_id in stops
    if chat:
        assert tok.convert_tokens_to_ids(TURN_END[name]) in stops
    else:  # GPT-2: no template, the one EOS
        assert stops == [tok.eos_token_id]
    _check_stops(module, rollouts, set(stops))
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["train/response_length/max"]) <= MAX_NEW_TOKENS
    assert math.isfinite(float(metrics["train/reward/mean"]))
