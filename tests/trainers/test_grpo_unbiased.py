"""The mean GRPO KL gradient against the exact grad KL(p || q) on an enumerable pair (reward 0, ``dr_grpo``).

With reward 0 only the KL term moves the policy, and with ``loss_type="dr_grpo"`` the expected gradient of the
trainer's loss is c * grad KL for a constant c: beta / max_len for ``rb`` and beta (G - 1) / (G max_len) for ``k1``
(the group-mean baseline removes 1/G of the score term). We average the trainer's gradient over NB independent
batches (trl's own scoring and loss, optimizer not stepped), fit c by least squares, and z-test every
coordinate against c * exact with standard errors from the batch-to-batch spread.

Threshold: about 950 coordinates; under the null each z is ~N(0, 1) (NB = 200 batch means of 64 completions), so
|z| > 4.5 somewhere has probability < 950 * 6.8e-6 ~ 0.7% by Bonferroni (the seeds are fixed: the result is
deterministic). trl's k3 must fail that test massively: we assert that more than 20% of the coordinates are more
than 4 standard errors off (measured: see the README; NB = 100 there), with either setting of
``use_bias_correction_kl``.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    BATCH,
    BETA,
    GROUP,
    MAX_LEN,
    MIXED_PROMPTS,
    PROMPT,
    SEED0,
    exact_mean_grad,
    make_trainer,
    mixed_batch,
    stale_batch_grads,
    z_statistics,
)

NB = 200  # batches per study; SEED0 (10_000) and BATCH, GROUP, MAX_LEN, BETA (64, 16, 4, 0.1) are support's
K3_NB = 100  # k3's bias is tens of standard errors: half the batches show it just as clearly


def gradient_study(estimator: str, tmp_path, nb: int = NB, prompts=None, **config) -> dict[str, float]:
    prompts = prompts or {PROMPT: [0]}
    trainer, policy, reference = make_trainer(
        estimator, tmp_path, batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=BETA, **config
    )
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    exact = exact_mean_grad(policy, reference, named, prompts, trainer.temperature)
    params = [p for _, p in named]
    grads = []
    for b in range(nb):
        inputs = mixed_batch(trainer, prompts, seed=SEED0 + b)
        loss = trainer.compute_loss(trainer.model, inputs)
        parts = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(parts, params, strict=True)]))
    return z_statistics(torch.stack(grads), exact)


@pytest.mark.statistics
@pytest.mark.parametrize(
    "estimator, expected_c",
    [("rb", BETA / MAX_LEN), ("k1", BETA * (GROUP - 1) / GROUP / MAX_LEN)],
)
def test_unbiased_estimators_follow_exact_grad_kl(tmp_path, estimator, expected_c):
    study = gradient_study(estimator, tmp_path)
    print(estimator, study)
    assert study["max_abs_z"] < 4.5, study
    assert abs(study["c"] - expected_c) < 4.5 * study["c_se"], study  # and the scale is the one the docs state


@pytest.mark.statistics
@pytest.mark.parametrize("estimator, expected_c", [("rb", BETA / MAX_LEN), ("k1", BETA * (GROUP - 1) / GROUP / MAX_LEN)])
def test_unbiased_at_temperature_with_prompts_of_two_lengths(tmp_path, estimator, expected_c):
    """The same test at temperature 0.7 (sampling, K_t and l_t all at T) with two prompts of different lengths."""
    study = gradient_study(estimator, tmp_path, prompts=MIXED_PROMPTS, temperature=0.7)
    print(estimator, "T=0.7, mixed prompts", study)
    assert study["max_abs_z"] < 4.5, study
    assert abs(study["c"] - expected_c) < 4.5 * study["c_se"], study


@pytest.mark.statistics
@pytest.mark.parametrize("bias_correction", [True, False])
def test_trl_k3_gradient_is_biased(tmp_path, bias_correction):
    """trl's k3 term: its mean gradient is not parallel to grad KL (the finding the README reports)."""
    study = gradient_study("k3", tmp_path, nb=K3_NB, use_bias_correction_kl=bias_correction)
    print("k3", bias_correction, study)
    assert study["frac_over_4se"] > 0.2, study
    assert study["max_abs_z"] > 20, study


def off_policy_study(tmp_path, *, weighted: bool, nb: int = NB) -> dict[str, float]:
    """GRPO ``rb`` at ``num_iterations=2``: the mean must be c * grad KL(p_theta || q); ``weighted=False`` drops
    trl's old log-probs from the batch."""
    # uncapped weights: the truncation at rb_prefix_weight_cap trades this unbiasedness for a bounded step
    trainer, _, _ = make_trainer("rb", tmp_path, batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=BETA, num_iterations=2,
                                 rb_prefix_weight_cap=None)  # fmt: skip
    drop = () if weighted else ("old_per_token_logps",)
    return z_statistics(*stale_batch_grads(trainer, drop, nb))


@pytest.mark.statistics
def test_rb_second_iteration_is_unbiased_with_importance_weights(tmp_path):
    """Unclipped ratios (reward 0: trl's clipped policy-gradient term is 0, only the KL term acts): the importance-
    weighted RB gradient on a stale batch is c * grad KL at the current policy; without the weights it is biased."""
    # importance weights have heavier tails than on-policy gradients: 400 batches (200 gave max |z| 4.56, 800 gave 2.0)
    study = off_policy_study(tmp_path, weighted=True, nb=2 * NB)
    print("off-policy rb, weighted", study)
    assert study["max_abs_z"] < 4.5, study
    assert abs(study["c"] - BETA / MAX_LEN) < 4.5 * study["c_se"], study
    stale = off_policy_study(tmp_path / "stale", weighted=False, nb=K3_NB)  # measured: 83% of coordinates > 4 SE
    print("off-policy rb, unweighted", stale)
    assert stale["frac_over_4se"] > 0.05 or abs(stale["c"] - BETA / MAX_LEN) > 10 * stale["c_se"], stale
