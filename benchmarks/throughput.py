"""Training throughput of lit_align beside TRL and beside a bare PyTorch loop doing the same work.

    pip install -e '.[bench]'                      # TRL (the script leaves its rows out without it)
    python benchmarks/throughput.py                # tiny shapes, fp32 and bf16-mixed, every method
    python benchmarks/throughput.py --setting realistic --precision 32-true --repeats 3
    python benchmarks/throughput.py --method sft --method dpo --side lit --side bare

Every figure comes from a fresh process (imports, model and data loading are outside the timed
window; the optimizer steps inside it are whole, backward, clipping and logging included) and
is the median of interleaved repeats, with the min-max spread: repeat r runs every (method,
side, precision) once before repeat r+1 starts, so a slow patch of the machine hits all sides.

The same work on every side: one seeded model written with ``save_pretrained`` and loaded by
each side from that folder, identical rows (written once to jsonl), the same batch shapes,
loss, AdamW settings (lr 1e-5, no weight decay, constant schedule, gradient clip 1.0), the same
precision and no evaluation or checkpointing in the window. "samples" are rows (SFT), pairs (DPO,
RM), completions (GRPO) and episodes (PPO). Peak RSS is the process's whole peak
(``ru_maxrss``), loading included.

TRL's PPO left TRL in 1.13; set ``--trl-ppo-path`` to a folder holding an older TRL
(``pip install --no-deps --target <dir> trl==1.12.0``) to time it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("sft", "dpo", "rm", "grpo", "grpo_nokl", "ppo")
SIDES = ("lit", "trl", "bare")
PRECISIONS = ("32-true", "bf16-mixed")
LR = 1e-5


@dataclass(frozen=True)
class Shapes:
    """One benchmark setting: the model and the work per optimizer step (per rollout for RL)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int | None            # None: the byte-level tokenizer (384 ids)
    sft_rows: int                # rows per step
    sft_prompt: int              # prompt tokens per SFT row
    sft_completion: int          # completion tokens per SFT row (EOS included)
    pairs: int                   # DPO / RM pairs per step
    pair_prompt: int
    pair_response: int           # chosen and rejected tokens (EOS included)
    rl_prompts: int              # prompts per rollout (GRPO and PPO)
    rl_generations: int          # completions per prompt (GRPO)
    rl_prompt: int
    rl_new_tokens: int
    ppo_prompts: int
    ppo_epochs: int
    warmup: int                  # untimed steps
    timed: int                   # timed steps


SETTINGS = {
    # the tiny model of the earlier side-by-side: 4 x 256 Llama, byte tokenizer
    "tiny": Shapes(layers=4, hidden=256, heads=4, intermediate=1024, vocab=None, sft_rows=16, sft_prompt=31,
                   sft_completion=32, pairs=8, pair_prompt=24, pair_response=24, rl_prompts=1, rl_generations=8,
                   rl_prompt=16, rl_new_tokens=16, ppo_prompts=8, ppo_epochs=4, warmup=3, timed=20),
    # CPU shapes where compute and memory dominate: 8 x 512 Llama, 32,000 ids
    "realistic": Shapes(layers=8, hidden=512, heads=8, intermediate=1024, vocab=32000, sft_rows=8, sft_prompt=256,
                        sft_completion=256, pairs=4, pair_prompt=256, pair_response=256, rl_prompts=8,
                        rl_generations=8, rl_prompt=64, rl_new_tokens=128, ppo_prompts=64, ppo_epochs=1, warmup=1,
                        timed=3),
}


def samples_per_step(method: str, s: Shapes) -> int:
    return {"sft": s.sft_rows, "dpo": s.pairs, "rm": s.pairs, "grpo": s.rl_prompts * s.rl_generations,
            "grpo_nokl": s.rl_prompts * s.rl_generations, "ppo": s.ppo_prompts}[method]


# ---------------------------------------------------------------------------------------------
# fixtures: one model folder, one reward-model folder and the rows, written once per setting


