"""KL estimators between two causal language models: pure torch, no trl, no transformers.

Alignment convention for every function here: ``logits[b, t]`` is the next-token distribution that ``tokens[b, t]``
was drawn from (completion-aligned, as trl's ``logits_to_keep``: the logits at the position *before* each token).
``mask[b, t]`` is 1 for real completion tokens (EOS included) and 0 for padding.

Notation (see docs/estimators.md): ``p`` the policy, ``q`` the reference, both as sampling distributions
(``softmax(logits / temperature)``); ``r_n = log p_n(y_n) - log q_n(y_n)``;
``K_n = KL(p_n || q_n)`` the exact KL of the two next-token distributions.

Numerics: every function computes in float32 (float64 when given float64), whatever the input dtype, with
logsumexp rather than softmax-then-log, and works through the positions in chunks so that the memory it takes
beyond its inputs and output is bounded by the chunk, not by the number of positions.

Modules (every public name below is importable from ``trl_rb.kl`` itself):

- ``estimators``: the estimator names and their aliases (``ESTIMATORS``, ``canonical_estimator``).
- ``checks``: input checks, compute dtype and chunk sizing shared by the kernels; ``check_temperature`` is public
  (``trl_rb.exact`` uses it).
- ``logits``: K_n from two logits tensors [..., V] (``token_kl``), the research code's API (``compute_kl``) and its
  formula (``research_token_kl``).
- ``linear``: K_n from last hidden states [..., H] and LM-head weights [V, H], never holding [N, V] logits
  (``linear_token_kl``, ``linear_weighted_kl_sum``, ``linear_kl_terms``).
- ``fused_logprob``: the policy's log-probs, entropy and K_n from one pass over both heads (``linear_logprob_kl``).
- ``sequence``: per-sequence estimators and gradient surrogates from [B, T, V] logits (``token_logprobs``,
  ``sequence_kl_terms``, ``kl_estimate``, ``kl_surrogate``, ``future_sum``, ``prefix_importance_weights``).
- ``_head``: the LM-head chunk machinery ``linear`` and ``fused_logprob`` share (private).

``__all__`` is the API ``trl_rb`` re-exports at its top level; ``research_token_kl`` and ``prefix_importance_weights``
are importable from here too, without being in it.
"""

from __future__ import annotations

from .checks import _CHUNK_ELEMENTS as _CHUNK_ELEMENTS
from .checks import _LINEAR_CHUNK_ELEMENTS as _LINEAR_CHUNK_ELEMENTS
from .checks import _LINEAR_CHUNK_ROWS as _LINEAR_CHUNK_ROWS
from .checks import check_temperature
from .estimators import ESTIMATORS, canonical_estimator
from .fused_logprob import linear_logprob_kl
from .linear import linear_kl_terms, linear_token_kl, linear_weighted_kl_sum
from .logits import compute_kl, token_kl
from .logits import research_token_kl as research_token_kl
from .sequence import future_sum, kl_estimate, kl_surrogate, sequence_kl_terms, token_logprobs
from .sequence import prefix_importance_weights as prefix_importance_weights

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
]

# The former kl.py's private name for checks.check_temperature, for code that imported it from here (the chunk
# budgets above likewise: benchmarks/bench_head_kl.py reads _LINEAR_CHUNK_ROWS). Not part of the API.
_check_temperature = check_temperature
del check_temperature
