"""Where a training step's time goes: one `benchmarks/throughput.py` run under py-spy, its
samples inside the training loop split into a few buckets.

    pip install py-spy
    python benchmarks/profile_steps.py --method grpo --side lit --side trl
    python benchmarks/profile_steps.py --setting realistic --method sft --precision bf16-mixed

Each stack sampled inside the training loop (Lightning's fit loop, TRL's ``_inner_training_loop``
or TRL 1.12's ``PPOTrainer.train``, the bare loop's ``run_bare``) is one bucket's: generation,
logging (``self.log``, torchmetrics, TensorBoard, TRL's ``log``) and data (``torch.utils.data``)
when any frame is theirs; otherwise the innermost frame that names a bucket decides: backward
(autograd), optimizer (AdamW, gradient clipping, the non-finite check), forward (model, loss and
log-prob math) or the rest (the trainers' own Python: loops, hooks, bookkeeping). The shares are
of the sampled loop time, warm-up steps included: proportions, not throughput (``throughput.py``
gives that).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import throughput  # noqa: E402  (the benchmark's shapes and runs)

LOOPS = ("fit_loop.py", "_inner_training_loop", "PPOTrainer.train (", "run_bare")
# any frame: the whole call is that bucket's (a forward inside generate is generation)
REGIONS = (
    ("generation", ("transformers/generation/", "vllm/")),
    ("logging", ("LightningModule.log", "logger_connector", "torchmetrics/", "tensorboard", "Trainer.log (")),
    ("data", ("torch/utils/data/",)),
)
# innermost frame first: the first frame one of these names decides
LEAVES = (
    ("backward", ("torch/autograd/", "Tensor.backward")),
    ("optimizer", ("torch/optim/adam", "clip_grad", "nonfinite.py")),
    ("rest", ("transformers/trainer", "trl/", "lightning/", "lit_align/algorithms/", "lit_align/data/")),
    ("forward", ("torch/nn/", "transformers/", "lit_align/losses/", "lit_align/models/", "throughput.py")),
)
NAMES = ("generation", "forward", "backward", "optimizer", "logging", "data", "rest")


def bucket(frames: list[str]) -> str | None:
    """The bucket of one sampled stack (root first), or None outside the training loop."""
    if not any(loop in frame for frame in frames for loop in LOOPS):
        return None
    for name, keys in REGIONS:
        if any(key in frame for frame in frames for key in keys):
            return name
    for frame in reversed(frames):
        for name, keys in LEAVES:
            if any(key in frame for key in keys):
                return name
    return "rest"


def shares(raw: str) -> dict[str, float]:
    """``{bucket: share of the loop's samples}`` from py-spy's raw (collapsed-stack) output."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        name = bucket(stack.split(";"))
        if name and n.isdigit():
            counts[name] += int(n)
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name in NAMES}


def profile(job: dict, rate: int, trl_ppo_path: str | None) -> dict[str, float]:
    env = dict(os.environ)
    if job["side"] == "trl" and job["method"] == "ppo" and trl_ppo_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (trl_ppo_path, env.get("PYTHONPATH")) if p)
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        run = subprocess.run(["py-spy", "record", "--format", "raw", "--rate", str(rate), "--nonblocking", "-o",
                              out.name, "--", sys.executable, os.path.join(HERE, "throughput.py"), "--worker",
                              json.dumps(job)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            raise RuntimeError(f"profiling {job['method']} on the {job['side']} side failed (exit {run.returncode}):\n"
                               + "\n".join(run.stderr.splitlines()[-15:]))
        return shares(open(out.name).read())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(throughput.SETTINGS), default="tiny")
    parser.add_argument("--method", action="append", choices=throughput.METHODS)
    parser.add_argument("--side", action="append", choices=throughput.SIDES)
    parser.add_argument("--precision", default="32-true", choices=throughput.PRECISIONS)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--cache", default=os.path.join(throughput.REPO, "logs", "benchmarks", "throughput"))
    parser.add_argument("--trl-ppo-path", default=os.environ.get("TRL_PPO_PATH"))
    args = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not on PATH: pip install py-spy")
    throughput.prepare(args.setting, args.cache)
    names = NAMES
    lines = ["| method | side | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for method in args.method or throughput.METHODS:
        for side in args.side or ("lit", "trl"):
            if side == "bare" and method not in ("sft", "dpo", "rm"):
                continue
            job = {"setting": args.setting, "cache": args.cache, "method": method, "side": side,
                   "precision": args.precision}
            got = profile(job, args.rate, args.trl_ppo_path)
            lines.append(f"| {method} | {side} | " + " | ".join(f"{100 * got[n]:.0f}%" for n in names) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
