"""Hidden-state capture of trl's own scoring forwards: ``HiddenCaptureMixin`` and the ``ScoredCall`` it records.

trl's RLOO and GRPO trainers score completions and compute their loss through one method,
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)``, whose forward runs
trl's fused LM head (per-token log-probs, no [B, T, V] logits). ``HiddenCaptureMixin`` wraps that method: while a
recording is open (``with self._rb_recording() as calls``), every call also records the backbone's last hidden
states of the completion positions (a forward hook, so no extra forward pass) in a ``ScoredCall``; a subclass may
rewrite the returned log-probs in ``_rb_transform_call``.

Alignment: every [B, C, ...] tensor here is completion-aligned like trl's ``logits_to_keep``: position i belongs to
completion token i (for hidden states, the hidden state just *before* token i, which predicts it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .heads import capture_last_hidden, completion_hidden, positions_from_attention_mask

__all__ = ["REF_HIDDEN_KEY", "HiddenCaptureMixin", "ScoredCall"]

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
