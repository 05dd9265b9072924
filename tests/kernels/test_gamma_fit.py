"""The pieces of ``rb``'s gamma control variate (``trl_rb.trainers.gamma``), without a trainer: the online fit of gamma
(a weighted least-squares slope, moving-averaged over batches, with its fallbacks) and leave-one-out centring. The
control variate inside RLOO and GRPO: ``tests/trainers/test_gamma.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_rb.trainers.gamma import GammaFit, leave_one_out_centred


def test_fit_is_the_weighted_least_squares_slope():
    gen = np.random.default_rng(0)
    d, w = gen.normal(size=50), gen.uniform(0.1, 2.0, size=50)
    y = 0.7 * d + 0.3 + 0.2 * gen.normal(size=50)
    fit = GammaFit(prior=0.1, decay=0.0, beta=0.1)
    assert fit.next_gamma() == 0.1  # no statistics: the prior
    fit.add(torch.tensor(y), torch.tensor(d), torch.tensor(w))
    assert fit.next_gamma() == pytest.approx(np.polyfit(d, y, 1, w=np.sqrt(w))[0], rel=1e-10)
    # decay: the moving average of the batches' normalized moments
    fit = GammaFit(prior=0.1, decay=0.5, beta=0.1)
    halves = (slice(0, 25), slice(25, 50))
    for part in halves:
        fit.add(torch.tensor(y[part]), torch.tensor(d[part]), torch.tensor(w[part]))
        fit.next_gamma()
    moments = [np.array([x.sum(), (x * y[p]).sum(), (x * d[p]).sum(), (x * y[p] * d[p]).sum(), (x * d[p] ** 2).sum()])
               / x.sum() for p, x in ((p, w[p]) for p in halves)]  # fmt: skip
    m = 0.5 * moments[0] + 0.5 * moments[1]
    slope = (m[3] / m[0] - m[1] * m[2] / m[0] ** 2) / (m[4] / m[0] - (m[2] / m[0]) ** 2)
    assert fit.current == pytest.approx(slope, rel=1e-10)
    # d without spread beyond rounding (the policy at its reference): the prior; a wild slope: bounded at 100 beta
    flat = GammaFit(prior=0.1, decay=0.0, beta=0.1)
    flat.add(torch.tensor(y), torch.zeros(50, dtype=torch.float64), torch.tensor(w))
    assert flat.next_gamma() == 0.1
    flat.add(torch.tensor(y), torch.tensor(1e-7 * d), torch.tensor(w))  # rounding-level spread: still the prior
    assert flat.next_gamma() == 0.1
    wild = GammaFit(prior=0.1, decay=0.0, beta=0.1)
    wild.add(torch.tensor(1e6 * d), torch.tensor(d), torch.tensor(w))
    assert wild.next_gamma() == pytest.approx(10.0)


def test_leave_one_out_centring():
    x = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    torch.testing.assert_close(leave_one_out_centred(x, 3), torch.tensor([-3.0, -1.5, 4.5, -6.0, 0.0, 6.0]))
    torch.testing.assert_close(leave_one_out_centred(x, 1), x)
