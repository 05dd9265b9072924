"""trl-rb: Rao-Blackwellized KL estimators for language models, in trl's RLOO, GRPO and distillation trainers.

The top level holds what a user of the trainers and kernels needs: the trainers and their configs, ``patch_trl``,
every public name of the estimator math ``trl_rb.kl`` (imports only torch) and ``estimate_kl``. The trainers and
tools import trl and transformers lazily, on first access, so ``import trl_rb`` stays light. The enumeration oracle
is imported from ``trl_rb.exact``; the experiments live in the separate ``trl_rb_experiments`` package.
"""

from __future__ import annotations

import importlib
from typing import Any

from .kl import (
    ESTIMATORS,
    canonical_estimator,
    compute_kl,
    future_sum,
    kl_estimate,
    kl_surrogate,
    linear_kl_terms,
    linear_logprob_kl,
    linear_token_kl,
    linear_weighted_kl_sum,
    sequence_kl_terms,
    token_kl,
    token_logprobs,
)

__version__ = "0.1.0"

# Public names that live in modules importing trl / transformers: loaded on first access.
_LAZY = {
    "RLOOConfig": "trl_rb.trainers.rloo",
    "RLOOTrainer": "trl_rb.trainers.rloo",
    "GRPOConfig": "trl_rb.trainers.grpo",
    "GRPOTrainer": "trl_rb.trainers.grpo",
    "DistillationConfig": "trl_rb.trainers.distillation",
    "DistillationTrainer": "trl_rb.trainers.distillation",
    "patch_trl": "trl_rb.trainers.patch",
    "unpatch_trl": "trl_rb.trainers.patch",
    "is_trl_patched": "trl_rb.trainers.patch",
    "estimate_kl": "trl_rb.estimate.api",
    "EstimateResult": "trl_rb.estimate.api",
}

# trl_rb.kl's public names (its __all__), then the lazy ones.
__all__ = [
    "ESTIMATORS",
    "canonical_estimator",
    "compute_kl",
    "future_sum",
    "kl_estimate",
    "kl_surrogate",
    "linear_kl_terms",
    "linear_logprob_kl",
    "linear_token_kl",
    "linear_weighted_kl_sum",
    "sequence_kl_terms",
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
