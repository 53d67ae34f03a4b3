"""The sweep runner: ablation files are checked, every variant x seed runs, the report's numbers
are the runs' own logged values, failures are listed and never averaged, re-runs resume."""

import csv
import glob
import json
import math
import os
import statistics

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from lit_align.ablate import AblationError, from_flags, load_ablation, main, plan, todo
from lit_align.ablate.curves import CurveStats, at_steps, budget_curve, read_curves
from lit_align.ablate.report import collect, mean_std, summarize
from lit_align.ablate.runs import FAILED, FINISHED, condense, option_args, slot_envs
from lit_align.ablate.spec import Budget
from tests.conftest import REPO

QUICKSTART = os.path.join(REPO, "configs", "sft", "arith.yaml")
# the quickstart recipe cut down to seconds: a 32-wide model, 64 training rows, 4 held-out ones
TINY = {"export_hf": False, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
        "trainer.log_every_n_steps": 1, "data.init_args.task.train_size": 64, "data.init_args.task.val_size": 4,
        "data.init_args.eval_batch_size": 4, "data.init_args.micro_batch_size": 4,
        "model.init_args.model.config.hidden_size": 32, "model.init_args.model.config.intermediate_size": 64}


class CrashAt(Callback):
    """Fails the run of seed ``seed`` once it has logged ``step`` training steps (``hard``: the
    process dies on the spot, as when it is killed)."""

    def __init__(self, step: int = 2, seed: int = 1, hard: bool = False):
        self.step, self.seed, self.hard = step, seed, hard

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step and int(os.environ.get("PL_GLOBAL_SEED", "-1")) == self.seed:
            if self.hard:
                os._exit(3)
            raise RuntimeError(f"crash at step {trainer.global_step}")


def crash(**kwargs) -> dict:
    return {"trainer.callbacks": [{"class_path": "tests.test_ablate.CrashAt", "init_args": kwargs}]}


def write_ablation(path, variants, **top) -> str:
    doc = {"base": QUICKSTART, "seeds": [0, 1], "metrics": {"train/loss": "min", "val/loss": "min"},
           "steps": {"trainer.max_steps": 4, "trainer.val_check_interval": 2}, "overrides": dict(TINY),
           "variants": variants, **top}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# -- ablation files ------------------------------------------------------------------------
def test_an_ablation_file_becomes_runs_with_the_budget_the_overrides_and_the_seed(tmp_path):
    delta = tmp_path / "high_lr.yaml"
    delta.write_text("model:\n  init_args:\n    optim:\n      lr: 1.0e-2\n")
    path = write_ablation(tmp_path / "abl.yaml", [
        {"name": "base"},
        {"name": "both", "deltas": [str(delta)], "overrides": {"model.init_args.optim.warmup_steps": 0,
                                                                "data.init_args.task.train_size": 32}}])
    ablation = load_ablation(path)
    assert ablation.name == "abl" and [v.name for v in ablation.variants] == ["base", "both"]
    runs = plan(ablation, str(tmp_path / "logs"), str(tmp_path / "ckpt"))
    assert [(r.variant, r.seed) for r in runs] == [("base", 0), ("base", 1), ("both", 0), ("both", 1)]
    args = runs[3].args
    assert args[:5] == ["fit", "--config", QUICKSTART, "--config", str(delta)]
    pairs = list(zip(args[5::2], args[6::2]))
    # common overrides, then the step budget, then the variant's, which win over the common ones
    assert pairs.index(("--data.init_args.task.train_size", "64")) < pairs.index(("--trainer.max_steps", "4")) \
        < pairs.index(("--data.init_args.task.train_size", "32"))
    assert ("--export_hf", "false") in pairs and ("--model.init_args.optim.warmup_steps", "0") in pairs
    # the quickstart builds its model from an inline config: the seed sets its initialisation too
    for key in ("--seed_everything", "--data.init_args.seed", "--model.init_args.model.seed"):
        assert (key, "1") in pairs
    assert ("--name", "abl/both/seed1") in pairs and runs[3].dir == str(tmp_path / "logs" / "abl" / "both" / "seed1")
    assert len({r.fingerprint for r in runs}) == 4


def test_option_args_keep_strings_as_typed_and_structures_as_json():
    assert option_args({"a.b": 0.5, "c": True, "d": "1e-3", "e": [1, {"x": None}]}) == [
        "--a.b", "0.5", "--c", "true", "--d", "1e-3", "--e", '[1, {"x": null}]']


