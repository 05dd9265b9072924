"""Configurations of trl's trainers beyond the basic ones: each gives the true numbers or is refused.

PEFT ``modules_to_save`` (the reference is the model with adapters disabled, head included), evaluation before any
training, RLOO's ``normalize_advantages``, unscorable completions, GRPO ``k1`` with tool masks, the ``kl/rb`` metric
switch and its graceful skip, and bf16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from enumerable import tiny_gpt2
from peft import LoraConfig
from support import (
    MODEL_KW,
    PROMPT,
    VOCAB,
    build_lm,
    length_reward,
    low_words_reward,
    make_config,
    make_trainer,
    prompts_dataset,
    score_batch,
)

from trl_rb.kl import token_kl
from trl_rb.trainers.capture import ScoredCall
from trl_rb.trainers.metrics import masked_sequence_sum
from trl_rb.trainers.rloo import SCORABLE_KEY, RLOOTrainer


def exact_sequence_kl(trainer, inputs, reference) -> torch.Tensor:
    """sum_t KL(p_t || q_t) [B] from full logits at generation's position ids (the tests' independent path)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    c = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        lp, lq = (m(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -c - 1 : -1]
                  for m in (trainer.model, reference))  # fmt: skip
    k = token_kl(lp, lq, temperature=trainer.temperature)
    return masked_sequence_sum(k, inputs["completion_mask"])


# ----------------------------------------------------------------------------------------------------------------
# PEFT modules_to_save: the reference head is the original, not the trained copy
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["rb", "k1"])
def test_peft_modules_to_save_reference_is_adapters_disabled(tmp_path, estimator):
    lora = LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head", "ln_f"])  # the head and a module
    trainer, _, _ = make_trainer(
        estimator, tmp_path, batch=16, group=4, use_ref_model=False, model=tiny_gpt2(VOCAB, 0, **MODEL_KW),
        peft_config=lora, temperature=0.8,
    )  # fmt: skip
    peft_model = trainer.model
    lm = peft_model.base_model.model
    trained = [lm.lm_head.modules_to_save["default"], lm.transformer.ln_f.modules_to_save["default"]]
    with torch.no_grad():  # what training would do to the copies: the policy now differs from the reference
        for module in trained:
            module.weight.add_(torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(0)))
    inputs = score_batch(trainer, 16, seed=1)
    trainer.compute_loss(peft_model, inputs)
    logged = trainer._metrics["train"]["kl/rb"][-1]

    class AdaptersDisabled(torch.nn.Module):
        def forward(self, **kw):
            with peft_model.disable_adapter():
                return peft_model(**kw)

    exact = exact_sequence_kl(trainer, inputs, AdaptersDisabled()).mean().item()
    assert exact > 0.5  # the perturbed head moved the policy far from the reference
    assert logged == pytest.approx(exact, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation before training, every mode of both trainers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3", "rb"])
def test_grpo_evaluate_before_train(tmp_path, estimator):
    trainer, _, _ = make_trainer(
        estimator, tmp_path, batch=8, group=4, eval_strategy="no", per_device_eval_batch_size=8,
    )  # fmt: skip
    trainer.eval_dataset = Dataset.from_dict({"prompt": [PROMPT] * 8})
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_kl/rb"] > 0.0 and math.isfinite(metrics["eval_kl/k1"])


@pytest.mark.parametrize("estimator", ["k1", "k3", "rb"])
def test_rloo_evaluate_before_train(lm_paths, tmp_path, estimator):
    args = make_config(tmp_path, estimator, per_device_eval_batch_size=8)
    trainer = RLOOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset(),
                          eval_dataset=prompts_dataset(4), ref_model=lm_paths["other"])  # fmt: skip
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_kl/rb"] > 0.0 and math.isfinite(metrics["eval_kl/k1"])


# ----------------------------------------------------------------------------------------------------------------
# RLOO: normalize_advantages, unscorable completions
# ----------------------------------------------------------------------------------------------------------------


def test_rloo_rb_refuses_normalized_advantages(lm_paths, tmp_path):
    with pytest.raises(ValueError, match="normalize_advantages=True"):
        RLOOTrainer(lm_paths["policy"], low_words_reward, args=make_config(tmp_path, "rb", normalize_advantages=True),
                    train_dataset=prompts_dataset())  # fmt: skip
    RLOOTrainer(lm_paths["policy"], low_words_reward, args=make_config(tmp_path, "k1", normalize_advantages=True),
                train_dataset=prompts_dataset())  # fmt: skip


