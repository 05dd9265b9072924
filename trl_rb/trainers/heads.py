"""What the RB KL needs from a causal LM inside trl's trainers: its LM head and its last hidden states.

trl 1.16 patches the policy and the reference with a fused LM head (``add_fused_lm_head``): their forward returns
per-token log-probs and never materializes [B, T, V] logits. The exact per-position KL is computed instead from
the last hidden states (caught by a forward hook on the backbone during trl's own forward, so no extra forward
pass) and the LM-head weights, with ``trl_rb.kl.linear_token_kl``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ACTIVE_ADAPTER",
    "HeadParams",
    "capture_last_hidden",
    "completion_hidden",
    "gathered_heads",
    "head_params",
    "positions_from_attention_mask",
    "unwrap_causal_lm",
    "vocab_size",
]


ACTIVE_ADAPTER = object()
"""``head_params``'s default ``adapter``: the head module as PEFT resolves it at the time of the call."""


@dataclass
class HeadParams:
    """The LM head of a causal LM as the sampler sees it: logits = softcap((h @ weight.T + bias) * logit_scale).

    The scale is applied before the soft-cap, as in trl's fused head and the models' own forwards.

    Attributes:
        weight: [V, H] LM-head weight (a live parameter: gradients flow into it).
        bias: [V] or None.
        logit_scale: multiplier applied to the raw logits (1.0 for most models).
        softcap: ``final_logit_softcapping`` (Gemma-2 style ``cap * tanh(z / cap)``), or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / accelerate wrappers (the one trl patches with its fused head)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engines
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return model


def vocab_size(model: nn.Module) -> int:
    """The number of rows of the model's LM head (PEFT- or accelerate-wrapped models are unwrapped)."""
    weight = unwrap_causal_lm(model).get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps a partitioned parameter's shape there


def _logit_scale(text_config) -> float:
    # The same config fields trl's fused head reads, so the KL uses the logits the completions were sampled from.
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def _adapter_view(head: nn.Module, adapter: str | None | object) -> nn.Module:
    """The module that computes the logits under ``adapter`` (see ``head_params``), for a PEFT ``modules_to_save``
    wrapper; any other head as it is."""
    # The wrapper resolves attribute access by the adapter state at the time of access (trl's reference forward
    # disables adapters or switches to its "ref" adapter), so the module is named explicitly.
    if adapter is ACTIVE_ADAPTER or not hasattr(head, "original_module"):
        return head
    copies = getattr(head, "modules_to_save", None)
    if adapter is not None and copies is not None and adapter in copies:
        return copies[adapter]
    return head.original_module  # adapters disabled, or an adapter that does not wrap the head


def head_params(model: nn.Module, *, adapter: str | None | object = ACTIVE_ADAPTER) -> HeadParams:
    """The LM head of ``model`` (PEFT- or accelerate-wrapped models are unwrapped).

    The tensors are the live parameters, possibly ZeRO-3 partitioned or FSDP2 DTensor shards: read them inside
    ``gathered_heads``. ``adapter`` says which head of a PEFT model with ``modules_to_save`` covering the head: a name
    (the head as that adapter sees it: its trained copy, or the original where the adapter does not wrap the head),
    ``None`` (adapters disabled: the original), or ``ACTIVE_ADAPTER`` (whatever the wrapper resolves to now; the
    right choice only outside trl's reference forwards, and for models without PEFT).

    Raises:
        ValueError: when the model has no linear output embedding (e.g. a tied head that is not an ``nn.Linear``-like
            module with a ``weight`` of shape [V, H]) or the head carries an adapter the KL would not see.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    # A LoRA adapter on the LM head changes the logits without changing `weight`: refuse rather than be silently wrong.
    if hasattr(head, "lora_A") and len(getattr(head, "lora_A", {})) > 0:
        raise ValueError(
            "The LM head carries a LoRA adapter; the RB KL reads the head's base weight only. Leave lm_head out of "
            "the LoRA target_modules (modules_to_save=['lm_head'] is supported), or use kl_estimator='k1'."
        )
    if hasattr(head, "token_adapter"):
        raise ValueError(
            "The LM head carries PEFT trainable tokens (trainable_token_indices); the RB KL reads the head's weight "
            "only. Leave the head out of trainable_token_indices, or use kl_estimator='k1'."
        )
    if head is not None:
        head = _adapter_view(head, adapter)
    weight = getattr(head, "weight", None)
    # ZeRO-3 partitions a parameter to an empty tensor and keeps its shape in `ds_shape`.
    shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
    if weight is None or len(shape) != 2:
        raise ValueError(
            f"{type(lm).__name__} has no linear LM head (get_output_embeddings() returned {type(head).__name__}); the "
            "RB KL needs one to compute next-token distributions from hidden states. Use kl_estimator='k1'."
        )
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return HeadParams(
        weight=weight,
        bias=getattr(head, "bias", None),
        logit_scale=_logit_scale(config),
        softcap=getattr(config, "final_logit_softcapping", None),
    )


def _whole(head: HeadParams) -> HeadParams:
    """FSDP2 DTensor shards -> one full tensor, differentiable: the gradient returns to the shards averaged over the
    mesh, as FSDP2 averages the gradients it reduces itself.

    ``full_tensor()``'s default backward takes each rank's gradient as already replicated and keeps only its own
    slice, so ranks that scored different batches would each keep their local gradient (measured: a silently wrong
    head gradient, tests/engines/test_fsdp2.py). Declaring it ``Partial("avg")`` makes the backward a reduce-scatter; ranks
    that scored the same batch (tensor parallelism) average equal values, which changes nothing.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        if not isinstance(t, DTensor):
            return t
        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)

    return HeadParams(weight=full(head.weight), bias=full(head.bias), logit_scale=head.logit_scale, softcap=head.softcap)


