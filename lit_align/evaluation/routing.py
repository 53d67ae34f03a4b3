"""How far a mixture-of-experts model's routing moved between two versions of its weights.

GSPO (Zheng et al. 2025, sec. 5.3) explains why GRPO struggles on MoE models by "expert-activation
volatility": after a gradient update, about 10% of the experts a rollout's tokens were routed to
change (Qwen3-30B-A3B, 48 layers), so token-level importance ratios swing. :func:`routing_change`
measures that share on the same text under two versions of a model; the command compares a base
with the checkpoints trained from it::

    python -m lit_align.evaluation.routing --before checkpoints/sft_chain_base_moe/hf \\
        --after checkpoints/grpo_family_chain_moe/grpo/seed0/last.ckpt --recipe configs/sft/chain_base_moe.yaml
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def expert_sets(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], k: int) -> torch.Tensor:
    """Which experts each token is routed to: ``[layers, tokens, E]`` booleans, ``k`` true per row.

    ``router_logits``: one ``[tokens, E]`` tensor per MoE layer (as HF returns them with
    ``output_router_logits=True``, batch and sequence flattened). The top-``k`` of the logits are
    the top-``k`` of the router's softmax, whatever the model normalises afterwards."""
    logits = torch.stack([r.float() for r in router_logits])
    chosen = torch.zeros_like(logits, dtype=torch.bool)
    return chosen.scatter_(-1, logits.topk(k, dim=-1).indices, True)


def routing_change(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The share of (layer, token) pairs whose set of routed experts differs between ``before``
    and ``after`` (both :func:`expert_sets` of the same tokens, ``[layers, tokens, E]``), over the
    tokens where ``mask`` ``[tokens]`` is true (all by default). A scalar in ``[0, 1]``."""
    if before.shape != after.shape:
        raise ValueError(f"routing_change: expert sets of shapes {tuple(before.shape)} and {tuple(after.shape)}")
    changed = (before != after).any(-1).float()  # [layers, tokens]
    if mask is None:
        return changed.mean()
    keep = mask.reshape(1, -1).float().expand_as(changed)
    return (changed * keep).sum() / keep.sum().clamp(min=1)


def load_weights(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model`` with the policy weights of a lit_align Lightning checkpoint ``path`` (``.ckpt``,
    read with :func:`~lit_align.models.reward.load_checkpoint_safely`), whose policy entries are
    ``model.<name>``. Strict: a missing or extra key is an error naming it."""
    from lit_align.models.reward import load_checkpoint_safely

    state = load_checkpoint_safely(path).get("state_dict")
    if state is None:
        raise ValueError(f"{path}: no state_dict, not a Lightning checkpoint")
    policy = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(policy, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{path}: policy weights do not match the model, missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model


@torch.no_grad()
def routing_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`expert_sets` of a right-padded ``[B, T]`` batch under ``model`` (eval mode)."""
    out = model.eval()(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    return expert_sets(out.router_logits, k)


def validation_batch(recipe: str, tokenizer, rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` validation rows of ``recipe``'s data, encoded by its own datamodule
    (chat template, completion, EOS, length limit) with ``tokenizer``, right-padded:
    ``input_ids`` and ``attention_mask`` ``[rows, T]``."""
    from lit_align.train import main as cli_main

    dm = cli_main(["--config", recipe], run=False).datamodule
    dm.tokenizer = tokenizer
    dm.setup("validate")
    encoded = [r["input_ids"] for r in dm.encoded.get("validation", [])[:rows]]
    if not encoded:
        raise ValueError(f"{recipe}: the data has no validation rows to route")
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="HF directory of the model before training")
    parser.add_argument("--after", required=True, action="append", help="HF directory or .ckpt (repeatable)")
    parser.add_argument("--recipe", required=True, help="a recipe whose validation rows are routed")
    parser.add_argument("--rows", type=int, default=500, help="validation rows routed (>= 1)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    for path in (args.before, *args.after):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")
    from transformers import AutoModelForCausalLM

    from lit_align.models.tokenizer import build_tokenizer

    def load(path: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    base = load(args.before)
    k = getattr(base.config, "num_experts_per_tok", None)
    if not k:
        parser.error(f"--before {args.before}: {base.config.model_type} is not a mixture-of-experts model "
                     "(its config has no num_experts_per_tok)")
    batch = validation_batch(args.recipe, build_tokenizer(args.before), args.rows)
    before = routing_of(base, batch["input_ids"], batch["attention_mask"], k)
    mask = batch["attention_mask"].reshape(-1).bool()
    result = {}
    for path in args.after:
        after = load_weights(load(args.before), path) if path.endswith(".ckpt") else load(path)
        result[path] = float(routing_change(before, routing_of(after, batch["input_ids"], batch["attention_mask"], k),
                                            mask))
        print(f"{path}: {result[path]:.2%} of (layer, token) pairs routed to another expert set", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
