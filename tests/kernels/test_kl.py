"""Unit tests of trl_rb.kl: values against float64 references, gradients (gradcheck), the logits-free linear path,
estimator names, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from enumerable import single_thread

import trl_rb
from trl_rb.kl import (
    ESTIMATORS,
    canonical_estimator,
    compute_kl,
    kl_estimate,
    kl_surrogate,
    linear_kl_terms,
    linear_token_kl,
    linear_weighted_kl_sum,
    research_token_kl,
    sequence_kl_terms,
    token_kl,
    token_logprobs,
)

INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with single_thread():
        yield


def ref_kl(lp: torch.Tensor, lq: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 reference KL per position; entries with p = 0 contribute 0."""
    lp, lq = lp.double() / temperature, lq.double() / temperature
    logp, logq = torch.log_softmax(lp, -1), torch.log_softmax(lq, -1)
    terms = torch.where(logp == -INF, torch.zeros_like(logp), logp.exp() * (logp - logq))
    return terms.sum(-1)


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# token_kl
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_token_kl_matches_float64_reference(dtype, temperature):
    lp, lq = _logits(3, 7, 50, seed=1, dtype=dtype), _logits(3, 7, 50, seed=2, dtype=dtype)
    out = token_kl(lp, lq, temperature=temperature)
    assert out.shape == (3, 7)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(out.double(), ref_kl(lp, lq, temperature), rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 21, 1000])
def test_token_kl_chunking_does_not_change_values_or_grads(chunk_size):
    lp = _logits(21, 33, seed=3, dtype=torch.float64).requires_grad_()
    lq = _logits(21, 33, seed=4, dtype=torch.float64).requires_grad_()
    w = torch.rand(21, dtype=torch.float64)
    out = token_kl(lp, lq, chunk_size=chunk_size, temperature=0.9)
    ref = ref_kl(lp, lq, 0.9)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13)
    g = torch.autograd.grad((w * out).sum(), (lp, lq))
    g_ref = torch.autograd.grad((w * ref).sum(), (lp, lq))
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_token_kl_infinities():
    p = torch.tensor([[0.0, -INF, 1.0], [0.0, -600.0, 1.0], [0.0, 2.0, 1.0], [-INF, 0.0, 1.0], [0.0, 1.0, 2.0]])
    q = torch.tensor([[0.0, -INF, 1.0], [0.0, -INF, 1.0], [0.0, -INF, 1.0], [0.0, 0.5, 1.0], [0.0, 1.0, 2.0]])
    out = token_kl(p, q)
    # p = 0 where q = 0: contributes 0, finite. p > 0 where q = 0: +inf, even when p underflows float32 (e^-600).
    assert torch.isfinite(out[0]) and float(out[0]) == pytest.approx(0.0, abs=1e-7)
    assert out[1] == INF and out[2] == INF
    # p = 0 at a finite q entry: finite, equals the float64 reference.
    assert float(out[3]) == pytest.approx(float(ref_kl(p[3], q[3])), rel=1e-6) and float(out[3]) > 0.1
    assert float(out[4]) == pytest.approx(0.0, abs=1e-7)
    # A NaN logit is not hidden.
    assert torch.isnan(token_kl(torch.tensor([0.0, float("nan")]), torch.tensor([0.0, 0.0])))


def test_token_kl_large_offsets_keep_precision():
    # Logits near 1e4 with a moderate spread: rounding must be relative to the spread, not the offset.
    base = _logits(16, 200, seed=5, scale=3.0) + 1e4
    shifted = base + 7.0  # the same distribution
    other = base + _logits(16, 200, seed=6, scale=0.05)
    assert torch.all(token_kl(base, shifted).abs() < 1e-6)
    assert torch.allclose(token_kl(base, other).double(), ref_kl(base, other), rtol=1e-4, atol=1e-6)
    tokens = torch.randint(200, (16,), generator=torch.Generator().manual_seed(0))
    lp = token_logprobs(base, tokens)
    assert torch.allclose(lp.double(), torch.log_softmax(base.double(), -1).gather(-1, tokens[:, None])[:, 0], atol=2e-5)


