import math

import pytest
import torch

from lit_align.models import CausalLMSpec, build_reward_model, build_tokenizer, sequence_scores
from lit_align.rewards import REWARDS, RewardError, Rewards, RewardSpec, register_reward
from tests.conftest import tiny_config


def ctx(lengths=None, max_new_tokens=10, **extra):
    lengths = lengths if lengths is not None else [1]
    return dict(completion_lengths=lengths, truncated=[n >= max_new_tokens for n in lengths],
                max_new_tokens=max_new_tokens, **extra)


def score(specs, completions, meta=None, prompts=None, **context):
    n = len(completions)
    rewards = Rewards(specs)
    return rewards(prompts or ["q"] * n, completions, meta or [{}] * n, **(context or ctx([1] * n)))


# -- arith_match -------------------------------------------------------------------


def test_arith_match_right_wrong_garbage():
    completions = ["59", "95", "garbage", "  59 because 5+4=9", "58", ""]
    total, raw = score([RewardSpec("arith_match")], completions, [{"answer": "95"}] * 6)
    assert raw["arith_match"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert total.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_arith_match_not_reversed_negative_and_int_answer():
    spec = RewardSpec("arith_match", args={"reverse_answer": False})
    _, raw = score([spec], ["95", "59", "-12", "-21"], [{"answer": 95}, {"answer": "95"}, {"answer": "-12"},
                                                        {"answer": "-12"}])
    assert raw["arith_match"].tolist() == [1.0, 0.0, 1.0, 0.0]
    _, raw = score([RewardSpec("arith_match")], ["-21", "-12"], [{"answer": "-12"}] * 2)
    assert raw["arith_match"].tolist() == [1.0, 0.0]


def test_arith_match_dotted_key():
    spec = RewardSpec("arith_match", args={"answer_key": "reward_model.ground_truth"})
    meta = [{"reward_model": {"ground_truth": "95"}}, {"reward_model": {"ground_truth": "12"}}]
    _, raw = score([spec], ["59", "59"], meta)
    assert raw["arith_match"].tolist() == [1.0, 0.0]


def test_arith_match_missing_key_names_key_and_row():
    spec = RewardSpec("arith_match", args={"answer_key": "reward_model.ground_truth"})
    meta = [{"reward_model": {"ground_truth": "95"}}, {"answer": "95"}]
    with pytest.raises(RewardError, match=r"reward 'arith_match', row 1 \(completion '59'\): meta has no "
                                          r"'reward_model.ground_truth'") as e:
        score([spec], ["59", "59"], meta)
    assert e.value.row == 1 and e.value.label == "arith_match"
    with pytest.raises(RewardError, match=r"row 0 .*'abc' is not an integer answer"):
        score([RewardSpec("arith_match")], ["59"], [{"answer": "abc"}])


# -- format ------------------------------------------------------------------------


def test_format_default_pattern():
    completions = [
        "<think>5+4=9</think> <answer>59</answer>",
        "\n <think>line one\nline two</think>\n<answer>59</answer>  \n",  # stripped; . spans newlines
        "<think>x</think><answer>59</answer> and more",
        "<answer>59</answer>",
        "59",
    ]
    _, raw = score([RewardSpec("format")], completions)
    assert raw["format"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    _, raw = score([RewardSpec("format", args={"full_match": False})], completions)
    assert raw["format"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_format_custom_pattern():
    _, raw = score([RewardSpec("format", args={"pattern": r"-?\d+"})], ["59", " 59 ", "5 9", "x59"])
    assert raw["format"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_format_invalid_regex():
    with pytest.raises(ValueError, match=r"rewards\[0\] 'format': format: invalid pattern '\(unclosed'"):
        Rewards([RewardSpec("format", args={"pattern": "(unclosed"})])


# -- overlong ----------------------------------------------------------------------


def test_overlong_hand_computed():
    lengths = [0, 6, 7, 8, 9, 10, 12]
    spec = RewardSpec("overlong", args={"max_len": 10, "cache_len": 4})
    _, raw = score([spec], ["x"] * 7, **ctx(lengths, max_new_tokens=100))
    assert raw["overlong"].tolist() == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


def test_overlong_defaults_from_context():
    # max_len = max_new_tokens = 10
    _, raw = score([RewardSpec("overlong", args={"cache_len": 4})], ["x"] * 3, **ctx([6, 8, 10], max_new_tokens=10))
    assert raw["overlong"].tolist() == [0.0, -0.5, -1.0]
    # cache_len defaults to max_len // 5 = 4 of 20: the band starts at 16
    _, raw = score([RewardSpec("overlong")], ["x"] * 4, **ctx([16, 17, 18, 20], max_new_tokens=20))
    assert raw["overlong"].tolist() == [0.0, -0.25, -0.5, -1.0]


def test_overlong_validation():
    for args in ({"max_len": 10, "cache_len": 10}, {"max_len": 10, "cache_len": 0}, {"cache_len": -1}):
        with pytest.raises(ValueError, match=r"rewards\[0\] 'overlong': overlong: cache_len must"):
            Rewards([RewardSpec("overlong", args=args)])
    # known only at call time: the band does not fit the rollout's max_new_tokens
    with pytest.raises(RewardError, match=r"reward 'overlong'.*cache_len must satisfy 1 <= cache_len < max_len=4"):
        score([RewardSpec("overlong", args={"cache_len": 4})], ["x"], **ctx([3], max_new_tokens=4))


# -- combination, import paths, registry ---------------------------------------------


def test_weighted_combination():
    specs = [
        RewardSpec("arith_match", weight=2.0),
        RewardSpec("format", weight=0.5, args={"pattern": r"\d+"}),
        RewardSpec("overlong", weight=1.0, args={"max_len": 10, "cache_len": 4}),
        RewardSpec("tests.rewards.custom:keyword_count", weight=-0.25, args={"word": "9"}),
    ]
    completions = ["59", "59 ok", "95", "99"]
    total, raw = score(specs, completions, [{"answer": "95"}] * 4, **ctx([2, 8, 10, 6], max_new_tokens=10))
    assert list(raw) == ["arith_match", "format", "overlong", "keyword_count"]
    assert raw["arith_match"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert raw["format"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert raw["overlong"].tolist() == [0.0, -0.5, -1.0, 0.0]
    assert raw["keyword_count"].tolist() == [1.0, 1.0, 1.0, 2.0]
    expected = [2 + 0.5 + 0 - 0.25, 2 + 0 - 0.5 - 0.25, 0 + 0.5 - 1 - 0.25, 0 + 0.5 + 0 - 0.5]
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert total.tolist() == pytest.approx(expected, abs=1e-6)
    assert all(v.dtype == torch.float32 and v.shape == (4,) for v in raw.values())


def test_import_path_function_and_class_with_bound_args():
    specs = [
        {"name": "tests.rewards.custom:keyword_count", "args": {"word": "a", "scale": 2.0}},
        RewardSpec("tests.rewards.custom:LengthReward", weight=3.0, args={"per_char": 0.5}),
        RewardSpec("tests.rewards.custom:keyword_count", label="bees", args={"word": "b"}),
    ]
    rewards = Rewards(specs)
    assert rewards.names == ["keyword_count", "LengthReward", "bees"]
    assert rewards.weights == [1.0, 3.0, 1.0]
    total, raw = rewards(["q", "q"], ["aab", "bbbb"], [{}, {}], **ctx([3, 4]))
    assert raw["keyword_count"].tolist() == [4.0, 0.0]
    assert raw["LengthReward"].tolist() == [1.5, 2.0]
    assert raw["bees"].tolist() == [1.0, 4.0]
    assert total.tolist() == [4.0 + 4.5 + 1.0, 0.0 + 6.0 + 4.0]
    rewards.setup("cpu")
    rewards.setup("cpu")
    assert rewards.fns[1].devices == ["cpu", "cpu"]


def test_context_extra_keys_reach_rewards():
    seen = {}

    @register_reward("test_ctx_probe")
    def probe():
        def fn(prompts, completions, meta, **context):
            seen.update(context)
            return [float(len(ids)) for ids in context["completion_ids"]]
        return fn

    try:
        assert REWARDS["test_ctx_probe"] is probe
        _, raw = score([RewardSpec("test_ctx_probe")], ["ab", "c"],
                       **ctx([2, 1], completion_ids=[[5, 6], [7]], future_key="x"))
        assert raw["test_ctx_probe"].tolist() == [2.0, 1.0]
        assert seen["future_key"] == "x" and seen["max_new_tokens"] == 10 and seen["truncated"] == [False, False]
        # a different factory under a taken name would silently change configs
        with pytest.raises(ValueError, match="'format' is already registered"):
            register_reward("format")(lambda: None)
    finally:
        REWARDS.pop("test_ctx_probe", None)


# -- construction errors -------------------------------------------------------------


@pytest.mark.parametrize("specs, pattern", [
    ([RewardSpec("format"), RewardSpec("nope")], r"rewards\[1\] 'nope': unknown reward: not a built-in \(arith_match,"),
    ([RewardSpec("no_such_pkg.mod:fn")], r"rewards\[0\] 'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod'"),
    ([RewardSpec("tests.rewards.custom:missing")], r"rewards\[0\] 'tests.rewards.custom:missing': module "
                                                   r"'tests.rewards.custom' has no attribute 'missing'"),
    ([RewardSpec("tests.rewards.custom:")], r"rewards\[0\] 'tests.rewards.custom:': an import path is"),
    ([RewardSpec("tests.rewards.custom:NOT_CALLABLE")], r"rewards\[0\] .*: int object is not callable"),
    ([RewardSpec("tests.rewards.custom:NotCallable")], r"instance of class NotCallable is not callable"),
    ([RewardSpec("tests.rewards.custom:no_context")], r"rewards\[0\] .*takes no \*\*context"),
    ([RewardSpec("tests.rewards.custom:LengthReward", args={"per_word": 1})], r"rewards\[0\] .*bad args .*per_word"),
    ([RewardSpec("format", args={"patern": "x"})], r"rewards\[0\] 'format': bad args .*patern"),
    ([RewardSpec("arith_match"), RewardSpec("arith_match", weight=0.5)],
     r"rewards\[1\] 'arith_match': label 'arith_match' is already used by rewards\[0\]"),
    ([RewardSpec("format", label="x"), RewardSpec("tests.rewards.custom:keyword_count", label="x")],
     r"rewards\[1\] .*label 'x' is already used"),
    ([RewardSpec("format", weight=math.nan)], r"rewards\[0\] 'format': weight nan is not a finite number"),
    ([RewardSpec("format", weight=math.inf)], r"rewards\[0\] 'format': weight inf is not a finite number"),
    ([RewardSpec("format", weight="1")], r"weight '1' is not a finite number"),
    ([RewardSpec("reward_model", args={"path": "/no/such/rm"})], r"rewards\[0\] 'reward_model': reward_model: "
                                                                  r"path '/no/such/rm' does not exist"),
    ([], r"no reward specs"),
])
def test_construction_errors(specs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Rewards(specs)


def test_unknown_import_chains_cause():
    with pytest.raises(ValueError) as e:
        Rewards([RewardSpec("no_such_pkg.mod:fn")])
    assert isinstance(e.value.__cause__.__cause__, ImportError)


# -- runtime errors ----------------------------------------------------------------


def broken(mode):
    return [RewardSpec("tests.rewards.custom:broken", args={"mode": mode}, label="brk")]


def test_raising_reward_names_label_row_and_completion():
    with pytest.raises(RewardError, match=r"reward 'brk', row 2 \(completion 'a bad one'\): raised KeyError: 'boom'") \
            as e:
        score(broken("raise"), ["fine", "ok", "a bad one", "bad too"])
    assert isinstance(e.value.__cause__, KeyError)
    assert e.value.row == 2 and e.value.label == "brk"


def test_long_completion_is_shortened():
    long = "bad " + "x" * 500
    with pytest.raises(RewardError, match=r"row 0 \(completion 'bad x+\.\.\.'\)") as e:
        score(broken("raise"), [long])
    assert len(str(e.value)) < 200


def test_non_finite_reward_names_first_bad_row():
    with pytest.raises(RewardError, match=r"reward 'brk', row 1 \(completion 'bad'\): returned nan \(not finite\)"):
        score(broken("nan"), ["ok", "bad", "also bad"])


def test_wrong_count_and_types():
    with pytest.raises(RewardError, match=r"reward 'brk': returned 2 values for 3 completions"):
        score(broken("short"), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"reward 'brk', row 1 \(completion 'bad'\): returned the non-numeric "
                                          r"value 'high' \(str\)"):
        score(broken("string"), ["ok", "bad"])
    with pytest.raises(RewardError,
                       match=r"reward 'brk': returned a tensor of shape \[2, 2\]; expected .* shape \[2\]"):
        score(broken("matrix"), ["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'brk': returned NoneType"):
        score(broken("none"), ["a", "b"])


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="got 1 prompts, 2 completions and 2 meta rows"):
        Rewards([RewardSpec("format")])(["q"], ["a", "b"], [{}, {}], **ctx([1, 1]))


# -- reward model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    tokenizer = build_tokenizer("byte")
    model = build_reward_model(CausalLMSpec(config=tiny_config(), seed=3), tokenizer)
    with torch.no_grad():  # a zero-init head would score everything alike
        torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def hand_scores(path, id_lists):
    from lit_align.models import load_reward_model

    model, _ = load_reward_model(path)
    out = []
    with torch.inference_mode():
        for ids in id_lists:
            t = torch.tensor([ids])
            out.append(sequence_scores(model, t, torch.ones_like(t)).item())
    return out


PROMPTS = ["12+34=", "7+8=", "99+1=", "3+3=", "50+50="]
COMPLETIONS = ["64", "51", "001", "6 is the answer, I think", "001"]


def test_reward_model_scores_prompt_completion_eos(rm_dir):
    tokenizer = build_tokenizer("byte")
    eos = tokenizer.eos_token_id
    rewards = Rewards([RewardSpec("reward_model", weight=2.0, args={"path": rm_dir})])
    rewards.setup("cpu")
    rewards.setup("cpu")  # idempotent
    # none truncated: each completion ended with EOS (a truncated one is scored without it)
    total, raw = rewards(PROMPTS, COMPLETIONS, [{}] * 5, **ctx([len(c) for c in COMPLETIONS], max_new_tokens=64))
    ids = [tokenizer(p, add_special_tokens=False).input_ids + tokenizer(c, add_special_tokens=False).input_ids + [eos]
           for p, c in zip(PROMPTS, COMPLETIONS)]
    # the same sequence the preference data trains on: the byte tokenizer appends </s> once
    assert ids == [tokenizer(p + c).input_ids for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = hand_scores(rm_dir, ids)
    assert raw["reward_model"].tolist() == pytest.approx(expected, abs=1e-5)
    assert total.tolist() == pytest.approx([2 * x for x in expected], abs=1e-5)
    # EOS is scored: without it the scores differ
    without_eos = hand_scores(rm_dir, [s[:-1] for s in ids])
    assert all(abs(a - b) > 1e-4 for a, b in zip(expected, without_eos))


def test_reward_model_no_double_eos_and_lazy_load(rm_dir):
    fn = REWARDS["reward_model"](path=rm_dir)
    assert fn.model is None
    plain = fn(["12+34="], ["64"], [{}])  # loads on first call
    assert fn.model is not None
    assert fn.encode("12+34=", "64</s>") == fn.encode("12+34=", "64")
    assert fn(["12+34="], ["64</s>"], [{}]).tolist() == pytest.approx(plain.tolist(), abs=1e-6)


def test_reward_model_batch_size_invariance(rm_dir):
    one = REWARDS["reward_model"](path=rm_dir, batch_size=1)(PROMPTS, COMPLETIONS, [{}] * 5)
    many = REWARDS["reward_model"](path=rm_dir, batch_size=32)(PROMPTS, COMPLETIONS, [{}] * 5)
    two = REWARDS["reward_model"](path=rm_dir, batch_size=2)(PROMPTS, COMPLETIONS, [{}] * 5)
    assert one.dtype == torch.float32 and one.shape == (5,)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    assert one[2].item() != one[0].item()  # the model is not constant


def test_reward_model_max_length_cuts_prompt_from_left(rm_dir):
    tokenizer = build_tokenizer("byte")
    prompt, completion = "1+2+3+4+5+6+7+8+9+10=", "55"
    full = tokenizer(prompt + completion).input_ids
    fn = REWARDS["reward_model"](path=rm_dir, max_length=8)
    assert fn.encode(prompt, completion) == full[-8:]
    assert fn([prompt], [completion], [{}]).tolist() == pytest.approx(hand_scores(rm_dir, [full[-8:]]), abs=1e-5)


def test_reward_model_bad_args(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        REWARDS["reward_model"](path=str(tmp_path), batch_size=0)
    # an existing directory that is not an export: load_reward_model's error, at setup
    fn = REWARDS["reward_model"](path=str(tmp_path))
    with pytest.raises(ValueError, match="without config.json"):
        fn.setup("cpu")


# -- task_check: the data module's own checker ------------------------------------------------
@pytest.mark.parametrize("reverse, verdicts", [(True, [1.0, 0.0, 1.0, 0.0, 0.0]), (False, [0.0, 1.0, 0.0, 1.0, 0.0])])
def test_task_check_returns_the_data_modules_checker_verdicts(reverse, verdicts):
    """37+58 = 95 and 9+8 = 17: with reversed answers "59" and "71" are right, else "95" and "17";
    the reward is the checker's verdict row by row, whatever the task's digit order."""
    from lit_align import ArithTask, PromptDataModule

    dm = PromptDataModule(task=ArithTask(digits=2, reverse_answer=reverse, train_size=8, val_size=4))
    completions = ["59", "95", "71 then more", "17", "no answer"]
    meta = [{"answer": "95"}, {"answer": "95"}, {"answer": "17"}, {"answer": "17"}, {"answer": "17"}]
    prompts = ["37+58=", "37+58=", "9+8=", "9+8=", "9+8="]
    assert [float(dm.checker(c, m, "")) for c, m in zip(completions, meta)] == verdicts
    total, raw = Rewards([RewardSpec("task_check")])(prompts, completions, meta, completion_lengths=[2] * 5,
                                                     truncated=[False] * 5, max_new_tokens=6, checker=dm.checker)
    assert raw["task_check"].tolist() == verdicts and total.tolist() == verdicts


def test_task_check_without_a_checker_names_the_reward():
    with pytest.raises(RewardError, match=r"reward 'task_check': task_check: no checker in the context"):
        Rewards([RewardSpec("task_check")])(["1+1="], ["2"], [{"answer": "2"}], completion_lengths=[1],
                                            truncated=[False], max_new_tokens=4, checker=None)


def test_task_check_on_data_without_a_checker_fails_when_fitting_starts(tmp_path):
    """Data from files has no checker: fit refuses task_check before the first rollout."""
    import json

    import lightning as L

    from lit_align import GRPO, PromptDataModule
    from lit_align.rollout import SamplingParams

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    dm = PromptDataModule(path=str(data), micro_batch_size=2, max_length=16)
    m = GRPO(model=CausalLMSpec(config=tiny_config()), rewards=[RewardSpec("task_check")], num_generations=2,
             sampling=SamplingParams(max_new_tokens=2, temperature=1.0), eval_max_new_tokens=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"GRPO\.rewards\[0\] 'task_check': the data module PromptDataModule has no "
                                         r"checker"):
        trainer.fit(m, datamodule=dm)
