"""trl_rb.RLOOTrainer on tiny GPT-2 models built here (CPU): exact gradients on a fixed batch, short training runs,
PEFT, multiple iterations, checkpoint resume, a user-chosen reference, and two processes."""

from __future__ import annotations

import math
import os

import peft
import pytest
import torch
import trl
from support import (
    generation_batch,
    grads,
    low_words_reward,
    make_config,
    prompts_dataset,
    scoring_trainer,
    target_reward,
)
from transformers import AutoTokenizer, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from trl_rb.kl import kl_estimate, sequence_kl_terms
from trl_rb.trainers.capture import REF_HIDDEN_KEY
from trl_rb.trainers.rloo import RLOOTrainer

hf_logging.set_verbosity_error()


def materialized(trainer, model, batch):
    """Policy-side quantities from full logits (the test's independent path): completion logits of both models."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    c = batch["completion_ids"].shape[1]
    logits_p = model(input_ids=ids, attention_mask=attn).logits[:, -c - 1 : -1]
    with torch.no_grad():
        logits_q = trainer.ref_model(input_ids=ids, attention_mask=attn).logits[:, -c - 1 : -1]
    return logits_p, logits_q


def loo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).view(-1)


def completion_rewards(batch) -> torch.Tensor:
    ids = [row[m.bool()].tolist() for row, m in zip(batch["completion_ids"], batch["completion_mask"], strict=True)]
    return torch.tensor(target_reward(ids), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# One fixed batch: advantages and gradients against independent computations from materialized logits.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3", "rb"])
def test_advantages_match_estimate_from_logits(lm_paths, tmp_path, estimator):
    beta, g = 0.5, 4
    args = make_config(tmp_path, estimator, beta=beta, temperature=0.7)
    trainer = scoring_trainer(lm_paths, args, ref_model=lm_paths["other"])
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(generation_batch(4, g))
    with torch.no_grad():
        logits_p, logits_q = materialized(trainer, trainer.model, batch)
    kl = kl_estimate(logits_p, logits_q, batch["completion_ids"], batch["completion_mask"], estimator,
                     temperature=0.7)
    expected = loo_advantages(completion_rewards(batch) - beta * kl, g)
    torch.testing.assert_close(batch["advantages"], expected, atol=2e-5, rtol=1e-4)
    assert (REF_HIDDEN_KEY in batch) == (estimator == "rb")
    # both KL metrics are logged whatever the estimator, from the same samples
    rb = kl_estimate(logits_p, logits_q, batch["completion_ids"], batch["completion_mask"], "rb", temperature=0.7)
    k1 = kl_estimate(logits_p, logits_q, batch["completion_ids"], batch["completion_mask"], "k1", temperature=0.7)
    assert trainer._metrics["train"]["kl/rb"][-1] == pytest.approx(rb.mean().item(), rel=1e-4, abs=1e-6)
    assert trainer._metrics["train"]["kl/k1"][-1] == pytest.approx(k1.mean().item(), rel=1e-4, abs=1e-5)
    assert rb.mean().item() > 0.05  # the two models differ: the checks above are not 0 == 0


def test_rb_loss_gradient_is_pg_plus_analytic_rb_term(lm_paths, tmp_path):
    """grad(trainer loss) = grad[-mean_i A_i * ratio_i + beta * mean_i sum_n K_n], with K_n from full logits."""
    beta, g = 0.5, 4
    args = make_config(tmp_path, "rb", beta=beta)
    trainer = scoring_trainer(lm_paths, args, ref_model=lm_paths["other"])
    model = trainer.model
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions(generation_batch(4, g))

    trainer.compute_loss(model, batch).backward()
    got = grads(model)

    ids, mask = batch["completion_ids"], batch["completion_mask"]
    logits_p, logits_q = materialized(trainer, model, batch)
    terms = sequence_kl_terms(logits_p, logits_q, ids, mask)
    logp = terms["logp"].sum(-1)
    rb = terms["K"].sum(-1)
    advantages = loo_advantages(completion_rewards(batch) - beta * rb.detach(), g)
    surrogate = -(advantages * torch.exp(logp - logp.detach())).mean() + beta * rb.mean()
    surrogate.backward()
    want = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)

    # Without the analytic term (trl's loss on the same batch) the gradient differs: the test can fail.
    trl.RLOOTrainer._compute_loss(trainer, model, batch).backward()
    trl_grads = grads(model)
    diff = max((trl_grads[n] - want[n]).abs().max().item() for n in want)
    assert diff > 1e-3


def test_k1_is_trl(lm_paths, tmp_path):
    """k1 mode scores and differentiates exactly like trl's RLOOTrainer on the same samples."""
    args = make_config(tmp_path, "k1", beta=0.5)
    trainer = scoring_trainer(lm_paths, args, ref_model=lm_paths["other"])
    prompts = generation_batch(4, 4)
    torch.manual_seed(2)
    ours = trainer._generate_and_score_completions(prompts)
    torch.manual_seed(2)
    theirs = trl.RLOOTrainer._generate_and_score_completions(trainer, prompts)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    trainer.compute_loss(trainer.model, ours).backward()
    got = grads(trainer.model)
    trl.RLOOTrainer._compute_loss(trainer, trainer.model, theirs).backward()
    want = grads(trainer.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Training runs.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3", "rb"])
def test_training_increases_reward(lm_paths, tmp_path, estimator):
    torch.manual_seed(0)
    args = make_config(tmp_path, estimator, max_steps=30)
    trainer = RLOOTrainer(lm_paths["policy"], target_reward, args=args, train_dataset=prompts_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 30
    for h in logs:
        assert math.isfinite(h["loss"])
        assert math.isfinite(h["kl/k1"])
        assert h["kl/rb"] >= 0.0
    # step 1: policy == reference (trl's copy of the starting model), so both estimates are 0
    assert logs[0]["kl/rb"] == pytest.approx(0.0, abs=1e-6) and logs[0]["kl/k1"] == pytest.approx(0.0, abs=1e-6)
    first = sum(h["reward"] for h in logs[:8]) / 8
    last = sum(h["reward"] for h in logs[-8:]) / 8
    # the target token starts at ~1/63; 30 steps bring its frequency well above
    assert last > first + 0.05, (first, last)
    assert logs[-1]["kl/rb"] > 0.1


def test_peft_two_iterations_and_resume(lm_paths, tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    args = make_config(tmp_path, "rb", max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2,
                       per_device_train_batch_size=8, learning_rate=3e-2)
    trainer = RLOOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset(),
                          peft_config=lora)
    assert trainer.ref_model is None  # the reference is the base model with adapters disabled
    trainer.train()
    # with num_iterations=2 a generation batch is scored (and KL metrics logged, like trl's reward) every 2 steps
    logs = [h for h in trainer.state.log_history if "kl/rb" in h]
    assert [h["step"] for h in logs] == [1, 3]
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # LoRA starts as the identity, so the first KL to the adapter-free base is 0; then it grows
    assert logs[0]["kl/rb"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["kl/rb"] > 1e-4

    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    assert os.path.isdir(checkpoint)
    resumed_args = make_config(tmp_path, "rb", max_steps=4, num_iterations=2, save_strategy="no",
                               per_device_train_batch_size=8, learning_rate=3e-2)
    resumed = RLOOTrainer(lm_paths["policy"], low_words_reward, args=resumed_args, train_dataset=prompts_dataset(),
                          peft_config=lora)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 4
    new_logs = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]  # history 1-2 is restored
    assert [h["step"] for h in new_logs] == [3, 4]
    assert all(math.isfinite(h["loss"]) for h in new_logs)
    assert new_logs[0]["kl/rb"] > 1e-4  # the resumed adapter, not a fresh one, is compared with the base


# ---------------------------------------------------------------------------------------------------------------------
# The reference model and misuse.
# ---------------------------------------------------------------------------------------------------------------------


def test_ref_model_as_instance_and_errors(lm_paths, tmp_path):
    other = GPT2LMHeadModel.from_pretrained(lm_paths["other"])
    trainer = RLOOTrainer(lm_paths["policy"], target_reward, args=make_config(tmp_path, "rb"),
                          train_dataset=prompts_dataset(), ref_model=other)
    assert trainer.ref_model is other and not any(p.requires_grad for p in other.parameters())
    assert trainer.beta == 0.05 and trainer.args.beta == 0.05

    # An in-memory policy has no path trl could rebuild its own reference from: with ref_model= it needs none.
    policy = GPT2LMHeadModel.from_pretrained(lm_paths["policy"])
    tokenizer = AutoTokenizer.from_pretrained(lm_paths["policy"])
    trainer = RLOOTrainer(policy, target_reward, args=make_config(tmp_path, "rb"), processing_class=tokenizer,
                          train_dataset=prompts_dataset(), ref_model=lm_paths["other"])
    assert trainer.beta == 0.05 and trainer.ref_model is not None
    batch = trainer._generate_and_score_completions(generation_batch(2, 4))
    assert torch.isfinite(batch["advantages"]).all()

    with pytest.raises(ValueError, match="vocabular"):
        RLOOTrainer(lm_paths["policy"], target_reward, args=make_config(tmp_path, "rb"),
                    train_dataset=prompts_dataset(), ref_model=lm_paths["small_vocab"])
    with pytest.raises(ValueError, match="beta=0.0"):
        RLOOTrainer(lm_paths["policy"], target_reward, args=make_config(tmp_path, "rb", beta=0.0),
                    train_dataset=prompts_dataset(), ref_model=lm_paths["other"])
    with pytest.raises(ValueError, match="top_k"):
        RLOOTrainer(lm_paths["policy"], target_reward, args=make_config(tmp_path, "rb", top_k=5),
                    train_dataset=prompts_dataset())


def test_beta_zero_is_trl(lm_paths, tmp_path):
    """No reference, no KL: the rb trainer trains like trl and logs no KL metric."""
    trainer = scoring_trainer(lm_paths, make_config(tmp_path, "rb", beta=0.0))
    assert trainer.ref_model is None
    torch.manual_seed(3)
    batch = trainer._generate_and_score_completions(generation_batch(4, 4))
    assert REF_HIDDEN_KEY not in batch and "kl/rb" not in trainer._metrics["train"]
