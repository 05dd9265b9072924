"""The LM-head machinery shared by the hidden-state kernels (``linear`` and ``fused_logprob``).

Those kernels never hold [N, V] logits: each model's logits are recomputed chunk by chunk from its last hidden states
h [n, H] (row n is position n) and its LM head, ``_Head`` (weight [V, H], optional bias [V], logit scale, optional
soft-cap: z = softcap * tanh((h W^T + b) * scale / softcap) / T). Per chunk, ``_log_softmax_into`` and
``_chunk_log_probs`` write both models' log-probabilities [n, V] into preallocated buffers, ``_rows_kl`` turns them
into the KL per row [n], and ``_grad_buffers``, ``_chain`` and ``_cast_grads`` push a chunk's gradient with respect to
the raw logits back to the hidden states ([n, H], their dtype), the weight ([V, H]) and the bias ([V]), the last two
accumulated in the compute dtype (float32, float64 for float64 inputs) and cast to the parameters' dtype at the end.

Scratch memory is per call: ``_Buffers`` holds the [rows, V] tensors (in the compute dtype, on the hidden states'
device) that one kernel call (a forward, or a backward) creates for itself and reuses across its own chunks only. No
buffer lives at module level or on an autograd Function, so concurrent or re-entrant calls share nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .logits import _fix_bad_rows


class _Head(NamedTuple):
    """One model's LM head as the sampler sees it: z = softcap * tanh((h W^T + b) * scale / softcap) / T."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    scale: float
    softcap: float | None


class _Buffers:
    """Reusable [rows, V] buffers for one pass (allocating fresh ones per chunk costs page faults on CPU)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, derivs: tuple[bool, bool]):
        def make() -> torch.Tensor:
            return torch.empty(rows, vocab, dtype=dtype, device=device)

        self.p, self.q, self.tmp = make(), make(), make()
        self.deriv_p = make() if derivs[0] else None
        self.deriv_q = make() if derivs[1] else None


def _log_softmax_into(
    out: torch.Tensor,
    tmp: torch.Tensor,
    hidden: torch.Tensor,
    head: _Head,
    temperature: float,
    deriv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write log softmax of the sampling logits of ``hidden`` [n, H] into ``out`` [n, V]; leaves exp(z - max) in
    ``tmp`` and returns its row sums [n, 1] (so p = tmp / sums). With soft-capping, ``deriv`` (when given) receives
    dz / d raw = (1 - tanh^2) * scale / T; without it, dz / d raw is the scalar scale / T.

    Each row's max is subtracted before the log-sum-exp, so log-probabilities keep full relative precision even for
    logits of magnitude 1e4 (see ``logits._scale``)."""
    w, b = head.weight, head.bias
    if hidden.dtype == w.dtype == out.dtype and (b is None or b.dtype == out.dtype):
        torch.mm(hidden, w.t(), out=out) if b is None else torch.addmm(b, hidden, w.t(), out=out)
    else:  # low-precision head: the product runs in its dtype (as in trl's fused head), then one float32 copy
        raw = hidden.to(w.dtype) @ w.t()
        out.copy_(raw if b is None else raw + b)
        del raw
    if head.softcap is None:
        if head.scale != temperature:  # skip a pass over [n, V] in the common case scale = T = 1
            out.mul_(head.scale / temperature)
    elif deriv is None:
        out.mul_(head.scale / head.softcap).tanh_().mul_(head.softcap / temperature)
    else:
        torch.tanh(out.mul_(head.scale / head.softcap), out=deriv)
        out.copy_(deriv).mul_(head.softcap / temperature)
        deriv.mul_(deriv).neg_().add_(1).mul_(head.scale / temperature)
    rowmax = out.amax(dim=-1, keepdim=True)
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))  # an all -inf row: no NaN
    out.sub_(rowmax)
    sums = torch.exp(out, out=tmp).sum(dim=-1, keepdim=True)
    out.sub_(sums.log())
    return sums


def _grad_buffers(h: torch.Tensor, head: _Head, need: tuple[bool, ...], dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Zeroed accumulators for the gradients of (h, head.weight, head.bias) whose ``need`` flag is set (else None);
    the hidden-state one is written chunk by chunk, so it starts empty."""
    w = head.weight
    return [
        torch.empty_like(h) if need[0] else None,
        torch.zeros(w.shape, dtype=dtype, device=w.device) if need[1] else None,
        torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need[2] and head.bias is not None else None,
    ]


def _chunk_log_probs(
    logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, hp: torch.Tensor, head_p: _Head, hq: torch.Tensor,
    head_q: _Head, temperature: float, dp: torch.Tensor | None = None, dq: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """One chunk's log p into ``logp``, log q into ``logq`` and p into ``p`` (each [n, V]); q first, since both use
    ``p`` as scratch. ``dp`` / ``dq``: soft-cap derivatives, as in ``_log_softmax_into``."""
    _log_softmax_into(logq, p, hq, head_q, temperature, dq)
    p.div_(_log_softmax_into(logp, p, hp, head_p, temperature, dp))


def _rows_kl(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """KL per row [n] from p and diff = log p - log q [n, V]; only rows with a -inf logit pay for ``_fix_bad_rows``
    (which also zeroes ``diff`` where p is 0 in them)."""
    kl = torch.linalg.vecdot(p, diff)
    bad = torch.isnan(kl)
    return _fix_bad_rows(kl, bad, p, diff) if bad.any() else kl


def _chain(
    graw: torch.Tensor,
    unused: torch.Tensor | None,
    h: torch.Tensor,
    head: _Head,
    grads: list[torch.Tensor | None],
    offset: int,
    s: int,
    e: int,
    dtype: torch.dtype,
) -> None:
    """Push one chunk's gradient with respect to the raw logits [n, V] back to the hidden states, weight and bias."""
    if unused is not None:
        graw[unused] = 0  # rows the loss does not use (padding) get exactly 0, even where their KL is inf or NaN
    w = head.weight
    grad_h, grad_w, grad_b = grads[offset : offset + 3]
    if grad_h is not None:
        grad_h[s:e] = (graw.to(w.dtype) @ w).to(h.dtype)
    if grad_w is not None:
        grad_w.addmm_(graw.t(), h[s:e].to(dtype))
    if grad_b is not None:
        grad_b += graw.sum(0)


def _cast_grads(grads: list[torch.Tensor | None], inputs: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
    return [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True)]
