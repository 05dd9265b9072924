"""The PEFT reference, on both trainers: the KL (the logged ``kl/rb``, RLOO's penalty and the loss's analytic term) is
the KL to the reference trl itself scores, head included.

- A fresh adapter (``peft_config=``): the reference is the model with adapters disabled, so under
  ``modules_to_save=["lm_head"]`` its head is the original module and the policy's is the trained copy.
- A pretrained adapter (the model passed in is already a ``PeftModel``): trl 1.16 adds a frozen ``"ref"`` adapter, a
  copy of ``"default"``, and scores the reference with it, so the reference head is ``modules_to_save["ref"]``; with
  LoRA on the backbone by ``target_modules`` or by ``target_parameters``.

The truth is an independent full-logit computation, with the reference run under trl's own ``use_adapter``.
"""

from __future__ import annotations

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from support import build_lm, low_words_reward
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.utils import use_adapter

from trl_rb.kl import token_kl
from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer
from trl_rb.trainers.metrics import masked_sequence_sum
from trl_rb.trainers.rloo import RLOOConfig, RLOOTrainer

BETA = 0.2
BATCH, GROUP = 8, 4


def _lora(setup: str) -> LoraConfig:
    if setup == "target_parameters":
        return LoraConfig(r=4, target_modules=[], target_parameters=["attn.c_attn.weight"], modules_to_save=["lm_head"])
    return LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])


def _perturb(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """What training does to an adapter: every trainable tensor of ``adapter`` (LoRA A and B, the head's copy) moves."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}." in name:
                param.add_(0.5 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _trainer(trainer_name: str, setup: str, tmp_path, estimator: str = "rb"):
    path = build_lm(tmp_path / "lm", seed=0, tied=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, peft_config = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), None
    if setup == "fresh":
        peft_config = _lora(setup)
    else:  # a pretrained adapter: already trained away from the base before trl_rb sees it
        model = get_peft_model(model, _lora(setup))
        _perturb(model, "default", seed=1)
        assert isinstance(model, PeftModel)
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_generations=GROUP,
                  max_completion_length=6, beta=BETA, kl_estimator=estimator, rb_gamma=0.0, report_to=[], use_cpu=True, bf16=False,
                  disable_dropout=True, save_strategy="no")  # fmt: skip
    config_class, trainer_class = (RLOOConfig, RLOOTrainer) if trainer_name == "rloo" else (GRPOConfig, GRPOTrainer)
    trainer = trainer_class(model, low_words_reward, args=config_class(**common), processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"prompt": ["w5 w6"] * 8}), peft_config=peft_config)  # fmt: skip
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    assert ("ref" in peft_model.peft_config) == (setup != "fresh")  # trl's own choice of reference
    _perturb(peft_model, "default", seed=2)  # the policy moves away from its reference, head included
    return trainer, peft_model


def _exact_sequence_kl(trainer, peft_model, inputs) -> torch.Tensor:
    """sum_t KL(p_t || q_t) [B] from full logits; q is run exactly as trl scores its reference."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    c = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        lp = peft_model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -c - 1 : -1]
        with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
            lq = peft_model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -c - 1 : -1]
    return masked_sequence_sum(token_kl(lp, lq, temperature=trainer.temperature), inputs["completion_mask"])


@pytest.mark.parametrize("estimator", ["rb", "k1", "k3"])
@pytest.mark.parametrize("setup", ["fresh", "pretrained", "target_parameters"])
@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_kl_is_to_the_reference_trl_scores(tmp_path, trainer_name, setup, estimator):
    """kl/rb (logged in every mode) against the truth; for rb also the loss's analytic term (RLOO; GRPO's loss uses
    the very K_n it logs)."""
    trainer, peft_model = _trainer(trainer_name, setup, tmp_path, estimator)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": "w5 w6"}] * BATCH)
    loss = trainer._compute_loss(trainer.model, inputs)
    exact = _exact_sequence_kl(trainer, peft_model, inputs)
    assert exact.mean().item() > 0.3  # the perturbed adapter and head moved the policy far from its reference
    assert trainer._metrics["train"]["kl/rb"][-1] == pytest.approx(exact.mean().item(), rel=1e-5)
    if trainer_name == "rloo" and estimator == "rb":
        # The loss's analytic half: trl's own loss on the same batch plus beta * mean_i sum_n K_n (on-policy).
        trl_loss = trl.RLOOTrainer._compute_loss(trainer, trainer.model, inputs)
        assert (loss - trl_loss).item() == pytest.approx(BETA * exact.mean().item(), rel=1e-4)


@pytest.mark.parametrize(
    "head_adapter",
    [dict(target_modules=["c_attn", "lm_head"]), dict(target_modules=["c_attn"], trainable_token_indices={"lm_head": [3, 4]})],
    ids=["lora", "trainable_tokens"],
)
@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_an_adapter_on_the_head_is_refused(tmp_path, trainer_name, head_adapter):
    """The head's logits would not be its weight's: rb refuses (trl itself may refuse LoRA on the head first)."""
    path = build_lm(tmp_path / "lm", seed=0, tied=False)
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, num_generations=GROUP,
                  beta=BETA, kl_estimator="rb", report_to=[], use_cpu=True, bf16=False)  # fmt: skip
    config_class, trainer_class = (RLOOConfig, RLOOTrainer) if trainer_name == "rloo" else (GRPOConfig, GRPOTrainer)
    with pytest.raises(ValueError, match="lm_head|LM head"):
        trainer_class(path, low_words_reward, args=config_class(**common), peft_config=LoraConfig(r=2, **head_adapter),
                      train_dataset=Dataset.from_dict({"prompt": ["w5 w6"] * 8}))  # fmt: skip
