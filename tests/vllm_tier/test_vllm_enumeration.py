"""The GRPO ``rb`` gradient under vLLM sampling, against exact enumeration.

vLLM samples from its own numerics (bf16 here, from the float32 checkpoint trl hands it), so its distribution p_v is
close to the trainer's p but not equal. Every completion y of a tiny Qwen2 (vocabulary 12, up to 3 tokens: 1,464
completions) is scored by the very vLLM engine trl built (prompt log-probs at temperature 1; at T=1 they equal the
log-probs vLLM returns when sampling, checked below), which gives p_v(y) exactly. The trainer then scores a batch
holding every y with vLLM's per-token log-probs, through trl's own code (the engine's ``generate`` is replaced by
the enumeration), and the per-completion gradients g(y) of the loss give the exact expectation
E_{y ~ p_v}[g(y)] = sum_y p_v(y) g(y). Reward 0 and ``dr_grpo``: it must be beta / max_len * grad KL(p || q), with
the KL of the trainer's model (``trl_rb.exact``), when the RB terms are importance-weighted by vLLM's log-probs.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from support import flat_grad
from transformers import PreTrainedTokenizerFast
from vllm_cpu import EOS_ID, WORDS, build_qwen2, keep_plain_cpu_linear

pytest.importorskip("vllm", reason="the vLLM tier runs in its own environment: bash scripts/vllm_tier.sh")

from vllm import SamplingParams  # noqa: E402

from trl_rb import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_rb.exact import enumerate_completions, exact_kl_and_grad  # noqa: E402
from trl_rb.trainers.gamma import GAMMA_KEY  # noqa: E402

MAX_LEN, BETA, GAMMA = 3, 0.1, 0.5  # a fixed gamma (5 beta): the control variate's weighting is checked too
PROMPT = "w1 w4"


def zero_reward(completion_ids, **_):
    return [0.0] * len(completion_ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    keep_plain_cpu_linear()
    root = tmp_path_factory.mktemp("vllm_enum")
    policy, reference = build_qwen2(root / "policy", seed=2), build_qwen2(root / "reference", seed=3)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(policy)
    tokens, mask = enumerate_completions(len(WORDS), MAX_LEN, EOS_ID)
    completions = [row[m.bool()].tolist() for row, m in zip(tokens, mask, strict=True)]
    config = GRPOConfig(
        output_dir=str(root / "out"), use_vllm=True, vllm_mode="colocate", use_cpu=True,
        vllm_gpu_memory_utilization=0.3, vllm_max_model_length=64, per_device_train_batch_size=len(completions),
        num_generations=4, max_completion_length=MAX_LEN, beta=BETA, temperature=1.0, loss_type="dr_grpo",
        rb_gamma=GAMMA, rb_prefix_weight_cap=None, report_to="none", save_strategy="no", bf16=False,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(policy, zero_reward, args=config, processing_class=tokenizer, ref_model=reference,
                          train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 8}))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss is called directly here
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    vllm_logps = vllm_completion_logprobs(trainer, prompt_ids, completions)
    return trainer, prompt_ids, completions, vllm_logps, sampling_probabilities(vllm_logps)


def sampling_probabilities(vllm_logps: list[list[float]]) -> torch.Tensor:
    """[N] p_vllm(y) of each enumerated completion (float64, normalized: they sum to 1 up to vLLM's rounding)."""
    p_v = torch.tensor([math.exp(sum(lps)) for lps in vllm_logps], dtype=torch.float64)
    return p_v / p_v.sum()


def vllm_completion_logprobs(trainer, prompt_ids, completions) -> list[list[float]]:
    """vLLM's log-prob of every token of every completion, from the engine trl built (its weights synced first)."""
    trainer.vllm_generation.sync_weights()
    prompts = [{"prompt_token_ids": prompt_ids + c} for c in completions]
    outputs = trainer.vllm_generation.llm.generate(
        prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False
    )
    n = len(prompt_ids)
    return [[o.prompt_logprobs[n + i][t].logprob for i, t in enumerate(c)] for o, c in zip(outputs, completions, strict=True)]


def scored_batch(trainer, prompt_ids, completions, logps) -> dict:
    """trl's scoring of a generation batch holding every completion, with vLLM's log-probs as the sampler's."""

    def enumerated(prompts, images, num_generations, profiler=None):
        return [prompt_ids] * len(completions), completions, [[[lp] for lp in row] for row in logps], None

    engine_generate = trainer.vllm_generation.generate
    trainer.vllm_generation.generate = enumerated
    try:
        return trainer._generate_and_score_completions([{"prompt": PROMPT}] * len(completions))
    finally:
        trainer.vllm_generation.generate = engine_generate


def expected_gradient(trainer, inputs, probs: torch.Tensor, drop: tuple[str, ...] = ()) -> torch.Tensor:
    """sum_y probs(y) g(y): each completion's loss gradient (a batch of one row) weighted by its probability."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    n = inputs["completion_mask"].shape[0]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(n):
        row = {k: v[i : i + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
               for k, v in inputs.items() if k not in drop}  # fmt: skip
        total += float(probs[i]) * flat_grad(trainer.compute_loss(trainer.model, row), params).double()
    return total


def exact_target(trainer, prompt_ids) -> torch.Tensor:
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    _, grads = exact_kl_and_grad(trainer.model, trainer.ref_model, prompt_ids, max_new_tokens=MAX_LEN,
                                 eos_token_id=EOS_ID, params=dict(named))  # fmt: skip
    return BETA / MAX_LEN * torch.cat([grads[n].flatten() for n, _ in named]).double()


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return float((estimate - target).norm() / target.norm())


def test_vllm_samples_from_the_logprobs_it_reports(setup):
    """At temperature 1 the log-probs vLLM returns while sampling equal its prompt log-probs of the same tokens, and
    the enumerated p_v sums to 1: p_v is vLLM's sampling distribution."""
    trainer, prompt_ids, completions, vllm_logps, _ = setup
    total = sum(math.exp(sum(lps)) for lps in vllm_logps)
    assert abs(total - 1.0) < 1e-3, total
    sampled = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": prompt_ids}] * 16, SamplingParams(max_tokens=MAX_LEN, logprobs=0, temperature=1.0, seed=3),
        use_tqdm=False,
    )
    index = {tuple(c): i for i, c in enumerate(completions)}
    gaps = [abs(next(iter(lp.values())).logprob - vllm_logps[index[tuple(o.outputs[0].token_ids)]][t])
            for o in sampled for t, lp in enumerate(o.outputs[0].logprobs)]  # fmt: skip
    print("sampling vs enumerated vLLM log-probs: max gap", max(gaps))
    assert max(gaps) < 1e-3, max(gaps)


