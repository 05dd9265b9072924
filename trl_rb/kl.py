"""KL estimators between two causal language models: pure torch, no trl, no transformers.

Alignment convention for every function here: ``logits[b, t]`` is the next-token distribution that ``tokens[b, t]``
was drawn from (completion-aligned, as trl's ``logits_to_keep``: the logits at the position *before* each token).
``mask[b, t]`` is 1 for real completion tokens (EOS included) and 0 for padding.

Notation (see docs/estimators.md): ``p`` the policy, ``q`` the reference, both as sampling distributions
(``softmax(logits / temperature)``); ``r_n = log p_n(y_n) - log q_n(y_n)``;
``K_n = KL(p_n || q_n)`` the exact KL of the two next-token distributions.

Numerics: every function computes in float32 (float64 when given float64), whatever the input dtype, with
logsumexp rather than softmax-then-log, and works through the positions in chunks so that the memory it takes
beyond its inputs and output is bounded by the chunk, not by the number of positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "ESTIMATORS",
    "canonical_estimator",
    "compute_kl",
    "future_sum",
    "kl_estimate",
    "kl_surrogate",
    "linear_kl_terms",
    "linear_logprob_kl",
    "linear_token_kl",
    "linear_weighted_kl_sum",
    "sequence_kl_terms",
    "token_kl",
    "token_logprobs",
]

# Canonical estimator names and their accepted aliases (matched case-insensitively).
ESTIMATORS: dict[str, tuple[str, ...]] = {
    "k1": ("mc",),
    "k2": (),
    "k3": (),
    "cv": (),
    "rb": ("full",),
}
_ALIASES = {alias: name for name, aliases in ESTIMATORS.items() for alias in (name, *aliases)}

# Elements of a [chunk, V] float32 temporary for the logits-based functions: 2**18 (1 MiB) keeps a chunk's few live
# temporaries in the L2 cache, which measured fastest (2**16 .. 2**21 tried, V = 50257 and 151936, see
# benchmarks/bench_kl.py), and bounds the extra memory at a few MiB whatever the number of positions.
_CHUNK_ELEMENTS = 2**18
# linear_token_kl and linear_weighted_kl_sum multiply each chunk of hidden states by the whole [V, H] LM-head weight,
# so every chunk streams the head through memory: a chunk must be hundreds of rows tall for the products to be
# compute-bound rather than memory-bound. Measured at the Qwen2.5-0.5B head
# (H=896, V=151936, N=512, 2 CPU threads): linear_weighted_kl_sum value+gradient 16.5 s with the former 27-row
# chunks (a 2**22-element budget), 8.9 s with 128 rows, 7.5 s with 512 rows. The default is a row count, capped so
# that one [chunk, V] float32 buffer stays within 2**26 elements (256 MiB; three to five are live, reused across
# chunks): 256 rows for any vocabulary up to 262144.
_LINEAR_CHUNK_ROWS = 256
_LINEAR_CHUNK_ELEMENTS = 2**26


def canonical_estimator(name: str, allowed: tuple[str, ...] | None = None) -> str:
    """Map an estimator name or alias (case-insensitive) to its canonical name.

    Args:
        name: e.g. ``"RB"``, ``"full"``, ``"mc"``, ``"k3"``.
        allowed: canonical names the caller supports; all of ``ESTIMATORS`` when ``None``.

    Raises:
        ValueError: for an unknown name, listing the valid ones (aliases included).
    """
    allowed = tuple(ESTIMATORS) if allowed is None else allowed
    key = name.lower() if isinstance(name, str) else name
    canonical = _ALIASES.get(key)
    if canonical is None or canonical not in allowed:
        valid = ", ".join(f"{n} (alias {', '.join(ESTIMATORS[n])})" if ESTIMATORS[n] else n for n in allowed)
        raise ValueError(f"Unknown KL estimator {name!r}; valid estimators are: {valid} (case-insensitive).")
    return canonical


# --------------------------------------------------------------------------------------------------------------------
# Input checks: bad input fails here, with both shapes named, not deep inside torch.
# --------------------------------------------------------------------------------------------------------------------


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {tensor.dtype}; cast it with .float().")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


def _check_logits_pair(logits_p: torch.Tensor, logits_q: torch.Tensor) -> None:
    _check_float("logits_p", logits_p)
    _check_float("logits_q", logits_q)
    if logits_p.dim() < 1:
        raise ValueError("logits_p must have a vocabulary dimension (last), got a 0-d tensor.")
    if logits_p.shape[-1] != logits_q.shape[-1]:
        raise ValueError(
            f"logits_p and logits_q have different vocabulary sizes: logits_p {tuple(logits_p.shape)} vs logits_q "
            f"{tuple(logits_q.shape)}; both models must share one tokenizer and vocabulary."
        )
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"logits_p and logits_q must have the same shape, got logits_p {tuple(logits_p.shape)} and logits_q "
            f"{tuple(logits_q.shape)}."
        )


def _check_tokens(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must match the logits without their vocabulary dimension: logits "
            f"{tuple(logits.shape)} -> expected tokens {tuple(logits.shape[:-1])} (logits[b, t] is the distribution "
            "tokens[b, t] was drawn from)."
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}.")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}.")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _default_chunk(vocab: int, chunk_size: int | None, elements: int | None = None, rows: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` when given, else as many as ``elements`` allow at this vocabulary (at most
    ``rows`` when given)."""
    if chunk_size is None:
        fitting = max(1, (elements or _CHUNK_ELEMENTS) // max(vocab, 1))
        return fitting if rows is None else min(rows, fitting)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return chunk_size


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
    _check_temperature(temperature)
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


# --------------------------------------------------------------------------------------------------------------------
# KL from last hidden states and LM-head weights: neither direction ever holds more than a chunk of [N, V] logits.
# One kernel (_kl_pass) serves linear_token_kl (forward, and its recompute-in-backward) and linear_weighted_kl_sum
# (value and policy gradient in a single forward pass).
# --------------------------------------------------------------------------------------------------------------------


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
    logits of magnitude 1e4 (see ``_scale``)."""
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


def _kl_pass(
    hp: torch.Tensor,
    head_p: _Head,
    hq: torch.Tensor,
    head_q: _Head,
    temperature: float,
    chunk: int,
    dtype: torch.dtype,
    weights: torch.Tensor | None = None,
    need: tuple[bool, ...] = (False,) * 6,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """One pass over [chunk, V] logits: the per-row KL(p_n || q_n) [N] (``dtype``); when ``tokens`` [N] (long) is
    given, the sampled log-ratios log p_n(tokens_n) - log q_n(tokens_n) [N] (``dtype``, else None); and, when
    ``weights`` [N] is given, the gradients of sum_n weights_n * KL_n with respect to (hp, head_p.weight, head_p.bias,
    hq, head_q.weight, head_q.bias), those whose ``need`` flag is set (others None). Hidden-state gradients have the
    hidden states' dtype; weight and bias gradients are accumulated in ``dtype`` (float32 or float64) whatever the
    parameters' dtype.

    hp [N, H_p], hq [N, H_q]: row n of each is position n. Rows with weight 0 get exactly zero gradient. Call it with
    autocast off (the public functions do): under trl's default bf16 autocast the products would run in bf16.
    """
    n_rows, vocab = hp.shape[0], head_p.weight.shape[0]
    rows = min(chunk, max(n_rows, 1))
    grad_p = weights is not None and any(need[:3])
    grad_q = weights is not None and any(need[3:6])
    buf = _Buffers(
        rows, vocab, dtype, hp.device, (grad_p and head_p.softcap is not None, grad_q and head_q.softcap is not None)
    )
    kl_all = torch.empty(n_rows, dtype=dtype, device=hp.device)
    ratio_all = None if tokens is None else torch.empty(n_rows, dtype=dtype, device=hp.device)
    grads: list[torch.Tensor | None] = [None] * 6
    if weights is not None:
        grads = _grad_buffers(hp, head_p, need[:3], dtype) + _grad_buffers(hq, head_q, need[3:6], dtype)
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        logp, logq, p = buf.p[: e - s], buf.q[: e - s], buf.tmp[: e - s]
        dp = None if buf.deriv_p is None else buf.deriv_p[: e - s]
        dq = None if buf.deriv_q is None else buf.deriv_q[: e - s]
        _chunk_log_probs(logp, logq, p, hp[s:e], head_p, hq[s:e], head_q, temperature, dp, dq)
        diff = logp.sub_(logq)  # log p - log q, in place of log p
        if ratio_all is not None:
            ratio_all[s:e] = diff.gather(1, tokens[s:e, None]).squeeze(1)
        kl = _rows_kl(p, diff)
        kl_all[s:e] = kl
        if not (grad_p or grad_q):
            continue
        g = weights[s:e].to(dtype).unsqueeze(-1)
        unused = (g == 0).squeeze(-1)
        unused = unused if unused.any() else None
        # d KL_n / d zq_v = q_v - p_v, in place of log q (before p is scaled into the policy's gradient below)
        if grad_q:
            gzq = logq.exp_().sub_(p).mul_(g if dq is not None else g * (head_q.scale / temperature))
            _chain(gzq if dq is None else gzq.mul_(dq), unused, hq, head_q, grads, 3, s, e, dtype)
        # d KL_n / d zp_v = p_v (log p_v - log q_v - KL_n), in place of the difference
        if grad_p:
            gzp = diff.sub_(kl.unsqueeze(-1)).mul_(p).mul_(g if dp is not None else g * (head_p.scale / temperature))
            _chain(gzp if dp is None else gzp.mul_(dp), unused, hp, head_p, grads, 0, s, e, dtype)
    return kl_all, ratio_all, grads


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


class _LinearTokenKL(torch.autograd.Function):
    """Per-position KL [N] from hidden states and heads; the backward recomputes each chunk's logits (general case:
    any upstream gradient, any input differentiable)."""

    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype):  # type: ignore[override]
        head_p, head_q = _Head(wp, bp, scale_p, cap_p), _Head(wq, bq, scale_q, cap_q)
        kl, _, _ = _kl_pass(hp, head_p, hq, head_q, temperature, chunk, dtype)
        ctx.save_for_backward(hp, wp, bp, hq, wq, bq)
        ctx.args = (temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype)
        return kl

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hp, wp, bp, hq, wq, bq = ctx.saved_tensors
        temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype = ctx.args
        head_p, head_q = _Head(wp, bp, scale_p, cap_p), _Head(wq, bq, scale_q, cap_q)
        need = tuple(ctx.needs_input_grad[:6])
        with torch.autocast(hp.device.type, enabled=False):  # a backward called inside an autocast region
            _, _, grads = _kl_pass(hp, head_p, hq, head_q, temperature, chunk, dtype, weights=grad_out, need=need)
        return (*_cast_grads(grads, (hp, wp, bp, hq, wq, bq)), None, None, None, None, None, None, None)


class _WeightedKLSum(torch.autograd.Function):
    """(sum_n w_n KL_n, KL [N] detached) with the policy-side gradient computed in the forward pass.

    The weights are known when the loss is built, so one pass over the [chunk, V] logits gives both the value and
    d/d(hidden_p, weight_p, bias_p); the backward only scales them. That saves recomputing both models' logits in the
    backward (two of the six [N, H] x [H, V] products of a recompute-in-backward kernel).
    """

    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, weights, temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype):  # type: ignore[override]
        head_p, head_q = _Head(wp, bp, scale_p, cap_p), _Head(wq, bq, scale_q, cap_q)
        need = (*ctx.needs_input_grad[:3], False, False, False)
        kl, _, grads = _kl_pass(hp, head_p, hq, head_q, temperature, chunk, dtype, weights=weights, need=need)
        total = torch.linalg.vecdot(weights.to(dtype), kl)
        ctx.save_for_backward(*_cast_grads(grads[:3], (hp, wp, bp)))
        ctx.mark_non_differentiable(kl)
        return total, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_kl):  # type: ignore[override]
        scaled = [None if g is None else grad_total.to(g.dtype) * g for g in ctx.saved_tensors]
        return (*scaled, *([None] * 11))


def _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q) -> None:
    for name, t in (("hidden_p", hidden_p), ("weight_p", weight_p), ("hidden_q", hidden_q), ("weight_q", weight_q)):
        _check_float(name, t)
    _check_temperature(temperature)
    if weight_p.dim() != 2 or weight_q.dim() != 2:
        raise ValueError(f"weights must be [V, H], got weight_p {tuple(weight_p.shape)} and weight_q {tuple(weight_q.shape)}.")
    if weight_p.shape[0] != weight_q.shape[0]:
        raise ValueError(
            f"weight_p {tuple(weight_p.shape)} and weight_q {tuple(weight_q.shape)} have different vocabulary sizes; "
            "both models must share one vocabulary."
        )
    if hidden_p.shape[-1] != weight_p.shape[1] or hidden_q.shape[-1] != weight_q.shape[1]:
        raise ValueError(
            f"hidden sizes do not match the heads: hidden_p {tuple(hidden_p.shape)} vs weight_p {tuple(weight_p.shape)}, "
            f"hidden_q {tuple(hidden_q.shape)} vs weight_q {tuple(weight_q.shape)}."
        )
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(
            f"hidden_p {tuple(hidden_p.shape)} and hidden_q {tuple(hidden_q.shape)} must cover the same positions."
        )
    for cap in (softcap_p, softcap_q):
        if cap is not None and not cap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {cap!r}.")


def _check_position_tokens(tokens: torch.Tensor, hidden_p: torch.Tensor) -> None:
    if tokens.shape != hidden_p.shape[:-1] or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be long with hidden_p's leading shape {tuple(hidden_p.shape[:-1])}, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}.")  # fmt: skip


def linear_token_kl(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    *,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
) -> torch.Tensor:
    """Exact per-position KL(p || q) from last hidden states and LM-head weights, without [N, V] logits.

    The logits of each model are ``z = softcap * tanh((h @ W.T + b) * logit_scale / softcap) / T`` (the soft-cap
    only when given), the transform trl's fused LM head applies. Positions are processed in chunks; the backward
    recomputes each chunk's logits, so neither direction holds more than a few [chunk, V] float32 tensors. For a
    loss ``sum(weights * KL)`` with weights known in advance, ``linear_weighted_kl_sum`` is faster.

    Args:
        hidden_p: policy last hidden states [..., H_p], aligned so that position i predicts token i (i.e. the
            hidden state *before* each completion token).
        weight_p: policy LM-head weight [V, H_p]; bias_p optional [V].
        hidden_q: reference last hidden states [..., H_q] (same leading shape as hidden_p); weight_q [V, H_q].
        temperature: the sampling temperature.
        chunk_size: positions per chunk (default 256, fewer where a [chunk, V] float32 buffer would exceed 2**26
            elements: every chunk streams the whole head, so tall chunks are faster; three to five such buffers are
            live, 155 MiB each at V = 151936).
        logit_scale_p, logit_scale_q, softcap_p, softcap_q: per-model logit scaling and soft-capping (e.g. the
            config's ``logit_scale`` and ``final_logit_softcapping``).

    Returns:
        [...] float32 (float64 if any input is float64). Differentiable with respect to every hidden state, weight
        and bias that requires grad; the matrix products run in the weights' dtype, the softmax math in float32.
    """
    _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q)
    chunk = _default_chunk(weight_p.shape[0], chunk_size, _LINEAR_CHUNK_ELEMENTS, _LINEAR_CHUNK_ROWS)
    dtype = _compute_dtype(hidden_p, weight_p, hidden_q, weight_q)
    with torch.autocast(hidden_p.device.type, enabled=False):  # float32 math under trl's default bf16 autocast
        flat = _LinearTokenKL.apply(
            hidden_p.reshape(-1, hidden_p.shape[-1]),
            weight_p,
            bias_p,
            hidden_q.reshape(-1, hidden_q.shape[-1]),
            weight_q,
            bias_q,
            float(temperature),
            chunk,
            float(logit_scale_p),
            float(logit_scale_q),
            softcap_p,
            softcap_q,
            dtype,
        )
    return flat.view(hidden_p.shape[:-1])


def linear_weighted_kl_sum(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
    return_token_kl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sum over positions of weights * KL(p || q), from hidden states and LM heads, gradient computed in the forward.

    Same model of the logits as ``linear_token_kl``. Its value and gradient equal those of
    ``(weights * linear_token_kl(...)).sum()`` with the reference side held constant, at about two thirds of the
    LM-head work: the weights being known, one pass gives the value and the policy's gradient, and the backward
    only scales the saved gradients (which cost the size of hidden_p, weight_p and bias_p).

    Args:
        hidden_p: policy last hidden states [..., H_p], position-aligned (position i predicts token i); any float
            dtype. Gradients flow into it, ``weight_p`` [V, H_p] and ``bias_p`` [V] (those that require grad).
        hidden_q, weight_q, bias_q: the reference side, [..., H_q], [V, H_q], [V]; detached (a constant: no gradient
            flows into it, whether or not it requires grad).
        weights: [...] (the leading shape of hidden_p) float weights, constant (detached). Positions with weight 0
            are skipped entirely: padding costs nothing and its hidden states may hold anything.
        temperature, chunk_size, logit_scale_*, softcap_*: as in ``linear_token_kl``.
        return_token_kl: also return the per-position KL values (detached), 0 where the weight is 0, from the same
            pass.

    Returns:
        A 0-d float32 tensor (float64 if any input is float64); with ``return_token_kl``, the pair (sum, KL [...]).
        Under ``torch.no_grad()`` only the values are computed.
    """
    _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q)
    _check_float("weights", weights)
    if weights.shape != hidden_p.shape[:-1]:
        raise ValueError(
            f"weights {tuple(weights.shape)} must have hidden_p's leading shape: hidden_p {tuple(hidden_p.shape)} -> "
            f"expected weights {tuple(hidden_p.shape[:-1])} (one weight per position)."
        )
    if not torch.is_grad_enabled():
        hidden_p, weight_p = hidden_p.detach(), weight_p.detach()
        bias_p = None if bias_p is None else bias_p.detach()
    chunk = _default_chunk(weight_p.shape[0], chunk_size, _LINEAR_CHUNK_ELEMENTS, _LINEAR_CHUNK_ROWS)
    dtype = _compute_dtype(hidden_p, weight_p, hidden_q, weight_q)
    weights = weights.detach()
    keep = weights != 0
    keep_all = bool(keep.all())
    hp, hq = hidden_p.reshape(-1, hidden_p.shape[-1]), hidden_q.detach().reshape(-1, hidden_q.shape[-1])
    w = weights.reshape(-1)
    if not keep_all:
        flat_keep = keep.reshape(-1)
        hp, hq, w = hp[flat_keep], hq[flat_keep], w[flat_keep]
    with torch.autocast(hp.device.type, enabled=False):  # float32 math under trl's default bf16 autocast
        total, kl = _WeightedKLSum.apply(
            hp,
            weight_p,
            bias_p,
            hq,
            weight_q.detach(),
            None if bias_q is None else bias_q.detach(),
            w,
            float(temperature),
            chunk,
            float(logit_scale_p),
            float(logit_scale_q),
            softcap_p,
            softcap_q,
            dtype,
        )
    if not return_token_kl:
        return total
    token_kl_values = kl.view(weights.shape) if keep_all else kl.new_zeros(weights.shape).masked_scatter(keep, kl)
    return total, token_kl_values


