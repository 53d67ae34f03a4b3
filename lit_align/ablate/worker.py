"""One run of a sweep in its own process: ``python -m lit_align.ablate.worker <run dir>/request.json``.

``lit_align.ablate --parallel N`` starts one per slot. The request holds the run (its training
arguments and fingerprint) and the metrics to record; the worker fits it exactly as a sequential
sweep does and writes the same record.
"""

from __future__ import annotations

import json
import os
import sys


def main(request: str) -> None:
    import torch

    from lit_align.ablate.runs import Run, execute

    threads = os.environ.get("LIT_ALIGN_TORCH_THREADS")
    if threads:  # OMP_NUM_THREADS sizes OpenMP's pool; torch's intra-op count is set here to match
        torch.set_num_threads(int(threads))
    with open(request) as f:
        spec = json.load(f)
    execute(Run(**spec["run"]), spec["metrics"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lit_align.ablate.worker <run dir>/request.json")
    main(sys.argv[1])