def test_token_kl_gradcheck():
    lp = _logits(4, 6, seed=7, dtype=torch.float64).requires_grad_()
    lq = _logits(4, 6, seed=8, dtype=torch.float64).requires_grad_()
    for temperature in (1.0, 0.7):
        assert torch.autograd.gradcheck(
            lambda a, b, t=temperature: token_kl(a, b, temperature=t, chunk_size=3), (lp, lq), fast_mode=temperature != 1.0
        )
    # Gradient with respect to one input only.
    out = token_kl(lp, lq.detach()).sum()
    (g,) = torch.autograd.grad(out, lp)
    assert torch.allclose(g, torch.autograd.grad(ref_kl(lp, lq.detach()).sum(), lp)[0], atol=1e-12)


def test_token_kl_grad_dtype_bf16():
    lp = _logits(3, 10, seed=9, dtype=torch.bfloat16).requires_grad_()
    lq = _logits(3, 10, seed=10, dtype=torch.bfloat16).requires_grad_()
    token_kl(lp, lq).sum().backward()
    assert lp.grad.dtype == torch.bfloat16 and lq.grad.dtype == torch.bfloat16
    ref_p = lp.detach().double().requires_grad_()
    ref_kl(ref_p, lq.detach().double()).sum().backward()
    assert torch.allclose(lp.grad.double(), ref_p.grad, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------------
# token_logprobs and linear_token_kl
# --------------------------------------------------------------------------------------------------------------------


def test_token_logprobs_values_and_gradcheck():
    logits = _logits(2, 5, 9, seed=11, dtype=torch.float64).requires_grad_()
    tokens = torch.randint(9, (2, 5), generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 1.7):
        out = token_logprobs(logits, tokens, temperature=temperature, chunk_size=3)
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(out, ref, atol=1e-13)
        assert torch.autograd.gradcheck(
            lambda x, t=temperature: token_logprobs(x, tokens, temperature=t, chunk_size=4), (logits,), fast_mode=True
        )
    assert token_logprobs(logits.detach().half(), tokens).dtype == torch.float32
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 9\)"):
        token_logprobs(logits, tokens + 9)


