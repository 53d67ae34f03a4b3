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
    ("vllm", r"unknown engine 'vllm': not a built-in \(hf.*\) nor an import path"),
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
