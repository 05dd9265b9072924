"""The exact per-position KL K_n = KL(p_n || q_n) from two logits tensors, and the research code's API.

- ``token_kl``: policy and reference logits [..., V] (any floating dtype, one shape) -> K [...] float32 (float64 for
  float64 inputs), differentiable with respect to both; chunked over positions by the autograd Function
  ``_TokenKL``, whose backward recomputes each chunk from the logits (it saves only the KL values).
- ``compute_kl``: the research code's API, [B, T] log-probs (and optionally [B, T, V] logits) -> [B, T]: the k1 terms
  r_n without logits, K_n with them.
- ``research_token_kl``: the research code's unchunked formula, kept as a reference and benchmark baseline.
- The per-chunk math, on already scaled float logits [n, V]: ``_chunk_kl`` and ``_chunk_kl_grads`` (KL per row and
  its gradients), ``_fix_bad_rows`` (the conventions for rows that hit 0 * inf, shared with the hidden-state kernels)
  and ``_scale`` (row-centred logits divided by T, shared with ``sequence.token_logprobs``).

The last dimension is the vocabulary; every leading dimension is a position (completion-aligned, see ``trl_rb.kl``).
"""

from __future__ import annotations

import math

import torch

from .checks import _check_logits_pair, _compute_dtype, _default_chunk, check_temperature

__all__ = ["compute_kl", "research_token_kl", "token_kl"]


# --------------------------------------------------------------------------------------------------------------------
# The per-position KL on one chunk of logits: shared by token_kl and linear_token_kl, forward and backward.
# --------------------------------------------------------------------------------------------------------------------