def _head(v, h, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(v, h, generator=gen, dtype=dtype), torch.randn(v, generator=gen, dtype=dtype)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(bias=True),
        dict(bias=True, logit_scale_p=1.7, logit_scale_q=0.6, temperature=0.8),
        dict(softcap_p=3.0, softcap_q=5.0, temperature=1.3),
        dict(bias=True, softcap_p=2.0, logit_scale_q=2.0),
    ],
)
def test_linear_token_kl_equals_token_kl_on_materialized_logits(options):
    options = dict(options)
    bias = options.pop("bias", False)
    wp, bp = _head(11, 6, 0)
    wq, bq = _head(11, 4, 1)  # different hidden sizes
    hp = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hq = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in (hp, wp, bp, hq, wq, bq)]
    hp_, wp_, bp_, hq_, wq_, bq_ = leaves
    t = options.get("temperature", 1.0)

    def materialize(h, w, b, scale, cap):
        z = (h @ w.T + (b if bias else 0)) * scale
        return cap * torch.tanh(z / cap) if cap is not None else z

    kw = dict(bias_p=bp_ if bias else None, bias_q=bq_ if bias else None, chunk_size=3, **options)
    out = linear_token_kl(hp_, wp_, hq_, wq_, **kw)
    zp = materialize(hp_, wp_, bp_, options.get("logit_scale_p", 1.0), options.get("softcap_p"))
    zq = materialize(hq_, wq_, bq_, options.get("logit_scale_q", 1.0), options.get("softcap_q"))
    ref = token_kl(zp, zq, temperature=t)
    assert out.shape == (2, 5) and out.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13)
    w = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    used = [x for x, name in zip(leaves, ("h", "w", "b", "h", "w", "b"), strict=True) if bias or name != "b"]
    g = torch.autograd.grad((w * out).sum(), used)
    g_ref = torch.autograd.grad((w * ref).sum(), used)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    if not (bias and options.get("softcap_p")):
        return
    # And against finite differences, once with every option on (gradcheck is slow).
    small = [x.detach()[..., :3, :].clone().requires_grad_() if x.dim() == 3 else x.detach().clone().requires_grad_()
             for x in leaves]

    def fn(hp, wp, bp, hq, wq, bq):
        return linear_token_kl(hp, wp, hq, wq, **(kw | dict(bias_p=bp if bias else None, bias_q=bq if bias else None)))

    assert torch.autograd.gradcheck(fn, tuple(small), fast_mode=True)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(logit_scale_p=1.7, logit_scale_q=0.6, temperature=0.8), dict(softcap_p=2.0, softcap_q=5.0, temperature=1.3)],
)
def test_linear_kl_terms_equal_sequence_kl_terms_on_materialized_logits(options):
    """r and K from hidden states and heads equal those from the logits, biases (one -inf entry) and chunks included."""
    wp, bp = _head(11, 6, 0)
    wq, bq = _head(11, 4, 1)
    bq[7] = -math.inf  # the reference cannot emit token 7: K = +inf where the policy can, r = +inf where sampled
    hp = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hq = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    tokens[0, 0] = 7
    t = options.get("temperature", 1.0)

    def materialize(h, w, b, scale, cap):
        z = (h @ w.T + b) * scale
        return cap * torch.tanh(z / cap) if cap is not None else z

    out = linear_kl_terms(hp, wp, hq, wq, tokens, bias_p=bp, bias_q=bq, chunk_size=3, **options)
    zp = materialize(hp, wp, bp, options.get("logit_scale_p", 1.0), options.get("softcap_p"))
    zq = materialize(hq, wq, bq, options.get("logit_scale_q", 1.0), options.get("softcap_q"))
    ref = sequence_kl_terms(zp, zq, tokens, torch.ones_like(tokens, dtype=torch.bool), temperature=t)
    assert out["r"].dtype == out["K"].dtype == torch.float64 and out["r"].shape == (2, 5)
    if options.get("softcap_q") is None:  # (a soft-cap maps the -inf logit to -softcap_q: finite)
        assert torch.isinf(out["r"][0, 0]) and torch.isinf(out["K"]).all()
    for name in ("r", "K"):
        finite = torch.isfinite(ref[name])
        assert torch.equal(finite, torch.isfinite(out[name])) and torch.equal(out[name][~finite], ref[name][~finite])
        assert torch.allclose(out[name][finite], ref[name][finite], rtol=1e-12, atol=1e-12)
    bq_finite = bq.clone()
    bq_finite[7] = 0.0
    k = linear_kl_terms(hp, wp, hq, wq, tokens, bias_p=bp, bias_q=bq_finite, **options)["K"]
    zq = materialize(hq, wq, bq_finite, options.get("logit_scale_q", 1.0), options.get("softcap_q"))
    assert torch.allclose(k, token_kl(zp, zq, temperature=t), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="tokens must be long"):
        linear_kl_terms(hp, wp, hq, wq, tokens.float(), bias_p=bp, bias_q=bq)


