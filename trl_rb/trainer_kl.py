"""The RB-KL machinery shared by trl_rb's trainers (RLOO, GRPO): capture, exact per-token KL, metrics, reference.

trl's RLOO and GRPO trainers score completions and compute their loss through one method,
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)``, whose forward runs
trl's fused LM head (per-token log-probs, no [B, T, V] logits). ``HiddenCaptureMixin`` wraps that method: while a
recording is open (``with self._rb_recording() as calls``), every call also records the backbone's last hidden
states of the completion positions (a forward hook, so no extra forward pass) in a ``ScoredCall``; a subclass may
rewrite the returned log-probs in ``_rb_transform_call``. The exact per-token KL K_n then comes from those hidden
states and each model's LM head through ``trl_rb.kl`` (``linear_token_kl``, ``linear_weighted_kl_sum``).

Alignment: every [B, C, ...] tensor here is completion-aligned like trl's ``logits_to_keep``: position i belongs to
completion token i (for hidden states, the hidden state just *before* token i, which predicts it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .kl import linear_token_kl, linear_weighted_kl_sum
from .lm_head import (
    HeadParams,
    capture_last_hidden,
    completion_hidden,
    gathered_heads,
    head_params,
    positions_from_attention_mask,
    unwrap_causal_lm,
    vocab_size,
)
from .sampling_check import check_rb_sampling

__all__ = [
    "REF_HIDDEN_KEY",
    "HiddenCaptureMixin",
    "ScoredCall",
    "check_rb_sampling",
    "k3_per_token",
    "load_reference_model",
    "log_sequence_metrics",
    "masked_sequence_sum",
    "prepare_reference_model",
    "rb_heads_available",
    "trl_without_reference",
    "reference_head",
    "token_kl_from_hidden",
    "weighted_kl_sum_from_hidden",
]

# Key of the reference's completion hidden states [B, C, H_ref] (detached) in the dict that
# `_generate_and_score_completions` returns; trl shuffles and splits it along dim 0 with every other tensor.
REF_HIDDEN_KEY = "rb_ref_completion_hidden"


@dataclass
class ScoredCall:
    """One call of ``_get_per_token_logps_and_entropies`` seen while a recording was open.

    Attributes:
        index: position of the call within the recording (0 = first).
        model: the model argument trl passed (the policy, possibly wrapped, or the reference model).
        hidden: [B, C, H] last hidden states predicting the C completion tokens (keeps its autograd graph when the
            forward ran with gradients).
        completion_mask: [B, C] the attention mask of the completion positions (1 = real token, 0 = padding).
        logps: [B, C] the per-token log-probs trl's fused head returned (as returned, before any rewrite).
        args: the positional arguments after ``model`` (input ids, attention mask, logits_to_keep, ...) and
        kwargs: the keyword arguments (batch size, multimodal inputs, ...), as trl passed them, so that the same
            inputs can be scored by another model.
    """

    index: int
    model: nn.Module
    hidden: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class HiddenCaptureMixin:
    """Mixin for trl's RLOO / GRPO trainers: records completion hidden states of trl's own scoring forwards.

    Put it before the trl trainer in the bases: ``class MyTrainer(HiddenCaptureMixin, trl.RLOOTrainer)``.
    Outside ``_rb_recording()`` the wrapped method is exactly trl's.
    """

    _rb_calls: list[ScoredCall] | None = None

    @contextmanager
    def _rb_recording(self) -> Iterator[list[ScoredCall]]:
        """Record every ``_get_per_token_logps_and_entropies`` call made inside the block, in call order."""
        if self._rb_calls is not None:
            raise RuntimeError("A hidden-state recording is already open; recordings do not nest.")
        calls: list[ScoredCall] = []
        self._rb_calls = calls
        try:
            yield calls
        finally:
            self._rb_calls = None

    def _rb_transform_call(self, call: ScoredCall, logps: torch.Tensor) -> torch.Tensor:
        """Hook: the per-token log-probs [B, C] trl receives from a recorded call. Default: unchanged."""
        return logps

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        # Scored at the positions generation sampled at (trl 1.16 passes none: wrong for left-padded GPT-2 rows).
        with positions_from_attention_mask(model):
            return self._scored_call(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    def _scored_call(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._rb_calls is None:
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with capture_last_hidden(model) as captured:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if not captured:
            raise RuntimeError(f"No hidden states were captured from {type(model).__name__}'s forward.")
        call = ScoredCall(
            index=len(self._rb_calls),
            model=model,
            # slice before concatenating: the result does not keep the prompts' hidden states alive
            hidden=torch.cat([completion_hidden(h, logits_to_keep) for h in captured], dim=0),
            completion_mask=attention_mask[:, -logits_to_keep:],
            logps=logps,
            args=(input_ids, attention_mask, logits_to_keep, *args),
            kwargs=kwargs,
        )
        self._rb_calls.append(call)
        return self._rb_transform_call(call, logps), entropies, aux


def _head_kwargs(policy_head: HeadParams, ref_head: HeadParams) -> dict[str, Any]:
    """The kl.py keyword arguments of the two heads (the reference's bias detached: it is a constant)."""
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


def masked_sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_n per_token[b, n] over real tokens: [B, C], [B, C] -> [B] (padding contributes exactly 0)."""
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask.bool(), per_token, zero).sum(-1)


def log_sequence_metrics(trainer: Any, mode: str, values: dict[str, torch.Tensor]) -> None:
    """Append the across-process mean of each per-sequence value [B] to ``trainer._metrics[mode][name]``.

    Every process must call this with the same names in the same order (it gathers).
    """
    names = sorted(values)
    local = torch.stack([values[n].detach().float() for n in names], dim=1)  # [B, M]
    gathered = trainer.accelerator.gather(local)  # [B * processes, M]
    means = gathered.mean(dim=0).tolist()
    for name, mean in zip(names, means, strict=True):
        trainer._metrics[mode][name].append(mean)


def reference_head(trainer: Any) -> HeadParams:
    """The reference's LM head: ``trainer.ref_model``'s, or, without one (PEFT policy, adapters disabled), the policy
    model's base head: the original under a ``modules_to_save`` copy (head_params refuses a LoRA'd head).

    The tensors are live parameters (a detached ZeRO-3 partition would stay empty when gathered); the KL functions
    here treat the reference side as a constant."""
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        return head_params(ref_model)
    return head_params(trainer.model, base=True)


def _check_fsdp_version(trainer: Any) -> None:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        # FSDP1 flattens parameters: outside a forward the head's weight is a view into this rank's flat shard.
        raise ValueError(
            "FSDP1 (fsdp_version=1) shards the LM head into flat parameters the exact KL cannot read outside the "
            "model's forward. Use FSDP2 (fsdp_config={'fsdp_version': 2}) or DeepSpeed ZeRO-3, or kl_estimator='k1' "
            "with rb_kl_metric=False."
        )


def rb_heads_available(trainer: Any, *, required: bool) -> bool:
    """Whether both LM heads can give the exact per-token KL (checked at construction, not at the first step).

    Raises the heads' ValueError when ``required`` (``rb``); otherwise warns once and returns False, so a ``k1`` /
    ``k3`` run skips the ``kl/rb`` metric instead of failing.
    """
    try:
        _check_fsdp_version(trainer)
        head_params(trainer.model)
        reference_head(trainer)
    except ValueError as err:
        if required:
            raise
        warnings.warn(f"kl/rb will not be logged: {err}", stacklevel=3)
        return False
    return True


def load_reference_model(
    ref_model: str | nn.Module,
    *,
    policy: nn.Module,
    args: Any,
    processing_class: Any = None,
    quantization_config: Any = None,
) -> nn.Module:
    """A user-chosen reference model: loaded from a path as trl loads its own reference, or taken as given.

    From a path, the ``from_pretrained`` keyword arguments are built as trl 1.16 builds its reference's:
    ``args.model_init_kwargs``, the trainer's ``quantization_config``, ``device_map=None`` under multi-GPU or
    DeepSpeed runs (``"auto"`` fails there), ``trust_remote_code`` from ``args``, and the policy's dtype and attention
    implementation unless given. Under ZeRO-3 the load is partitioned (transformers' zero.Init, as for trl's).
    The reference must share the policy's vocabulary: the same LM-head size, and, when ``ref_model`` is a path that
    holds a tokenizer, the same token -> id map as ``processing_class``.

    Args:
        ref_model: a path (or hub id) or a ``PreTrainedModel``.
        policy: the policy model (possibly PEFT-wrapped).
        args: the trainer's config.
        processing_class: the trainer's tokenizer (or processor).
        quantization_config: the trainer's ``quantization_config`` argument (applied to the reference too, as trl
            does for its own).

    Raises:
        ValueError: vocabularies differ, or ``quantization_config`` is given twice; TypeError: ``ref_model`` is
        neither a string nor a module.
    """
    from trl.trainer.utils import create_model_from_path

    if isinstance(ref_model, str):
        path = ref_model
        ref_model = create_model_from_path(path, **_reference_init_kwargs(args, policy, quantization_config))
        _check_tokenizer(path, processing_class)
    elif not isinstance(ref_model, nn.Module):
        raise TypeError(f"ref_model must be a path string or a model, got {type(ref_model).__name__}.")
    if vocab_size(ref_model) != vocab_size(policy):
        raise ValueError(
            f"ref_model has a vocabulary of {vocab_size(ref_model)} tokens but the policy has {vocab_size(policy)}; "
            "the KL between two models needs one shared tokenizer and vocabulary. Pick a reference trained with the "
            "policy's tokenizer."
        )
    return ref_model


def _reference_init_kwargs(args: Any, policy: nn.Module, quantization_config: Any) -> dict[str, Any]:
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "quantization_config was given both as a trainer argument and in args.model_init_kwargs; set it in one "
                "place."
            )
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails in distributed runs
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    base = unwrap_causal_lm(policy)
    kwargs.setdefault("dtype", base.dtype)
    kwargs.setdefault("attn_implementation", base.config._attn_implementation)
    return kwargs


def _check_tokenizer(path: str, processing_class: Any) -> None:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return
    try:
        from transformers import AutoTokenizer

        ref_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return  # no tokenizer saved with the reference: the vocabulary-size check is all we can do
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The tokenizer saved with ref_model {path!r} differs from the trainer's (token -> id maps differ); the KL "
            "between two models needs one shared tokenizer and vocabulary."
        )


@contextmanager
def trl_without_reference(args: Any) -> Iterator[None]:
    """Inside the block ``args.beta`` reads 0, so a trl trainer's ``__init__`` builds no reference of its own.

    With an explicit ``ref_model=`` trl's copy of the starting model would be wasted memory, and for a policy passed
    as an in-memory model trl cannot build it at all (it reloads from the policy's path). The caller sets
    ``self.beta`` and installs its reference (``prepare_reference_model``) after the block.
    """
    beta, args.beta = args.beta, 0.0
    try:
        yield
    finally:
        args.beta = beta


def _cast_head_to_fp32(model: nn.Module) -> None:
    """The LM head's parameters in float32, as trl's ``cast_lm_head_to_fp32`` leaves its own reference; a tied input
    embedding (now float32 too) keeps returning the model's dtype."""
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    head.float()
    tied = model.get_input_embeddings()
    if tied is not None and tied.weight is head.weight and dtype != torch.float32:
        tied.register_forward_hook(lambda _module, _args, output: output.to(dtype))


def prepare_reference_model(trainer: Any, ref_model: nn.Module) -> nn.Module:
    """Make ``ref_model`` a reference like trl makes its own: dropout off (if ``args.disable_dropout``), the LM head in
    float32 (if ``args.cast_lm_head_to_fp32``), trl's fused LM head at the trainer's temperature, no gradients, and
    prepared by accelerate (DeepSpeed / FSDP / plain)."""
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    if trainer.args.disable_dropout:
        disable_dropout_in_model(ref_model)
    cast = getattr(trainer.args, "cast_lm_head_to_fp32", False)  # a GRPOConfig field; RLOOConfig has none
    if cast:
        _cast_head_to_fp32(ref_model)
    # Patching twice is harmless: the outermost fused forward calls the backbone directly, at this temperature.
    add_fused_lm_head(ref_model, temperature=trainer.temperature, cast_lm_head_to_fp32=cast)
    ref_model.requires_grad_(False)
    ref_model.eval()
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)
