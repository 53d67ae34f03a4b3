"""Routing drift of a mixture-of-experts model: expert sets and the share that changed, by hand."""

import pytest
import torch

from lit_align.evaluation.routing import expert_sets, load_weights, routing_change


def test_expert_sets_and_the_share_of_changed_sets():
    # 2 layers x 3 tokens x 4 experts, top-2
    before = (torch.tensor([[4.0, 3, 0, 0], [0, 1, 2, 3], [1, 0, 0, 2]]),
              torch.tensor([[0.0, 0, 1, 2], [5, 0, 4, 0], [0, 9, 8, 0]]))
    sets = expert_sets(before, 2)
    assert sets.shape == (2, 3, 4) and sets.sum(-1).eq(2).all()
    assert sets[0, 0].tolist() == [True, True, False, False] and sets[1, 2].tolist() == [False, True, True, False]
    # layer 0 token 1: {2, 3} -> {2, 3} with another order of preference (not a change);
    # layer 1 token 0: {2, 3} -> {0, 3} (a change); layer 0 token 2: {0, 3} -> {0, 1} (a change)
    after = (torch.tensor([[4.0, 3, 0, 0], [0, 1, 3, 2], [2, 1, 0, 0]]),
             torch.tensor([[2.0, 0, 1, 3], [5, 0, 4, 0], [0, 9, 8, 0]]))
    assert float(routing_change(sets, expert_sets(after, 2))) == pytest.approx(2 / 6)
    # without token 2 (padding): only layer 1 token 0 of 4 pairs
    mask = torch.tensor([True, True, False])
    assert float(routing_change(sets, expert_sets(after, 2), mask)) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="expert sets of shapes"):
        routing_change(sets, sets[:, :2])


def test_load_weights_from_a_lightning_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.config = type("C", (), {"tie_word_embeddings": False})()
    trained = {"model.weight": torch.ones(2, 2), "model.bias": torch.zeros(2),
               "val_exact_match.correct": torch.ones(())}
    torch.save({"state_dict": trained}, tmp_path / "last.ckpt")
    assert torch.equal(load_weights(model, str(tmp_path / "last.ckpt")).weight, torch.ones(2, 2))
    torch.save({"state_dict": {"model.weight": torch.ones(2, 2)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"bad.ckpt: policy weights do not match the model, missing \['bias'\]"):
        load_weights(model, str(tmp_path / "bad.ckpt"))


def test_cli_counts_reroutes_of_a_trained_copy(zoo, tmp_path, repo_root, capsys):
    """The command on the zoo's MoE: its own weights change nothing; a copy whose first router
    prefers other experts (a Lightning checkpoint, as training writes) re-routes exactly the
    (layer, token) pairs whose top-2 set the edit changes, counted here by hand."""
    import os

    from transformers import AutoModelForCausalLM

    from lit_align.evaluation.routing import main, routing_of

    base = AutoModelForCausalLM.from_pretrained(zoo["moe"], dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(zoo["moe"], dtype=torch.float32)
    gate = trained.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight[0] += 3 * gate.weight[3]  # expert 0 gains where expert 3 scores high
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "last.ckpt")
    recipe = os.path.join(repo_root, "configs/sft/chain_base_moe.yaml")
    result = main(["--before", zoo["moe"], "--after", zoo["moe"], "--after", str(tmp_path / "last.ckpt"),
                   "--recipe", recipe, "--rows", "6"])
    assert result[zoo["moe"]] == 0.0
    # by hand: the same rows as the recipe's datamodule encodes them, real tokens only
    from lit_align.evaluation.routing import validation_batch
    from lit_align.models.tokenizer import build_tokenizer

    batch = validation_batch(recipe, build_tokenizer(zoo["moe"]), 6)
    assert batch["input_ids"].shape[0] == 6 and batch["attention_mask"].sum(-1).min() > 0
    k = base.config.num_experts_per_tok
    before = routing_of(base, batch["input_ids"], batch["attention_mask"], k)
    after = routing_of(trained, batch["input_ids"], batch["attention_mask"], k)
    real = batch["attention_mask"].reshape(-1).bool()
    changed = (before != after).any(-1)[:, real]  # [layers, real tokens]
    assert changed[0].any() and changed.float().mean().item() == pytest.approx(result[str(tmp_path / "last.ckpt")])
    for argv, message in ((["--before", zoo["qwen2_base"]], "qwen2 is not a mixture-of-experts model"),
                          (["--before", zoo["moe"], "--rows", "0"], "--rows must be >= 1, got 0"),
                          (["--before", str(tmp_path / "nowhere")], "nowhere does not exist")):
        with pytest.raises(SystemExit):
            main([*argv, "--after", zoo["moe"], "--recipe", recipe])
        assert message in capsys.readouterr().err
