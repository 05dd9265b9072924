"""trl-rb: Rao-Blackwellized KL estimators for language models, in trl's RLOO, GRPO and distillation trainers.

The estimator math (``trl_rb.kl``) imports only torch; the trainers and tools import trl and transformers lazily,
on first access, so ``import trl_rb`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .kl import (
    ESTIMATORS,
    compute_kl,
    kl_estimate,
    kl_surrogate,
    linear_kl_terms,
    linear_logprob_kl,
    linear_token_kl,
    linear_weighted_kl_sum,
    token_kl,
    token_logprobs,
)

__version__ = "0.1.0"

# Public names that live in modules importing trl / transformers: loaded on first access.
_LAZY = {
    "exact_kl": "trl_rb.exact",
    "exact_kl_and_grad": "trl_rb.exact",
    "enumerate_completions": "trl_rb.exact",
    "completion_table": "trl_rb.exact",
    "CompletionTable": "trl_rb.exact",
    "count_completions": "trl_rb.exact",
    "RLOOConfig": "trl_rb.trainers.rloo",
    "RLOOTrainer": "trl_rb.trainers.rloo",
    "GRPOConfig": "trl_rb.trainers.grpo",
    "GRPOTrainer": "trl_rb.trainers.grpo",
    "DistillationConfig": "trl_rb.trainers.distillation",
    "DistillationTrainer": "trl_rb.trainers.distillation",
    "estimate_kl": "trl_rb.estimate.api",
    "EstimateResult": "trl_rb.estimate.api",
    "build_review_lm": "trl_rb.sentiment.review_lm",
    "load_review_lm": "trl_rb.sentiment.review_lm",
    "vader_reward": "trl_rb.sentiment.rewards",
    "classifier_reward": "trl_rb.sentiment.rewards",
    "review_prompts": "trl_rb.sentiment.review_lm",
    "review_lm_path": "trl_rb.sentiment.review_lm",
    "patch_trl": "trl_rb.trainers.patch",
    "unpatch_trl": "trl_rb.trainers.patch",
    "is_trl_patched": "trl_rb.trainers.patch",
}

__all__ = [
    "ESTIMATORS",
    "compute_kl",
    "kl_estimate",
    "kl_surrogate",
    "linear_kl_terms",
    "linear_logprob_kl",
    "linear_token_kl",
    "linear_weighted_kl_sum",
    "token_kl",
    "token_logprobs",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_rb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
