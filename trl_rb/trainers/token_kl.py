"""The exact per-token KL K_n inside the trainers, from recorded hidden states and the two LM heads.

K_n comes from ``trl_rb.kl`` (``linear_token_kl``, ``linear_weighted_kl_sum``) on the completion-aligned hidden
states of ``capture.ScoredCall`` and each model's head, gathered however the engine shards it
(``heads.gathered_heads``). Alignment: [B, C, ...] tensors are completion-aligned like trl's ``logits_to_keep``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..kl import linear_token_kl, linear_weighted_kl_sum
from .heads import ACTIVE_ADAPTER, HeadParams, gathered_heads, head_params

__all__ = [
    "k3_per_token",
    "logs_rb_metric",
    "policy_head",
    "reference_head",
    "token_kl_from_hidden",
    "trained_adapter",
    "weighted_kl_sum_from_hidden",
]


def _head_kwargs(policy_head: HeadParams, ref_head: HeadParams) -> dict[str, Any]:
    """The ``trl_rb.kl`` keyword arguments of the two heads (the reference's bias detached: it is a constant)."""
    return dict(
        bias_p=policy_head.bias,
        bias_q=None if ref_head.bias is None else ref_head.bias.detach(),
        logit_scale_p=policy_head.logit_scale,
        logit_scale_q=ref_head.logit_scale,
        softcap_p=policy_head.softcap,
        softcap_q=ref_head.softcap,
    )


def token_kl_from_hidden(
    policy_hidden: torch.Tensor,
    policy_head: HeadParams,
    ref_hidden: torch.Tensor,
    ref_head: HeadParams,
    *,
    temperature: float,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact per-token KL(p_n || q_n) [B, C] from the two models' completion hidden states and LM heads
    (``trl_rb.kl.linear_token_kl``).

    Args:
        policy_hidden: [B, C, H_p] policy hidden states, completion-aligned; gradients flow into them and into
            ``policy_head``'s weight (and bias).
        ref_hidden: [B, C, H_q] reference hidden states; the reference side is detached (it is a constant).
        temperature: the sampling temperature (trl's ``args.temperature``).
        mask: optional [B, C]; only positions where it is 1 are computed, the others are exactly 0.
        chunk_size: positions per chunk (default: ``linear_token_kl``'s).

    Returns:
        [B, C] float32 (float64 for float64 inputs).
    """
    keep = None if mask is None else mask.bool()
    hp, hq = (policy_hidden, ref_hidden) if keep is None else (policy_hidden[keep], ref_hidden[keep])
    with gathered_heads(policy_head, ref_head) as (policy_head, ref_head):
        k = linear_token_kl(
            hp,
            policy_head.weight,
            hq.detach(),
            ref_head.weight.detach(),
            temperature=temperature,
            chunk_size=chunk_size,
            **_head_kwargs(policy_head, ref_head),
        )
    if keep is None:
        return k
    # only real tokens are computed (padding costs nothing); padding is exactly 0
    return k.new_zeros(keep.shape).masked_scatter(keep, k)


def weighted_kl_sum_from_hidden(
    policy_hidden: torch.Tensor,
    policy_head: HeadParams,
    ref_hidden: torch.Tensor,
    ref_head: HeadParams,
    weights: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int | None = None,
    return_token_kl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sum_{b,n} weights[b, n] * KL(p_{b,n} || q_{b,n}): a scalar loss term with gradient through the policy only
    (``trl_rb.kl.linear_weighted_kl_sum``: the gradient is computed in the forward pass, the weights being known).

    Args:
        policy_hidden: [B, C, H_p] completion-aligned policy hidden states (gradients flow into them and into the
            policy head's weight and bias).
        ref_hidden: [B, C, H_q] reference hidden states (constant).
        weights: [B, C] constant weights, e.g. beta * mask / B; positions with weight 0 are skipped entirely (so
            padding costs nothing and its hidden states never matter).
        temperature: the sampling temperature.
        chunk_size: positions per chunk (default: ``linear_weighted_kl_sum``'s).
        return_token_kl: also return the per-token KL [B, C] (detached; 0 where the weight is 0) from the same pass.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), whose value and gradient equal those of
        ``(weights * token_kl_from_hidden(...)).sum()``; with ``return_token_kl``, the pair (sum, per-token KL).
    """
    with gathered_heads(policy_head, ref_head) as (policy_head, ref_head):
        return linear_weighted_kl_sum(
            policy_hidden,
            policy_head.weight,
            ref_hidden.detach(),
            ref_head.weight.detach(),
            weights,
            temperature=temperature,
            chunk_size=chunk_size,
            return_token_kl=return_token_kl,
            **_head_kwargs(policy_head, ref_head),
        )


def k3_per_token(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 term exp(-r) - 1 + r (>= 0) of per-token log ratios r = log p - log q, any shape."""
    return torch.expm1(-log_ratio) + log_ratio


def trained_adapter(trainer: Any) -> str | object:
    """The name of the adapter a PEFT policy trains (the active one: call it when the trainer is built, outside trl's
    reference forwards), or ``ACTIVE_ADAPTER`` for a model without PEFT."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(peft_model, "peft_config"):
        return ACTIVE_ADAPTER
    active = peft_model.active_adapter
    return active if isinstance(active, str) else active[0]


def policy_head(trainer: Any, model: Any) -> HeadParams:
    """The policy's LM head: under PEFT ``modules_to_save``, the trained adapter's copy (named explicitly: trl's
    reference forward switches adapters, and RLOO computes K_n inside it). ``model`` is the (possibly wrapped) policy
    trl passes to its scoring or loss call."""
    return head_params(model, adapter=trainer._rb_policy_adapter)


def reference_head(trainer: Any) -> HeadParams:
    """The reference's LM head, the one trl's reference forward uses: ``trainer.ref_model``'s; without one, the PEFT
    policy's head under trl's reference adapter: trl 1.16's frozen ``"ref"`` copy of a pretrained adapter when it
    added one, else adapters disabled (``use_adapter(model, "ref" if "ref" in model.peft_config else None)`` in its
    scoring). Under ``modules_to_save`` that is ``modules_to_save["ref"]`` or the original module; head_params
    refuses a LoRA'd head.

    The tensors are live parameters (a detached ZeRO-3 partition would stay empty when gathered); the KL functions
    here treat the reference side as a constant."""
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        return head_params(ref_model)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = "ref" if "ref" in getattr(peft_model, "peft_config", {}) else None
    return head_params(trainer.model, adapter=adapter)


def _check_fsdp_version(trainer: Any) -> None:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        # FSDP1 flattens parameters: outside a forward the head's weight is a view into this rank's flat shard.
        raise ValueError(
            "FSDP1 (fsdp_version=1) shards the LM head into flat parameters the exact KL cannot read outside the "
            "model's forward. Use FSDP2 (fsdp_config={'fsdp_version': 2}) or DeepSpeed ZeRO-3, or kl_estimator='k1' "
            "with rb_kl_metric=False."
        )


def logs_rb_metric(trainer: Any, estimator: str) -> bool:
    """Whether the trainer computes K_n and logs ``kl/rb`` (checked at construction, not at the first step).

    Only with ``beta != 0``: always for ``rb``, for ``k1`` / ``k3`` unless ``args.rb_kl_metric`` is False. Where the
    heads cannot give K_n, ``rb`` raises the heads' ValueError; ``k1`` / ``k3`` warn once and skip the metric.
    """
    required = estimator == "rb"
    if trainer.beta == 0.0 or not (required or getattr(trainer.args, "rb_kl_metric", True)):
        return False
    try:
        _check_fsdp_version(trainer)
        policy_head(trainer, trainer.model)
        reference_head(trainer)
    except ValueError as err:
        if required:
            raise
        warnings.warn(f"kl/rb will not be logged: {err}", stacklevel=3)
        return False
    return True
