"""The KL kernels the trainers run on hidden states and LM heads, without a trainer: the single-pass loss kernel
(``weighted_kl_sum_from_hidden``, gradient computed in its forward) and the per-token path against autograd through
``linear_token_kl``, and the linear kernels under bf16 autocast (trl's default ``bf16=True``, on CPU too)."""

from __future__ import annotations

import pytest
import torch

from trl_rb.kl import linear_token_kl, linear_weighted_kl_sum
from trl_rb.trainers.heads import HeadParams
from trl_rb.trainers.token_kl import token_kl_from_hidden, weighted_kl_sum_from_hidden


@pytest.mark.parametrize(("scale", "softcap", "bias"), [(1.0, None, False), (0.7, None, True), (1.3, 5.0, True)])
def test_single_pass_kernel_matches_autograd(scale, softcap, bias):
    """The loss kernel (gradient computed in its forward) equals autograd through linear_token_kl, float64."""
    g = torch.Generator().manual_seed(0)
    b, c, hdim, hq_dim, vocab = 3, 5, 6, 4, 11
    hp = torch.randn(b, c, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    wp = torch.randn(vocab, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    bp = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    hq = torch.randn(b, c, hq_dim, generator=g, dtype=torch.float64)
    wq = torch.randn(vocab, hq_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    weights = mask * torch.tensor([[0.2], [0.5], [1.5]], dtype=torch.float64)
    head_p, head_q = HeadParams(wp, bp, scale, softcap), HeadParams(wq, None, 1.0, softcap)

    got = weighted_kl_sum_from_hidden(hp, head_p, hq, head_q, weights, temperature=0.8, chunk_size=3)
    params = [x for x in (hp, wp, bp) if x is not None]
    got_grads = torch.autograd.grad(got * 2.5, params)
    k = linear_token_kl(hp, wp, hq, wq, bias_p=bp, temperature=0.8, logit_scale_p=scale, softcap_p=softcap,
                        softcap_q=softcap)
    want = (weights * k).sum()
    want_grads = torch.autograd.grad(want * 2.5, params)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8)
    # the masked per-token path agrees, with exact zeros on padding
    per_token = token_kl_from_hidden(hp, head_p, hq, head_q, temperature=0.8, mask=mask)
    torch.testing.assert_close(per_token, torch.where(mask.bool(), k, 0.0).detach(), rtol=1e-10, atol=0)
    assert (per_token[mask == 0] == 0).all()
    with torch.no_grad():  # the values-only fast path (scoring) agrees too
        fast = token_kl_from_hidden(hp, head_p, hq, head_q, temperature=0.8, mask=mask, chunk_size=2)
    torch.testing.assert_close(fast, per_token, rtol=1e-10, atol=1e-12)


def test_linear_kl_under_bf16_autocast_stays_float32():
    gen = torch.Generator().manual_seed(0)
    hp = torch.randn(37, 16, generator=gen, requires_grad=True)
    wp = torch.randn(50, 16, generator=gen, requires_grad=True)
    hq, wq = torch.randn(37, 16, generator=gen), torch.randn(50, 16, generator=gen)
    weights = torch.rand(37, generator=gen)

    def value_and_grads():
        total = linear_weighted_kl_sum(hp, wp, hq, wq, weights, temperature=0.7)
        per_token = linear_token_kl(hp, wp, hq, wq, temperature=0.7)
        grads = torch.autograd.grad(total + per_token.sum(), (hp, wp))
        return [total, per_token, *grads]

    plain = value_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = value_and_grads()
    for a, b in zip(plain, autocast, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)  # bf16 products would be off by ~1e-2