def test_linear_token_kl_float32_and_bf16_weights():
    wp, _ = _head(40, 8, 5, torch.float32)
    wq, _ = _head(40, 8, 6, torch.float32)
    h = torch.randn(3, 8)
    ref = token_kl(h @ wp.T, h @ wq.T)
    assert torch.allclose(linear_token_kl(h, wp, h, wq), ref, rtol=1e-5, atol=1e-6)
    out = linear_token_kl(h.bfloat16(), wp.bfloat16(), h.bfloat16(), wq.bfloat16())
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("softcap_p", [None, 2.5])
def test_linear_weighted_kl_sum_equals_autograd_through_linear_token_kl(softcap_p):
    # float64, bias, logit scales, soft-capping, temperature, padding with weight 0 and garbage (inf) hidden states
    wp, bp = _head(13, 6, 10)
    wq, bq = _head(13, 5, 11)
    gen = torch.Generator().manual_seed(12)
    hp = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen)
    hq = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    weights = torch.rand(3, 4, dtype=torch.float64, generator=gen) + 0.1
    weights[0, 3] = weights[2, 2:] = 0.0
    hp[2, 3] = hq[2, 3] = INF  # a padded position: must not touch the value or the gradients
    kw = dict(temperature=0.7, logit_scale_p=1.3, logit_scale_q=0.8, softcap_p=softcap_p, softcap_q=4.0, chunk_size=5)

    leaves = [t.clone().requires_grad_() for t in (hp, wp, bp)]
    total, values = linear_weighted_kl_sum(
        leaves[0], leaves[1], hq, wq, weights, bias_p=leaves[2], bias_q=bq, return_token_kl=True, **kw
    )
    grads = torch.autograd.grad(total, leaves)

    ref_leaves = [t.clone().requires_grad_() for t in (hp, wp, bp)]
    used = weights != 0
    per_token = linear_token_kl(ref_leaves[0][used], ref_leaves[1], hq[used], wq, bias_p=ref_leaves[2], bias_q=bq, **kw)
    ref_total = (weights[used] * per_token).sum()
    ref_grads = torch.autograd.grad(ref_total, ref_leaves)

    assert total.dim() == 0 and total.dtype == torch.float64
    assert torch.allclose(total, ref_total, rtol=1e-12, atol=0)
    assert values.shape == (3, 4) and not values.requires_grad
    assert torch.equal(values[~used], torch.zeros(int((~used).sum()), dtype=torch.float64))
    assert torch.allclose(values[used], per_token.detach(), rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.equal(grads[0][~used], torch.zeros_like(grads[0][~used]))
    # without return_token_kl: the same scalar; under no_grad: the same value, nothing to differentiate
    assert torch.equal(linear_weighted_kl_sum(hp, wp, hq, wq, weights, bias_p=bp, bias_q=bq, **kw), total.detach())
    with torch.no_grad():
        value = linear_weighted_kl_sum(leaves[0], leaves[1], hq, wq, weights, bias_p=leaves[2], bias_q=bq, **kw)
    assert not value.requires_grad and torch.allclose(value, ref_total.detach(), rtol=1e-12, atol=0)


def test_linear_weighted_kl_sum_bad_weights():
    w = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="weights"):
        linear_weighted_kl_sum(torch.zeros(2, 3), w, torch.zeros(2, 3), w, torch.ones(3))
    with pytest.raises(TypeError, match="weights"):
        linear_weighted_kl_sum(torch.zeros(2, 3), w, torch.zeros(2, 3), w, torch.ones(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------------
# compute_kl, estimators, surrogates
# --------------------------------------------------------------------------------------------------------------------


def test_compute_kl_research_semantics():
    lp, lq = _logits(2, 4, 9, seed=12), _logits(2, 4, 9, seed=13)
    new, ref = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(compute_kl(new, ref), new - ref)
    research = (torch.softmax(lp, -1) * (torch.log_softmax(lp, -1) - torch.log_softmax(lq, -1))).sum(-1)
    assert torch.allclose(compute_kl(new, ref, lp, lq), research, atol=1e-6)
    assert torch.allclose(research_token_kl(lp, lq), research)
    with pytest.raises(ValueError, match="both logits_p and logits_q"):
        compute_kl(new, ref, lp, None)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        compute_kl(new, ref[:, :3])


def _sequence_case(seed=0, b=4, t=6, v=7, temperature=1.0):
    lp, lq = _logits(b, t, v, seed=seed, dtype=torch.float64), _logits(b, t, v, seed=seed + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(v, (b, t), generator=gen)
    lengths = torch.tensor([t, 1, 3, t - 1])[:b]
    mask = (torch.arange(t) < lengths[:, None]).long()
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, -100))  # padding ids need not be valid
    return lp, lq, tokens, mask


@pytest.mark.parametrize("temperature", [1.0, 0.75])
def test_kl_estimate_values(temperature):
    lp, lq, tokens, mask = _sequence_case(temperature=temperature)
    logp = torch.log_softmax(lp / temperature, -1)
    logq = torch.log_softmax(lq / temperature, -1)
    safe = tokens.clamp(min=0).unsqueeze(-1)
    r = ((logp.gather(-1, safe) - logq.gather(-1, safe)).squeeze(-1)) * mask
    k = ref_kl(lp, lq, temperature) * mask
    big_r = r.sum(-1)
    expected = {
        "k1": big_r,
        "k2": (0.5 * r**2).sum(-1),
        "k3": ((torch.exp(-r) - 1 + r) * mask).sum(-1),
        "cv": big_r + torch.exp(-big_r) - 1,
        "rb": k.sum(-1),
    }
    for name, value in expected.items():
        out = kl_estimate(lp, lq, tokens, mask, name, temperature=temperature)
        assert out.shape == (4,) and out.dtype == torch.float64
        assert torch.allclose(out, value, rtol=1e-12, atol=1e-13), name
        surrogate = kl_surrogate(lp, lq, tokens, mask, name, temperature=temperature)
        assert torch.allclose(surrogate, value, rtol=1e-12, atol=1e-13), name
    terms = sequence_kl_terms(lp, lq, tokens, mask, temperature=temperature)
    assert torch.allclose(terms["r"], r) and torch.allclose(terms["K"], k)


def test_padding_with_infinite_kl_gets_zero_gradient():
    # A padded position whose reference puts 0 mass where the policy does not (KL = +inf there) must not leak
    # inf / NaN into the loss or the gradient.
    lp = _logits(2, 3, 4, seed=20).requires_grad_()
    lq = _logits(2, 3, 4, seed=21)
    lq[0, 2, 1] = -INF
    tokens = torch.tensor([[0, 1, 2], [3, 2, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.isinf(token_kl(lp, lq)[0, 2])
    for name in ("rb", "k1"):
        out = kl_surrogate(lp, lq, tokens, mask, name)
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.sum(), lp)
        assert torch.isfinite(g).all() and torch.all(g[0, 2] == 0)


def test_kl_estimate_float32_from_bf16():
    lp, lq, tokens, mask = _sequence_case()
    out = kl_estimate(lp.bfloat16(), lq.bfloat16(), tokens, mask, "rb")
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), (ref_kl(lp.bfloat16(), lq.bfloat16()) * mask).sum(-1), atol=1e-5)


def test_surrogate_gradients_single_sequence():
    # One sequence, hand-derived: k1 grad wrt logits_p at step n is grad l_n * sum_{m>=n} r_m; rb adds grad K_n
    # and uses sum_{m>n} K_m. The reference logits get no gradient.
    lp, lq, tokens, mask = _sequence_case(b=1, t=4)
    lp.requires_grad_()
    lq.requires_grad_()
    logp = torch.log_softmax(lp, -1)
    onehot = torch.nn.functional.one_hot(tokens.clamp(min=0), lp.shape[-1]).double()
    grad_l = (onehot - logp.exp()) * mask.unsqueeze(-1)  # d l_n / d logits_n
    with torch.no_grad():
        terms = sequence_kl_terms(lp, lq, tokens, mask)
    r, k = terms["r"][0], terms["K"][0]
    future_r = r.flip(0).cumsum(0).flip(0)
    future_k = k.flip(0).cumsum(0).flip(0) - k
    (g1,) = torch.autograd.grad(kl_surrogate(lp, lq, tokens, mask, "k1").sum(), lp)
    assert torch.allclose(g1[0], grad_l[0] * future_r.unsqueeze(-1), atol=1e-12)
    (gk,) = torch.autograd.grad((ref_kl(lp, lq) * mask).sum(), lp)
    (grb,) = torch.autograd.grad(kl_surrogate(lp, lq, tokens, mask, "full").sum(), lp)
    assert torch.allclose(grb[0], gk[0] + grad_l[0] * future_k.unsqueeze(-1), atol=1e-12)
    out = kl_surrogate(lp, lq, tokens, mask, "rb").sum()
    out.backward()
    assert lq.grad is None


def test_estimator_names():
    assert set(ESTIMATORS) == {"k1", "k2", "k3", "cv", "rb"}
    for name, canonical in [("MC", "k1"), ("mc", "k1"), ("K1", "k1"), ("Full", "rb"), ("RB", "rb"), ("k3", "k3")]:
        assert canonical_estimator(name) == canonical
    lp, lq, tokens, mask = _sequence_case()
    assert torch.equal(kl_estimate(lp, lq, tokens, mask, "FULL"), kl_estimate(lp, lq, tokens, mask, "rb"))
    assert torch.equal(kl_estimate(lp, lq, tokens, mask, "Mc"), kl_estimate(lp, lq, tokens, mask, "k1"))
    for fn in (kl_estimate, kl_surrogate):
        with pytest.raises(ValueError, match=r"'k4'.*k1 \(alias mc\), k2, k3, cv, rb \(alias full\)"):
            fn(lp, lq, tokens, mask, "k4")
    with pytest.raises(ValueError, match="valid estimators are: k1 .*, rb"):
        canonical_estimator("k2", allowed=("k1", "rb"))


def test_public_exports():
    names = ("token_kl", "linear_token_kl", "linear_weighted_kl_sum", "token_logprobs", "kl_estimate", "kl_surrogate")
    for name in (*names, "compute_kl"):
        assert getattr(trl_rb, name) is getattr(trl_rb.kl, name)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def test_mismatched_shapes_name_both():
    a, b = torch.zeros(2, 3, 5), torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4, 5\)"):
        token_kl(a, b)
    with pytest.raises(ValueError, match=r"different vocabulary sizes.*\(2, 3, 5\).*\(2, 3, 6\)"):
        token_kl(a, torch.zeros(2, 3, 6))
    tokens, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    for fn in (kl_estimate, kl_surrogate):
        with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4, 5\)"):
            fn(a, b, tokens, mask)
        with pytest.raises(ValueError, match=r"tokens \(2, 4\).*logits \(2, 3, 5\)"):
            fn(a, a, tokens, mask)
        with pytest.raises(ValueError, match=r"mask \(2, 4\).*tokens \(2, 3\)"):
            fn(a, a, tokens[:, :3], mask)
    with pytest.raises(ValueError, match=r"tokens \(2, 4\).*logits \(2, 3, 5\)"):
        token_logprobs(a, tokens)
    w = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"weight_p \(5, 3\).*weight_q \(6, 3\)"):
        linear_token_kl(torch.zeros(2, 3), w, torch.zeros(2, 3), torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"hidden_p \(2, 4\) vs weight_p \(5, 3\)"):
        linear_token_kl(torch.zeros(2, 4), w, torch.zeros(2, 3), w)
    with pytest.raises(ValueError, match=r"hidden_p \(2, 3\) and hidden_q \(4, 3\)"):
        linear_token_kl(torch.zeros(2, 3), w, torch.zeros(4, 3), w)