BAD_FILES = [
    ({"seedz": [0]}, "top level: unknown key(s) ['seedz']"),
    ({"base": None}, "base: expected a non-empty string"),
    ({"base": "no/such/recipe.yaml"}, "base: recipe no/such/recipe.yaml does not exist"),
    ({"variants": [{"name": "a"}, {"name": "a", "overrides": {"x": 1}}]}, "variants[1].name: 'a' repeats"),
    ({"variants": [{"name": "a", "deltas": ["missing_delta.yaml"]}]}, "variants[0].deltas[0]: delta missing_delta"),
    ({"variants": [{"name": "a", "overrides": {"model.init_args.beta": float("nan")}}]},
     "variants[0].overrides.model.init_args.beta: must be finite"),
    ({"overrides": {"model.init_args.optim.lr": "inf"}}, "overrides.model.init_args.optim.lr: must be finite"),
    ({"variants": [{"name": "a", "paper": float("inf")}]}, "variants[0].paper: must be finite"),
    ({"variants": [{"name": "a", "delta": []}]}, "variants[0]: unknown key(s) ['delta']"),
    ({"variants": [{"name": "a/b"}]}, "variants[0].name: 'a/b'"),
    ({"variants": [{"name": "a"}, {"name": "b"}]}, "variants[1]: 'b' runs the same deltas and overrides as 'a'"),
    ({"variants": [{"name": "a", "overrides": {"trainer.max_steps": 9}}]}, "variants[0].overrides: ['trainer"),
    ({"steps": {"trainer.val_check_interval": 2}}, "steps: trainer.max_steps is required"),
    ({"steps": {"trainer.max_steps": 0}}, "steps.trainer.max_steps: expected a positive integer"),
    ({"overrides": {"name": "x"}}, "overrides.name: set by the runner"),
    ({"metrics": {"val/exact_match": "up"}}, "metrics.val/exact_match: expected max or min"),
    ({"seeds": [0, 0]}, "seeds: repeated seeds"),
    ({"budget": {"metric": "train/response_length/mean", "scale": -1}}, "budget.scale: must be > 0"),
    ({"budget": {"metric": "train/response_length/mean", "reduce": "mean"}}, "budget.reduce: expected sum"),
    ({"paper": {"source": "s", "metric": "m", "beside": "val/nope"}}, "paper.beside: 'val/nope' is not one of"),
    ({"variants": [{"name": "a", "paper": 30}]}, "variants (a).paper: paper values need a top-level paper"),
]


@pytest.mark.parametrize("change, message", BAD_FILES, ids=[m.split(":")[0] for _, m in BAD_FILES])
def test_bad_ablation_files_fail_naming_the_file_and_the_field(tmp_path, change, message):
    doc = {"base": QUICKSTART, "seeds": [0], "metrics": {"train/loss": "min"}, "steps": {"trainer.max_steps": 2},
           "variants": [{"name": "a"}], **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AblationError) as error:
        load_ablation(str(path))
    assert f"ablate: {path}: {message}" in str(error.value)


SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "*.yaml")))


