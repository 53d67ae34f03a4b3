"""Runs of a sweep: their training-CLI arguments, their records, and how they are executed.

Every (variant, seed) is one ``fit`` through the same CLI as ``lit_align.train``, named
``<sweep>/<variant>/seed<k>``, so its TensorBoard logs, resolved config and checkpoints sit under
``<logs_dir>/<sweep>/<variant>/seed<k>/version_N`` and ``<checkpoints_dir>/<sweep>/<variant>/seed<k>``.
Beside the logs, ``run.json`` is the run's record: ``running`` while it trains, then ``finished``
(with the log folder it wrote) or ``failed`` (with the error). A run counts as done only when its
record says ``finished`` with the same settings (arguments and recipe file contents); a folder
alone proves nothing, since a killed run leaves one too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import yaml

from lit_align.ablate.spec import Ablation, AblationError

FINISHED, FAILED, RUNNING, INTERRUPTED = "finished", "failed", "running", "interrupted"


@dataclass
class Run:
    """One ``fit`` of the sweep; ``args`` are the training CLI's (``fit --config ...``)."""

    variant: str
    seed: int
    args: list[str]
    dir: str
    fingerprint: str

    @property
    def record_path(self) -> str:
        return os.path.join(self.dir, "run.json")

    def read_record(self) -> dict | None:
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:  # a torn write from a killed process: run it again
            return {"status": FAILED, "error": f"unreadable record {self.record_path}: {e}"}

    def write_record(self, record: dict) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.record_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, self.record_path)  # atomic: a reader never sees half a record
        return record

    def is_current(self, record: dict | None) -> bool:
        return record is not None and record.get("fingerprint") == self.fingerprint


def option_args(overrides: dict) -> list[str]:
    """``{"model.init_args.beta": 0.0}`` -> ``["--model.init_args.beta", "0.0"]``. Strings go as
    typed (the CLI parses them, as on a command line); other values as JSON, which the CLI
    reads as YAML, so lists and mappings keep their structure."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def seed_args(files: list[str], seed: int) -> list[str]:
    """What a seed changes: the global seed (sampling, dropout), the data order and, for a
    model built from an inline ``config`` (random init) in any of ``files``, its initialisation."""
    inline = False
    for path in files:
        with open(path) as f:
            model = ((yaml.safe_load(f) or {}).get("model") or {}).get("init_args", {}).get("model") or {}
        if "config" in model:
            inline = model["config"] is not None
        elif model.get("pretrained") is not None:
            inline = False
    args = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    return args + (["--model.init_args.model.seed", str(seed)] if inline else [])


def _digest(paths: list[str]) -> dict[str, str]:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def plan(ablation: Ablation, logs_dir: str = "logs", checkpoints_dir: str = "checkpoints") -> list[Run]:
    """Every run of the sweep, variant-major, each with its arguments and settings fingerprint."""
    runs = []
    for variant in ablation.variants:
        files = [ablation.base, *variant.deltas]
        digests = _digest(files)
        for seed in ablation.seeds:
            name = f"{ablation.name}/{variant.name}/seed{seed}"
            args = ["fit", *(a for f in files for a in ("--config", f)), *option_args(ablation.overrides),
                    *option_args(ablation.steps), *option_args(variant.overrides), *seed_args(files, seed)]
            # what the run computes, not where it writes: a moved logs folder still resumes
            fingerprint = hashlib.sha256(json.dumps({"args": args, "files": digests}).encode()).hexdigest()[:16]
            # a run the sweep starts again (failed, or its settings changed) replaces its own export
            args += ["--name", name, "--logs_dir", logs_dir, "--checkpoints_dir", checkpoints_dir,
                     "--overwrite", "true"]
            runs.append(Run(variant.name, seed, args, os.path.join(logs_dir, name), fingerprint))
    return runs


def todo(runs: list[Run], rerun_failed: bool = False) -> tuple[list[Run], list[str]]:
    """The runs to (re)start and why: never started, killed, settings changed since, or failed
    with ``rerun_failed``. Finished and current runs are skipped, as are current failures."""
    out, notes = [], []
    for run in runs:
        record = run.read_record()
        label = f"{run.variant} seed {run.seed}"
        if record is None:
            out.append(run)
        elif not run.is_current(record):
            out.append(run)
            notes.append(f"{label}: settings changed since its {record.get('status')} run; running it again")
        elif record.get("status") == FINISHED:
            notes.append(f"{label}: finished before; skipped")
        elif record.get("status") == FAILED:
            if rerun_failed:
                out.append(run)
                notes.append(f"{label}: failed before; running it again (--rerun-failed)")
            else:
                notes.append(f"{label}: failed before ({condense(record.get('error'))}); skipped "
                             "(--rerun-failed retries it)")
        else:
            out.append(run)
            notes.append(f"{label}: {record.get('status')} when its sweep stopped; running it again")
    return out, notes


#: Lines of a config parser's union-type error that repeat the structure rather than say what is wrong.
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "Expected a <class 'NoneType'>", "Parser key")


def condense(error: str | None, limit: int = 400) -> str:
    """One line for tables: the error without the parser's restated structure, cut to ``limit``
    characters (the record and ``runs.csv`` keep all of it)."""
    lines = [line.strip(" -") for line in str(error or "").splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    text = " ".join(" ".join(kept or lines).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metric_values(trainer, names) -> dict[str, float]:
    logged = trainer.callback_metrics
    return {m: float(logged[m]) if m in logged else math.nan for m in names}


def execute(run: Run, metrics: list[str]) -> dict:
    """Fit ``run`` in this process and write its record: ``finished`` with the logs' folder and
    the final logged ``metrics``, or ``failed`` with the error (the sweep goes on). An interrupt
    (Ctrl-C: Lightning then exits) marks it ``interrupted`` and stops the sweep."""
    import torch

    from lit_align.train import AlignCLI

    record = {"status": RUNNING, "variant": run.variant, "seed": run.seed, "fingerprint": run.fingerprint,
              "args": run.args, "threads": torch.get_num_threads(),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time()}
    run.write_record(record)
    start, argv = time.perf_counter(), sys.argv
    sys.argv = argv[:1]  # the sweep's own flags are not the run's (LightningCLI warns when it sees both)
    try:
        # parse errors raise instead of exiting, so a typo in one variant is that variant's failure
        cli = AlignCLI(args=run.args, parser_kwargs={"exit_on_error": False})
    except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others' results
        record.update(status=FAILED, error=f"{type(e).__name__}: {e}".strip())
    except BaseException:
        record.update(status=INTERRUPTED, seconds=time.perf_counter() - start)
        run.write_record(record)
        raise
    else:
        logger = cli.trainer.logger
        record.update(status=FINISHED, log_dir=getattr(logger, "log_dir", None),
                      final=_metric_values(cli.trainer, metrics), global_step=cli.trainer.global_step)
    finally:
        sys.argv = argv
    record["seconds"] = time.perf_counter() - start
    return run.write_record(record)


def slot_envs(parallel: int) -> list[dict[str, str]]:
    """Environment of each of ``parallel`` slots: torch threads = cores / parallel, and on GPUs
    one device each (``CUDA_VISIBLE_DEVICES``)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // parallel))
    envs = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "LIT_ALIGN_TORCH_THREADS": threads}
            for _ in range(parallel)]
    if torch.cuda.is_available():
        given = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [d.strip() for d in given.split(",") if d.strip()] if given else \
            [str(i) for i in range(torch.cuda.device_count())]
        if parallel > len(devices):
            raise AblationError(f"ablate: --parallel {parallel}: only {len(devices)} GPU(s) visible ({devices}); "
                                "one run per device")
        for env, device in zip(envs, devices):
            env["CUDA_VISIBLE_DEVICES"] = device
    elif parallel > cores:
        raise AblationError(f"ablate: --parallel {parallel}: only {cores} CPU core(s) here; one run per core")
    return envs


