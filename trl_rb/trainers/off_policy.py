"""Prefix importance weights of the RB terms on batches the current policy did not sample.

A batch is off-policy when it is trained on after an optimizer step (``num_iterations > 1``, ``steps_per_generation``
above the accumulation steps) or sampled by vLLM with trl's importance-sampling correction on. The RB terms then
weight each position's prefix by W_{<t} = p(y_<t) / p_sampler(y_<t) (``trl_rb.kl.prefix_importance_weights``),
truncated at ``args.rb_prefix_weight_cap`` as trl truncates its own importance ratios.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kl import prefix_importance_weights

__all__ = ["DEFAULT_PREFIX_WEIGHT_CAP", "PREFIX_WEIGHT_CAP_HELP", "check_prefix_weight_cap", "sampler_prefix_weights"]

DEFAULT_PREFIX_WEIGHT_CAP = 3.0
"""The default cap: trl's own default truncation of its vLLM importance ratios (``vllm_importance_sampling_clip_max``)."""

PREFIX_WEIGHT_CAP_HELP = (
    "Upper bound C on the prefix importance weights W_{<t} = p(y_<t) / p_sampler(y_<t) of the RB terms on batches the "
    "current policy did not sample (num_iterations > 1, steps_per_generation > accumulation steps, vLLM with the "
    "importance-sampling correction): min(W, C), truncated importance sampling as in trl's vLLM correction (same "
    "default, 3.0). Keeps the step finite and its variance bounded; biases it where the current policy makes a prefix "
    "more than C times as likely as the sampler did (those prefixes are under-weighted). With rb_gamma != 0 the "
    "control variate's whole-completion weight is truncated too, which breaks the cancellation of its two halves: "
    "a binding cap then biases more (measured under vLLM: 3.7e-2 relative at gamma = 5 beta vs 2.7e-3 at 0). None: "
    "no cap (unbiased; a weight beyond float range raises a ValueError)."
)


def check_prefix_weight_cap(cap: Any) -> None:
    """Raise a ValueError unless ``cap`` is None or a positive number."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ValueError(f"rb_prefix_weight_cap={cap!r}: use a positive number (default 3.0) or None for no cap.")


def sampler_prefix_weights(
    args: Any, logps: torch.Tensor, sampler_logps: torch.Tensor | None, mask: torch.Tensor, *, inclusive: bool = False
) -> torch.Tensor | None:
    """[B, C] prefix weights W_{<t} (constants) of a batch sampled by ``sampler_logps``' policy, or None on-policy;
    with ``inclusive``, W_{<=t} (the last column is then the whole completion's weight).

    Args:
        args: the trainer's config; ``rb_prefix_weight_cap`` is read from it (a plain trl config gets the default).
        logps: [B, C] the current policy's per-token log-probs of the completion (detached here).
        sampler_logps: [B, C] the sampling policy's, or None when the current policy sampled the batch.
        mask: [B, C] 1 = a token the sampler drew.

    Raises:
        ValueError: when a weight is not finite (only possible without a cap), naming the setting and the fix.
    """
    if sampler_logps is None:
        return None
    cap = getattr(args, "rb_prefix_weight_cap", DEFAULT_PREFIX_WEIGHT_CAP)
    weights = prefix_importance_weights(logps.detach() - sampler_logps, mask, cap=cap, inclusive=inclusive)
    if not torch.isfinite(weights).all():
        largest = (logps.detach() - sampler_logps).masked_fill(~mask.bool(), 0).nan_to_num(0.0).cumsum(-1).max()
        raise ValueError(
            f"A prefix importance weight p(y_<t) / p_sampler(y_<t) of the RB terms overflowed (log weight up to "
            f"{largest.item():.1f}) with rb_prefix_weight_cap=None: the batch is too far off-policy for an uncapped "
            "weight. Set rb_prefix_weight_cap (e.g. 3.0, truncated importance sampling) or fewer num_iterations."
        )
    return weights
