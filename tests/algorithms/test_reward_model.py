"""RewardModel: last-token scoring, the Bradley-Terry step mean (accumulation invariance),
HF export and checkpoint round trips, and learning."""

import json
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForSequenceClassification

from lit_align import ArithTask, CausalLMSpec, OptimSpec, PreferenceDataModule, RewardModel
from lit_align.losses import bradley_terry_loss
from lit_align.models import build_causal_lm, build_reward_model, build_tokenizer, load_reward_model, sequence_scores
from tests.algorithms.test_sft import GradCapture
from tests.conftest import tiny_config


def _module(**kw):
    kw.setdefault("optim", OptimSpec(lr=1e-3, warmup_steps=0))
    return RewardModel(model=CausalLMSpec(config=tiny_config(), seed=1), **kw)


def _data(micro: int, rows: int = 8, **kw):
    # 2-digit sums: answers of 2 or 3 digits, wrong answers off by up to 100, so pairs and
    # batches mix sequence lengths and padding.
    kw.setdefault("task", ArithTask(digits=2, train_size=rows, val_size=4))
    return PreferenceDataModule(max_length=16, micro_batch_size=micro, group_by_length=False, eval_batch_size=4, **kw)


def _trainer(tmp_path, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), **kw)


def _right_padded(seqs, pad_id):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _manual_score(model, seq):
    """Backbone on the unpadded sequence alone, head on its last hidden state."""
    hidden = model.base_model(input_ids=torch.tensor([seq])).last_hidden_state
    return model.score(hidden[0, -1]).squeeze(-1)


# -- scoring ---------------------------------------------------------------------------
SEQS = [[54, 58, 46, 56, 59, 64, 1], [52, 46, 53, 64, 56, 1], [55, 55, 46, 55, 55, 64, 51, 53, 52, 1]]


def test_score_is_taken_at_the_last_non_pad_token():
    tok = build_tokenizer("byte")
    model = build_reward_model(CausalLMSpec(config=tiny_config(), seed=2), tok).eval()
    ids, mask = _right_padded(SEQS, tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        assert scores.shape == (3,)
        for i, seq in enumerate(SEQS):
            torch.testing.assert_close(scores[i], _manual_score(model, seq), rtol=1e-5, atol=1e-6)
        # whatever sits in the padded positions after the last real token does not matter
        noisy = torch.where(mask.bool(), ids, torch.randint(3, 300, ids.shape))
        torch.testing.assert_close(sequence_scores(model, noisy, mask), scores)
        # HF's pooling, with pad != EOS here, agrees: plain transformers users get the same score
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1), scores)
        # left padding (rollouts' prompts) gives the same scores: positions come from the mask
        left = torch.stack([row.roll(int((1 - m).sum())) for row, m in zip(ids, mask)])
        left_mask = torch.stack([m.roll(int((1 - m).sum())) for m in mask])
        assert left_mask[:, -1].all() and not left_mask[:, 0].all()
        torch.testing.assert_close(sequence_scores(model, left, left_mask), scores, rtol=1e-4, atol=1e-5)


def test_score_uses_the_mask_when_pad_equals_eos():
    """HF's pooling skips trailing tokens equal to pad; with pad = EOS that drops the final EOS."""
    tok = build_tokenizer("byte")
    model = build_reward_model(CausalLMSpec(config=tiny_config(), seed=2), tok).eval()
    model.config.pad_token_id = tok.eos_token_id
    ids, mask = _right_padded(SEQS, tok.eos_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        for i, seq in enumerate(SEQS):
            torch.testing.assert_close(scores[i], _manual_score(model, seq), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits.squeeze(-1), scores)


def test_empty_row_is_an_error():
    tok = build_tokenizer("byte")
    model = build_reward_model(CausalLMSpec(config=tiny_config()), tok)
    with pytest.raises(ValueError, match="all zeros"):
        sequence_scores(model, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))


# -- loss ------------------------------------------------------------------------------
CHOSEN = torch.tensor([2.0, -1.0, 0.5])
REJECTED = torch.tensor([1.0, 0.0, 0.5])
MARGIN = torch.tensor([0.5, 0.0, 1.0])


def _hand_loss(margin=None, center=0.0):
    diff = (CHOSEN - REJECTED - (margin if margin is not None else 0)).tolist()
    nll = sum(-torch.log(torch.sigmoid(torch.tensor(d))).item() for d in diff) / 3
    return nll + center * sum(((c + r) ** 2) for c, r in zip(CHOSEN.tolist(), REJECTED.tolist())) / 3


def _step_loss(module, batch, accumulate, world):
    """training_step with hand-made scores under a stand-in trainer."""
    module.pair_scores = lambda b: (CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_())
    module._trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world)
    module.log = lambda *a, **k: None
    return module.training_step(batch, 0)