def word_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` ids: ``w<i>`` is id i, so every side sees the same
    token counts for the same text (ids 0-3 are pad, EOS, unk, BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def text_of(rng: random.Random, n: int, s: Shapes) -> str:
    """``n`` tokens of text: ``n`` bytes of letters (byte tokenizer) or ``n`` words."""
    if s.vocab is None:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n)).strip().ljust(n, "x")
    return " ".join(f"w{rng.randrange(4, s.vocab)}" for _ in range(n))


def prepare(setting: str, cache: str) -> str:
    """Write ``<cache>/<setting>/{policy,rm}`` and the jsonl rows; returns the folder."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    s = SETTINGS[setting]
    root = os.path.join(cache, setting)
    if os.path.isfile(os.path.join(root, "done")):
        return root
    os.makedirs(root, exist_ok=True)
    tokenizer = ByT5Tokenizer() if s.vocab is None else word_tokenizer(s.vocab)
    config = LlamaConfig(vocab_size=len(tokenizer) if s.vocab is None else s.vocab, hidden_size=s.hidden,
                         intermediate_size=s.intermediate, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.heads, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    for name, cls in (("policy", LlamaForCausalLM), ("rm", LlamaForSequenceClassification)):
        model = cls(config if name == "policy" else LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
        model.save_pretrained(os.path.join(root, name))
        tokenizer.save_pretrained(os.path.join(root, name))
    rng = random.Random(0)
    # EOS is appended by every side: the completion text holds one token fewer than its budget
    rows = {
        "sft": [{"prompt": text_of(rng, s.sft_prompt, s), "completion": text_of(rng, s.sft_completion - 1, s)}
                for _ in range(s.sft_rows * 64)],
        "pref": [{"prompt": text_of(rng, s.pair_prompt, s), "chosen": text_of(rng, s.pair_response - 1, s),
                  "rejected": text_of(rng, s.pair_response - 1, s)} for _ in range(s.pairs * 64)],
        "prompts": [{"prompt": text_of(rng, s.rl_prompt, s)} for _ in range(max(s.rl_prompts, s.ppo_prompts) * 64)],
    }
    for name, data in rows.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    open(os.path.join(root, "done"), "w").close()
    return root


def read_rows(root: str, name: str) -> list[dict]:
    with open(os.path.join(root, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def spread_reward(prompts, completions, meta=None, **context):
    """A cheap rule reward with spread inside a group: the share of distinct characters."""
    return [len(set(c)) / (1 + len(c)) for c in completions]


# ---------------------------------------------------------------------------------------------
# one run in this process


class Clock:
    """Wall time at the end of each optimizer step (each rollout for RL); the window starts at
    the end of the last warm-up step."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def seconds(self) -> float:
        return self.times[-1] - self.times[self.warmup - 1]


def run_lit(method: str, s: Shapes, root: str, precision: str, clock: Clock) -> None:
    import lightning as L
    import yaml

    from lit_align.train import main

    policy = os.path.join(root, "policy")
    optim = {"lr": LR, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0}
    steps = s.warmup + s.timed
    data = {"val_split": None, "test_split": None, "seed": 0}
    rl = {"rewards": [{"name": "throughput:spread_reward"}], "eval_max_new_tokens": 0,
          "sampling": {"max_new_tokens": s.rl_new_tokens, "temperature": 1.0}}
    if method == "sft":
        model = {"class_path": "lit_align.SFT", "init_args": {"eval_max_new_tokens": 0}}
        data |= {"path": os.path.join(root, "sft.jsonl"), "max_length": s.sft_prompt + s.sft_completion,
                 "micro_batch_size": s.sft_rows, "group_by_length": False}
        data_cls = "lit_align.InstructionDataModule"
    elif method in ("dpo", "rm"):
        model = ({"class_path": "lit_align.DPO", "init_args": {"beta": 0.1, "eval_max_new_tokens": 0}}
                 if method == "dpo" else {"class_path": "lit_align.RewardModel", "init_args": {}})
        data |= {"path": os.path.join(root, "pref.jsonl"), "max_length": s.pair_prompt + s.pair_response,
                 "micro_batch_size": s.pairs, "group_by_length": False}
        data_cls = "lit_align.PreferenceDataModule"
    elif method in ("grpo", "grpo_nokl"):
        n = s.rl_prompts * s.rl_generations
        model = {"class_path": "lit_align.GRPO", "init_args": {
            **rl, "num_generations": s.rl_generations, "beta": 0.04 if method == "grpo" else 0.0,
            "kl_estimator": "k3" if method == "grpo" else None, "mini_batches": 1, "forward_batch_size": n}}
        data |= {"path": os.path.join(root, "prompts.jsonl"), "answer_key": None, "max_length": s.rl_prompt,
                 "micro_batch_size": s.rl_prompts}
        data_cls = "lit_align.PromptDataModule"
    else:
        rm = os.path.join(root, "rm")
        model = {"class_path": "lit_align.PPO", "init_args": {
            **rl, "rewards": [{"name": "reward_model", "args": {"path": rm}}], "value_model": {"pretrained": rm},
            "ppo_epochs": s.ppo_epochs, "mini_batches": 1, "forward_batch_size": s.ppo_prompts, "beta": 0.05,
            "kl_estimator": "k1", "critic_optim": optim}}
        data |= {"path": os.path.join(root, "prompts.jsonl"), "answer_key": None, "max_length": s.rl_prompt,
                 "micro_batch_size": s.ppo_prompts}
        data_cls = "lit_align.PromptDataModule"
        steps *= 2 * s.ppo_epochs  # actor and critic steps per rollout
    model["init_args"] |= {"model": {"pretrained": policy}, "optim": optim}
    config = {"name": f"throughput_{method}", "model": model, "data": {"class_path": data_cls, "init_args": data},
              "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "precision": precision,
                          "log_every_n_steps": 10, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                          "limit_val_batches": 0}}
    path = os.path.join(root, f"lit_{method}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    scratch = os.path.join(root, "scratch")
    cli = main(["--config", path, "--logs_dir", os.path.join(scratch, "logs"), "--checkpoints_dir",
                os.path.join(scratch, "ckpt"), "--export_hf", "false", "--save_every_n_steps", str(10**6)], run=False)

    class Tick(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            clock.tick()

    cli.trainer.callbacks.append(Tick())
    cli.trainer.fit(cli.model, cli.datamodule)


def run_trl(method: str, s: Shapes, root: str, precision: str, clock: Clock) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    policy = os.path.join(root, "policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    steps = s.warmup + s.timed
    common = {"output_dir": os.path.join(root, "scratch", "trl"), "learning_rate": LR, "weight_decay": 0.0,
              "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "max_steps": steps,
              "logging_steps": 10, "save_strategy": "no", "report_to": "none", "bf16": precision == "bf16-mixed",
              "use_cpu": True, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
              # TRL's configs turn activation checkpointing on by default: off, as on the other sides
              "gradient_checkpointing": False}
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, per_device_train_batch_size=s.sft_rows, max_length=s.sft_prompt + s.sft_completion,
                         completion_only_loss=True, packing=False)
        trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(policy), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(read_rows(root, "sft")), callbacks=[Tick()])
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, per_device_train_batch_size=s.pairs, beta=0.1,
                         max_length=s.pair_prompt + s.pair_response)
        trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(policy), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(read_rows(root, "pref")), callbacks=[Tick()])
    elif method == "rm":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common, per_device_train_batch_size=s.pairs, max_length=s.pair_prompt + s.pair_response,
                            center_rewards_coefficient=None)
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
        trainer = RewardTrainer(model, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(read_rows(root, "pref")), callbacks=[Tick()])
    elif method in ("grpo", "grpo_nokl"):
        from trl import GRPOConfig, GRPOTrainer

        n = s.rl_prompts * s.rl_generations
        args = GRPOConfig(**common, per_device_train_batch_size=n, num_generations=s.rl_generations,
                          steps_per_generation=1, max_completion_length=s.rl_new_tokens, temperature=1.0,
                          beta=0.04 if method == "grpo" else 0.0, loss_type="dapo", log_completions=False)
        trainer = GRPOTrainer(policy, reward_funcs=[spread_reward], args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(read_rows(root, "prompts")), callbacks=[Tick()])
    else:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        rm = os.path.join(root, "rm")
        prompts = [{"input_ids": tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]}
                   for r in read_rows(root, "prompts")]
        common.pop("max_steps")
        args = PPOConfig(**common, per_device_train_batch_size=s.ppo_prompts, gradient_accumulation_steps=1,
                         num_mini_batches=1, num_ppo_epochs=s.ppo_epochs, total_episodes=steps * s.ppo_prompts,
                         response_length=s.rl_new_tokens, local_rollout_forward_batch_size=s.ppo_prompts,
                         num_sample_generations=0, temperature=1.0, kl_coef=0.05, kl_estimator="k1",
                         stop_token="eos")
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(policy),
                             ref_model=AutoModelForCausalLM.from_pretrained(policy),
                             reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
                             value_model=AutoModelForSequenceClassification.from_pretrained(rm),
                             train_dataset=Dataset.from_list(prompts), callbacks=[Tick()])
    trainer.train()


def run_bare(method: str, s: Shapes, root: str, precision: str, clock: Clock) -> None:
    """The same work as the trainers' with nothing but torch and transformers: tokenise, pad,
    forward, loss, backward, clip, AdamW step."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if method not in ("sft", "dpo", "rm"):
        raise SystemExit(f"bare: no loop for {method}")
    policy = os.path.join(root, "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if method == "rm" else AutoModelForCausalLM
    model = cls.from_pretrained(policy, **({"num_labels": 1} if method == "rm" else {})).train()
    ref = AutoModelForCausalLM.from_pretrained(policy).eval().requires_grad_(False) if method == "dpo" else None
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" \
        else contextlib.nullcontext

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(map(len, seqs))
        return torch.tensor([q + [value] * (width - len(q)) for q in seqs])

    def sequences(rows: list[dict], key: str) -> tuple[list[list[int]], list[list[int]]]:
        prompts = [ids(r["prompt"]) for r in rows]
        return [p + ids(r[key]) + [tok.eos_token_id] for p, r in zip(prompts, rows)], prompts

    def logps(m, input_ids, mask, labels) -> torch.Tensor:
        logits = m(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        lp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * (target != -100)).sum(-1)

    rows = read_rows(root, "sft" if method == "sft" else "pref")
    per = s.sft_rows if method == "sft" else s.pairs
    for step in range(s.warmup + s.timed):
        batch = rows[step * per:(step + 1) * per]
        if method == "sft":
            seqs, prompts = sequences(batch, "completion")
        else:
            chosen, prompts = sequences(batch, "chosen")
            seqs = chosen + sequences(batch, "rejected")[0]
            prompts = prompts + prompts
        input_ids, mask = pad(seqs, tok.pad_token_id), pad([[1] * len(q) for q in seqs], 0)
        labels = pad([[-100] * len(p) + q[len(p):] for p, q in zip(prompts, seqs)], -100)
        with autocast():
            if method == "sft":
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            elif method == "dpo":
                with torch.no_grad():
                    ref_lp = logps(ref, input_ids, mask, labels)
                lp = logps(model, input_ids, mask, labels)
                margin = (lp - ref_lp)[:per] - (lp - ref_lp)[per:]
                loss = -F.logsigmoid(0.1 * margin).mean()
            else:
                scores = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1).float()
                loss = -F.logsigmoid(scores[:per] - scores[per:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick()


def worker(job: dict) -> dict:
    s = SETTINGS[job["setting"]]
    root = os.path.join(job["cache"], job["setting"])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reward: throughput:spread_reward
    clock = Clock(s.warmup)
    {"lit": run_lit, "trl": run_trl, "bare": run_bare}[job["side"]](job["method"], s, root, job["precision"], clock)
    steps = len(clock.times) - s.warmup
    if steps < 1:
        raise SystemExit(f"{job}: {len(clock.times)} steps recorded, need more than {s.warmup}")
    return {**job, "steps": steps, "seconds": clock.seconds(),
            "samples_per_s": steps * samples_per_step(job["method"], s) / clock.seconds(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------
# the driver: interleaved fresh processes, one table


def launch(job: dict, trl_ppo_path: str | None) -> dict | None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    if job["side"] == "trl" and job["method"] == "ppo":
        if not trl_ppo_path:
            return None
        env["PYTHONPATH"] = os.pathsep.join(p for p in (trl_ppo_path, env.get("PYTHONPATH")) if p)
    return run_worker(os.path.abspath(__file__), job, env)


def run_worker(script: str, job: dict, env: dict) -> dict | None:
    """Run ``script --worker <job>`` in a fresh process (every figure from its own process) and
    return the dict it printed on its last ``RESULT`` line, or ``None`` (with its stderr) on failure."""
    done = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        print(f"failed: {job}\n{done.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def trl_available(trl_ppo_path: str | None) -> dict[str, str | None]:
    import importlib.util

    def version(path: str | None) -> str | None:
        code = "import trl; print(trl.__version__)"
        env = dict(os.environ, PYTHONPATH=path) if path else None
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
        return out.stdout.strip() or None

    return {"trl": version(None) if importlib.util.find_spec("trl") else None,
            "trl_ppo": version(trl_ppo_path) if trl_ppo_path else None}


def cell(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results: list[dict], setting: str) -> str:
    lines = [f"setting `{setting}`: {asdict(SETTINGS[setting])}", "",
             "| method | precision | lit_align samples/s | TRL samples/s | bare loop samples/s | lit / TRL "
             "| lit / bare | peak RSS MB lit / TRL / bare |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        for precision in PRECISIONS:
            got = {side: [r for r in results if (r["method"], r["precision"], r["side"]) == (method, precision, side)]
                   for side in SIDES}
            if not any(got.values()):
                continue
            med = {side: statistics.median([r["samples_per_s"] for r in rs]) if rs else None
                   for side, rs in got.items()}

            def ratio(a: str, b: str, med=med) -> str:
                return f"{med[a] / med[b]:.2f}" if med[a] and med[b] else "-"

            rss = " / ".join(f"{statistics.median([r['peak_rss_mb'] for r in rs]):.0f}" if rs else "-"
                             for rs in got.values())
            lines.append(f"| {method} | {precision} | " + " | ".join(
                cell([r["samples_per_s"] for r in got[side]]) for side in SIDES)
                + f" | {ratio('lit', 'trl')} | {ratio('lit', 'bare')} | {rss} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    parser.add_argument("--method", action="append", choices=METHODS)
    parser.add_argument("--side", action="append", choices=SIDES)
    parser.add_argument("--precision", action="append", choices=PRECISIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=os.path.join(REPO, "logs", "benchmarks", "throughput"))
    parser.add_argument("--trl-ppo-path", default=os.environ.get("TRL_PPO_PATH"),
                        help="a folder with TRL <= 1.12 (PPOTrainer) to prepend to PYTHONPATH for TRL's PPO")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return ""
    versions = trl_available(args.trl_ppo_path)
    sides = [s for s in (args.side or SIDES) if s != "trl" or versions["trl"]]
    prepare(args.setting, args.cache)
    jobs = [{"setting": args.setting, "cache": args.cache, "method": m, "side": side, "precision": p}
            for m in args.method or METHODS for p in args.precision or PRECISIONS for side in sides
            if not (side == "bare" and m not in ("sft", "dpo", "rm"))]
    results: list[dict] = []
    out = os.path.join(args.cache, f"{args.setting}.jsonl")
    for repeat in range(args.repeats):
        for job in jobs:
            result = launch(job, args.trl_ppo_path)
            if result:
                results.append({**result, "repeat": repeat})
                with open(out, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
                print(f"[{repeat}] {job['method']} {job['side']} {job['precision']}: "
                      f"{result['samples_per_s']:.1f} samples/s, {result['peak_rss_mb']:.0f} MB", flush=True)
    import torch
    import transformers

    text = (table(results, args.setting) + f"\ntorch {torch.__version__}, transformers {transformers.__version__}, "
            f"TRL {versions['trl']}, TRL for PPO {versions['trl_ppo']}; {args.repeats} interleaved repeats\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
