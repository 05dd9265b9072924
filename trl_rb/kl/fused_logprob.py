"""The rb loss's policy head: log-probs, entropy and KL from the same tiles, with one shared backward.

``linear_logprob_kl`` (the autograd Function ``_LinearLogprobKL``): from the policy's and the reference's last hidden
states [..., H_p] and [..., H_q], their LM heads [V, H_p] and [V, H_q] (biases [V]) and the sampled tokens [...] long
(position i predicts ``tokens[i]``), the policy's log p(tokens), entropy H(p) and KL(p || q), each [...] float32
(float64 if any input is float64), with gradient to the policy side only. ``_logprob_kl_forward`` and
``_logprob_kl_backward`` are its two chunked passes, built on the chunk machinery of ``_head`` (same model of the logits
and the same chunks as ``linear.linear_token_kl``); ``_entropy`` is the entropy per row of one chunk.
"""

from __future__ import annotations

import torch

from ._head import _Buffers, _cast_grads, _chain, _chunk_log_probs, _grad_buffers, _Head, _log_softmax_into, _rows_kl
from .checks import (
    _LINEAR_CHUNK_ELEMENTS,
    _LINEAR_CHUNK_ROWS,
    _check_linear_inputs,
    _check_position_tokens,
    _compute_dtype,
    _default_chunk,
)

__all__ = ["linear_logprob_kl"]


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
