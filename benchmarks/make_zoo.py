"""Writes the zoo of tiny real-format checkpoints (``tests/zoo.py``) to a folder.

    python benchmarks/make_zoo.py /tmp/zoo                       # every model, plus the repetition variant
    python benchmarks/make_zoo.py /tmp/zoo --only llama3_instruct --only gpt2 --seed 1
    python benchmarks/make_zoo.py /tmp/zoo --only gpt2 --repetition-penalty 1.3

Each model lands in ``<folder>/<name>`` as ``save_pretrained`` writes it, ready for
``--model.init_args.model.pretrained <folder>/<name>``. The same seed writes identical files.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.zoo import REPETITION_VARIANT, ZOO, build_model, build_zoo  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the model directories (created if missing)")
    parser.add_argument("--only", action="append", choices=ZOO, help="write only this model (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="write every model with this repetition_penalty in its generation config instead of"
                             f" its own (no {REPETITION_VARIANT} then)")
    args = parser.parse_args(argv)
    if args.repetition_penalty is not None and not (math.isfinite(args.repetition_penalty)
                                                    and args.repetition_penalty > 0):
        parser.error(f"--repetition-penalty: {args.repetition_penalty} must be a finite number > 0")
    os.makedirs(args.folder, exist_ok=True)
    names = tuple(args.only or ZOO)
    if args.repetition_penalty is None:
        paths = build_zoo(args.folder, names, seed=args.seed)
    else:
        paths = {name: build_model(name, args.folder, args.seed, {"repetition_penalty": args.repetition_penalty})
                 for name in names}
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return paths


if __name__ == "__main__":
    main()