def test_dtype_errors():
    ints = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point"):
        token_kl(ints, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        token_kl(torch.zeros(2, 5), ints)
    with pytest.raises(TypeError, match="floating-point"):
        token_logprobs(ints, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        kl_estimate(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(TypeError, match="floating-point"):
        linear_token_kl(torch.zeros(2, 3, dtype=torch.long), torch.zeros(5, 3), torch.zeros(2, 3), torch.zeros(5, 3))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    a = torch.zeros(1, 2, 5)
    tokens, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    calls = [
        lambda: token_kl(a, a, temperature=temperature),
        lambda: token_logprobs(a, tokens, temperature=temperature),
        lambda: kl_estimate(a, a, tokens, mask, temperature=temperature),
        lambda: kl_surrogate(a, a, tokens, mask, temperature=temperature),
        lambda: linear_token_kl(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 3), torch.zeros(5, 3),
                                temperature=temperature),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 5), chunk_size=0)


# --------------------------------------------------------------------------------------------------------------------
# Memory: token_kl's extra memory is bounded by its chunk, the research formula's grows with N * V.
# --------------------------------------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from trl_rb.kl import research_token_kl, token_kl
    torch.set_num_threads(1)
    n, v, method, backward = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    fn = token_kl if method == "token_kl" else research_token_kl
    def kib(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
    p = torch.randn(n, v).requires_grad_(backward)
    q = torch.randn(n, v).requires_grad_(backward)
    warm = fn(p[:2].detach().requires_grad_(backward), q[:2].detach().requires_grad_(backward))
    if backward:
        warm.sum().backward()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    base = kib("VmRSS")
    out = fn(p, q)
    if backward:
        out.sum().backward()
    extra = (kib("VmHWM") - base) * 1024 - (2 * p.nbytes if backward else 0)
    print(json.dumps(extra))
    """
)


def _extra_bytes(n: int, v: int, method: str, backward: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(n), str(v), method, "1" if backward else "0"],
        capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS counters")
def test_token_kl_extra_memory_is_bounded():
    n, v = 1024, 16384  # 64 MiB per input
    mib = 2**20
    research = _extra_bytes(n, v, "research", backward=False)
    assert research > 150 * mib  # the meter sees the formula's [N, V] temporaries (about 4 of them)
    # Forward and backward (the peak covers the forward too), beyond the inputs and their gradients.
    assert _extra_bytes(n, v, "token_kl", backward=True) < 24 * mib
