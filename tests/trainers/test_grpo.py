"""trl_rb.GRPOConfig / GRPOTrainer: config, exact loss and advantage algebra on a fixed batch, training runs, PEFT.

The models are the enumerable tiny GPT-2 pair (vocabulary a, b, EOS plus a BOS prompt token; float64) from
``tests/enumerable.py``, with a word-level tokenizer over the same ids, so every quantity below can be recomputed from
materialized logits and compared to machine precision.
"""

from __future__ import annotations

import math

import pytest
import torch
import trl
from datasets import Dataset
from enumerable import tiny_gpt2
from support import (
    MODEL_KW,
    PROMPT,
    VOCAB,
    length_reward,
    make_trainer,
    materialized,
    score_batch,
    tiny_tokenizer,
    zero_reward,
)

from trl_rb.kl import kl_surrogate, token_kl, token_logprobs
from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer, reduce_like_loss_type
from trl_rb.trainers.token_kl import k3_per_token

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def config(tmp_path, **kwargs) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_config_names_defaults_and_errors(tmp_path):
    default = config(tmp_path)
    assert (default.kl_estimator, default.use_bias_correction_kl) == ("rb", False)  # one default for both trainers
    assert config(tmp_path, kl_estimator="k3").use_bias_correction_kl is True  # trl's default kept for k3
    rb = config(tmp_path, kl_estimator="RB", beta=0.1)
    assert (rb.kl_estimator, rb.use_bias_correction_kl) == ("rb", False)
    assert config(tmp_path, kl_estimator="full", beta=0.1).kl_estimator == "rb"
    assert config(tmp_path, kl_estimator="Mc", beta=0.1).kl_estimator == "k1"
    with pytest.raises(ValueError, match="Unknown KL estimator 'k2'"):
        config(tmp_path, kl_estimator="k2", beta=0.1)
    with pytest.raises(ValueError, match="Unknown KL estimator"):
        config(tmp_path, kl_estimator="bogus", beta=0.1)
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        config(tmp_path, kl_estimator="rb", beta=0.1, use_bias_correction_kl=True)
    assert config(tmp_path, kl_estimator="k1").beta == 0.0  # no KL term: trains like trl, no KL metric


def test_config_parses_with_trl_parser(tmp_path):
    parser = trl.TrlParser((GRPOConfig,))
    (args,) = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--kl_estimator", "RB", "--beta", "0.05", "--loss_type", "dr_grpo"]
    )
    assert (args.kl_estimator, args.beta, args.use_bias_correction_kl) == ("rb", 0.05, False)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nkl_estimator: k1\nbeta: 0.2\n")
    (args,) = parser.parse_args_and_config(["--config", str(yaml)])
    assert (args.kl_estimator, args.beta) == ("k1", 0.2)
    assert "kl_estimator" in GRPOConfig.__doc__ and "use_bias_correction_kl" in GRPOConfig.__doc__


