"""The mixture-of-experts router load-balancing loss: SFT and DPO add it (hand-computed Switch
loss), generation runs without router logits, the export keeps the setting, and every other
module refuses a config that asks for it."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_align import DPO, GRPO, SFT, ArithTask, CausalLMSpec, InstructionDataModule, OptimSpec, RewardModel
from tests.conftest import tiny_config

COEF = 0.25  # large, so a dropped or mis-scaled term shows in the gradient
MOE = tiny_config("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                  output_router_logits=True, router_aux_loss_coef=COEF)


def switch_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, experts: int, k: int) -> torch.Tensor:
    """Fedus et al. 2021, eq. 4, over every layer's unpadded tokens: ``E * sum_(slot, i) f_(slot,i) *
    P_i``, with ``f`` the share of tokens whose ``slot``-th choice is expert ``i`` and ``P_i`` the mean
    router probability of expert ``i``."""
    logits = torch.cat(router_logits)  # [layers * tokens, E]
    keep = mask.reshape(-1).repeat(len(router_logits)).float()
    probs = logits.float().softmax(-1)
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, experts).float()  # [N, k, E]
    f = (chosen * keep[:, None, None]).sum(0) / keep.sum()
    p = (probs * keep[:, None]).sum(0) / keep.sum()
    return experts * (f * p[None]).sum()


class Capture(L.Callback):
    def __init__(self):
        self.batches, self.grads = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_sft_step_adds_the_switch_loss_mean_over_micro_batches(tmp_path):
    """One optimizer step of 2 accumulated micro-batches: the gradient is that of the step's token
    mean cross-entropy plus ``coef`` times the mean of the micro-batches' Switch losses,
    computed here by hand from the router logits."""
    module = SFT(model=CausalLMSpec(config=MOE, seed=3), optim=OptimSpec(lr=1e-3, warmup_steps=0, grad_clip=None),
                 eval_max_new_tokens=0)
    data = InstructionDataModule(task=ArithTask(digits=2, train_size=8, val_size=4), max_length=16,
                                 micro_batch_size=4, group_by_length=False, eval_batch_size=4)
    capture = Capture()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        default_root_dir=str(tmp_path), max_steps=1, accumulate_grad_batches=2, callbacks=[capture])
    trainer.fit(module, datamodule=data)

    fresh = SFT(model=CausalLMSpec(config=MOE, seed=3))
    fresh.configure_model()
    model = fresh.model.train()
    assert model.config.output_router_logits is False  # generation and scoring run without them
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in capture.batches)
    loss, auxes = 0.0, []
    for b in capture.batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
        labels = b["labels"][:, 1:]
        loss = loss + F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                      reduction="sum") / tokens
        auxes.append(switch_loss(out.router_logits, b["attention_mask"], 4, 2))
    assert len(auxes) == 2  # a perfectly balanced router scores k = 2
    (loss + COEF * torch.stack(auxes).mean()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(capture.grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    router = [n for n in capture.grads if n.endswith("mlp.gate.weight")]
    assert router and all(capture.grads[n].abs().sum() > 0 for n in router)

    # without the term the router gradient differs: the test above sees the aux loss
    model.zero_grad()
    loss2 = sum(F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                                .flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
                for b in capture.batches) / tokens
    loss2.backward()
    assert not torch.allclose(capture.grads[router[0]], model.get_parameter(router[0]).grad, rtol=1e-3, atol=1e-7)


def test_generation_runs_and_the_export_keeps_output_router_logits(tmp_path):
    from transformers import AutoConfig

    m = SFT(model=CausalLMSpec(config=MOE, seed=0))
    m.configure_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = m.model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  do_sample=False)
    assert out.shape == (1, 8)
    m.export_hf(str(tmp_path / "hf"))
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.output_router_logits is True and config.router_aux_loss_coef == COEF
    # the export trains on: a DPO policy loads it with the term on, RL refuses it until told
    assert DPO(model=CausalLMSpec(pretrained=str(tmp_path / "hf"))).router_aux_loss_coef == COEF
    with pytest.raises(ValueError, match="GRPO: model config sets output_router_logits: true"):
        GRPO(model=CausalLMSpec(pretrained=str(tmp_path / "hf")), rewards=[{"name": "task_check"}])
    off = CausalLMSpec(pretrained=str(tmp_path / "hf"), extra={"output_router_logits": False})
    assert GRPO(model=off, rewards=[{"name": "task_check"}]).router_aux_loss_coef is None


def test_modules_without_the_term_refuse_the_setting():
    with pytest.raises(ValueError, match="RewardModel: model config sets output_router_logits: true.*"
                                         "model.extra.output_router_logits: false"):
        RewardModel(model=CausalLMSpec(config=MOE))
    dense = tiny_config()
    assert RewardModel(model=CausalLMSpec(config=dense)).router_aux_loss_coef is None
    assert SFT(model=CausalLMSpec(config={**MOE, "output_router_logits": False})).router_aux_loss_coef is None