def test_rb_gradient_is_unbiased_under_vllm_sampling(setup):
    trainer, prompt_ids, completions, vllm_logps, p_v = setup
    inputs = scored_batch(trainer, prompt_ids, completions, vllm_logps)
    trainer_logps = inputs["old_per_token_logps"].double()  # trl scores the trainer's policy when vLLM samples
    mismatch = (trainer_logps - inputs["sampling_per_token_logps"].double()).abs()[inputs["completion_mask"].bool()]
    target = exact_target(trainer, prompt_ids)
    weighted = relative_error(expected_gradient(trainer, inputs, p_v), target)
    # the same batch treated as the trainer's own samples (no sampler log-probs): biased by the mismatch
    unweighted = relative_error(expected_gradient(trainer, inputs, p_v, drop=("sampling_per_token_logps",)), target)
    print(f"vLLM-trainer |log-prob gap| mean {float(mismatch.mean()):.2e} max {float(mismatch.max()):.2e}; relative "
          f"error of E_vllm[g] vs beta/L grad KL: importance-weighted {weighted:.2e}, unweighted {unweighted:.2e}")
    assert float(mismatch.max()) > 1e-4  # vLLM's numerics differ from the trainer's: the weights have work to do
    assert weighted < 2e-4, weighted
    assert unweighted > 5 * weighted, (weighted, unweighted)


def test_truncated_weights_bias_a_stale_vllm_batch(setup):
    """A batch vLLM sampled before the policy moved (a later iteration; 0.45% of p_v's mass has a prefix weight
    above 3): uncapped weights keep the gradient unbiased, with gamma 5 beta and 0; the default cap (3.0, trl's
    truncation of its own ratios) biases it, by an amount the note and the README report: small with gamma 0, as
    large as ignoring the weights with gamma 5 beta (the control variate's whole-completion weight is truncated far
    more often than the prefix weights, so its two halves no longer cancel)."""
    trainer, prompt_ids, completions, vllm_logps, p_v = setup
    inputs = scored_batch(trainer, prompt_ids, completions, vllm_logps)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    errors = {}
    try:
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        target = exact_target(trainer, prompt_ids)
        for gamma in (GAMMA, 0.0):
            batch = {**inputs, GAMMA_KEY: torch.full_like(inputs[GAMMA_KEY], gamma)}
            for cap in (None, 3.0):
                trainer.args.rb_prefix_weight_cap = cap
                errors[gamma, cap] = relative_error(expected_gradient(trainer, batch, p_v), target)
            errors[gamma, "unweighted"] = relative_error(
                expected_gradient(trainer, batch, p_v, drop=("sampling_per_token_logps",)), target
            )
    finally:
        trainer.args.rb_prefix_weight_cap = None
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    print("stale vLLM batch, relative error of E_vllm[g] vs beta/L grad KL (gamma, cap):", errors)
    for gamma in (GAMMA, 0.0):
        assert errors[gamma, None] < 2e-4, errors
        assert errors[gamma, "unweighted"] > 100 * errors[gamma, None], errors
    assert errors[0.0, 3.0] < errors[0.0, "unweighted"], errors
