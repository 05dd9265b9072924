"""A checkpoint's generation_config.json under ``rb``, both trainers: what transformers applies when trl generates
(recorded from ``generate()`` itself) is refused, naming the file; what trl overrides is accepted."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from support import build_lm, low_words_reward
from transformers import GenerationConfig, GenerationMixin

from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer
from trl_rb.trainers.rloo import RLOOConfig, RLOOTrainer
from trl_rb.trainers.sampling import check_rb_checkpoint_generation_config

QWEN_LIKE = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)  # trl overrides all
LEAKING = dict(min_p=0.05, typical_p=0.9, no_repeat_ngram_size=3)  # trl passes min_p=None and the others not at all
DISTRIBUTION_PROCESSORS = {"MinPLogitsWarper", "TypicalLogitsWarper", "NoRepeatNGramLogitsProcessor",
                           "TopKLogitsWarper", "TopPLogitsWarper", "RepetitionPenaltyLogitsProcessor"}  # fmt: skip


def _saved_lm(tmp_path, **settings) -> str:
    path = build_lm(tmp_path / "lm", seed=0)
    GenerationConfig(**settings).save_pretrained(path)
    return path


def _trainer(trainer_name, path, tmp_path, estimator, **overrides):
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=4, beta=0.1, kl_estimator=estimator, report_to=[], use_cpu=True, bf16=False,
                  max_steps=1, save_strategy="no", disable_tqdm=True, **overrides)  # fmt: skip
    config_class, trainer_class = (RLOOConfig, RLOOTrainer) if trainer_name == "rloo" else (GRPOConfig, GRPOTrainer)
    return trainer_class(path, low_words_reward, args=config_class(**common),
                         train_dataset=Dataset.from_dict({"prompt": ["w5 w6"] * 4}))  # fmt: skip


def _processors_generate_builds(trainer, monkeypatch) -> set[str]:
    """The logits processors transformers' generate() builds during one training step of ``trainer`` (a min-p of 0,
    which keeps every token, left out)."""
    built: list[str] = []
    original = GenerationMixin._get_logits_processor

    def recording(self, *args, **kwargs):
        processors = original(self, *args, **kwargs)
        built.extend(type(p).__name__ for p in processors if getattr(p, "min_p", None) != 0.0)
        return processors

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", recording)
    torch.manual_seed(0)
    trainer.train()
    assert built or trainer.args.temperature == 1.0
    return set(built)


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_settings_trl_overrides_are_accepted_and_never_reach_generate(tmp_path, trainer_name, monkeypatch):
    path = _saved_lm(tmp_path, **QWEN_LIKE)
    trainer = _trainer(trainer_name, path, tmp_path, "rb")  # not refused
    assert not _processors_generate_builds(trainer, monkeypatch) & DISTRIBUTION_PROCESSORS


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_settings_that_reach_generate_are_refused_naming_the_file(tmp_path, trainer_name, monkeypatch):
    path = _saved_lm(tmp_path, **QWEN_LIKE, **LEAKING)
    # k1 is valid under any sampler: it shows what generate() really applies from the file
    built = _processors_generate_builds(_trainer(trainer_name, path, tmp_path, "k1"), monkeypatch)
    assert {"MinPLogitsWarper", "TypicalLogitsWarper", "NoRepeatNGramLogitsProcessor"} <= built
    with pytest.raises(ValueError) as err:
        _trainer(trainer_name, path, tmp_path, "rb")
    message = str(err.value)
    assert f"{path}/generation_config.json" in message
    for key in LEAKING:
        assert key in message
    for key in ("top_k", "top_p", "repetition_penalty"):  # overridden by trl: not named
        assert f"{key}=" not in message
    # the fix the message names: neutral values in generation_kwargs, which then win
    fixed = _trainer(trainer_name, path, tmp_path, "rb",
                     generation_kwargs={"min_p": 0.0, "typical_p": 1.0, "no_repeat_ngram_size": 0})  # fmt: skip
    assert not _processors_generate_builds(fixed, monkeypatch) & DISTRIBUTION_PROCESSORS


def test_transformers_4_lets_trl_keys_win_even_when_none():
    saved = {"min_p": 0.05, "top_k": 20, "transformers_version": "4.57.0"}
    trl_kwargs = {"top_k": 0, "min_p": None, "temperature": 1.0}
    check_rb_checkpoint_generation_config(saved, trl_kwargs, 1.0, source="m/generation_config.json",
                                          transformers_major=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"min_p=0\.05"):
        check_rb_checkpoint_generation_config(saved, trl_kwargs, 1.0, source="m/generation_config.json",
                                              transformers_major=5)  # fmt: skip
    with pytest.raises(ValueError, match="unknown to trl_rb"):
        check_rb_checkpoint_generation_config({"mirostat_tau": 5.0}, trl_kwargs, 1.0, source="m",
                                              transformers_major=5)  # fmt: skip