@contextmanager
def gathered_heads(*heads: HeadParams) -> Iterator[tuple[HeadParams, ...]]:
    """The heads with whole tensors for the duration of the block, however the engine shards them.

    DeepSpeed ZeRO-3: the partitioned weight and bias are all-gathered (trl's ``maybe_gather_lm_head_ctx``, which skips
    parameters already available and de-duplicates shared ones) and re-partitioned on exit, so compute that reads them
    (its gradients included, as ``linear_weighted_kl_sum`` does) must happen inside the block; ZeRO-3's hooks reduce
    the head's gradient when autograd delivers it. FSDP2: DTensor shards are made whole with ``full_tensor()``. Plain
    and DDP parameters are yielded as they are. Every process must enter the block (it is collective).
    """
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    params = [t for h in heads for t in (h.weight, h.bias) if t is not None]
    with maybe_gather_lm_head_ctx(*params):
        yield tuple(_whole(h) for h in heads)


def _backbone(lm: nn.Module) -> nn.Module:
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        get_decoder = getattr(lm, "get_decoder", None)
        backbone = get_decoder() if callable(get_decoder) else None
    if backbone is None or backbone is lm:
        raise ValueError(f"Cannot find the backbone of {type(lm).__name__} to read its last hidden states.")
    return backbone


@contextmanager
def capture_last_hidden(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the backbone's last hidden state [b, L, H] of every forward of ``model`` run inside the block.

    The list yielded fills with one tensor per forward call, in call order (trl scores in mini-batches). The tensors
    keep their autograd graph when the forward runs with gradients enabled.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(hidden)

    handle = _backbone(unwrap_causal_lm(model)).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def positions_from_attention_mask(model: nn.Module) -> Iterator[None]:
    """Inside the block, a backbone forward given an ``attention_mask`` but no ``position_ids`` gets the positions
    generation uses, ``cumsum(attention_mask) - 1``, instead of 0..L-1 counted over the left padding.

    trl 1.16 scores completions without position ids. For models with absolute position embeddings (GPT-2) that
    shifts every left-padded row: the log-probs, and the exact KL, would be those of a distribution other than the
    one the completions were sampled from (measured: the mean GRPO KL gradient 0.67 cosine to the truth with two
    prompt lengths, tests/trainers/test_grpo_unbiased.py). Rotary models are invariant to the shift and multimodal models
    compute their own (e.g. 3-D) positions: for those, and for backbones without a ``position_ids`` argument, the
    block changes nothing.
    """
    lm = unwrap_causal_lm(model)
    backbone = _backbone(lm)
    if not _absolute_positions(lm, backbone):
        yield
        return

    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _absolute_positions(lm: nn.Module, backbone: nn.Module) -> bool:
    """Whether the text-only model embeds absolute positions (GPT-2 style) and takes ``position_ids``."""
    config = lm.config
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        return False  # multimodal: positions are the model's own business
    if hasattr(backbone, "rotary_emb") or any(
        getattr(config, name, None) is not None for name in ("rope_theta", "rope_parameters", "rope_scaling")
    ):
        return False
    return "position_ids" in inspect.signature(backbone.forward).parameters


def completion_hidden(hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Hidden states [B, L, H] of prompt + completion -> the [B, C, H] that predict the C completion tokens.

    Position i of the result is the hidden state just before completion token i (the same alignment as the logits
    of ``logits_to_keep`` in trl), so ``linear_token_kl`` of it is completion-aligned.
    """
    return hidden[:, -logits_to_keep - 1 : -1]
