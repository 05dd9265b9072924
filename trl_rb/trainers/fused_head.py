"""The rb loss's policy head: log-probs, entropy and K_n from one fused LM-head op inside trl's own loss forward.

trl's loss forward gets the policy's per-token log-probs from its fused LM head: ``trl.trainer.utils`` calls
``_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
outputs)`` (one product forward, three backward). The rb loss also needs K_n at the same positions; computed
afterwards from the recorded hidden states (``weighted_kl_sum_from_hidden``) that is four more [N, H] x [H, V]
products. ``fused_loss_head`` swaps trl's function, for the one loss forward, for ``trl_rb.kl.linear_logprob_kl``,
which returns the log-probs, the entropy and K_n from the same tiles and one shared backward: two more products
(the reference's logits, forward and recomputed), the policy's logits and both gradient products being shared.

The policy's head product runs in the dtype trl's own would (the autocast dtype, else the hidden states'), so the
log-probs are trl's up to summation order, and K_n is computed from those same logits (the reference's in its
weight's dtype, as in ``token_kl``). Where the heads are sharded the fused head is not used: under ZeRO-3 the head
would have to be gathered again inside the backward, and under FSDP2 trl makes DTensor heads whole with a plain
``full_tensor()``, whose gradient the K_n term must not inherit (see ``heads._whole``). There, and for a trl call
asking for other outputs, the trainer computes K_n after trl's forward as before; both paths give the same loss
and gradient (tests/trainers/test_fused_head_trainers.py; tests/kernels/test_fused_head.py under autocast, up to the
rounding of the policy's logits to its dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..kl import linear_logprob_kl
from .capture import REF_HIDDEN_KEY
from .heads import HeadParams
from .token_kl import policy_head, reference_head

__all__ = ["FusedLossHead", "fused_loss_head", "head_is_fusable", "loss_head_for", "weighted_sum"]

_SUPPORTED_OUTPUTS = {"log_probs", "entropy"}


def _is_whole_tensor(t: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return t is None or not (hasattr(t, "ds_id") or isinstance(t, DTensor))  # ZeRO-3 partition / FSDP2 shard


def head_is_fusable(*heads: HeadParams) -> bool:
    """Whether every head's weight and bias are whole, unsharded tensors (plain, DDP, ZeRO-1/2)."""
    return all(_is_whole_tensor(t) for h in heads for t in (h.weight, h.bias))