def test_rloo_rb_skips_unscorable_completions_like_trl(lm_paths, tmp_path):
    """trl zeroes the advantage of a completion no reward function scored, so its KL penalty never acts; the analytic
    half of the RB gradient must skip it too: its weight is 0, and its hidden states get no gradient."""

    def every_other(completion_ids, **_):
        return [None if i % 2 else 0.5 for i in range(len(completion_ids))]

    args = make_config(tmp_path, "rb", per_device_train_batch_size=8, num_generations=4)
    trainer = RLOOTrainer(lm_paths["policy"], every_other, args=args, train_dataset=prompts_dataset(),
                          ref_model=lm_paths["other"])  # fmt: skip
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([{"prompt": f"w{i + 5} w{i + 6}"} for i in range(2) for _ in range(4)])
    assert batch[SCORABLE_KEY].tolist() == [1.0, 0.0] * 4
    assert torch.all(batch["advantages"][1::2] == 0)
    # the loss with the unscorable rows' hidden states replaced: identical (they carry no weight)
    loss = trainer._compute_loss(trainer.model, batch)
    altered = dict(batch)
    ref_hidden = batch["rb_ref_completion_hidden"].clone()
    ref_hidden[1::2] += 3.0
    altered["rb_ref_completion_hidden"] = ref_hidden
    assert trainer._compute_loss(trainer.model, altered).item() == pytest.approx(loss.item(), rel=1e-6)
    scorable_changed = dict(batch)
    ref_hidden = batch["rb_ref_completion_hidden"].clone()
    ref_hidden[0::2] += 3.0
    scorable_changed["rb_ref_completion_hidden"] = ref_hidden
    assert abs(trainer._compute_loss(trainer.model, scorable_changed).item() - loss.item()) > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# GRPO k1 with tools: only the tokens the policy sampled
# ----------------------------------------------------------------------------------------------------------------


def test_grpo_k1_penalty_sums_sampled_tokens_only(tmp_path):
    trainer, _, _ = make_trainer("k1", tmp_path, batch=8, group=4, beta=0.5)
    mask = torch.ones(8, 3)
    tool_mask = torch.tensor([[1.0, 0.0, 1.0]] * 8)  # token 1 is a tool's output, inserted, not sampled
    policy_logps = torch.zeros(8, 3)
    ref_logps = torch.zeros(8, 3)
    ref_logps[:4, 1] = -5.0  # a huge log ratio on the tool token of the first group only: must not count
    ref_logps[4, 0] = -1.0  # a sampled token's log ratio: must count
    out = {"completion_mask": mask, "tool_mask": tool_mask, "advantages": torch.zeros(8)}
    fake = ScoredCall(index=0, model=trainer.model, hidden=torch.zeros(8, 3, 1), completion_mask=mask,
                      logps=policy_logps)  # fmt: skip
    ref = ScoredCall(index=1, model=trainer.ref_model, hidden=torch.zeros(8, 3, 1), completion_mask=mask,
                     logps=ref_logps)  # fmt: skip
    trainer._add_k1_penalty(out, [fake], ref)
    expected = torch.zeros(8)
    expected[4:] = 0.25 * 0.5  # group 2: k1 = (1, 0, 0, 0), centred: (0.75, -0.25, ...) times -beta
    expected[4] = -0.75 * 0.5
    torch.testing.assert_close(out["advantages"], expected)


# ----------------------------------------------------------------------------------------------------------------
# The kl/rb metric: optional in k1 / k3, skipped with one warning where the heads cannot give it
# ----------------------------------------------------------------------------------------------------------------


def test_rb_metric_switch(tmp_path, lm_paths):
    trainer, _, _ = make_trainer("k3", tmp_path, batch=8, group=4, max_steps=1, rb_kl_metric=False)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "kl/rb" not in logs[0] and "kl/k1" in logs[0]
    args = make_config(tmp_path, "k1", rb_kl_metric=False, max_steps=1)
    rloo = RLOOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset())
    rloo.train()
    logs = [h for h in rloo.state.log_history if "loss" in h]
    assert "kl/rb" not in logs[0] and "kl/k1" in logs[0]


def test_rloo_k1_without_linear_head_skips_the_metric(lm_paths, tmp_path, monkeypatch):
    import trl_rb.trainers.token_kl as trainer_kl

    def no_head(*_a, **_k):
        raise ValueError("GPT2LMHeadModel has no linear LM head")

    monkeypatch.setattr(trainer_kl, "head_params", no_head)
    args = make_config(tmp_path, "k1", max_steps=1)
    with pytest.warns(UserWarning, match="kl/rb will not be logged"):
        rloo = RLOOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset())
    rloo.train()
    assert "kl/k1" in rloo.state.log_history[0] and "kl/rb" not in rloo.state.log_history[0]
    with pytest.raises(ValueError, match="no linear LM head"):
        RLOOTrainer(lm_paths["policy"], low_words_reward, args=make_config(tmp_path, "rb"),
                    train_dataset=prompts_dataset())  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# bf16 (trl's default): autocast on CPU (the KL kernels under autocast: tests/kernels/test_kl_from_hidden.py)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_name", ["grpo", "rloo"])
def test_bf16_training_run(tmp_path, lm_paths, trainer_name):
    """trl's default bf16=True (autocast on CPU too): rb trains, with finite numbers and a KL that grows."""
    if trainer_name == "grpo":
        trainer, policy, _ = make_trainer(
            "rb", tmp_path, batch=8, group=4, max_steps=3, bf16=True, reward=length_reward, learning_rate=0.1,
            dtype=torch.float32,
        )  # fmt: skip
    else:
        args = make_config(tmp_path, "rb", max_steps=3, bf16=True, use_cpu=True, learning_rate=0.1)
        trainer = RLOOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset())
    assert trainer.args.bf16
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert 0.0 <= logs[0]["kl/rb"] < logs[-1]["kl/rb"]


