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
import importlib
import json

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
    """``model`` with the weights of ``path``: an HF directory, or a lit_align Lightning
    checkpoint (``.ckpt``) whose policy entries are ``model.<name>``. Strict: a missing or extra
    key is an error naming it."""
    if not path.endswith(".ckpt"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    policy = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(policy, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{path}: policy weights do not match the model, missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model


@torch.no_grad()
def routing_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    out = model.eval()(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    return expert_sets(out.router_logits, k)


def _task(recipe: str):
    import yaml

    with open(recipe) as f:
        spec = yaml.safe_load(f)["data"]["init_args"]["task"]
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="HF directory of the model before training")
    parser.add_argument("--after", required=True, action="append", help="HF directory or .ckpt (repeatable)")
    parser.add_argument("--recipe", required=True, help="a recipe whose data.init_args.task gives the text")
    parser.add_argument("--rows", type=int, default=500, help="held-out rows (prompt + reference completion)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.models.tokenizer import BYTE_TOKENIZER, build_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.before)
    except (OSError, ValueError):
        tokenizer = build_tokenizer(BYTE_TOKENIZER)
    rows = _task(args.recipe).rows("instruction")["validation"][:args.rows]
    texts = [r["prompt"] + r["completion"] for r in rows]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(args.before, dtype=torch.float32)
    k = base.config.num_experts_per_tok
    before = routing_of(base, batch["input_ids"], batch["attention_mask"], k)
    mask = batch["attention_mask"].reshape(-1).bool()
    result = {}
    for path in args.after:
        after = load_weights(AutoModelForCausalLM.from_pretrained(args.before, dtype=torch.float32), path)
        result[path] = float(routing_change(before, routing_of(after, batch["input_ids"], batch["attention_mask"], k),
                                            mask))
        print(f"{path}: {result[path]:.2%} of (layer, token) pairs routed to another expert set", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