def test_trainer_refuses_unsupported_settings(tmp_path):
    with pytest.raises(ValueError, match="top_p=0.9"):
        make_trainer("rb", tmp_path, top_p=0.9)
    from peft import LoraConfig

    lora_head = LoraConfig(r=2, target_modules=["c_attn", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):  # trl refuses it already; head_params would too
        make_trainer("rb", tmp_path, use_ref_model=False, model=tiny_gpt2(VOCAB, 0, **MODEL_KW), peft_config=lora_head)
    # trl_rb's config: use_bias_correction_kl=True is the user's explicit choice, and means nothing for rb / k1
    explicit = config(tmp_path, kl_estimator="k3", beta=0.1)
    explicit.kl_estimator = "k1"
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        GRPOTrainer(model=tiny_gpt2(VOCAB, 0, **MODEL_KW), reward_funcs=[zero_reward], args=explicit,
                    train_dataset=Dataset.from_dict({"prompt": [PROMPT]}), processing_class=tiny_tokenizer())
    # a plain trl config: True is trl's default there; the trainer's default rb applies, with a warning
    plain = trl.GRPOConfig(output_dir=str(tmp_path), beta=0.1, use_cpu=True, report_to=[], bf16=False)
    with pytest.warns(UserWarning, match="use_bias_correction_kl"):
        trainer = GRPOTrainer(model=tiny_gpt2(VOCAB, 0, **MODEL_KW), reward_funcs=[zero_reward], args=plain,
                              train_dataset=Dataset.from_dict({"prompt": [PROMPT]}), processing_class=tiny_tokenizer(),
                              ref_model=tiny_gpt2(VOCAB, 1, **MODEL_KW))
    assert trainer.kl_estimator == "rb"


# ----------------------------------------------------------------------------------------------------------------
# Exact algebra on one fixed batch (float64: agreement to ~1e-12)
# ----------------------------------------------------------------------------------------------------------------


def test_rb_loss_gradient_is_the_rb_surrogate(tmp_path):
    """reward 0, dr_grpo: grad loss == beta / (N * max_len) * grad sum_i kl_surrogate_rb (materialized logits)."""
    trainer, _, reference = make_trainer("rb", tmp_path, batch=32, group=8, beta=0.3)
    inputs = score_batch(trainer, 32, seed=1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    lp, lq = materialized(trainer, reference, inputs)
    tokens, mask = inputs["completion_ids"], inputs["completion_mask"]
    expected_loss = 0.3 * kl_surrogate(lp, lq, tokens, mask, "rb").sum() / (32 * 4)
    want = torch.autograd.grad(expected_loss, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)  # trl computes l_t in float32
    assert abs(float(loss) - float(expected_loss)) < 1e-10  # value: beta * sum K / (N * max_len)
    # the metrics are the per-sequence sums of r_t and K_t on this batch
    with torch.no_grad():
        k = (token_kl(lp, lq) * mask).sum(-1).mean()
        r = ((token_logprobs(lp, tokens) - token_logprobs(lq, tokens)) * mask).sum(-1).mean()
    assert trainer._metrics["train"]["kl/rb"][-1] == pytest.approx(float(k), rel=1e-6)
    assert trainer._metrics["train"]["kl/k1"][-1] == pytest.approx(float(r), rel=1e-6)


def test_k1_advantages_are_group_centred_k1(tmp_path):
    """k1: advantages = reward part - beta * (k1_i - mean of k1 over the group); the loss has no KL term."""
    trainer, _, reference = make_trainer("k1", tmp_path, batch=32, group=8, beta=0.3, reward=length_reward)
    inputs = score_batch(trainer, 32, seed=2)
    lp, lq = materialized(trainer, reference, inputs)
    tokens, mask = inputs["completion_ids"], inputs["completion_mask"]
    with torch.no_grad():
        k1 = ((token_logprobs(lp, tokens) - token_logprobs(lq, tokens)) * mask).sum(-1)
    length = mask.sum(-1).double()
    centred = lambda x: (x.view(-1, 8) - x.view(-1, 8).mean(1, keepdim=True)).view(-1)  # noqa: E731
    torch.testing.assert_close(inputs["advantages"].double(), centred(length) - 0.3 * centred(k1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo", "sapo"])
def test_reduction_matches_trl_normalization(tmp_path, loss_type):
    """trl's own k3 term, switched on and off on one batch, differs by beta * reduce_like_loss_type(k3 terms)."""
    trainer, _, _ = make_trainer("k3", tmp_path, batch=16, group=4, beta=0.5, use_bias_correction_kl=False)
    inputs = score_batch(trainer, 16, seed=3)
    trainer.loss_type = loss_type
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        with_kl = trainer._compute_loss(trainer.model, inputs)
        trainer.beta = 0.0
        without = trainer._compute_loss(trainer.model, inputs)
        trainer.beta = 0.5
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1],
        )
    terms = k3_per_token(logps - inputs["ref_per_token_logps"])
    ours = reduce_like_loss_type(
        terms,
        inputs["completion_mask"],
        loss_type=loss_type,
        max_completion_length=4,
        accumulation_steps=2,
        num_items_in_batch=inputs["num_items_in_batch"],
        steps_per_generation=trainer.args.steps_per_generation,
    )
    assert float(with_kl - without) == pytest.approx(0.5 * float(ours), rel=1e-6)  # trl works in float32


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k3", "k1", "rb"])
def test_short_training_run(tmp_path, estimator):
    trainer, _, _ = make_trainer(
        estimator, tmp_path, batch=16, group=4, beta=0.05, reward=length_reward, max_steps=8, learning_rate=3e-2,
        scale_rewards="group", loss_type="dapo",
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["kl/k1"]) and h["kl/rb"] >= 0.0
    # the length reward goes up
    first = sum(h["reward"] for h in logs[:3]) / 3
    last = sum(h["reward"] for h in logs[-3:]) / 3
    assert last > first


def test_peft_reference_is_the_base_model(tmp_path):
    """A LoRA policy without ref_model: the reference is the base (adapters disabled); at step 1 (LoRA B = 0) the
    policy equals it, so both KL metrics are 0; training then moves the policy away (kl/rb > 0)."""
    from peft import LoraConfig

    trainer, _, _ = make_trainer(
        "rb", tmp_path, batch=16, group=4, reward=length_reward, use_ref_model=False,
        model=tiny_gpt2(VOCAB, 0, **MODEL_KW), peft_config=LoraConfig(r=4, target_modules=["c_attn", "c_fc"]),
        max_steps=6, learning_rate=0.1, scale_rewards="group",
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert abs(logs[0]["kl/rb"]) < 1e-6 and abs(logs[0]["kl/k1"]) < 1e-6
    assert logs[-1]["kl/rb"] > 1e-4


@pytest.mark.parametrize("estimator", ["k1", "k3", "rb"])
def test_multi_iteration_and_accumulation_run(tmp_path, estimator):
    """num_iterations=2 (trl scores the old policy too) with gradient accumulation: the scoring order is still found,
    and beta=0 trains like trl without a reference or KL metrics."""
    trainer, _, _ = make_trainer(
        estimator, tmp_path, batch=8, group=4, reward=length_reward, max_steps=2, learning_rate=1e-2,
        num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=2,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["kl/rb"] >= 0 for h in logs)
    plain, _, _ = make_trainer(estimator, tmp_path / "b0", batch=8, group=4, beta=0.0, use_ref_model=False, max_steps=1)
    plain.train()
    assert plain.ref_model is None
    assert not any(k.startswith("kl") for h in plain.state.log_history for k in h)


def test_rb_prefix_weights_use_the_samplers_logprobs_whenever_trl_has_them(tmp_path):
    """With vLLM the sampler is vLLM: its log-probs (``sampling_per_token_logps``, which trl 1.16 always requests)
    replace the trainer's old ones in the RB prefix weights, with trl's importance-sampling correction on or off
    (plumbing check on one batch; the weighting is tested against exact enumeration in test_grpo_unbiased.py, and
    under real vLLM sampling in tests/vllm_tier)."""
    trainer, _, _ = make_trainer("rb", tmp_path, batch=16, group=4, num_iterations=2)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    inputs = score_batch(trainer, 16, seed=5)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    stale = torch.autograd.grad(trainer.compute_loss(trainer.model, inputs), params)
    as_vllm = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
    as_vllm["sampling_per_token_logps"] = inputs["old_per_token_logps"]
    as_vllm["importance_sampling_ratio"] = torch.ones_like(inputs["old_per_token_logps"])  # trl's, read by its loss
    for correction in (True, False):
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, correction
        vllm = torch.autograd.grad(trainer.compute_loss(trainer.model, as_vllm), params)
        for a, b in zip(stale, vllm, strict=True):
            torch.testing.assert_close(a, b)
    trainer.use_vllm = False
    unscored = {k: v for k, v in as_vllm.items() if k != "sampling_per_token_logps"}
    on_policy = torch.autograd.grad(trainer.compute_loss(trainer.model, unscored), params)  # no sampler scores used
    assert max(float((a - b).abs().max()) for a, b in zip(stale, on_policy, strict=True)) > 1e-6
