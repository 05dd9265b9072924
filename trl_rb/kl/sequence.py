"""Per-sequence estimators and gradient surrogates, from logits [B, T, V], sampled tokens [B, T] and a mask [B, T].

``logits[b, t]`` is the next-token distribution ``tokens[b, t]`` was drawn from (completion-aligned); ``mask[b, t]`` is 1
for real completion tokens (EOS included) and 0 for padding. Holds:

- ``token_logprobs``: log softmax(logits / T)[tokens], [...] float32 (float64 for float64 logits), chunked over
  positions (the autograd Function ``_TokenLogprob``);
- ``sequence_kl_terms``: the per-position terms every estimator is built from (log p_n(y_n), r_n, K_n), [B, T];
- ``kl_estimate`` and ``kl_surrogate``: the per-sequence estimate [B] of each estimator of
  ``estimators.ESTIMATORS``, and a surrogate whose gradient estimates the KL's;
- ``future_sum`` (sum over later positions, the RB score term's factor) and ``prefix_importance_weights`` (W_{<t},
  for batches another policy sampled), over the last dimension.
"""

from __future__ import annotations

import math

import torch

from .checks import _check_float, _check_logits_pair, _check_tokens, _compute_dtype, _default_chunk, check_temperature
from .estimators import canonical_estimator
from .logits import _scale, token_kl

__all__ = [
    "future_sum",
    "kl_estimate",
    "kl_surrogate",
    "prefix_importance_weights",
    "sequence_kl_terms",
    "token_logprobs",
]


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
    check_temperature(temperature)
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
    check_temperature(temperature)
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
      (tests/kernels/test_rb_variance_counterexample.py builds a pair where k1 is constant and rb is not).
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
