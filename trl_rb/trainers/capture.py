"""Hidden-state capture of trl's own scoring forwards: ``HiddenCaptureMixin`` and the ``ScoredCall`` it records.

trl's RLOO and GRPO trainers score completions and compute their loss through one method,
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)``, whose forward runs
trl's fused LM head (per-token log-probs, no [B, T, V] logits). ``HiddenCaptureMixin`` wraps that method: while a
recording is open (``with self._rb_recording() as recording``), every call also records the backbone's last hidden
states of the completion positions (a forward hook, so no extra forward pass) in a ``ScoredCall``, and the
recording's ``rewrite`` (if any) may replace the log-probs trl receives. ``GenerationPositionsMixin`` (below it in
the bases) scores every call at generation's position ids.

Alignment: every [B, C, ...] tensor here is completion-aligned like trl's ``logits_to_keep``: position i belongs to
completion token i (for hidden states, the hidden state just *before* token i, which predicts it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .heads import capture_last_hidden, completion_hidden, positions_from_attention_mask

__all__ = ["REF_HIDDEN_KEY", "GenerationPositionsMixin", "HiddenCaptureMixin", "Recording", "ScoredCall"]

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


@dataclass
class Recording:
    """One open recording: the calls seen so far and what the trainer's hooks collect for the block that opened it.

    Attributes:
        calls: every ``ScoredCall`` of the block, in call order.
        rewrite: called as ``rewrite(call, logps)`` for each call; its return value is what trl receives instead of
            the log-probs (None: trl gets its own log-probs unchanged).
        notes: what other overridden trl methods report while the block runs (e.g. RLOO's ``_calculate_rewards``),
            read by the block after trl returns.
    """

    calls: list[ScoredCall] = field(default_factory=list)
    rewrite: Callable[[ScoredCall, torch.Tensor], torch.Tensor] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class GenerationPositionsMixin:
    """Scores every sequence at the position ids generation sampled it at: ``cumsum(attention_mask) - 1``.

    trl 1.16 calls the model without position ids, which shifts left-padded rows of absolute-position models (GPT-2)
    to other positions than generation used; rotary and multimodal models are unaffected. Overrides trl's
    ``_get_per_token_logps_and_entropies`` (every scoring and loss forward goes through it).
    """

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        with positions_from_attention_mask(model):
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )


class HiddenCaptureMixin:
    """Mixin for trl's RLOO / GRPO trainers: records completion hidden states of trl's own scoring forwards.

    Put it before the trl trainer in the bases: ``class MyTrainer(HiddenCaptureMixin, trl.RLOOTrainer)``. The only
    state it keeps is the open ``Recording`` (one object, opened and closed by ``_rb_recording``); outside a recording
    the wrapped method is exactly trl's.
    """

    _rb_open: Recording | None = None

    @contextmanager
    def _rb_recording(
        self, rewrite: Callable[[ScoredCall, torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[Recording]:
        """Record every ``_get_per_token_logps_and_entropies`` call made inside the block, in call order; ``rewrite``
        (if given) replaces the log-probs trl receives from each call."""
        if self._rb_open is not None:
            raise RuntimeError("A hidden-state recording is already open; recordings do not nest.")
        recording = Recording(rewrite=rewrite)
        self._rb_open = recording
        try:
            yield recording
        finally:
            self._rb_open = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        recording = self._rb_open
        if recording is None:
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
            index=len(recording.calls),
            model=model,
            # slice before concatenating: the result does not keep the prompts' hidden states alive
            hidden=torch.cat([completion_hidden(h, logits_to_keep) for h in captured], dim=0),
            completion_mask=attention_mask[:, -logits_to_keep:],
            logps=logps,
            args=(input_ids, attention_mask, logits_to_keep, *args),
            kwargs=kwargs,
        )
        recording.calls.append(call)
        if recording.rewrite is not None:
            logps = recording.rewrite(call, logps)
        return logps, entropies, aux
