"""Every ``python -m lit_align...`` command in README.md's code blocks parses and builds as written.

Training commands are instantiated in-process (``main(args, run=False)``: model, data module and
trainer built, nothing trained); strategy deltas, which need several processes or GPUs, are
parsed with ``--print_config``. What a fresh clone lacks is replaced, and only that: an earlier
stage's export by a tiny one (``stand_in_exports``), a hub model id by a zoo checkpoint of the
same family, ``my_rewards:math_match`` by a module of that name, a LLaVA stage-1 export by a tiny
one. Data paths are left as written: a data module reads its files in ``setup``, not when built.
Sweep commands are parsed by the sweep runner's parser and, in the flag form, turned into a sweep."""

import itertools
import os
import re
import shlex

import pytest

from tests.conftest import REPO, stand_in_exports, write_tiny_llava_export

HUB_MODELS = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2_instruct"}
#: Deltas for CUDA GPUs only (refused here before anything is built): parsed, as strategy deltas are.
GPU_ONLY = {"configs/precision/16-mixed.yaml"}


def readme_commands() -> list[str]:
    """The ``python -m lit_align...`` commands of README.md's fenced code blocks, continuations joined,
    trailing comments dropped."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            start = line.find("python -m lit_align")
            if start >= 0:
                commands.append(shlex.join(shlex.split(line[start:], comments=True)))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_documents():
    assert len(COMMANDS) >= 15
    assert "python -m lit_align.train fit --config configs/sft/arith.yaml" in COMMANDS  # the quickstart
    assert any("--model.init_args.model.config null" in c for c in COMMANDS)


def _substituted(args: list[str], tmp_path, zoo) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        if arg in HUB_MODELS:
            arg = zoo[HUB_MODELS[arg]]
        elif arg.startswith("checkpoints/") and args[i - 1] == "--model.init_args.init_from":
            arg = write_tiny_llava_export(tmp_path / "stage1_export")
        out.append(arg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m lit_align.train")])
def test_a_readme_training_command_builds(command, tmp_path, zoo, monkeypatch):
    from lit_align.train import main

    args = shlex.split(command)[3:]
    assert args[0] in ("fit", "validate", "test"), command
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    for path in configs:
        assert os.path.isfile(os.path.join(REPO, path)), (command, path)
    monkeypatch.chdir(REPO)
    (tmp_path / "my_rewards.py").write_text("def math_match(prompts, completions, meta, **context):\n"
                                            "    return [0.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rest = _substituted(args[1:], tmp_path, zoo)
    if any(os.sep + "strategy" + os.sep in os.path.join(REPO, c) or c in GPU_ONLY for c in configs):
        with pytest.raises(SystemExit) as exit:
            main([args[0], *rest, "--print_config"])
        assert exit.value.code in (0, None)
        return
    # stand-ins after the configs, before the command's own overrides, which win
    last = max(i for i, a in enumerate(rest) if a == "--config") + 2
    cli = main([*rest[:last], *stand_in_exports(configs[0], tmp_path), *rest[last:]], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    given = dict(itertools.pairwise(rest))
    if "--model.init_args.model.pretrained" in given:
        assert cli.model.spec.pretrained == given["--model.init_args.model.pretrained"]
    if "--model.init_args.rewards" in given:  # the command line's list, whole
        assert [s.name for s in cli.model.rewards.specs] == ["my_rewards:math_match"]
        assert cli.model.rewards.specs[0].args == {}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m lit_align.ablate")])
def test_a_readme_sweep_command_parses(command, monkeypatch):
    from lit_align.ablate.cli import ablation_of, parser

    monkeypatch.chdir(REPO)
    p = parser()
    args = p.parse_args(shlex.split(command)[3:])
    if args.config is None or os.path.isfile(args.config):
        sweep = ablation_of(args, p)
        assert sweep.variants
    else:
        assert args.config == "configs/ablations/<name>.yaml"  # the README's placeholder
