"""trl-rb's experiments, built on the ``trl_rb`` library (which never imports this package).

- ``trl_rb_experiments.sentiment``: the sentiment-control task: the offline review LM (``review_lm``), rewards
  (``rewards``), prompt files (``data``, ``trl-rb prepare-imdb``) and the training run behind ``python
  rloo_sentiment.py`` (``experiment``). Needs the ``sentiment`` extra (``pip install trl-rb[sentiment]``: VADER).
- ``trl_rb_experiments.studies``: studies over that task: ``trl-rb sweep`` (``sweep``), ``trl-rb pareto``
  (``pareto``), ``trl-rb study`` (``study``, ``study_report``) and ``trl-rb distill-study`` (``distillation_study``).
- ``trl_rb_experiments.plugins``: the ``trl-rb`` subcommands above and ``trl-rb estimate``'s default reference and
  prompts, registered through entry points.

The review LM and the rewards are importable from here (loaded on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_review_lm": "trl_rb_experiments.sentiment.review_lm",
    "load_review_lm": "trl_rb_experiments.sentiment.review_lm",
    "review_prompts": "trl_rb_experiments.sentiment.review_lm",
    "review_lm_path": "trl_rb_experiments.sentiment.review_lm",
    "vader_reward": "trl_rb_experiments.sentiment.rewards",
    "classifier_reward": "trl_rb_experiments.sentiment.rewards",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_rb_experiments' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