@pytest.mark.parametrize("use_margin, center", [(True, 0.0), (True, 0.01), (False, 0.0), (False, 0.05)])
def test_loss_is_bradley_terry_on_hand_made_scores(use_margin, center):
    module = _module(use_margin=use_margin, center_coef=center)
    batch = {"input_ids": torch.zeros(6, 4, dtype=torch.long), "margin": MARGIN, "num_seqs_step": torch.tensor(3.0)}
    want = _hand_loss(MARGIN if use_margin else None, center)
    torch.testing.assert_close(module.pair_loss(CHOSEN, REJECTED, batch).item(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.pair_loss(CHOSEN, REJECTED, batch),
                               bradley_terry_loss(CHOSEN, REJECTED, MARGIN if use_margin else None, center))
    # one micro-batch that is the whole step: the plain mean
    torch.testing.assert_close(_step_loss(module, batch, 1, 1).item(), want, rtol=1e-5, atol=1e-6)
    # 3 of the step's 12 pairs, with Lightning's 1/accumulate and the ranks' average undone
    batch["num_seqs_step"] = torch.tensor(12.0)
    torch.testing.assert_close(_step_loss(module, batch, 2, 2).item(), want * 3 / 12 * 4, rtol=1e-5, atol=1e-6)


# -- accumulation invariance -------------------------------------------------------------
def _step_grads(tmp_path, micro, accumulate, **data_kw):
    capture = GradCapture()
    trainer = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[capture])
    trainer.fit(_module(center_coef=0.1), datamodule=_data(micro, **data_kw))
    return capture.grads[0]


