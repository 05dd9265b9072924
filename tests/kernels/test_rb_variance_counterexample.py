"""Sequence-level RB is not always lower-variance than k1: a two-step counterexample, computed exactly.

Each K_n = E[r_n | y_<n] is a Rao-Blackwellization of r_n, but sum_n K_n is not the conditional expectation of
sum_n r_n given a single sigma-algebra: K_2 depends on y_1, and Cov(K_2, r_1 - K_1) can be negative. Here r_1 and
K_2(y_1) cancel exactly, so k1 is constant (variance 0) while RB is not. On typical model pairs RB's variance is far
lower (tests/kernels/test_estimators_statistics.py); this test keeps the limit of that claim documented and true.
"""

import math

import torch

from trl_rb import kl_estimate

NEG_INF = float("-inf")


def _two_step_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every completion of a 2-token vocabulary, 2 steps, with its probability under p.

    Step 1: p = (1/2, 1/2), q = (1/4, 3/4). Step 2 after token 0: p = q = (1/2, 1/2). Step 2 after token 1:
    p = (1, 0), q = (1/3, 2/3), so r_2 = K_2 = log 3 and r_1 + r_2 = log 2 on every completion.
    """
    tokens = torch.tensor([[0, 0], [0, 1], [1, 0]])
    prob = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    step1_p = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    step1_q = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64))
    even = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    step2_p = {0: even, 1: torch.tensor([0.0, NEG_INF], dtype=torch.float64)}
    step2_q = {0: even, 1: torch.log(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))}
    logits_p = torch.stack([torch.stack([step1_p, step2_p[int(y[0])]]) for y in tokens])
    logits_q = torch.stack([torch.stack([step1_q, step2_q[int(y[0])]]) for y in tokens])
    return logits_p, logits_q, tokens, prob


def _mean_var(values: torch.Tensor, prob: torch.Tensor) -> tuple[float, float]:
    mean = (prob * values).sum()
    return float(mean), float((prob * (values - mean) ** 2).sum())


def test_rb_can_have_higher_sequence_variance_than_k1():
    logits_p, logits_q, tokens, prob = _two_step_pair()
    mask = torch.ones_like(tokens)
    k1_mean, k1_var = _mean_var(kl_estimate(logits_p, logits_q, tokens, mask, "k1"), prob)
    rb_mean, rb_var = _mean_var(kl_estimate(logits_p, logits_q, tokens, mask, "rb"), prob)
    # Both unbiased: the exact KL is log 2 (k1 is constant at log 2).
    assert math.isclose(k1_mean, math.log(2), abs_tol=1e-12)
    assert math.isclose(rb_mean, math.log(2), abs_tol=1e-12)
    assert k1_var < 1e-24
    # Var(K_1 + K_2(y_1)) = Var(K_2(y_1)) = (log 3)^2 / 4.
    assert math.isclose(rb_var, math.log(3) ** 2 / 4, rel_tol=1e-9)