def linear_kl_terms(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
) -> dict[str, torch.Tensor]:
    """The per-position terms every estimator is built from, from hidden states and LM heads in one pass, no gradient.

    Same model of the logits as ``linear_token_kl`` (and the same chunks, so no [N, V] logits are held).

    Args:
        hidden_p, hidden_q: last hidden states [..., H_p] and [..., H_q], position-aligned: position i is the state
            before token i.
        weight_p, weight_q: LM-head weights [V, H_p], [V, H_q]; biases optional [V]. The reference's head and hidden
            states are moved to the policy's device.
        tokens: [...] long, the sampled token at each position.
        temperature, chunk_size, logit_scale_*, softcap_*: as in ``linear_token_kl``.

    Returns:
        ``{"r": log p(tokens) - log q(tokens), "K": KL(p || q)}``, each [...] float32 (float64 if any input is
        float64), detached.
    """
    _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q)
    _check_position_tokens(tokens, hidden_p)
    device = hidden_p.device
    head_p = _Head(weight_p.detach(), None if bias_p is None else bias_p.detach(), float(logit_scale_p), softcap_p)
    head_q = _Head(weight_q.detach().to(device), None if bias_q is None else bias_q.detach().to(device),
                   float(logit_scale_q), softcap_q)  # fmt: skip
    chunk = _default_chunk(weight_p.shape[0], chunk_size, _LINEAR_CHUNK_ELEMENTS, _LINEAR_CHUNK_ROWS)
    dtype = _compute_dtype(hidden_p, weight_p, hidden_q, weight_q)
    hp = hidden_p.detach().reshape(-1, hidden_p.shape[-1])
    hq = hidden_q.detach().to(device).reshape(-1, hidden_q.shape[-1])
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        kl, ratio, _ = _kl_pass(hp, head_p, hq, head_q, float(temperature), chunk, dtype,
                                tokens=tokens.to(device).reshape(-1))  # fmt: skip
    return {"r": ratio.view(tokens.shape), "K": kl.view(tokens.shape)}


