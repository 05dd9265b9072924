"""The sequence-level reverse KL(student || teacher) of on-policy distillation, from hidden states and LM heads.

On completions y ~ p (the student, at temperature T), with D_t = KL(p_t || q_t) the exact divergence of the two
next-token distributions at step t and l_t = log p_t(y_t), the RB surrogate of KL(p || q) over whole sequences is

    S = sum_t [D_t + (l_t - sg l_t) * sg(sum_{m>t} D_m)]            (docs/estimators.md, K replaced by D)

Its value is sum_t D_t (an unbiased estimate of the sequence KL) and its expected gradient is grad KL(p || q). The
first term alone, trl's loss with the completions held fixed, is the pathwise half: it misses how each token changes
the later tokens' divergences.

Kernels: trl's own. D_t and its gradient come from ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``
(``beta=1.0``: reverse KL, gradient to the student only), l_t and its gradient from ``trl.kernels.ChunkedLogProbFunction``
on the same student hidden states; no [B, T, V] logits are built. Alignment: every [B, C, ...] tensor here is
completion-aligned, position c holding the hidden state *before* completion token c (trl's ``logits_to_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

from ..kl import future_sum
from .heads import HeadParams, gathered_heads
from .metrics import masked_sequence_sum

__all__ = ["KL_GRADIENTS", "DistillationTerms", "distillation_loss", "leave_one_out_baseline", "prompt_groups", "reverse_kl_terms"]

KL_GRADIENTS = ("pathwise", "rb")

REVERSE_KL = 1.0  # trl's beta: 1.0 selects KL(student || teacher)


@dataclass
class DistillationTerms:
    """Per-token quantities of one batch, [B, C] completion-aligned, 0 at masked positions.

    Attributes:
        divergence: D_t = KL(p_t || q_t), float32, differentiable with respect to the student.
        logprob: l_t = log p_t(y_t) of the sampled token, float32 (differentiable when requested).
        teacher_logprob: log q_t(y_t), float32, detached.
        entropy: the student's entropy H(p_t), float32, detached.
        mask: the positions the loss uses (completion tokens, tool outputs excluded), bool.
    """

    divergence: torch.Tensor
    logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor

    def sequence_kl(self) -> torch.Tensor:
        """sum_t D_t per sequence [B], detached: the RB estimate of the sequence-level KL (``kl/rb``)."""
        return masked_sequence_sum(self.divergence.detach(), self.mask)

    def sequence_log_ratio(self) -> torch.Tensor:
        """sum_t log p_t(y_t) / q_t(y_t) per sequence [B], detached: the k1 estimate (``kl/k1``)."""
        return masked_sequence_sum(self.logprob.detach() - self.teacher_logprob, self.mask)


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n_valid] -> [B, C], zeros elsewhere; differentiable (an all-masked batch still gives a connected zero)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _sampled_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head: HeadParams,
    targets: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """log softmax(z / T)[target] per row [n] with trl's chunked log-prob kernel (``head`` gives the logit transform)."""
    return ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, head.softcap, head.logit_scale, ()
    )[0]


