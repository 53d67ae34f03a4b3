"""The rollout engine interface and registry: built-in ``hf``, registered names, import paths,
and the errors that name what is wrong."""

import pytest

from lit_align.models import build_tokenizer
from lit_align.rollout import ENGINES, HFEngine, RolloutEngine, build_engine, register_engine, resolve_engine

TOK = build_tokenizer("byte")


class EchoEngine(RolloutEngine):
    """A complete engine (its rollouts are never used here)."""

    def update_weights(self, model):
        pass

    def generate(self, model, prompts, sampling):
        raise NotImplementedError


class HalfEngine(RolloutEngine):
    def update_weights(self, model):
        pass


class NotAnEngine:
    def generate(self, model, prompts, sampling):
        raise NotImplementedError


@pytest.fixture
def registry():
    before = dict(ENGINES)
    yield ENGINES
    ENGINES.clear()
    ENGINES.update(before)


def test_hf_is_built_in():
    assert ENGINES["hf"] is HFEngine and resolve_engine("hf") is HFEngine
    engine = build_engine("hf", TOK, logprob_batch_size=3)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    assert engine.tokenizer is TOK and engine.logprob_batch_size == 3


def test_the_interface_is_abstract():
    with pytest.raises(TypeError):
        RolloutEngine(TOK)
    with pytest.raises(TypeError):
        HalfEngine(TOK)
    with pytest.raises(ValueError, match="logprob_batch_size"):
        EchoEngine(TOK, logprob_batch_size=0)


def test_register_by_name(registry):
    assert register_engine("echo")(EchoEngine) is EchoEngine
    assert resolve_engine("echo") is EchoEngine
    register_engine("echo")(EchoEngine)  # the same class again (a re-import) is fine
    with pytest.raises(ValueError, match="'echo' is already registered to .*EchoEngine"):
        register_engine("echo")(HFEngine)
    with pytest.raises(ValueError, match="import path"):
        register_engine("a:b")
    with pytest.raises(ValueError, match="not a subclass of lit_align.rollout.RolloutEngine"):
        register_engine("other")(NotAnEngine)
    assert "other" not in registry


def test_import_path():
    engine = build_engine("tests.rollout.test_engines:EchoEngine", TOK, logprob_batch_size=5)
    assert type(engine) is EchoEngine and engine.logprob_batch_size == 5


@pytest.mark.parametrize("name, match", [
    ("nope", r"unknown engine 'nope': not a built-in \(hf, vllm\) nor an import path"),
    ("tests.rollout.test_engines:NotAnEngine", "not a subclass of lit_align.rollout.RolloutEngine"),
    ("tests.rollout.test_engines:HalfEngine", r"HalfEngine leaves abstract methods unimplemented \(generate\)"),
    ("tests.rollout.test_engines:Missing", "has no attribute 'Missing'"),
    ("tests.rollout.no_such_module:Engine", "cannot import module 'tests.rollout.no_such_module'"),
    ("tests.rollout.test_engines:", "an import path is 'package.module:name'"),
    ("", "not an engine name"),
])
def test_bad_engines_are_named(name, match):
    with pytest.raises(ValueError, match=match):
        resolve_engine(name)


class SettingsEngine(EchoEngine):
    def __init__(self, tokenizer, logprob_batch_size: int = 32, width: int = 1):
        super().__init__(tokenizer, logprob_batch_size)
        self.width = width


def test_engine_spec_passes_its_args():
    from lit_align.rollout import EngineSpec

    engine = build_engine(EngineSpec("tests.rollout.test_engines:SettingsEngine", {"width": 3}), TOK, 7)
    assert (engine.width, engine.logprob_batch_size) == (3, 7)
    with pytest.raises(ValueError, match="bad args.*height"):
        build_engine(EngineSpec("tests.rollout.test_engines:SettingsEngine", {"height": 3}), TOK)


def test_engine_spec_from_yaml_reaches_the_module():
    from lit_align import GRPO
    from lit_align.models import CausalLMSpec
    from lit_align.rewards import RewardSpec
    from lit_align.rollout import EngineSpec
    from tests.conftest import tiny_config

    spec = EngineSpec("tests.rollout.test_engines:SettingsEngine", {"width": 5})
    m = GRPO(model=CausalLMSpec(config=tiny_config()), rewards=[RewardSpec("arith_match")], engine=spec)
    assert type(m.engine) is SettingsEngine and m.engine.width == 5 and m.hparams.engine == spec
    with pytest.raises(ValueError, match="GRPO.engine: .*unexpected keyword argument 'height'"):
        GRPO(model=CausalLMSpec(config=tiny_config()), rewards=[RewardSpec("arith_match")],
             engine=EngineSpec("tests.rollout.test_engines:SettingsEngine", {"height": 5}))


def test_vllm_is_registered_and_says_when_it_is_missing():
    import importlib.util

    assert ENGINES["vllm"].__name__ == "VLLMEngine"
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: tests/vllm cover the engine")
    with pytest.raises(ValueError, match=r"engine vllm: cannot import vllm .*\.ci/vllm_env\.sh"):
        build_engine("vllm", TOK)
    # bad settings fail first, without vllm
    with pytest.raises(ValueError, match=r"engine vllm: gpu_memory_utilization: need a number in \(0, 1\]"):
        build_engine("vllm", TOK, gpu_memory_utilization=float("nan"))
