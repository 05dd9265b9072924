"""One test per trl method trl_rb overrides or swaps: each pins the trl 1.16 call order the override relies on, so
that a trl upgrade which changes it fails here, by name, instead of silently changing numbers.

The listed calls are recorded on a real scoring and loss step of a tiny GPT-2 pair (policy, ``ref_model=``); the
table of overrides is in ``trl_rb.trainers``' docstring.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import trl
from datasets import Dataset
from enumerable import tiny_gpt2_pair, word_tokenizer
from trl.trainer import distillation_trainer as trl_distillation_trainer
from trl.trainer import utils as trl_utils

from trl_rb import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl_rb.trainers.fused_head import loss_head_for

VOCAB, PROMPT = 4, "<bos>"


def reward(completions, **_):
    return [float(len(c)) for c in completions]


def make(name: str, tmp_path, estimator: str = "rb", beta: float = 0.1, **config):
    policy, reference = tiny_gpt2_pair(VOCAB, seed=0, dtype=torch.float32, n_embd=8, n_layer=1)
    config_cls, trainer_cls = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[name]
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=3, beta=beta, kl_estimator=estimator, report_to=[], use_cpu=True,
                      save_strategy="no", bf16=False, **config)  # fmt: skip
    trainer = trainer_cls(model=policy, reward_funcs=[reward], args=args, ref_model=reference,
                          processing_class=word_tokenizer(("<bos>", "a", "b", "<eos>"), eos="<eos>", bos="<bos>"),
                          train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 16}))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def spy(trainer, events: list[tuple[str, ...]]) -> None:
    """Record, in order, trl's calls of the methods trl_rb overrides (instance attributes shadow the class's)."""
    scored = trainer._get_per_token_logps_and_entropies
    rewards = trainer._calculate_rewards

    def logps(model, *args, **kwargs):
        events.append(("logps", "policy" if model is trainer.model else "reference"))
        return scored(model, *args, **kwargs)

    def calculate_rewards(*args, **kwargs):
        events.append(("rewards",))
        return rewards(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = logps
    trainer._calculate_rewards = calculate_rewards


def scored_batch(trainer, events) -> dict:
    torch.manual_seed(0)
    spy(trainer, events)
    return trainer._generate_and_score_completions([{"prompt": PROMPT}] * 8)


@pytest.mark.parametrize("estimator", ["rb", "k1", "k3"])
def test_rloo_scores_policy_then_reference_then_rewards(tmp_path, estimator):
    """RLOO's rewrite turns the second scoring call's log-probs into old - penalty: trl must score the policy, then
    the reference, then compute the rewards (whose unscorable rows the override notes), then build old - ref."""
    events: list[tuple[str, ...]] = []
    output = scored_batch(make("rloo", tmp_path, estimator), events)
    assert events == [("logps", "policy"), ("logps", "reference"), ("rewards",)]
    assert {"advantages", "completion_mask"} <= set(output)


def test_rloo_loss_runs_one_policy_forward(tmp_path):
    trainer = make("rloo", tmp_path)
    inputs = scored_batch(trainer, [])
    events: list[tuple[str, ...]] = []
    spy(trainer, events)
    trainer.compute_loss(trainer.model, inputs)
    assert events == [("logps", "policy")]


@pytest.mark.parametrize("steps_per_generation, expected", [
    (1, [("logps", "reference"), ("rewards",)]),
    # a generation batch spanning optimizer steps: trl also scores the sampling policy, first
    (2, [("logps", "policy"), ("logps", "reference"), ("rewards",)]),
])  # fmt: skip
def test_grpo_scores_the_reference_last(tmp_path, steps_per_generation, expected):
    """GRPO reads the reference's hidden states from the last scoring call and the sampling policy's log-probs
    from the one before it, when there is one."""
    events: list[tuple[str, ...]] = []
    output = scored_batch(make("grpo", tmp_path, steps_per_generation=steps_per_generation), events)
    assert events == expected
    assert "ref_per_token_logps" in output and ("old_per_token_logps" in output) == (steps_per_generation > 1)


@pytest.mark.parametrize("estimator", ["rb", "k1"])
def test_grpo_loss_has_trls_k3_term_once_on_one_forward(tmp_path, estimator):
    """trl's loss adds beta * k3 of the log-probs of its one policy forward, unmultiplied (use_bias_correction_kl is
    off in the config trl sees): taking that term back out must leave exactly trl's loss at beta = 0."""
    trainer = make("grpo", tmp_path, estimator)
    assert trainer.args.use_bias_correction_kl is False
    inputs = scored_batch(trainer, [])
    events: list[tuple[str, ...]] = []
    spy(trainer, events)
    with torch.no_grad():
        trl_loss = trl.GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    assert events == [("logps", "policy")]
    other = make("grpo", tmp_path / "other", estimator, beta=0.3)  # same weights (same seed), same batch
    with torch.no_grad():
        other_loss = trl.GRPOTrainer._compute_loss(other, other.model, inputs)
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0]
    k3 = torch.expm1(inputs["ref_per_token_logps"] - logps) - (inputs["ref_per_token_logps"] - logps)
    ours = trainer._reduce(k3, inputs["completion_mask"], inputs, "train")
    assert float(other_loss - trl_loss) == pytest.approx(0.2 * float(ours), rel=1e-5)


def test_trl_calls_the_model_without_position_ids(tmp_path):
    """GenerationPositionsMixin supplies cumsum(mask) - 1 only where trl passes no position ids."""
    trainer = make("grpo", tmp_path)
    inputs = scored_batch(trainer, [])
    seen: list[dict] = []
    hook = trainer.model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            trl.GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    finally:
        hook.remove()
    assert seen and all("position_ids" not in kwargs or kwargs["position_ids"] is None for kwargs in seen)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_trl_looks_up_its_log_prob_head_at_call_time(tmp_path, monkeypatch, name):
    """fused_head swaps ``trl.trainer.utils._ChunkedLogProbFunction`` for one loss forward: trl must look it up when
    it scores (if it bound the name at import, the rb loss would silently fall back to the unfused pass)."""
    assert hasattr(trl_utils, "_ChunkedLogProbFunction")
    trainer = make(name, tmp_path)
    inputs = scored_batch(trainer, [])
    module = importlib.import_module(f"trl_rb.trainers.{name}")
    heads = []

    def recording_loss_head_for(*args, **kwargs):
        heads.append(loss_head_for(*args, **kwargs))
        return heads[-1]

    monkeypatch.setattr(module, "loss_head_for", recording_loss_head_for)
    trainer.compute_loss(trainer.model, inputs)
    assert len(heads) == 1 and heads[0] is not None and heads[0].token_kl is not None


def test_trl_distillation_calls_the_functions_it_swaps():
    """DistillationTrainer swaps two module functions of trl's distillation trainer for one call each; trl must
    still have them and call them through the module (not a bound local name)."""
    import inspect

    source = inspect.getsource(trl.DistillationTrainer)
    for name in ("_chunked_divergence_loss", "shuffle_sequence_dict"):
        assert hasattr(trl_distillation_trainer, name), name
        assert f"{name}(" in source, name
