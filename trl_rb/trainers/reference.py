"""A user-chosen reference model (``ref_model=``), loaded and prepared as trl loads and prepares its own."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .heads import unwrap_causal_lm, vocab_size

__all__ = ["args_for_trl", "load_reference_model", "prepare_reference_model"]


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


def args_for_trl(args: Any, estimator: str, *, beta: float | None = None) -> Any:
    """The config a trl trainer's ``__init__`` gets: ``args`` itself, or a shallow copy where trl must see other
    values than the user's (the user's object is never modified).

    - ``beta``: 0.0 when trl_rb installs its own reference (``ref_model=``): trl then builds no copy of the starting
      model (wasted memory, and impossible for a policy passed in memory); the caller sets the real beta on the
      trainer and its ``args`` after ``__init__``.
    - ``use_bias_correction_kl`` (GRPO): False unless ``estimator == "k3"``: a plain ``trl.GRPOConfig`` has trl's
      default True, which would multiply trl's k3 term by the importance ratio; ``k1`` and ``rb`` take trl's k3 term
      back out of the loss and need it unmultiplied.
    """
    if args is None:  # trl builds its default config
        return args
    changes: dict[str, Any] = {}
    if beta is not None and args.beta != beta:
        changes["beta"] = beta
    if estimator != "k3" and getattr(args, "use_bias_correction_kl", False):
        changes["use_bias_correction_kl"] = False
    if not changes:
        return args
    trl_args = copy.copy(args)
    for name, value in changes.items():
        setattr(trl_args, name, value)
    return trl_args


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
