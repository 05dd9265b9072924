"""Claims the docstrings and the README make, each checked against what the code does (both trainers where both
offer it): a plain trl config's estimator, ``beta=0`` against trl itself, and the RB variance caveat."""

from __future__ import annotations

import pytest
import torch
import trl
from datasets import Dataset
from support import build_lm, low_words_reward

import trl_rb
from trl_rb.trainers.grpo import GRPOTrainer
from trl_rb.trainers.rloo import RLOOTrainer


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_a_plain_trl_config_gets_rb_as_documented(tmp_path, trainer_name):
    path = build_lm(tmp_path / "lm", seed=0)
    config_class, trainer_class = (
        (trl.RLOOConfig, RLOOTrainer) if trainer_name == "rloo" else (trl.GRPOConfig, GRPOTrainer)
    )
    args = config_class(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, beta=0.1,
                        report_to=[], use_cpu=True, bf16=False)  # fmt: skip
    with pytest.warns(UserWarning) if trainer_name == "grpo" else _no_warning_needed():
        trainer = trainer_class(path, low_words_reward, args=args, train_dataset=Dataset.from_dict({"prompt": ["w5"] * 4}))
    assert trainer.kl_estimator == "rb"
    doc = _flat(trainer_class.__doc__)
    assert "plain ``trl." in doc and 'kl_estimator="k3"``.' not in doc.split("plain ``trl.")[1][:80]


class _no_warning_needed:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_rb_variance_caveat_is_stated_not_denied():
    doc = _flat(trl_rb.kl_surrogate.__doc__)
    assert "no larger than k1" not in doc and "test_rb_variance_counterexample" in doc


def _gradients_like_trl(trainer_name: str, tmp_path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(trl_rb's loss gradient, trl's) at beta=0 on one batch that trl_rb generated and scored (both flattened)."""
    path = build_lm(tmp_path / "lm", seed=0)
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, beta=0.0, seed=0,
                  max_completion_length=5, report_to=[], use_cpu=True, bf16=False, disable_dropout=True)  # fmt: skip
    if trainer_name == "rloo":
        ours = RLOOTrainer(path, low_words_reward, args=trl_rb.RLOOConfig(**common),
                           train_dataset=Dataset.from_dict({"prompt": prompts}))  # fmt: skip
        theirs = trl.RLOOTrainer(path, low_words_reward, args=trl.RLOOConfig(**common),
                                 train_dataset=Dataset.from_dict({"prompt": prompts}))  # fmt: skip
    else:
        ours = GRPOTrainer(path, low_words_reward, args=trl_rb.GRPOConfig(**common),
                           train_dataset=Dataset.from_dict({"prompt": prompts}))  # fmt: skip
        theirs = trl.GRPOTrainer(path, low_words_reward, args=trl.GRPOConfig(**common),
                                 train_dataset=Dataset.from_dict({"prompt": prompts}))  # fmt: skip
    for trainer in (ours, theirs):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    batch = ours._generate_and_score_completions([{"prompt": p} for p in prompts])
    assert batch["advantages"].abs().max() > 0

    def gradient(trainer) -> torch.Tensor:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(trainer._compute_loss(trainer.model, batch), params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)])

    return gradient(ours), gradient(theirs)


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_beta_zero_trains_like_trl_but_for_gpt2_positions(tmp_path, trainer_name):
    """README and docstrings: at beta=0 every mode trains like trl, except that absolute-position models are scored
    at generation's position ids, which differ from trl's on left-padded rows."""
    ours, theirs = _gradients_like_trl(trainer_name, tmp_path / "one_length", ["w5 w6"] * 4)
    assert theirs.norm() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())
    ours, theirs = _gradients_like_trl(trainer_name, tmp_path / "two_lengths", ["w5 w6 w7 w8", "w9"] * 2)
    assert (ours - theirs).norm() > 1e-3 * theirs.norm()