# --------------------------------------------------------------------------------------------------------------------
# The rb loss's policy head: log-probs, entropy and KL from the same tiles, with one shared backward.
# --------------------------------------------------------------------------------------------------------------------


def _entropy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v row by row [n]; entries with p = 0 contribute 0 (not 0 * -inf)."""
    ent = -torch.linalg.vecdot(p, logp)
    bad = torch.isnan(ent) & ~torch.isnan(p).any(-1)
    if bad.any():
        rows = bad.nonzero().squeeze(-1)
        ent = ent.index_put((rows,), -(p[rows] * logp[rows]).masked_fill_(p[rows] == 0, 0).sum(-1))
    return ent


def _logprob_kl_forward(
    hp: torch.Tensor, head_p: _Head, tokens: torch.Tensor, hq: torch.Tensor, head_q: _Head, temperature: float,
    chunk: int, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per row n: log p_n(tokens_n), H(p_n), KL(p_n || q_n), each [N] ``dtype``; two products per chunk."""
    n_rows, vocab = hp.shape[0], head_p.weight.shape[0]
    rows = min(chunk, max(n_rows, 1))
    buf = _Buffers(rows, vocab, dtype, hp.device, (False, False))
    logprob, entropy, kl_all = (torch.empty(n_rows, dtype=dtype, device=hp.device) for _ in range(3))
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        logp, logq, p = buf.p[: e - s], buf.q[: e - s], buf.tmp[: e - s]
        _chunk_log_probs(logp, logq, p, hp[s:e], head_p, hq[s:e], head_q, temperature)
        logprob[s:e] = logp.gather(1, tokens[s:e, None]).squeeze(1)
        entropy[s:e] = _entropy(p, logp)
        kl_all[s:e] = _rows_kl(p, logp.sub_(logq))
    return logprob, entropy, kl_all


