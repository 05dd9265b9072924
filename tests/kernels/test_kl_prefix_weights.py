"""``prefix_importance_weights``, the RB terms' prefix importance weights on batches the current policy did not sample:
products of the token ratios computed in log space (float64), truncated at a cap (the trainers' ``rb_prefix_weight_cap``).
On both trainers, with far off-policy completions: ``tests/trainers/test_off_policy_weights.py``."""

from __future__ import annotations

import pytest
import torch

from trl_rb.kl import prefix_importance_weights

LENGTH = 512  # tests/trainers/test_off_policy_weights.py's completion length


def test_weights_are_the_capped_products_in_float64():
    gen = torch.Generator().manual_seed(0)
    log_ratio = 0.2 + 0.05 * torch.randn(3, LENGTH, generator=gen)  # sum over 512 tokens ~ 102: exp overflows float32
    mask = torch.ones(3, LENGTH)
    mask[2, 300:] = 0
    log_ratio[1, 7] = float("nan")  # a sampler log-prob that was not available: ratio 1
    exact = torch.where(mask.bool() & ~log_ratio.isnan(), log_ratio, 0.0).double().cumsum(-1)
    exact = torch.exp(exact - torch.where(mask.bool() & ~log_ratio.isnan(), log_ratio, 0.0).double())
    uncapped = prefix_importance_weights(log_ratio, mask)
    assert torch.isinf(uncapped).any()  # the uncapped product does not fit float32
    finite = exact < 1e30
    torch.testing.assert_close(uncapped[finite].double(), exact[finite], rtol=1e-4, atol=0.0)
    for cap in (0.5, 3.0, 1e6):
        capped = prefix_importance_weights(log_ratio, mask, cap=cap)
        torch.testing.assert_close(capped.double(), exact.clamp(max=cap), rtol=1e-4, atol=0.0)
    with pytest.raises(ValueError, match="positive"):
        prefix_importance_weights(log_ratio, mask, cap=0.0)