@dataclass
class FusedLossHead:
    """The batch one loss forward scores, and what the fused head computed for it.

    Attributes:
        completion_ids: [B, C] the completion tokens (trl scores prompt + completion, ``logits_to_keep = C``).
        completion_mask: [B, C] 1 for the real completion tokens trl scores (its labels that are not -100).
        ref_hidden: [B, C, H_q] the reference's completion hidden states (constant), completion-aligned.
        ref_head: the reference's LM head (whole tensors, see ``head_is_fusable``).
        token_kl: [B, C] K_n with its gradient to the policy, 0 on padding; None until a fused call ran (and when trl's
            call could not be fused: the caller then computes K_n itself).
        calls: how many times trl's loss forward called the head (one is expected).
        trl_function: trl's ``_ChunkedLogProbFunction`` while the head is installed (non-fusable calls go to it).
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    ref_hidden: torch.Tensor
    ref_head: HeadParams
    token_kl: torch.Tensor | None = None
    calls: int = 0
    trl_function: Any = None

    def _rows(self, n_rows: int, targets: torch.Tensor) -> torch.Tensor | None:
        """Indices of the completion tokens among trl's rows (None: trl passed exactly those, in order).

        trl flattens the shifted [B, L - 1] positions: all of them (devices without Triton), or only those whose label
        is not -100 (the completion tokens, row-major). Either way the tokens must be the completions'."""
        b, c = self.completion_mask.shape
        valid = self.completion_mask.bool()
        expected = self.completion_ids[valid]
        rows = None
        if n_rows != expected.shape[0]:
            if n_rows % b:
                raise RuntimeError(f"trl's fused head scored {n_rows} rows for a batch of {b}: unexpected layout.")
            full = torch.zeros(b, n_rows // b, dtype=torch.bool, device=valid.device)
            full[:, -c:] = valid
            rows = full.reshape(-1).nonzero().squeeze(-1)
        got = targets if rows is None else targets[rows]
        if not torch.equal(got, expected):
            raise RuntimeError(
                "trl's fused head scored other tokens than the completions trl_rb expects; this trl version lays out "
                "its loss forward differently from 1.16."
            )
        return rows

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs",),
    ) -> tuple[torch.Tensor | None, ...]:
        """``_ChunkedLogProbFunction.apply``'s signature and outputs; also fills ``token_kl``."""
        if self.calls:  # K_n of one call's rows only would be silently incomplete
            raise RuntimeError("trl's loss forward ran its fused LM head more than once; trl_rb expects one call.")
        self.calls += 1
        if not set(outputs) <= _SUPPORTED_OUTPUTS:  # (sharded heads never get here: see loss_head_for)
            return self.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                           final_logit_softcapping, logit_scale, outputs)  # fmt: skip
        rows = self._rows(hidden.shape[0], targets)
        hp, tokens = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
        # trl runs the policy's head product in the autocast dtype (else the hidden states'): so do the log-probs
        # here, and K_n with them. The cast copies the head once (V x H elements in that dtype); gradients flow back.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        hp, weight = hp.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
        valid = self.completion_mask.bool()
        ref = self.ref_head
        logprob, entropy, kl = linear_logprob_kl(
            hp, weight, tokens, self.ref_hidden[valid].to(ref.weight.dtype), ref.weight,
            bias_p=bias, bias_q=ref.bias, temperature=temperature, logit_scale_p=logit_scale,
            logit_scale_q=ref.logit_scale, softcap_p=final_logit_softcapping, softcap_q=ref.softcap,
        )  # fmt: skip
        self.token_kl = kl.new_zeros(valid.shape).masked_scatter(valid, kl)

        def back(x: torch.Tensor) -> torch.Tensor:  # to trl's rows (the others it masks to 0 itself)
            return x if rows is None else x.new_zeros(hidden.shape[0]).index_copy(0, rows, x)

        return back(logprob), back(entropy) if "entropy" in outputs else None, None, None, None


@contextmanager
def fused_loss_head(head: FusedLossHead | None) -> Iterator[FusedLossHead | None]:
    """Inside the block trl's fused LM-head op is ``head.apply`` (nothing changes when ``head`` is None)."""
    if head is None:
        yield None
        return
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original is None or isinstance(original, FusedLossHead):
        raise RuntimeError("trl.trainer.utils._ChunkedLogProbFunction is missing or already replaced (nested use).")
    head.trl_function = original
    trl_utils._ChunkedLogProbFunction = head
    try:
        yield head
    finally:
        trl_utils._ChunkedLogProbFunction = original


def loss_head_for(trainer: Any, model: Any, inputs: dict[str, Any]) -> FusedLossHead | None:
    """The fused head for this loss batch of an rb trainer, or None where its heads are sharded (see the module)."""
    ref_head = reference_head(trainer)
    if not head_is_fusable(policy_head(trainer, model), ref_head):
        return None
    return FusedLossHead(
        completion_ids=inputs["completion_ids"],
        completion_mask=inputs["completion_mask"],
        ref_hidden=inputs[REF_HIDDEN_KEY],
        ref_head=ref_head,
    )


def weighted_sum(weights: torch.Tensor, token_kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum weights * K with K's gradient, K detached), both 0 where the weight is 0 (where K may be inf): what
    ``weighted_kl_sum_from_hidden(..., return_token_kl=True)`` returns, from K_n already computed."""
    used = weights != 0
    kl = torch.where(used, token_kl, torch.zeros((), dtype=token_kl.dtype, device=token_kl.device))
    return (weights.to(kl.dtype) * kl).sum(), kl.detach()