def _nonzero_part(g: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """g * value, 0 where g is 0 (where value may be inf or NaN: an unused row's KL)."""
    return torch.zeros_like(value) if g is None else torch.where(g != 0, g * value, torch.zeros_like(value))


def _logprob_kl_backward(
    hp: torch.Tensor, head_p: _Head, tokens: torch.Tensor, hq: torch.Tensor, head_q: _Head, entropy: torch.Tensor,
    kl: torch.Tensor, upstream: tuple[torch.Tensor | None, ...], temperature: float, chunk: int, dtype: torch.dtype,
    need: tuple[bool, ...],
) -> list[torch.Tensor | None]:  # fmt: skip
    """Gradients of sum_n (g_lp log p_n(y_n) + g_ent H(p_n) + g_kl KL_n) with respect to (hp, weight_p, bias_p).

    One logits gradient per chunk for all three terms: d/dz_v = g_lp (1[v = y] - p_v) - g_ent p_v (log p_v + H)
    + g_kl p_v (log p_v - log q_v - KL); so the two gradient products are paid once, and the reference's logits are
    recomputed only for chunks where some g_kl is not 0."""
    g_lp, g_ent, g_kl = (None if g is None else g.to(dtype) for g in upstream)
    n_rows, vocab = hp.shape[0], head_p.weight.shape[0]
    rows = min(chunk, max(n_rows, 1))
    buf = _Buffers(rows, vocab, dtype, hp.device, (head_p.softcap is not None, False))
    grads = _grad_buffers(hp, head_p, need, dtype)
    zero = torch.zeros(n_rows, dtype=dtype, device=hp.device)
    slope = zero.clone() if g_kl is None else g_kl.clone()  # coefficient of log p_v in the bracket
    if g_ent is not None:
        slope -= g_ent
    # the row constant: g_lp + g_ent H + g_kl KL
    offset = (zero if g_lp is None else g_lp) + _nonzero_part(g_ent, entropy) + _nonzero_part(g_kl, kl)
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        logp, logq, p = buf.p[: e - s], buf.q[: e - s], buf.tmp[: e - s]
        dp = None if buf.deriv_p is None else buf.deriv_p[: e - s]
        gk = None if g_kl is None else g_kl[s:e]
        uses_q = gk is not None and bool((gk != 0).any())
        if uses_q:
            _chunk_log_probs(logp, logq, p, hp[s:e], head_p, hq[s:e], head_q, temperature, dp)
        else:
            p.div_(_log_softmax_into(logp, p, hp[s:e], head_p, temperature, dp))
        gz = logp.mul_(slope[s:e, None])
        if uses_q:
            unused = gk == 0
            if unused.any():
                logq[unused] = 0  # a row whose KL is unused: its log q may hold -inf
            gz.sub_(logq.mul_(gk[:, None]))
        gz.sub_(offset[s:e, None]).mul_(p).masked_fill_(p == 0, 0)
        if g_lp is not None:
            gz.scatter_add_(1, tokens[s:e, None], g_lp[s:e, None])
        if dp is not None:
            gz.mul_(dp)
        elif head_p.scale != temperature:
            gz.mul_(head_p.scale / temperature)
        _chain(gz, None, hp, head_p, grads, 0, s, e, dtype)
    return grads


class _LinearLogprobKL(torch.autograd.Function):
    """(log p(token), H(p), KL(p || q)) [N] each, with the gradient to the policy side only (the reference is a
    constant). Forward: both models' logits once per chunk; backward: both recomputed, one shared logits gradient."""

    @staticmethod
    def forward(ctx, hp, wp, bp, tokens, hq, wq, bq, temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # entropy is often logged only: no gradient, no work
        head_p, head_q = _Head(wp, bp, scale_p, cap_p), _Head(wq, bq, scale_q, cap_q)
        logprob, entropy, kl = _logprob_kl_forward(hp, head_p, tokens, hq, head_q, temperature, chunk, dtype)
        ctx.save_for_backward(hp, wp, bp, tokens, hq, wq, bq, entropy, kl)
        ctx.args = (temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype)
        return logprob, entropy, kl

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_kl):  # type: ignore[override]
        hp, wp, bp, tokens, hq, wq, bq, entropy, kl = ctx.saved_tensors
        temperature, chunk, scale_p, scale_q, cap_p, cap_q, dtype = ctx.args
        head_p, head_q = _Head(wp, bp, scale_p, cap_p), _Head(wq, bq, scale_q, cap_q)
        need = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(hp.device.type, enabled=False):  # a backward called inside an autocast region
            grads = _logprob_kl_backward(hp, head_p, tokens, hq, head_q, entropy, kl, (g_lp, g_ent, g_kl),
                                         temperature, chunk, dtype, need)  # fmt: skip
        return (*_cast_grads(grads, (hp, wp, bp)), *([None] * 11))


def linear_logprob_kl(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    tokens: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    *,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logit_scale_p: float = 1.0,
    logit_scale_q: float = 1.0,
    softcap_p: float | None = None,
    softcap_q: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's log-prob of each token, its entropy and KL(p || q), from one pass over both heads' logits.

    What an rb policy-gradient loss needs from the LM head in one fused op: the log-probs (the policy-gradient
    term), the entropy (trl's metric and bonus) and K_n (the analytic half of the RB gradient), with any upstream
    gradient on each. Per chunk the forward computes both models' logits once; the backward recomputes them and
    forms a single logits gradient for all three outputs, so the two gradient products are shared: six
    [N, H] x [H, V] products in all, against eight for a log-prob head plus ``linear_weighted_kl_sum``. Same model
    of the logits and the same chunks as ``linear_token_kl``.

    Args:
        hidden_p: policy last hidden states [..., H_p], position-aligned (position i predicts ``tokens[i]``);
            gradients flow into it, ``weight_p`` [V, H_p] and ``bias_p`` [V] (those that require grad).
        tokens: [...] long, the sampled token at each position.
        hidden_q, weight_q, bias_q: the reference side, [..., H_q], [V, H_q], [V]; detached (a constant).
        temperature, chunk_size, logit_scale_*, softcap_*: as in ``linear_token_kl``.

    Returns:
        (log p(tokens), entropy of p, KL(p || q)), each [...] float32 (float64 if any input is float64).
    """
    _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q)
    _check_position_tokens(tokens, hidden_p)
    chunk = _default_chunk(weight_p.shape[0], chunk_size, _LINEAR_CHUNK_ELEMENTS, _LINEAR_CHUNK_ROWS)
    dtype = _compute_dtype(hidden_p, weight_p, hidden_q, weight_q)
    with torch.autocast(hidden_p.device.type, enabled=False):  # float32 math under trl's default bf16 autocast
        outs = _LinearLogprobKL.apply(
            hidden_p.reshape(-1, hidden_p.shape[-1]),
            weight_p,
            bias_p,
            tokens.reshape(-1),
            hidden_q.detach().reshape(-1, hidden_q.shape[-1]),
            weight_q.detach(),
            None if bias_q is None else bias_q.detach(),
            float(temperature),
            chunk,
            float(logit_scale_p),
            float(logit_scale_q),
            softcap_p,
            softcap_q,
            dtype,
        )
    return tuple(x.view(tokens.shape) for x in outs)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Per-sequence estimators and gradient surrogates.
# --------------------------------------------------------------------------------------------------------------------


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits / T)[token] at every position, chunked; [N, V], [N] -> [N]."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk, dtype):  # type: ignore[override]
        n = logits.shape[0]
        out = torch.empty(n, dtype=dtype, device=logits.device)
        for s in range(0, n, chunk):
            # log_softmax is relative to the row max: no precision lost to a large common logit offset.
            logp = torch.log_softmax(_scale(logits[s : s + chunk], temperature, dtype), dim=-1)
            out[s : s + chunk] = logp.gather(-1, tokens[s : s + chunk].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, tokens = ctx.saved_tensors
        t, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s : s + chunk].to(dtype).unsqueeze(-1)
            probs = torch.softmax(_scale(logits[s : s + chunk], t, dtype), dim=-1)
            grad[s : s + chunk] = probs.mul_(-g / t).to(logits.dtype)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), (grad_out.to(dtype).unsqueeze(-1) / t).to(logits.dtype))
        return grad, None, None, None, None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """log softmax(logits / T)[tokens] at every position, chunked over positions.

    Args:
        logits: [..., V] floating; tokens: [...] integer ids, completion-aligned with the logits.

    Returns:
        [...] float32 (float64 for float64 logits), differentiable with respect to the logits.
    """
    _check_float("logits", logits)
    _check_temperature(temperature)
    _check_tokens(logits, tokens, None)
    vocab = logits.shape[-1]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) for logits {tuple(logits.shape)}; got ids in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]. Replace padding ids with a valid id and mask them.")
    chunk = _default_chunk(vocab, chunk_size)
    out = _TokenLogprob.apply(
        logits.reshape(-1, vocab), tokens.reshape(-1).long(), float(temperature), chunk, _compute_dtype(logits)
    )
    return out.view(tokens.shape)


def sequence_kl_terms(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    need_rb: bool = True,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The per-position quantities every estimator is built from, masked to 0 on padding.

    Returns a dict of [B, T] tensors: ``logp`` (log p_n(y_n), with gradient to logits_p), ``r`` (r_n, detached
    from nothing: it carries gradient to both inputs), and, with ``need_rb``, ``K`` (K_n).
    """
    _check_logits_pair(logits_p, logits_q)
    _check_tokens(logits_p, tokens, mask)
    m = mask.bool()
    safe_tokens = torch.where(m, tokens, torch.zeros_like(tokens))
    logp = token_logprobs(logits_p, safe_tokens, temperature=temperature, chunk_size=chunk_size)
    logq = token_logprobs(logits_q, safe_tokens, temperature=temperature, chunk_size=chunk_size)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    out = {"logp": torch.where(m, logp, zero), "r": torch.where(m, logp - logq, zero)}
    if need_rb:
        k = token_kl(logits_p, logits_q, temperature=temperature, chunk_size=chunk_size)
        out["K"] = torch.where(m, k, zero)
    return out


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum_{m >= n} x_m along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


def prefix_importance_weights(
    log_ratio: torch.Tensor, mask: torch.Tensor, *, cap: float | None = None, inclusive: bool = False
) -> torch.Tensor:
    """W_{<t} = prod_{s<t} p(y_s) / p_old(y_s): the importance weight of each position's prefix, [B, T] -> [B, T]
    (with ``inclusive``, W_{<=t}: the prefix up to and including token t).

    Computed in log space (a cumulative sum of log ratios, exponentiated once), so the only overflow is of the weight
    itself: over 512 tokens a mean log ratio of 0.2 already gives W = exp(102), beyond float32.

    Args:
        log_ratio: [B, T] per-token log p(y_t) - log p_old(y_t) (detach it: the weights are constants), aligned with
            the tokens; NaN (a sampler log-prob that was not available) counts as ratio 1, as in trl's vLLM correction.
        mask: [B, T] (1 = a token the sampling policy drew; others contribute factor 1).
        cap: upper bound C on every weight (truncated importance sampling, min(W, C)); None for none.

    Returns:
        [B, T] float (log_ratio's dtype); W_{<0} = 1. Uncapped, it re-weights a batch sampled by p_old into an unbiased
        estimate under p: E_old[W_{<t} f(y_<t)] = E_p[f(y_<t)] for any function of the prefix. Capped, the estimate
        is finite with variance at most C times the on-policy one, and biased by -E_old[(W_{<t} - C)_+ f(y_<t)]: the
        prefixes the current policy favours more than C-fold over the sampler are under-weighted. Uncapped weights
        may be +inf.
    """
    keep = mask.bool() & ~torch.isnan(log_ratio)
    masked = torch.where(keep, log_ratio, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device))
    log_weights = masked.cumsum(-1) if inclusive else masked.cumsum(-1) - masked
    if cap is not None:
        if not cap > 0:
            raise ValueError(f"cap={cap!r}: an importance-weight cap must be positive (or None for no cap).")
        log_weights = log_weights.clamp(max=math.log(cap))
    return torch.exp(log_weights)


def future_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_{m > n} x_m along the last dimension ([..., T] -> [..., T]): what the score term of step n multiplies in
    the RB surrogate (later steps' KL depends on token n; earlier and current ones do not)."""
    return _reverse_cumsum(x) - x


def _value_from_terms(estimator: str, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    r = terms["r"]
    if estimator == "k1":
        return r.sum(-1)
    if estimator == "k2":
        return (0.5 * r * r).sum(-1)
    if estimator == "k3":
        # exp(-r) - 1 + r on padding (r = 0) is 0, so no extra masking is needed.
        return torch.expm1(-r).add(r).sum(-1)
    if estimator == "cv":
        big_r = r.sum(-1)
        return big_r + torch.expm1(-big_r)
    return terms["K"].sum(-1)


def kl_estimate(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "rb",
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-sequence estimate of KL(p || q) from one sampled completion per row.

    Args:
        logits_p, logits_q: [B, T, V] policy and reference logits, completion-aligned with ``tokens``.
        tokens: [B, T] sampled completion ids (drawn from p at ``temperature``).
        mask: [B, T], 1 for real completion tokens (EOS included), 0 for padding.
        estimator: ``k1`` (alias ``mc``): sum r_n; ``k2``: sum r_n^2 / 2 (biased); ``k3``: sum exp(-r_n) - 1 + r_n;
            ``cv``: R + exp(-R) - 1 with R = sum r_n; ``rb`` (alias ``full``): sum K_n. Case-insensitive.
        temperature: the sampling temperature.

    Returns:
        [B] float32 (float64 for float64 logits). Average over rows (and prompts) for the KL estimate.
    """
    name = canonical_estimator(estimator)
    _check_temperature(temperature)
    with torch.no_grad():
        terms = sequence_kl_terms(
            logits_p, logits_q, tokens, mask, temperature=temperature, need_rb=name == "rb", chunk_size=chunk_size
        )
        return _value_from_terms(name, terms)


def kl_surrogate(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "rb",
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-sequence surrogate: its value is ``kl_estimate``, its gradient with respect to ``logits_p`` an estimator
    of the gradient of KL(p || q) with respect to the policy. The reference logits are treated as constants.

    With ``sg`` the stop-gradient and ``l_n = log p_n(y_n)``:

    - ``k1``: ``sg(sum r_n) + sum_n (l_n - sg l_n) * sg(sum_{m>=n} r_m)``: the unbiased score-function (MC) gradient.
    - ``rb``: ``sum_n K_n + sum_n (l_n - sg l_n) * sg(sum_{m>n} K_m)``: the unbiased Rao-Blackwellized gradient.
      Each K_n is r_n's expectation given the prefix, so no K_n is noisier than the r_n it replaces, but the sequence
      sum is not guaranteed to be: K_m of a later step can cancel an earlier r_n, so neither the value's nor the
      gradient's variance (hence mean squared error) is provably at or below k1's
      (tests/test_rb_variance_counterexample.py builds a pair where k1 is constant and rb is not).
    - ``k2``, ``k3``, ``cv``: the value differentiated with the sampled tokens held fixed, as trainers do when they
      put them in the loss. ``k2`` gives sum_n r_n grad l_n, whose mean is the sum of the per-step KL gradients with
      the prefix fixed (no score term for later steps): biased for the sequence KL. ``k3`` gives
      sum_n (1 - exp(-r_n)) grad l_n, whose mean is -sum_n sum_v q_n(v) grad log p_n(v), the gradient of a
      cross-entropy toward q: biased. ``cv`` gives (1 - exp(-R)) sum_n grad l_n: biased.

    Args and shapes as ``kl_estimate``. Returns [B], differentiable with respect to ``logits_p``.
    """
    name = canonical_estimator(estimator)
    terms = sequence_kl_terms(
        logits_p, logits_q.detach(), tokens, mask, temperature=temperature, need_rb=name == "rb", chunk_size=chunk_size
    )
    logp = terms["logp"]
    score = logp - logp.detach()  # value 0, gradient grad l_n
    if name == "k1":
        r = terms["r"].detach()
        return r.sum(-1) + (score * _reverse_cumsum(r)).sum(-1)
    if name == "rb":
        k = terms["K"]
        future = future_sum(k.detach())
        return k.sum(-1) + (score * future).sum(-1)
    return _value_from_terms(name, terms)
