"""Sweep runner: a base recipe, its named variants and seeds, one report with plots.

    python -m lit_align.ablate --config configs/ablations/<name>.yaml [--parallel N] [--rerun-failed]
    python -m lit_align.ablate --base configs/grpo/arith.yaml --delta configs/ablations/grpo/dr_grpo.yaml \\
        --seeds 0 1 2 --metric val/exact_match --set trainer.max_steps=100

Every (variant, seed) is one ``fit`` through the same CLI as ``lit_align.train``, with its own logs,
resolved config and checkpoints under ``<sweep>/<variant>/seed<k>`` and a record (``run.json``)
saying whether it finished; a re-run skips finished runs. The report (``<logs_dir>/<sweep>/``:
``summary.md``, ``summary.csv``, ``runs.csv``, ``plots/``) is read from the runs' TensorBoard logs.

- :mod:`lit_align.ablate.spec`: the ablation file's schema and checks.
- :mod:`lit_align.ablate.runs`: each run's arguments, records, sequential or parallel execution.
- :mod:`lit_align.ablate.curves` / :mod:`~lit_align.ablate.report` / :mod:`~lit_align.ablate.plots`:
  the curves read back, the tables, the PNGs (matplotlib, optional extra ``plots``).
"""

from lit_align.ablate.cli import main
from lit_align.ablate.report import Summary, write_report
from lit_align.ablate.runs import Run, plan, run_all, seed_args, todo
from lit_align.ablate.spec import (
    Ablation,
    AblationError,
    Budget,
    Paper,
    Variant,
    from_flags,
    load_ablation,
)

__all__ = ["Ablation", "AblationError", "Budget", "Paper", "Run", "Summary", "Variant", "from_flags", "load_ablation",
           "main", "plan", "run_all", "seed_args", "todo", "write_report"]
