"""Reward functions for the sentiment experiment, with trl's reward-function signature.

trl calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` and expects one
float per completion. ``vader_reward`` scores the completion text with VADER (the offline default);
``classifier_reward`` scores prompt + completion with a sequence-classification model and returns the logit of its
positive class (the research code's reward: the POSITIVE logit of lvwerra/distilbert-imdb).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

__all__ = ["classifier_reward", "load_reward", "vader_reward"]


@functools.lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError(
            "The VADER reward needs the sentiment experiment's extra: pip install 'trl-rb[sentiment]' (or "
            "pip install vaderSentiment)."
        ) from None
    return SentimentIntensityAnalyzer()


def _text(item: Any) -> str:
    # Conversational completions are lists of messages: score the text of the last one.
    if isinstance(item, list):
        return str(item[-1]["content"]) if item else ""
    return str(item)


def vader_reward(completions: list, **kwargs: Any) -> list[float]:
    """The VADER compound score (in [-1, 1], > 0 is positive) of each completion's text."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(_text(c))["compound"]) for c in completions]


def _positive_index(config, positive_label: str | int | None) -> int:
    labels = {int(i): str(name) for i, name in (config.id2label or {}).items()}
    if isinstance(positive_label, int):
        if positive_label not in range(config.num_labels):
            raise ValueError(f"positive_label={positive_label} is not a class index (num_labels={config.num_labels})")
        return positive_label
    if positive_label is None:
        matches = [i for i, name in labels.items() if name.lower() in ("positive", "pos")]
        if len(matches) == 1:
            return matches[0]
        if config.num_labels == 2:
            return 1  # binary sentiment classifiers put the positive class second by convention
        raise ValueError(
            f"cannot tell which class is positive among {sorted(labels.values())}: pass positive_label=<name or index>"
        )
    matches = [i for i, name in labels.items() if name.lower() == positive_label.lower()]
    if not matches:
        raise ValueError(
            f"positive_label={positive_label!r} is not one of the model's labels {sorted(labels.values())}"
        )
    return matches[0]


def classifier_reward(
    model_name_or_path: str | os.PathLike,
    positive_label: str | int | None = None,
    *,
    batch_size: int = 32,
    max_length: int = 512,
    include_prompt: bool = True,
    device: str | None = None,
) -> Callable[..., list[float]]:
    """A reward function: the positive-class logit of a sequence-classification model.

    Args:
        model_name_or_path: a local folder or hub id of an ``AutoModelForSequenceClassification`` with its tokenizer.
        positive_label: the positive class, by label name (case-insensitive, e.g. ``"POSITIVE"``) or index.
            Default: the label named positive/pos, else index 1 of a binary classifier.
        include_prompt: score ``prompt + completion`` (as the research code did) rather than the completion alone.

    Returns:
        ``f(completions, prompts=None, **kwargs) -> list[float]``, named after the model (trl logs rewards under
        the function's ``__name__``).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path)
    model.eval()
    if device is not None:
        model.to(device)
    index = _positive_index(model.config, positive_label)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def reward(completions: list, prompts: list | None = None, **kwargs: Any) -> list[float]:
        texts = [_text(c) for c in completions]
        if include_prompt and prompts is not None:
            texts = [_text(p) + t for p, t in zip(prompts, texts, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(model.device)
            with torch.inference_mode():
                logits = model(**batch).logits
            out += logits[:, index].float().tolist()
        return out

    reward.__name__ = f"classifier_{os.path.basename(str(model_name_or_path).rstrip('/')) or 'reward'}"
    return reward


def load_reward(spec: str, positive_label: str | int | None = None) -> Callable[..., list[float]]:
    """The reward function named by a command-line value: ``vader`` or a classifier's path / hub id."""
    if spec.lower() == "vader":
        return vader_reward
    return classifier_reward(spec, positive_label=positive_label)
