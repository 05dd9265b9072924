"""KL from last hidden states and LM-head weights: neither direction ever holds more than a chunk of [N, V] logits.

One kernel (``_kl_pass``) serves ``linear_token_kl`` (forward, and its recompute-in-backward: the autograd Function
``_LinearTokenKL``) and ``linear_weighted_kl_sum`` (value and policy gradient in a single forward pass:
``_WeightedKLSum``); ``linear_kl_terms`` runs it once, without gradient, for the per-position terms (r, K) every
estimator is built from.

Shapes: hidden states [..., H_p] and [..., H_q], position-aligned (position i is the state before token i, so it
predicts token i); LM-head weights [V, H_p] and [V, H_q], biases [V]; per-position outputs [...] float32 (float64 if
any input is float64). The matrix products run in the weights' dtype, the softmax math in float32 (float64), with
autocast off. Positions go in chunks of 256 by default, fewer where a [chunk, V] buffer would exceed 2**26 elements
(``checks._default_chunk``); the chunk machinery is in ``_head``.
"""

from __future__ import annotations

import torch

from ._head import _Buffers, _cast_grads, _chain, _chunk_log_probs, _grad_buffers, _Head, _rows_kl
from .checks import (
    _LINEAR_CHUNK_ELEMENTS,
    _LINEAR_CHUNK_ROWS,
    _check_float,
    _check_linear_inputs,
    _check_position_tokens,
    _compute_dtype,
    _default_chunk,
)

__all__ = ["linear_kl_terms", "linear_token_kl", "linear_weighted_kl_sum"]


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