def _chunk_kl(zp: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    """Exact KL(softmax(zp) || softmax(zq)) row by row, from already scaled float logits [n, V] -> [n].

    sum_v p_v (log p_v - log q_v) with both log-probabilities from the fused log_softmax kernel (one pass each,
    faster than torch.logsumexp, and relative to each row's max, so logits of magnitude 1e4 lose no precision to a
    large common offset). Three [n, V] temporaries: log p, log q (reused for the difference), p.
    """
    logp = torch.log_softmax(zp, dim=-1)
    logq = torch.log_softmax(zq, dim=-1)
    p = torch.exp(logp)
    diff = torch.sub(logp, logq, out=logq)
    kl = torch.linalg.vecdot(p, diff)
    bad = torch.isnan(kl)
    if bad.any():  # only rows that hit 0 * inf pay for the fix
        kl = _fix_bad_rows(kl, bad, p, diff)
    return kl


def _fix_bad_rows(kl: torch.Tensor, bad: torch.Tensor, p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """KL of the rows that hit 0 * inf, with ``_chunk_kl``'s conventions: entries where p is 0 contribute 0, entries
    where q is 0 and p > 0 contribute +inf (even when p underflows to 0), a NaN logit still gives NaN. Also zeroes
    ``diff`` where p is 0 in those rows, so the gradient formula p * (diff - KL) stays finite there."""
    rows = bad.nonzero().squeeze(-1)
    pr, d = p[rows], diff[rows]
    contrib = torch.where(d == math.inf, d, pr * d)
    # NaN from 0 * -inf or from -inf - (-inf) (both probabilities 0), but not from a NaN row (p is NaN there)
    contrib = contrib.masked_fill_(torch.isnan(contrib) & ~torch.isnan(pr), 0)
    diff[rows] = d.masked_fill_(pr == 0, 0)
    return kl.index_put((rows,), contrib.sum(-1))


def _chunk_kl_grads(
    zp: torch.Tensor, zq: torch.Tensor, kl: torch.Tensor, g: torch.Tensor, need_q: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of sum_rows g * KL(softmax(zp) || softmax(zq)) with respect to zp and zq, each [n, V].

    ``need_q=False`` skips the reference's gradient (None): trainers never differentiate the reference.

    d KL / d zp_v = p_v (log p_v - log q_v - KL);  d KL / d zq_v = q_v - p_v. Recomputed from the logits (nothing
    but the KL values is saved by the forward), in place where possible.
    """
    logp = torch.log_softmax(zp, dim=-1)
    p = torch.exp(logp)
    logq = torch.log_softmax(zq, dim=-1)
    g = g.unsqueeze(-1)
    grad_zp = logp.sub_(logq).sub_(kl.unsqueeze(-1)).mul_(p).masked_fill_(p == 0, 0).mul_(g)
    grad_zq = logq.exp_().sub_(p).mul_(g) if need_q else None
    unused = g.squeeze(-1) == 0
    if unused.any():
        # Rows the loss does not use (e.g. masked padding) get exactly 0, even where their KL is +inf or NaN.
        grad_zp[unused] = 0
        if grad_zq is not None:
            grad_zq[unused] = 0
    return grad_zp, grad_zq


def _scale(z: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """(z - rowmax(z)) / T as a new ``dtype`` tensor [n, V]: the same softmax, in at most two passes over z.

    Subtracting the row max first matters for precision, not range: torch's log_softmax computes
    z - (max + log sum exp), which rounds at the scale of the max (1e-3 for logits near 1e4 in float32); on centred
    logits the max is 0 and log-probabilities keep full relative precision.
    """
    m = torch.nan_to_num(z.amax(dim=-1, keepdim=True).to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    out = z.to(dtype).sub_(m) if z.dtype != dtype else z - m
    return out.div_(temperature) if temperature != 1.0 else out


class _TokenKL(torch.autograd.Function):
    """Chunked exact per-position KL over logits [N, V] -> [N]; the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits_p, logits_q, temperature, chunk, dtype):  # type: ignore[override]
        n = logits_p.shape[0]
        out = torch.empty(n, dtype=dtype, device=logits_p.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            out[s:e] = _chunk_kl(_scale(logits_p[s:e], temperature, dtype), _scale(logits_q[s:e], temperature, dtype))
        ctx.save_for_backward(logits_p, logits_q, out)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        logits_p, logits_q, out = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        t, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        grad_p = torch.empty_like(logits_p) if need_p else None
        grad_q = torch.empty_like(logits_q) if need_q else None
        for s in range(0, logits_p.shape[0], chunk):
            e = min(s + chunk, logits_p.shape[0])
            gp, gq = _chunk_kl_grads(
                _scale(logits_p[s:e], t, dtype),
                _scale(logits_q[s:e], t, dtype),
                out[s:e],
                grad_out[s:e].to(dtype),
                need_q,
            )
            if need_p:
                grad_p[s:e] = gp / t
            if need_q:
                grad_q[s:e] = gq / t
        return grad_p, grad_q, None, None, None


def token_kl(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """Exact KL(softmax(logits_p / T) || softmax(logits_q / T)) at every position.

    Args:
        logits_p: policy logits, shape [..., V], any floating dtype (bf16 / fp16 / fp32 / fp64).
        logits_q: reference logits, the same shape.
        temperature: the sampling temperature T > 0 (the KL is of the distributions the tokens were drawn from).
        chunk_size: positions per chunk; by default about 2**18 / V, which bounds the extra memory at a few
            [chunk, V] float32 temporaries (a few MiB) whatever the number of positions.

    Returns:
        Tensor of shape ``logits_p.shape[:-1]``, float32 (float64 for float64 inputs), differentiable with respect
        to both inputs. Vocabulary entries where p is 0 (logit -inf) contribute 0; p > 0 where q is 0 gives +inf.
        Values are >= 0 up to rounding (~1e-7 relative); they are not clamped.
    """
    _check_logits_pair(logits_p, logits_q)
    check_temperature(temperature)
    vocab = logits_p.shape[-1]
    chunk = _default_chunk(vocab, chunk_size)
    dtype = _compute_dtype(logits_p, logits_q)
    flat = _TokenKL.apply(logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab), float(temperature), chunk, dtype)
    return flat.view(logits_p.shape[:-1])


def research_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """The research code's formula, kept as a reference and benchmark baseline: five [..., V] temporaries."""
    p = torch.softmax(logits_p.float(), dim=-1)
    return (p * (torch.log_softmax(logits_p.float(), -1) - torch.log_softmax(logits_q.float(), -1))).sum(-1)


def compute_kl(
    new_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits_p: torch.Tensor | None = None,
    logits_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The research code's API: per-position KL, Monte Carlo without logits, Rao-Blackwellized with them.

    Args:
        new_logprobs: log p_n(y_n) of the sampled tokens under the policy, shape [B, T].
        ref_logprobs: log q_n(y_n) under the reference, shape [B, T].
        logits_p, logits_q: optional policy and reference logits [B, T, V], completion-aligned (``logits[b, t]`` is
            the distribution of token ``t``), at the sampling temperature already (no scaling is applied here).

    Returns:
        [B, T]: ``new_logprobs - ref_logprobs`` (the k1 terms r_n) when no logits are given, else the exact
        per-position KL K_n over the last dimension (float32). Giving only one of the two logits is an error.
    """
    if (logits_p is None) != (logits_q is None):
        raise ValueError("compute_kl needs both logits_p and logits_q for the RB estimate, or neither for MC.")
    if logits_p is None:
        if new_logprobs.shape != ref_logprobs.shape:
            raise ValueError(
                f"new_logprobs {tuple(new_logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have the "
                "same shape."
            )
        return new_logprobs - ref_logprobs
    return token_kl(logits_p, logits_q)