# ----------------------------------------------------------------------------------------------------------------
# ref_model= from a path: loaded like trl's own reference
# ----------------------------------------------------------------------------------------------------------------


def test_reference_init_kwargs_follow_trl():
    from types import SimpleNamespace

    from trl_rb.trainers.reference import _reference_init_kwargs

    policy = tiny_gpt2(VOCAB, 0, **MODEL_KW, dtype=torch.float32)

    def args(distributed: str, **init):
        return SimpleNamespace(model_init_kwargs=init or None, trust_remote_code=True,
                               distributed_state=SimpleNamespace(distributed_type=distributed))  # fmt: skip

    quant = object()
    kwargs = _reference_init_kwargs(args("DEEPSPEED", device_map="auto", revision="r1"), policy, quant)
    assert kwargs["device_map"] is None and kwargs["revision"] == "r1" and kwargs["quantization_config"] is quant
    assert kwargs["trust_remote_code"] is True and kwargs["dtype"] == torch.float32
    assert kwargs["attn_implementation"] == policy.config._attn_implementation
    assert _reference_init_kwargs(args("NO", device_map="auto", dtype="bfloat16"), policy, None)["dtype"] == "bfloat16"
    assert _reference_init_kwargs(args("NO", device_map="auto"), policy, None)["device_map"] == "auto"
    with pytest.raises(ValueError, match="quantization_config was given both"):
        _reference_init_kwargs(args("NO", quantization_config=quant), policy, quant)


def test_ref_model_path_honours_init_kwargs_and_fp32_head(tmp_path):
    from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer

    # untied heads: trl's own cast of a tied policy head assumes a `model.embed_tokens` attribute GPT-2 lacks
    policy, other = build_lm(tmp_path / "p", seed=0, tied=False), build_lm(tmp_path / "q", seed=1, tied=False)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, beta=0.1,
                      max_completion_length=4, report_to=[], use_cpu=True, bf16=False,
                      model_init_kwargs={"dtype": "bfloat16"}, cast_lm_head_to_fp32=True)  # fmt: skip
    trainer = GRPOTrainer(policy, low_words_reward, args=args, train_dataset=prompts_dataset(), ref_model=other)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16  # model_init_kwargs reached the reference
    assert ref.lm_head.weight.dtype == torch.float32  # cast_lm_head_to_fp32, as trl does for its own reference
    assert trainer.model.lm_head.weight.dtype == torch.float32
    trainer.model.train()
    torch.manual_seed(0)
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": "w5 w6"}] * 4)
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and trainer._metrics["train"]["kl/rb"][-1] > 0.0


# ----------------------------------------------------------------------------------------------------------------
# sync_ref_model: the reference's hidden states and head both come from the synced reference
# ----------------------------------------------------------------------------------------------------------------


def test_sync_ref_model_reads_the_synced_reference(lm_paths, tmp_path):
    from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, beta=0.1,
                      max_completion_length=6, report_to=[], use_cpu=True, bf16=False, max_steps=2, logging_steps=1,
                      learning_rate=0.05, save_strategy="no", sync_ref_model=True, ref_model_sync_steps=1,
                      ref_model_mixup_alpha=0.5, disable_dropout=True)  # fmt: skip
    trainer = GRPOTrainer(lm_paths["policy"], low_words_reward, args=args, train_dataset=prompts_dataset())
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    before = ref.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.allclose(ref.lm_head.weight, before)  # trl synced the reference (its head too)
    trainer.model.train()
    torch.manual_seed(3)
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([{"prompt": "w5 w6"}] * 4 + [{"prompt": "w7"}] * 4)
    trainer.compute_loss(trainer.model, inputs)
    exact = exact_sequence_kl(trainer, inputs, ref).mean().item()
    assert exact > 1e-4
    assert trainer._metrics["train"]["kl/rb"][-1] == pytest.approx(exact, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# FSDP1: refused for rb, metric skipped for k1 / k3 (the check both trainers run at construction)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["rb", "k1", "k3"])
def test_fsdp1_is_refused_for_rb_and_skips_the_metric_otherwise(estimator):
    """accelerate enables FSDP only on accelerators, so the trainers cannot be built under FSDP1 here: the shared
    construction-time check (``logs_rb_metric``, called by RLOO and GRPO alike) gets a trainer as FSDP1 leaves it."""
    from types import SimpleNamespace

    from trl_rb.trainers.token_kl import logs_rb_metric

    fsdp1 = SimpleNamespace(
        beta=0.1, args=SimpleNamespace(rb_kl_metric=True), is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))),
    )  # fmt: skip
    if estimator == "rb":
        with pytest.raises(ValueError, match="fsdp_version=1"):
            logs_rb_metric(fsdp1, estimator)
    else:
        with pytest.warns(UserWarning, match="kl/rb will not be logged.*FSDP1"):
            assert logs_rb_metric(fsdp1, estimator) is False
