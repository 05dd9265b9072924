"""Property tests (hypothesis) of token_kl, compute_kl and kl_estimate on adversarial logits: -inf entries, magnitudes
up to 1e4, bf16 / fp16 / fp32 inputs, temperatures != 1. References are float64 computations on the same (rounded)
input values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from enumerable import single_thread
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_rb.kl import compute_kl, kl_estimate, token_kl

INF = math.inf
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with single_thread():
        yield


SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


@st.composite
def logit_pairs(draw, max_rows: int = 6, max_vocab: int = 40):
    """(logits_p, logits_q, temperature): [n, V] in a low-precision or float32 dtype, magnitudes up to 1e4, -inf
    entries in either (never a whole row: both are distributions), sometimes q = p plus a small perturbation (KL near 0)."""
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(2, max_vocab))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e3, 1e4]))
    offset = draw(st.sampled_from([0.0, 0.0, 1e3, -1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    p = rng.uniform(-1, 1, (n, v)) * scale + offset
    if draw(st.booleans()):
        q = p + rng.normal(0, draw(st.sampled_from([1e-3, 0.1, 1.0])), (n, v))
    else:
        q = rng.uniform(-1, 1, (n, v)) * scale + offset
    p, q = np.clip(p, -1e4, 1e4), np.clip(q, -1e4, 1e4)
    if draw(st.booleans()):
        p[rng.random((n, v)) < 0.3] = -INF
        p[np.arange(n), rng.integers(0, v, n)] = offset  # at least one finite entry per row of p
    if draw(st.booleans()):
        q[rng.random((n, v)) < 0.3] = -INF
        q[np.arange(n), rng.integers(0, v, n)] = offset  # q is a distribution too: never a whole row of -inf
        if draw(st.booleans()):  # keep q's support wide enough that the KL is finite
            q[np.isinf(q) & np.isfinite(p)] = offset - scale
    temperature = draw(st.sampled_from([1.0, 0.5, 0.9, 1.7, 3.0]))
    return torch.tensor(p).to(dtype), torch.tensor(q).to(dtype), temperature


def reference(lp: torch.Tensor, lq: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 KL on the same input values: p = 0 entries contribute 0; p > 0 where q = 0 gives +inf."""
    logp = torch.log_softmax(lp.double() / temperature, -1)
    logq = torch.log_softmax(lq.double() / temperature, -1)
    support = lp != -INF
    terms = torch.where(support, logp.exp() * (logp - logq), torch.zeros_like(logp))
    kl = terms.sum(-1)
    return torch.where((support & (lq == -INF)).any(-1), torch.full_like(kl, INF), kl)


@SETTINGS
@given(logit_pairs())
def test_token_kl_properties(case):
    lp, lq, temperature = case
    out = token_kl(lp, lq, temperature=temperature)
    ref = reference(lp, lq, temperature)
    assert out.dtype == torch.float32 and out.shape == lp.shape[:-1]
    infinite = torch.isinf(ref)
    # +inf exactly where q is 0 somewhere p is not; finite everywhere else.
    assert torch.equal(torch.isinf(out), infinite) and bool((out[infinite] > 0).all())
    assert bool(torch.isfinite(out[~infinite]).all())
    assert bool((out[~infinite] >= -1e-6).all())
    # float32 math relative to each row's max: error at the scale of the log-ratios, not of the logits.
    diff = (out[~infinite].double() - ref[~infinite]).abs()
    assert bool((diff <= 1e-5 + 2e-5 * ref[~infinite].abs()).all()), (diff.max(), ref[~infinite])


@SETTINGS
@given(logit_pairs())
def test_token_kl_gradients_finite_where_kl_is(case):
    lp, lq, temperature = case
    lp, lq = lp.float().requires_grad_(), lq.float().requires_grad_()
    out = token_kl(lp, lq, temperature=temperature)
    finite = torch.isfinite(out)
    out[finite].sum().backward()
    assert bool(torch.isfinite(lp.grad[finite]).all()) and bool(torch.isfinite(lq.grad[finite]).all())
    # Softmax gradients sum to 0 over the vocabulary (shift invariance).
    assert torch.allclose(lp.grad.sum(-1), torch.zeros(lp.shape[0]), atol=1e-4)
    assert torch.allclose(lq.grad.sum(-1), torch.zeros(lq.shape[0]), atol=1e-4)


@st.composite
def finite_pairs(draw):
    n, v = draw(st.integers(1, 4)), draw(st.integers(2, 30))
    b, t = draw(st.integers(1, 3)), n
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 5.0, 50.0]))
    rng = np.random.default_rng(seed)
    lp = torch.tensor(rng.normal(0, scale, (b, t, v)), dtype=torch.float32)
    lq = torch.tensor(rng.normal(0, scale, (b, t, v)), dtype=torch.float32)
    return lp, lq


@SETTINGS
@given(finite_pairs())
def test_compute_kl_matches_research_formula(pair):
    lp, lq = pair
    research = (torch.softmax(lp.double(), -1) * (torch.log_softmax(lp.double(), -1) - torch.log_softmax(lq.double(), -1))).sum(-1)
    out = compute_kl(torch.zeros(lp.shape[:-1]), torch.zeros(lp.shape[:-1]), lp, lq)
    assert torch.allclose(out.double(), research, rtol=2e-5, atol=1e-5)
    new, ref = torch.randn(lp.shape[:-1]), torch.randn(lp.shape[:-1])
    assert torch.equal(compute_kl(new, ref), new - ref)


@SETTINGS
@given(finite_pairs(), st.sampled_from([1.0, 0.6, 2.0]), st.integers(0, 2**31 - 1))
def test_kl_estimate_properties(pair, temperature, seed):
    lp, lq = pair
    b, t, v = lp.shape
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(v, (b, t), generator=gen)
    mask = (torch.arange(t) < torch.randint(1, t + 1, (b, 1), generator=gen)).long()
    values = {name: kl_estimate(lp, lq, tokens, mask, name, temperature=temperature) for name in ("k1", "k2", "k3", "cv", "rb")}
    for name in ("k2", "k3", "cv", "rb"):  # non-negative estimators
        assert bool((values[name] >= -1e-5).all()), name
    k = (reference(lp.reshape(-1, v), lq.reshape(-1, v), temperature).reshape(b, t) * mask).sum(-1)
    assert torch.allclose(values["rb"].double(), k, rtol=2e-5, atol=1e-5)
    logp = torch.log_softmax(lp.double() / temperature, -1).gather(-1, tokens[..., None])[..., 0]
    logq = torch.log_softmax(lq.double() / temperature, -1).gather(-1, tokens[..., None])[..., 0]
    r = (logp - logq) * mask
    assert torch.allclose(values["k1"].double(), r.sum(-1), rtol=2e-5, atol=1e-4)
    assert torch.allclose(values["k2"].double(), (0.5 * r * r).sum(-1), rtol=2e-5, atol=1e-4)