def readme_example(tmp_path) -> str:
    """The ablation file the README shows, written out as a file."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text[text.index("```yaml", text.index("### Ablation sweeps")) + len("```yaml"):]
    path = tmp_path / "readme_example.yaml"
    path.write_text(block[: block.index("```")])
    return str(path)


@pytest.mark.parametrize("path", ["README.md", *SHIPPED], ids=lambda p: os.path.relpath(p, REPO))
def test_the_readme_example_and_every_shipped_ablation_file_load_and_plan(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # ablation files name recipes relative to the repository root
    ablation = load_ablation(readme_example(tmp_path) if path == "README.md" else os.path.relpath(path, REPO))
    runs = plan(ablation)
    assert len(runs) == len(ablation.variants) * len(ablation.seeds) and ablation.steps["trainer.max_steps"] > 0
    if path != "README.md":
        others = [load_ablation(os.path.relpath(p, REPO)).name for p in SHIPPED if p != path]
        assert ablation.name not in others, f"two ablation files write logs/{ablation.name}/"


def test_missing_required_fields_and_missing_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"seeds": [0], "metrics": {"m": "max"}, "steps": {"trainer.max_steps": 1},
                                    "variants": [{"name": "a"}]}))
    with pytest.raises(AblationError, match=f"{path}: base: missing"):
        load_ablation(str(path))
    with pytest.raises(AblationError, match="ablation file .*nope.yaml does not exist"):
        load_ablation(str(tmp_path / "nope.yaml"))


def test_the_flag_form_builds_the_same_kind_of_sweep(tmp_path):
    delta = tmp_path / "high_lr.yaml"
    delta.write_text("model:\n  init_args:\n    optim:\n      lr: 1.0e-2\n")
    ablation = from_flags(QUICKSTART, [str(delta)], [0, 2], ["val/exact_match", "train/loss:min"],
                          ["trainer.max_steps=3"], name="s")
    assert [v.name for v in ablation.variants] == ["baseline", "high_lr"]
    assert ablation.metrics == {"val/exact_match": "max", "train/loss": "min"}
    runs = plan(ablation, "logs")
    assert [(r.variant, r.seed) for r in runs] == [("baseline", 0), ("baseline", 2), ("high_lr", 0), ("high_lr", 2)]
    assert runs[2].args[:5] == ["fit", "--config", QUICKSTART, "--config", str(delta)]
    assert "--trainer.max_steps" in runs[0].args and runs[0].args[runs[0].args.index("--trainer.max_steps") + 1] == "3"
    with pytest.raises(AblationError, match="command line: --delta: delta .*nope.yaml does not exist"):
        from_flags(QUICKSTART, [str(tmp_path / "nope.yaml")], [0], [], [])
    with pytest.raises(AblationError, match="--set: 'no_equals_sign': expected KEY=VALUE"):
        from_flags(QUICKSTART, [], [0], [], ["no_equals_sign"])
    with pytest.raises(AblationError, match="nothing to run"):
        from_flags(QUICKSTART, [], [0], [], [], baseline=False)
    with pytest.raises(SystemExit):  # flag-form options beside an ablation file are refused
        main(["--config", str(delta), "--seeds", "1"])
    # nothing ran yet: the report lists every run as not run and averages nothing
    summaries = main(["--base", QUICKSTART, "--delta", str(delta), "--name", "s", "--logs_dir", str(tmp_path),
                      "--report-only"], echo=lambda *a: None)
    assert [len(s.finished) for s in summaries] == [0, 0]
    assert "| baseline | 0 of 1 (not run 1) |" in (tmp_path / "s" / "summary.md").read_text()


# -- curves, statistics, resume decisions --------------------------------------------------
def test_curve_stats_end_best_and_step_of_best():
    curve = [(0, 0.2), (10, 0.7), (20, 0.7), (30, 0.5)]
    assert CurveStats.of(curve, "max") == CurveStats(0.5, 0.7, 10.0)  # first step reaching the best
    assert CurveStats.of(curve, "min") == CurveStats(0.5, 0.2, 0.0)
    diverged = CurveStats.of([(0, 1.0), (1, math.nan)], "min")
    assert math.isnan(diverged.end) and diverged.best == 1.0 and diverged.best_step == 0.0
    assert at_steps([(2, 1.0), (5, 3.0)], [0, 2, 4, 5, 9])[1:] == [1.0, 1.0, 3.0, 3.0]


def test_budget_is_the_per_step_product_times_scale_summed():
    curves = {"len": [(0, 4.0), (1, 6.0), (2, 5.0)], "rounds": [(0, 1.0), (2, 3.0)]}
    assert budget_curve(curves, Budget(("len",), scale=8)) == [(0, 32.0), (1, 80.0), (2, 120.0)]
    assert budget_curve(curves, Budget(("len", "rounds"), scale=2)) == [(0, 8.0), (2, 38.0)]
    assert budget_curve(curves, Budget(("len",), scale=2, reduce="last")) == [(0, 8.0), (1, 12.0), (2, 10.0)]
    assert budget_curve(curves, Budget(("tokens",))) is None


def test_mean_and_sample_std():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    mean, std = mean_std([0.3])
    assert mean == 0.3 and math.isnan(std)  # one seed has no spread to report
    assert all(math.isnan(x) for x in mean_std([0.1, math.nan]))  # a diverged seed is not dropped


def test_resume_decisions(tmp_path):
    ablation = from_flags(QUICKSTART, [], [0, 1, 2, 3, 4], ["m"], [])
    runs = plan(ablation, str(tmp_path))

    def base(r, **kw):
        return {"fingerprint": r.fingerprint, **kw}

    runs[0].write_record(base(runs[0], status=FINISHED))
    runs[1].write_record(base(runs[1], status=FAILED, error="ValueError: x"))
    runs[2].write_record(base(runs[2], status="running"))  # its sweep was killed
    runs[3].write_record({"fingerprint": "other", "status": FINISHED})  # settings changed since
    os.makedirs(runs[4].dir)  # a folder alone is no finished run
    pending, notes = todo(runs)
    assert [r.seed for r in pending] == [2, 3, 4]
    assert any("seed 1: failed before (ValueError: x); skipped" in n for n in notes)
    assert any("seed 3: settings changed" in n for n in notes)
    assert [r.seed for r in todo(runs, rerun_failed=True)[0]] == [1, 2, 3, 4]
    # the report counts only the finished, current run; the others keep their state
    outcomes = collect(ablation, runs)
    assert [o.status for o in outcomes] == [FINISHED, FAILED, "running", "stale", "not run"]
    assert [len(s.finished) for s in summarize(ablation, outcomes)] == [1]


def test_parallel_slots_split_the_cores_and_refuse_more_runs_than_cores():
    import torch

    cores = len(os.sched_getaffinity(0))
    envs = slot_envs(1)
    assert envs[0]["OMP_NUM_THREADS"] == str(cores)
    if not torch.cuda.is_available():
        assert [e["OMP_NUM_THREADS"] for e in slot_envs(cores)] == ["1"] * cores
        with pytest.raises(AblationError, match=f"--parallel {cores + 1}: only {cores} CPU core"):
            slot_envs(cores + 1)


def test_condensed_errors_keep_the_cause():
    error = ("ValueError: Does not validate against any of the Union subtypes\nSubtypes: [A, B]\nErrors:\n"
             "  - optim: lr=-1.0 must be > 0\n  - Expected a <class 'NoneType'>\nGiven value type: Namespace")
    assert condense(error) == \
        "ValueError: Does not validate against any of the Union subtypes optim: lr=-1.0 must be > 0"


# -- a real sweep --------------------------------------------------------------------------
def test_tiny_sweep_report_matches_the_logs_lists_failures_and_resumes(tmp_path, monkeypatch):
    """2 variants x 2 seeds plus a variant whose seed 1 crashes at step 3 (after logging): the
    tables are the runs' own logged values, the crash is failed and not averaged, a re-run trains
    nothing and --rerun-failed retries only the failure."""
    import lit_align.train

    path = write_ablation(tmp_path / "tiny.yaml", [
        {"name": "a", "paper": 1.5},
        {"name": "b", "overrides": {"model.init_args.optim.lr": 3.0e-2, "model.init_args.optim.warmup_steps": 0},
         "paper": 2.5},
        {"name": "crashy", "overrides": crash(step=3, seed=1)}],
        budget={"metric": "lr/pg1", "scale": 1000, "label": "lr sum"},
        paper={"source": "A et al. 2025, Table 1", "metric": "score", "beside": "val/loss"})
    logs = tmp_path / "logs"
    argv = ["--config", path, "--logs_dir", str(logs), "--checkpoints_dir", str(tmp_path / "ckpt")]
    main(argv, echo=lambda *a: None)
    sweep = logs / "tiny"

    # every finished run's numbers, read independently from its event files
    per_run = {}
    for r in read_csv(sweep / "runs.csv"):
        if r["status"] == FINISHED:
            curves = read_curves(r["log_dir"])
            per_run[r["variant"], int(r["seed"])] = curves
            for m in ("train/loss", "val/loss"):
                best = min(v for _, v in curves[m])
                assert float(r[f"{m}:end"]) == pytest.approx(curves[m][-1][1])
                assert float(r[f"{m}:best"]) == pytest.approx(best)
                assert float(r[f"{m}:best_step"]) == next(s for s, v in curves[m] if v == best)
            assert float(r["budget"]) == pytest.approx(1000 * sum(v for _, v in curves["lr/pg1"]))
    assert sorted(per_run) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("crashy", 0)]
    assert len(per_run["a", 0]["train/loss"]) == 4 and len(per_run["a", 0]["val/loss"]) == 2
    # the seeds differ, so do their losses; so do the variants' learning rates (the budget column)
    assert per_run["a", 0]["train/loss"] != per_run["a", 1]["train/loss"]

    rows = {r["variant"]: r for r in read_csv(sweep / "summary.csv")}
    for variant in ("a", "b"):
        for m in ("train/loss", "val/loss"):
            ends = [per_run[variant, s][m][-1][1] for s in (0, 1)]
            assert float(rows[variant][f"{m}:end_mean"]) == pytest.approx(statistics.mean(ends))
            assert float(rows[variant][f"{m}:end_std"]) == pytest.approx(statistics.stdev(ends))
            bests = [min(v for _, v in per_run[variant, s][m]) for s in (0, 1)]
            assert float(rows[variant][f"{m}:best_mean"]) == pytest.approx(statistics.mean(bests))
    assert float(rows["b"]["budget_mean"]) > float(rows["a"]["budget_mean"])  # lr 3e-2 without warm-up
    assert rows["a"]["paper"] == "1.5"
    # the record's final value (the trainer's own) is the end of the logged curve
    record = json.loads((sweep / "a" / "seed0" / "run.json").read_text())
    assert record["final"]["train/loss"] == pytest.approx(per_run["a", 0]["train/loss"][-1][1])

    # the crash logged steps before failing, yet only seed 0 counts
    crashed = read_curves(str(sweep / "crashy" / "seed1" / "version_0"))
    assert len(crashed["train/loss"]) >= 2
    crashy = rows["crashy"]
    assert (crashy["finished"], crashy["runs"], crashy["train/loss:end_n"]) == ("1", "2", "1")
    assert float(crashy["train/loss:end_mean"]) == pytest.approx(per_run["crashy", 0]["train/loss"][-1][1])
    assert math.isnan(float(crashy["train/loss:end_std"]))
    failed = [r for r in read_csv(sweep / "runs.csv") if r["status"] == FAILED]
    assert [(r["variant"], r["seed"]) for r in failed] == [("crashy", "1")]
    assert "RuntimeError: crash at step 3" in failed[0]["error"]

    summary = (sweep / "summary.md").read_text()
    assert "| crashy | 1 of 2 (failed 1) |" in summary
    assert "- crashy seed 1: failed: RuntimeError: crash at step 3" in summary
    assert "paper: score" in summary and "| a | 2 | 1.5 |" in summary and "A et al. 2025, Table 1" in summary
    for name in ("train_loss.png", "val_loss.png", "val_loss_vs_budget.png"):
        png = (sweep / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert f"(plots/{name})" in summary

    # a re-run trains nothing and writes the same tables
    calls = []
    real = lit_align.train.AlignCLI

    def counting(*args, **kwargs):
        calls.append(kwargs["args"][kwargs["args"].index("--name") + 1])
        return real(*args, **kwargs)

    monkeypatch.setattr(lit_align.train, "AlignCLI", counting)
    before = (sweep / "summary.csv").read_text()
    main(argv, echo=lambda *a: None)
    assert calls == [] and (sweep / "summary.csv").read_text() == before
    assert not (sweep / "a" / "seed0" / "version_1").exists()
    # --rerun-failed retries the failure alone (it crashes again, in a new log folder)
    main([*argv, "--rerun-failed"], echo=lambda *a: None)
    assert calls == ["tiny/crashy/seed1"] and (sweep / "crashy" / "seed1" / "version_1").is_dir()
    assert (sweep / "summary.csv").read_text() == before
    # a moved logs folder still resumes: the runs are known by their settings, not their paths
    os.rename(logs, tmp_path / "moved")
    main(["--config", path, "--logs_dir", str(tmp_path / "moved"), "--checkpoints_dir", str(tmp_path / "ckpt")],
         echo=lambda *a: None)
    assert calls == ["tiny/crashy/seed1"] and (tmp_path / "moved" / "tiny" / "summary.csv").read_text() == before


@pytest.mark.slow
def test_parallel_runs_in_subprocesses_with_a_share_of_the_cores(tmp_path, monkeypatch):
    """--parallel 2: each run in its own process with cores / 2 torch threads; a worker killed
    mid-run (no record written) is reported failed with its exit code."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    path = write_ablation(tmp_path / "par.yaml", [{"name": "ok"}, {"name": "killed", "overrides": crash(
        step=1, seed=0, hard=True)}], seeds=[0])
    logs = tmp_path / "logs"
    summaries = main(["--config", path, "--logs_dir", str(logs), "--checkpoints_dir", str(tmp_path / "ckpt"),
                      "--parallel", "2"], echo=lambda *a: None)
    ok = json.loads((logs / "par" / "ok" / "seed0" / "run.json").read_text())
    assert ok["status"] == FINISHED and ok["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    killed = json.loads((logs / "par" / "killed" / "seed0" / "run.json").read_text())
    assert killed["status"] == FAILED and killed["error"].startswith("worker exited with code 3")
    assert [len(s.finished) for s in summaries] == [1, 0]
    curves = read_curves(ok["log_dir"])
    assert float(read_csv(logs / "par" / "runs.csv")[0]["train/loss:end"]) == pytest.approx(curves["train/loss"][-1][1])