def reverse_kl_terms(
    student_hidden: torch.Tensor,
    student_head: HeadParams,
    teacher_hidden: torch.Tensor,
    teacher_head: HeadParams,
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    logprob_grad: bool,
) -> DistillationTerms:
    """D_t, l_t, log q_t(y_t) and H(p_t) at the unmasked positions, with trl's chunked kernels.

    Args:
        student_hidden: [B, C, H_s] student last hidden states, completion-aligned; any float dtype.
        student_head: the student's LM head (live parameters: gradients flow into them).
        teacher_hidden: [B, C, H_t] teacher last hidden states, aligned the same way (no gradient).
        teacher_head: the teacher's LM head (no gradient).
        completion_ids: [B, C] the sampled tokens y_t.
        mask: [B, C] 1 where the loss uses the position.
        temperature: both distributions are softmax(logits / temperature).
        logprob_grad: whether l_t keeps its graph (the rb score term needs it; a metric does not).

    Every process must call this (ZeRO-3 / FSDP2 gather the heads collectively).
    """
    mask = mask.bool()
    valid = mask.reshape(-1)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[valid]
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[valid]
    targets = completion_ids.reshape(-1)[valid]
    with gathered_heads(student_head, teacher_head) as (s, t):
        # The teacher's tensors go in as they are (trl's kernels give them no gradient): a ZeRO-3 parameter must stay
        # one, since the kernels' own gather reads its status. A whole FSDP2 copy is cast like trl does (its master
        # copy can be float32 under bf16).
        t_weight, t_bias = t.weight, t.bias
        if not hasattr(t_weight, "ds_status") and t_weight.dtype != h_t.dtype:
            t_weight = t_weight.to(h_t.dtype)
        divergence, entropy = ChunkedDivergenceFunction.apply(
            h_s, s.weight, s.bias, h_t, t_weight, t_bias, REVERSE_KL, temperature,
            s.logit_scale, s.softcap, t.logit_scale, t.softcap,
        )  # fmt: skip
        with torch.set_grad_enabled(logprob_grad and torch.is_grad_enabled()):
            logprob = _sampled_logprob(h_s, s.weight, s.bias, s, targets, temperature)
        with torch.no_grad():
            teacher_logprob = _sampled_logprob(h_t, t_weight, t_bias, t, targets, temperature)
    return DistillationTerms(
        divergence=_scatter(divergence.float(), mask),
        logprob=_scatter(logprob.float(), mask),
        teacher_logprob=_scatter(teacher_logprob.float(), mask),
        entropy=_scatter(entropy.detach().float(), mask),
        mask=mask,
    )


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64 group index per row: rows with the same prompt tokens (padding ignored) share an index.

    Args:
        prompt_ids: [B, P] prompt tokens, padded (either side) to a common width P.
        prompt_mask: [B, P] 1 at real prompt tokens.
    """
    keys = torch.where(prompt_mask.bool(), prompt_ids, torch.full_like(prompt_ids, -1))
    return torch.unique(keys, dim=0, return_inverse=True)[1].reshape(-1)


def leave_one_out_baseline(values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per position, the mean of ``values`` over the *other* rows of the same group that reach that position.

    Args:
        values: [B, C] float, completion-aligned (here G_t = sum_{m>t} D_m).
        mask: [B, C] bool, which positions of each row are real.
        groups: [B] int64 group index per row (``prompt_groups``).

    Returns [B, C] of ``values``' dtype: 0 where no other row of the group reaches the position. Row i's baseline is
    a function of the other rows only, so with rows sampled independently given their prompt it leaves the expected
    score-function gradient of row i unchanged.
    """
    n = int(groups.max()) + 1 if groups.numel() else 0
    kept = torch.where(mask, values, torch.zeros_like(values))
    sums = kept.new_zeros(n, values.shape[1]).index_add_(0, groups, kept)
    counts = kept.new_zeros(n, values.shape[1]).index_add_(0, groups, mask.to(kept.dtype))
    others = counts[groups] - mask.to(kept.dtype)
    return torch.where(others > 0, (sums[groups] - kept) / others.clamp(min=1), torch.zeros_like(kept))


def distillation_loss(
    terms: DistillationTerms,
    kl_gradient: str,
    normalizer: torch.Tensor | float,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss whose gradient trains the student, a 0-d float32 tensor: (per-token sum) / ``normalizer``.

    ``"pathwise"``: sum_t D_t, trl's loss (trl divides by the batch's token count). ``"rb"``: the RB surrogate
    sum_t [D_t + (l_t - sg l_t) * sg(G_t - b_t)], G_t = sum_{m>t} D_m, whose value is the same sum and whose expected
    gradient is grad KL(p || q) times the number of sequences; with a constant ``normalizer`` the mean gradient is a
    fixed multiple of grad KL. b_t is the leave-one-out baseline of G_t over the rows of the same ``groups`` entry
    (completions of the same prompt, independent samples: ``leave_one_out_baseline``); None: b_t = 0.
    """
    if kl_gradient not in KL_GRADIENTS:
        raise ValueError(f"kl_gradient={kl_gradient!r}: use one of {KL_GRADIENTS}.")
    total = terms.divergence.sum()
    if kl_gradient == "rb":
        later = future_sum(terms.divergence.detach())  # padding holds 0, so only real later tokens count
        if groups is not None:
            later = later - leave_one_out_baseline(later, terms.mask, groups.to(later.device))
        score = (terms.logprob - terms.logprob.detach()) * later
        total = total + torch.where(terms.mask, score, torch.zeros_like(score)).sum()
    return total / normalizer
