"""Peak memory of the per-token log-probs at a large vocabulary, and of gradient checkpointing.

    python benchmarks/memory.py                                   # both parts, 3 interleaved repeats
    python benchmarks/memory.py --part logprobs --repeats 5 --chunk-size 1024 --chunk-size 256
    python benchmarks/memory.py --part checkpointing --device cuda --steps 5

Part A, ``token_logprobs``: forward and backward of the log-probs of 2,048 tokens (``B=1``,
``T=2048``) over a 150,000-id vocabulary, from bf16 and from float32 logits that require grad, by
three implementations: ``naive`` (a full float32 ``log_softmax`` then gather), ``chunked`` (the
previous library code: a Python loop of float32 chunks under autograd, which keeps every chunk's
float32 upcast for the backward) and ``function`` (``lit_align.losses.token_logprobs``, the
chunked autograd function that keeps only the logits and a float32 value per row). The figure
is the peak above a baseline taken once the inputs exist: the logits' gradient (the size of the
logits, in their dtype) is part of every figure.

Part B, gradient checkpointing: one SFT optimizer step (``lit_align.SFT`` under a Lightning
Trainer, AdamW) of a random-init Llama (8 layers x 512 hidden by default, byte tokenizer),
batch 4 x 512 tokens, float32, with ``CausalLMSpec(gradient_checkpointing=...)`` off and on:
peak RSS above the RSS at the start of training (the peak includes the optimizer states AdamW
allocates at its first step, the same on both sides), the whole process's peak, and the time of
a step after ``--warmup`` untimed ones.

Every figure comes from a fresh process (``ru_maxrss`` cannot be reset), the median of
interleaved repeats with the min-max spread: repeat r runs every measurement once before repeat
r+1 starts. On CUDA the figures are ``torch.cuda.max_memory_allocated`` above the same baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("naive", "chunked", "function")
DTYPES = ("bfloat16", "float32")
PARTS = ("logprobs", "checkpointing")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# part A: token_logprobs


def _naive(logits, labels, temperature: float = 1.0, chunk_size: int = 1024):
    """A full float32 ``[B, T, V]`` log-softmax, then gather."""
    import torch

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)


def _chunked(logits, labels, temperature: float = 1.0, chunk_size: int = 1024):
    """``token_logprobs`` as it was before the autograd function: chunks of rows upcast to
    float32 in a Python loop; autograd keeps each chunk's float32 copy for the backward."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1])
    ids = labels.reshape(-1).clamp(min=0)
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, flat.shape[0]))
        z = flat[rows].float()
        if temperature != 1.0:
            z = z / temperature
        out.append(z.gather(-1, ids[rows, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(out).view(labels.shape)


def _function(logits, labels, temperature: float = 1.0, chunk_size: int = 1024):
    from lit_align.losses import token_logprobs

    return token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)


#: the implementations before (``naive``, ``chunked``) and after (``function``)
reference = {"naive": _naive, "chunked": _chunked}
IMPLEMENTATIONS = {**reference, "function": _function}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def run_logprobs(job: dict) -> dict:
    import torch

    import lit_align.losses  # noqa: F401  (imported before the baseline, in every process alike)

    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    n, v = job["tokens"], job["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(1, n, v, dtype=dtype, device=device)
    for start in range(0, n, 128):  # filled in place: no float32 temporary of the full size
        logits[0, start: start + 128].normal_(generator=g).mul_(3.0)
    labels = torch.randint(0, v, (1, n), generator=g, device=device)
    logits.requires_grad_(True)
    fn = IMPLEMENTATIONS[job["impl"]]
    # warm-up on a tiny input: one-time allocations (thread pools, kernels) stay out of the figure
    tiny = torch.randn(1, 8, 64, device=device).to(dtype).requires_grad_(True)
    fn(tiny, labels[:, :8] % 64, temperature=job["temperature"], chunk_size=3).sum().backward()
    del tiny
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss, base_peak = _rss_mb(), _peak_rss_mb()
    base_cuda = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    fn(logits, labels, temperature=job["temperature"], chunk_size=job["chunk_size"]).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert logits.grad is not None and logits.grad.dtype == dtype
    peak = _peak_rss_mb()
    if peak <= base_peak:  # the run set no new peak: its own is not measured
        raise SystemExit(f"{job}: no new peak RSS above the baseline's {base_peak:.0f} MB")
    return {"seconds": seconds, "peak_mb": peak - base_rss, "baseline_slack_mb": base_peak - base_rss,
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() - base_cuda) / MB if device.type == "cuda" else None,
            "logits_mb": logits.numel() * logits.element_size() / MB}


# ---------------------------------------------------------------------------------------------
# part B: gradient checkpointing in an SFT step


def prepare_rows(cache: str, seq: int) -> str:
    """``<cache>/sft_<seq>.jsonl``: rows of random letters longer than ``seq`` bytes (the prompt
    side is cut to fit), so every row is exactly ``seq`` tokens, half of them labelled."""
    path = os.path.join(cache, f"sft_{seq}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        rng = random.Random(0)
        text = lambda k: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))  # noqa: E731
        with open(path, "w") as f:
            for _ in range(256):
                f.write(json.dumps({"prompt": text(seq), "completion": text(seq // 2 - 1)}) + "\n")
    return path


def run_checkpointing(job: dict) -> dict:
    import lightning as L
    import torch

    from lit_align import SFT, CausalLMSpec, InstructionDataModule, OptimSpec

    config = dict(model_type="llama", hidden_size=job["hidden"], intermediate_size=job["intermediate"],
                  num_hidden_layers=job["layers"], num_attention_heads=job["heads"], num_key_value_heads=job["heads"],
                  max_position_embeddings=max(1024, job["seq"]), tie_word_embeddings=True)
    spec = CausalLMSpec(config=config, tokenizer="byte", gradient_checkpointing=job["checkpointing"])
    module = SFT(model=spec, optim=OptimSpec(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant"),
                 eval_max_new_tokens=0)
    data = InstructionDataModule(path=job["rows"], val_split=None, test_split=None, max_length=job["seq"],
                                 micro_batch_size=job["batch"], group_by_length=False, seed=0)
    marks: dict[str, float] = {}
    ticks: list[float] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            if job["device"] == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                marks["cuda"] = torch.cuda.memory_allocated()
            marks["rss"], marks["peak"] = _rss_mb(), _peak_rss_mb()
            marks["params"] = sum(p.numel() for p in pl_module.parameters())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks.setdefault("tokens", int(batch["attention_mask"].sum()))

        def on_train_batch_end(self, *args, **kwargs):
            if job["device"] == "cuda":
                torch.cuda.synchronize()
            ticks.append(time.perf_counter())

    trainer = L.Trainer(accelerator="gpu" if job["device"] == "cuda" else "cpu", devices=1,
                        max_steps=job["warmup"] + job["steps"], precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Probe()],
                        default_root_dir=os.path.join(job["cache"], "scratch"))
    trainer.fit(module, datamodule=data)
    active = all(getattr(m, "gradient_checkpointing", False) for m in module.model.modules()
                 if type(m).__name__.endswith("DecoderLayer"))
    assert active == job["checkpointing"], "gradient checkpointing is not in the state asked for"
    steps = [b - a for a, b in zip(ticks[job["warmup"] - 1:], ticks[job["warmup"]:])]
    peak = _peak_rss_mb()
    return {"step_seconds": statistics.median(steps), "peak_mb": peak - marks["rss"], "process_peak_mb": peak,
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() - marks["cuda"]) / MB if "cuda" in marks else None,
            "params": marks["params"], "tokens": marks["tokens"]}


# ---------------------------------------------------------------------------------------------
# the driver: a fresh process per measurement, interleaved repeats, markdown tables


def worker(job: dict) -> dict:
    import torch

    torch.manual_seed(0)
    return {**job, **(run_logprobs(job) if job["part"] == "logprobs" else run_checkpointing(job))}


def launch(job: dict) -> dict | None:
    from throughput import run_worker  # the same fresh-process protocol (benchmarks/ is on sys.path)

    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return run_worker(os.path.abspath(__file__), job, env)


def cell(values: list[float], fmt: str = "{:,.0f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def logprobs_table(results: list[dict]) -> str:
    lines = ["| logits | implementation | chunk rows | peak above inputs MB (CPU RSS) | CUDA peak MB | "
             "forward + backward s |", "| --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["dtype"], r["chunk_size"], r["impl"]) for r in results},
                  key=lambda k: (DTYPES.index(k[0]), -k[1], IMPLS.index(k[2])))
    for dtype, chunk, impl in keys:
        rs = [r for r in results if (r["dtype"], r["chunk_size"], r["impl"]) == (dtype, chunk, impl)]
        lines.append(f"| {dtype} | {impl} | {chunk if impl != 'naive' else '-'} | {cell([r['peak_mb'] for r in rs])} "
                     f"| {cell([r['cuda_peak_mb'] for r in rs])} | {cell([r['seconds'] for r in rs], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def checkpointing_table(results: list[dict]) -> str:
    lines = ["| gradient checkpointing | peak above start of training MB (CPU RSS) | process peak RSS MB "
             "| CUDA peak MB | s per step |", "| --- | --- | --- | --- | --- |"]
    for flag in (False, True):
        rs = [r for r in results if r["checkpointing"] == flag]
        if rs:
            lines.append(f"| {'on' if flag else 'off'} | {cell([r['peak_mb'] for r in rs])} "
                         f"| {cell([r['process_peak_mb'] for r in rs])} | {cell([r['cuda_peak_mb'] for r in rs])} "
                         f"| {cell([r['step_seconds'] for r in rs], '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=PARTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cache", default=os.path.join(REPO, "logs", "benchmarks", "memory"))
    # part A
    parser.add_argument("--tokens", type=int, default=2048, help="B * T (B = 1)")
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--impl", action="append", choices=IMPLS)
    parser.add_argument("--chunk-size", action="append", type=int, help="rows per chunk (default 1024, the library's)")
    parser.add_argument("--temperature", type=float, default=1.0)
    # part B
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps (at least 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps: at least 1 each (a step is timed from the end of the one before)")
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return ""
    parts = args.part or PARTS
    jobs = []
    if "logprobs" in parts:
        common = {"part": "logprobs", "device": args.device, "tokens": args.tokens, "vocab": args.vocab,
                  "temperature": args.temperature}
        for dtype in args.dtype or DTYPES:
            for impl in args.impl or IMPLS:
                for chunk in ([1024] if impl == "naive" else args.chunk_size or [1024]):
                    jobs.append({**common, "dtype": dtype, "impl": impl, "chunk_size": chunk})
    if "checkpointing" in parts:
        rows = prepare_rows(args.cache, args.seq)
        common = {"part": "checkpointing", "device": args.device, "cache": args.cache, "rows": rows,
                  **{k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "seq", "batch",
                                                   "warmup", "steps")}}
        jobs += [{**common, "checkpointing": flag} for flag in (False, True)]
    results: list[dict] = []
    os.makedirs(args.cache, exist_ok=True)
    out = os.path.join(args.cache, "results.jsonl")
    for repeat in range(args.repeats):
        for job in jobs:
            result = launch(job)
            if result is None:
                continue
            results.append({**result, "repeat": repeat})
            with open(out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
            what = (f"{job['dtype']} {job['impl']} chunk {job['chunk_size']}" if job["part"] == "logprobs"
                    else f"checkpointing {'on' if job['checkpointing'] else 'off'}")
            print(f"[{repeat}] {job['part']} {what}: {result['peak_mb']:,.0f} MB", flush=True)
    import torch

    text = ""
    a = [r for r in results if r["part"] == "logprobs"]
    if a:
        text += (f"token_logprobs forward + backward, {args.tokens} tokens x vocab {args.vocab:,} (logits "
                 f"{args.tokens * args.vocab * 2 / MB:,.0f} MB in bf16, {args.tokens * args.vocab * 4 / MB:,.0f} MB "
                 f"in float32), temperature {args.temperature}, {args.device}\n\n" + logprobs_table(a))
    b = [r for r in results if r["part"] == "checkpointing"]
    if b:
        text += (("\n" if text else "") + f"SFT step, Llama {args.layers} x {args.hidden} "
                 f"(intermediate {args.intermediate}, {b[0]['params'] / 1e6:.1f}M parameters, byte vocabulary), "
                 f"batch {args.batch} x {args.seq} tokens, float32, {args.device}, {args.warmup} untimed + "
                 f"{args.steps} timed steps\n\n" + checkpointing_table(b))
    text += f"\ntorch {torch.__version__}; {args.repeats} interleaved repeats, median (min-max)\n"
    print(text)
    return text


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