def _margin_files(tmp_path):
    rng = random.Random(0)
    rows = [dict(r, margin=rng.choice([0.0, 0.5, 2.0]))
            for r in ArithTask(digits=2, val_size=4).rows("preference")["train"][:8]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data_files": {"train": str(path)}, "val_split": None, "test_split": None, "task": None}


@pytest.mark.parametrize("margins", [False, True], ids=["task", "margins"])
def test_one_micro_batch_equals_accumulated_micro_batches(tmp_path, margins):
    """A step of 8 pairs: one micro-batch of 8, 8 accumulated micro-batches of 1, and an
    uneven 3 + 3 + 2 split (where a mean of micro-batch means would be wrong) give one gradient."""
    data_kw = _margin_files(tmp_path) if margins else {}
    full = _step_grads(tmp_path, 8, 1, **data_kw)
    split = _step_grads(tmp_path, 1, 8, **data_kw)
    uneven = _step_grads(tmp_path, 3, 3, **data_kw)
    assert full.keys() == split.keys() == uneven.keys() and "model.score.weight" in full
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(uneven[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pairs_have_unequal_lengths():
    # Guards the invariance test: pairs of one length would not exercise the padding.
    dm = _data(8)
    dm.tokenizer = _module().tokenizer
    dm.setup("fit")
    lengths = {len(r[s]["input_ids"]) for r in dm.encoded["train"] for s in ("chosen", "rejected")}
    assert len(lengths) > 1


# -- export and checkpoints --------------------------------------------------------------
def _scores(model, tokenizer):
    ids, mask = _right_padded(SEQS, tokenizer.pad_token_id)
    with torch.no_grad():
        return sequence_scores(model.eval(), ids, mask)


def test_hf_export_and_checkpoint_load_give_the_same_scores(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=_data(4))
    ckpt = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(ckpt)
    module.export_hf(str(tmp_path / "hf"))
    want = _scores(module.model, module.tokenizer)

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1 and type(hf) is type(module.model)
    torch.testing.assert_close(_scores(hf, module.tokenizer), want)
    for path in (tmp_path / "hf", ckpt):
        model, tokenizer = load_reward_model(str(path))
        assert not model.training
        assert tokenizer.pad_token_id == module.tokenizer.pad_token_id
        torch.testing.assert_close(_scores(model, tokenizer), want)


def test_initialised_from_a_causal_lm_export(tmp_path):
    """An SFT export holds a causal LM: the backbone is loaded, the head seeded, and a
    checkpoint trained from it loads back."""
    tok = build_tokenizer("byte")
    lm = build_causal_lm(CausalLMSpec(config=tiny_config(), seed=5), tok)
    lm.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    spec = CausalLMSpec(pretrained=str(tmp_path / "sft"), seed=3)
    a, b = RewardModel(model=spec), RewardModel(model=spec)
    a.configure_model()
    b.configure_model()
    assert a.model.training
    lm_state = lm.state_dict()
    for name, value in a.model.base_model.state_dict().items():
        torch.testing.assert_close(value, lm_state[f"model.{name}"], msg=name)
    torch.testing.assert_close(a.model.score.weight, b.model.score.weight)  # the new head is seeded

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(a, datamodule=_data(4))
    trainer.save_checkpoint(tmp_path / "rm.ckpt")
    model, tokenizer = load_reward_model(str(tmp_path / "rm.ckpt"))
    torch.testing.assert_close(_scores(model, tokenizer), _scores(a.model, a.tokenizer))
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(str(tmp_path / "sft"))


def test_validation_logs_pair_metrics_without_generation(tmp_path):
    module = _module(num_logged_samples=2)
    module.generate_greedy = None  # a reward model never generates
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path)),
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    metrics = trainer.validate(module, datamodule=_data(4), verbose=False)[0]
    assert set(metrics) == {f"val/{m}" for m in ("loss", "accuracy", "margin", "chosen_score", "rejected_score")}
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    torch.testing.assert_close(metrics["val/margin"], metrics["val/chosen_score"] - metrics["val/rejected_score"],
                               rtol=1e-4, atol=1e-5)
    assert RewardModel.monitor == ("val/accuracy", "max")


@pytest.mark.parametrize("kwargs, match", [
    (dict(center_coef=-0.1), "center_coef"),
    (dict(num_logged_samples=-1), "num_logged_samples"),
])
def test_invalid_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_multi_label_config_is_rejected():
    with pytest.raises(ValueError, match="num_labels"):
        build_reward_model(CausalLMSpec(config=tiny_config(num_labels=2)), build_tokenizer("byte"))


def test_load_reward_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_reward_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        load_reward_model(str(tmp_path))


def test_validate_before_fit(tmp_path):
    """trainer.validate() (inference mode) then fit() with validation (no_grad) on one trainer:
    the metric states the first left behind must not break the second."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=2, val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    module, data = _module(), _data(4)
    trainer.validate(module, datamodule=data, verbose=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and "val/accuracy" in trainer.callback_metrics


# -- learning --------------------------------------------------------------------------------
def _random_wrong_pairs(tmp_path, task: ArithTask) -> dict:
    """Arith pairs whose rejected answer is any other number in the sums' range (not a near
    miss): telling them apart needs only part of the sum, e.g. its last digit."""
    rng = random.Random(0)
    files = {}
    for split, rows in task.rows("preference").items():
        out = []
        for row in rows:
            wrong = int(row["answer"])
            while wrong == int(row["answer"]):
                wrong = rng.randint(10, 198)
            out.append(dict(row, rejected=task.format_answer(wrong)))
        files[split] = str(tmp_path / f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)
    return files


@pytest.mark.slow
def test_reward_model_learns_to_rank_correct_sums(tmp_path):
    """A 2x64 Llama from scratch on 2-digit sums, correct answer vs a random wrong one:
    held-out pairwise accuracy goes from chance (~0.5) to >= 0.85 in 500 steps (0.90-0.95 measured
    over model seeds 0-2, about 15 s on 2 CPU cores)."""
    config = dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    module = RewardModel(model=CausalLMSpec(config=config),
                         optim=OptimSpec(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=30))
    files = _random_wrong_pairs(tmp_path, ArithTask(digits=2, val_size=300))
    data = PreferenceDataModule(data_files=files, max_length=32, micro_batch_size=64, group_by_length=False,
                                eval_batch_size=300)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=500,
                        val_check_interval=500, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics["val/accuracy"].item()
    print(f"held-out pairwise accuracy {before:.3f} -> {after:.3f}")
    assert 0.35 <= before <= 0.65, before
    assert after >= 0.85, after


def test_recipe_runs_from_the_cli_and_its_checkpoint_loads(tmp_path):
    """configs/rm/arith.yaml end to end on a tiny causal LM export (LightningCLI stores the
    init arguments as dicts in the checkpoint), and a non-reward checkpoint is refused."""
    from lit_align.train import main
    from tests.conftest import REPO, write_tiny_export

    cli = main(["fit", "--config", f"{REPO}/configs/rm/arith.yaml", "--model.init_args.model.pretrained",
                write_tiny_export(tmp_path / "sft"), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                "--data.init_args.task.val_size", "8", "--data.init_args.eval_batch_size", "8",
                "--data.init_args.micro_batch_size", "4", "--logs_dir", str(tmp_path / "logs"),
                "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "rm"])
    assert cli.trainer.global_step == 3 and "val/accuracy" in cli.trainer.callback_metrics
    assert (tmp_path / "ckpt" / "rm" / "best-step3.ckpt").exists()  # kept by val/accuracy
    want = _scores(cli.model.model, cli.model.tokenizer)
    for path in (tmp_path / "ckpt" / "rm" / "last.ckpt", tmp_path / "ckpt" / "rm" / "hf"):
        model, tokenizer = load_reward_model(str(path))
        torch.testing.assert_close(_scores(model, tokenizer), want)

    sft = main(["fit", "--config", f"{REPO}/configs/sft/arith.yaml", "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "0", "--data.init_args.micro_batch_size", "4",
                "--logs_dir", str(tmp_path / "logs"), "--checkpoints_dir", str(tmp_path / "ckpt"), "--name", "sft",
                "--export_hf", "false"])
    assert sft.trainer.global_step == 1
    with pytest.raises(ValueError, match="not a checkpoint of lit_align.RewardModel"):
        load_reward_model(str(tmp_path / "ckpt" / "sft" / "last.ckpt"))
