"""Prefix importance weights of the RB terms on batches the current policy did not sample, on both trainers: computed
in log space, truncated at ``rb_prefix_weight_cap`` (default 3.0, trl's own vLLM truncation), so that long, far
off-policy completions give a finite step; uncapped, an overflow is refused with a ValueError naming the setting."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from support import build_lm, low_words_reward
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer
from trl_rb.trainers.rloo import OLD_TOKEN_LOGPS_KEY, RLOOConfig, RLOOTrainer

LENGTH = 512
EOS = 1  # build_lm's tokenizer


def _never_stopping_lm(tmp_path):
    """A GPT-2 whose EOS logit is about -30 everywhere: every completion runs to LENGTH tokens."""
    path = build_lm(tmp_path / "lm", seed=0, tied=False, n_positions=LENGTH + 16, n_layer=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ln_f, head = model.transformer.ln_f, model.lm_head
        direction = torch.zeros(ln_f.bias.shape)
        direction[0] = 1.0
        ln_f.weight.mul_(0.2)
        ln_f.bias.copy_(5.0 * direction)  # every final hidden state has component ~5 along `direction`
        head.weight[:, 0] = 0.0
        head.weight[EOS] = -6.0 * direction
    return model, AutoTokenizer.from_pretrained(path)


def _off_policy_batch(trainer_name: str, tmp_path, cap):
    model, tokenizer = _never_stopping_lm(tmp_path)
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=LENGTH, beta=0.1, kl_estimator="rb", num_iterations=2, report_to=[],
                  use_cpu=True, bf16=False, disable_dropout=True, save_strategy="no", rb_prefix_weight_cap=cap)  # fmt: skip
    config_class, trainer_class = (RLOOConfig, RLOOTrainer) if trainer_name == "rloo" else (GRPOConfig, GRPOTrainer)
    trainer = trainer_class(model, low_words_reward, args=config_class(**common), processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"prompt": ["w5 w6"] * 4}),
                            ref_model=build_lm(tmp_path / "ref", seed=1, n_positions=LENGTH + 16))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": "w5 w6"}] * 4)
    mask = inputs["completion_mask"]
    assert mask.sum(-1).min().item() == LENGTH
    # The sampler made every token e^0.2 times less likely than the current policy does: log W reaches ~102.
    key = OLD_TOKEN_LOGPS_KEY if trainer_name == "rloo" else "old_per_token_logps"
    inputs[key] = inputs[key] - 0.2 * mask
    return trainer, inputs


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_long_off_policy_completions_give_a_finite_step(tmp_path, trainer_name):
    trainer, inputs = _off_policy_batch(trainer_name, tmp_path, cap=3.0)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_uncapped_overflow_is_refused(tmp_path, trainer_name):
    trainer, inputs = _off_policy_batch(trainer_name, tmp_path, cap=None)
    with pytest.raises(ValueError, match="rb_prefix_weight_cap"):
        trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("config_class", [RLOOConfig, GRPOConfig])
@pytest.mark.parametrize("cap", [0.0, -1.0, "3"])
def test_config_refuses_a_bad_cap(tmp_path, config_class, cap):
    with pytest.raises(ValueError, match="rb_prefix_weight_cap"):
        config_class(output_dir=str(tmp_path), rb_prefix_weight_cap=cap, report_to=[])
