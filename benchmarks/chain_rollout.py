"""What an RL recipe's first rollouts look like on the chain task: truncation and group variance.

    python -m lit_align.train fit --config configs/sft/chain_base.yaml      # -> checkpoints/sft_chain_base/hf
    python benchmarks/chain_rollout.py --config configs/grpo/chain.yaml --prompts 256

Builds the recipe's module and data as ``lit_align.train`` does (the policy is the base export
the recipe names), then samples ``num_generations`` completions for each of the first
``--prompts`` training prompts with the module's own engine and sampling settings, in batches of
the recipe's ``micro_batch_size``, as the first rollouts of a run would. Reported overall and per
chain length: the share of completions that hit ``max_new_tokens`` without their EOS, the share
that state the right answer (the task's checker), and the share of groups whose samples are all
right or all wrong (zero reward variance: no GRPO signal, dropped by DAPO's dynamic sampling).
With ``--greedy``, also the greedy accuracy at the rollout's limit and at ``eval_max_new_tokens``.
The table goes to stdout (markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch

from lit_align.rollout import SamplingParams, decode_completions, hf_generate
from lit_align.train import main as cli_main


def build(config: str, overrides: list[str]):
    cli = cli_main(["--config", config, *overrides], run=False)
    module, dm = cli.model, cli.datamodule
    module.configure_model()
    module.model.eval()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return module, dm


def rollouts(module, dm, prompts: int, seed: int) -> list[dict]:
    """One record per completion: ``steps``, ``group``, ``correct``, ``truncated``, ``length``."""
    torch.manual_seed(seed)
    rows = dm.encoded["train"][:prompts]
    sampling = dataclasses.replace(module.sampling, n=module.num_generations, stop_token_ids=module.stop_ids())
    size = dm.hparams.micro_batch_size
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start: start + size]
        module.engine.update_weights(module.model)
        with torch.no_grad():
            rollout = module.engine.generate(module.model, dm.collate([[r] for r in chunk]), sampling)
        for i, (completion, meta) in enumerate(zip(rollout.completions, rollout.meta)):
            out.append({"steps": int(meta["steps"]), "group": start + i // rollout.group_size,
                        "correct": dm.task.check(completion, meta["answer"]),
                        "truncated": bool(rollout.truncated[i]), "length": int(rollout.lengths[i])})
    return out


def greedy_accuracy(module, dm, max_new_tokens: int) -> dict[str, float]:
    rows = dm.encoded["validation"]
    stops = module.stop_ids()
    correct = defaultdict(list)
    for start in range(0, len(rows), 250):
        chunk = rows[start: start + 250]
        batch = dm.eval_collate([[r] for r in chunk])
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stops)
        with torch.no_grad():
            ids = hf_generate(module.model, batch["prompt_ids"], batch["prompt_mask"], sampling,
                              module.tokenizer.pad_token_id, stops)
        for completion, meta in zip(decode_completions(module.tokenizer, ids, stops), batch["meta"]):
            ok = dm.task.check(completion, meta["answer"])
            correct[str(meta["steps"])].append(ok)
            correct["all"].append(ok)
    return {k: sum(v) / len(v) for k, v in correct.items()}


def table(records: list[dict]) -> str:
    by = defaultdict(list)
    for r in records:
        by[str(r["steps"])].append(r)
        by["all"].append(r)
    lines = ["| chain length | completions | truncated | right | mean length | groups | all right | all wrong |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(by, key=lambda k: (k == "all", k)):
        rs = by[key]
        groups = defaultdict(list)
        for r in rs:
            groups[r["group"]].append(r["correct"])
        n = len(rs)
        truncated, right = sum(r["truncated"] for r in rs) / n, sum(r["correct"] for r in rs) / n
        lines.append(f"| {key} | {n} | {truncated:.1%} | {right:.1%} | {sum(r['length'] for r in rs) / n:.1f}"
                     f" | {len(groups)}"
                     f" | {sum(all(g) for g in groups.values()) / len(groups):.1%}"
                     f" | {sum(not any(g) for g in groups.values()) / len(groups):.1%} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/grpo/chain.yaml", help="an online-RL recipe on the chain task")
    p.add_argument("--prompts", type=int, default=256, help="training prompts to sample from (in recipe batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="also greedy held-out accuracy at both limits")
    p.add_argument("overrides", nargs="*", help="CLI overrides for the recipe, e.g. --model.init_args.model.pretrained")
    return p.parse_args(argv)


def run(argv=None) -> None:
    args = parse_args(argv)
    module, dm = build(args.config, args.overrides)
    began = time.perf_counter()
    records = rollouts(module, dm, args.prompts, args.seed)
    took = time.perf_counter() - began
    print(f"{args.config}: policy {module.spec.pretrained}, {args.prompts} prompts x {module.num_generations} samples, "
          f"max_new_tokens {module.sampling.max_new_tokens}, temperature {module.sampling.temperature} "
          f"({took:.0f} s)\n")
    print(table(records))
    if args.greedy:
        for limit in (module.sampling.max_new_tokens, module.eval_max_new_tokens):
            acc = greedy_accuracy(module, dm, limit)
            per = ", ".join(f"{k}: {v:.1%}" for k, v in sorted(acc.items()) if k != "all")
            print(f"\ngreedy held-out accuracy at {limit} new tokens: {acc['all']:.1%} ({per})")


if __name__ == "__main__":
    run()