def spawn(run: Run, metrics: list[str], env: dict[str, str]) -> dict:
    """Fit ``run`` in a subprocess (``python -m lit_align.ablate.worker``) with ``env`` added; its
    output goes to ``<run dir>/output.log``. A worker that dies before writing its record
    (killed, out of memory) leaves the run ``failed`` with the end of its output."""
    os.makedirs(run.dir, exist_ok=True)
    request = os.path.join(run.dir, "request.json")
    with open(request, "w") as f:
        json.dump({"run": asdict(run), "metrics": metrics}, f)
    log = os.path.join(run.dir, "output.log")
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "lit_align.ablate.worker", request], stdout=out,
                               stderr=subprocess.STDOUT, env={**os.environ, **env})
    record = run.read_record() or {}
    if record.get("fingerprint") == run.fingerprint and record.get("status") in (FINISHED, FAILED):
        return record
    with open(log, errors="replace") as f:
        tail = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
    return run.write_record({**record, "status": FAILED, "variant": run.variant, "seed": run.seed,
                             "fingerprint": run.fingerprint, "args": run.args,
                             "error": f"worker exited with code {code}: {' | '.join(tail)} (see {log})"})


def run_all(runs: list[Run], metrics: list[str], parallel: int = 1, echo=print) -> list[dict]:
    """Execute ``runs``: one after the other in this process, or ``parallel`` subprocesses at once."""
    if parallel < 1:
        raise AblationError(f"ablate: --parallel must be >= 1, got {parallel}")
    if parallel == 1:
        records = []
        for i, run in enumerate(runs):
            echo(f"ablate: [{i + 1}/{len(runs)}] {run.variant} seed {run.seed}")
            records.append(execute(run, metrics))
            _echo_done(run, records[-1], echo)
        return records
    envs = slot_envs(parallel)
    slots: queue.Queue[int] = queue.Queue()
    for i in range(parallel):
        slots.put(i)

    def job(run: Run) -> dict:
        slot = slots.get()
        try:
            echo(f"ablate: {run.variant} seed {run.seed} started (slot {slot}, output in {run.dir}/output.log)")
            record = spawn(run, metrics, envs[slot])
            _echo_done(run, record, echo)
            return record
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(job, runs))


def _echo_done(run: Run, record: dict, echo) -> None:
    extra = f": {condense(record.get('error'))}" if record.get("status") == FAILED else ""
    echo(f"ablate: {run.variant} seed {run.seed} {record.get('status')} in {record.get('seconds', math.nan):.1f} s"
         + extra)
