"""The mean RLOO KL gradient against the exact grad KL(p || q) on an enumerable pair (reward 0).

Derivation. With reward 0 trl's reward is -beta E_i, E_i the detached per-sequence KL estimate, and the leave-one-out
advantage is A_i = -beta (E_i - b_i), b_i = mean_{j != i} E_j over the other G - 1 completions of the same prompt. At
ratio 1 (one iteration: old_logps are the policy's own) the gradient of trl's loss -mean_i ratio_i A_i is
-mean_i A_i grad log p(y_i); ``rb`` adds beta mean_i sum_n grad K_n(y_i). b_i is independent of y_i and
E[grad log p(y)] = 0, so the baseline drops out of the expectation *exactly* (no (G - 1) / G factor, unlike GRPO's
group mean, which contains y_i), and the mean over sequences removes any length factor. Hence

    k1:  E[grad] = beta E[sum_n r_n grad log p(y)]                         = beta grad KL
    rb:  E[grad] = beta E[sum_n K_n grad log p(y) + sum_n grad K_n]         = beta grad KL
    rb scoring, trl's loss alone: beta (grad KL - E[sum_n grad K_n])       (biased)

(k1: grad KL = E[R grad log p] + E[grad R] and E[grad r_n] = E[grad l_n] = 0; rb: ESTIMATORS.md, "Inside RLOO".)

Test. The trainer's gradient (trl's scoring and loss, optimizer never stepped) is averaged over NB independent batches
at fixed parameters and every coordinate is z-tested against beta * exact, with standard errors from the
batch-to-batch spread. Threshold: about 940 coordinates, each z ~ N(0, 1) under the null (t with NB - 1 = 199 degrees
of freedom, means of 64 completions), so max |z| > 4.5 has probability about 940 * 1.2e-5 ~ 1% by Bonferroni (the
seeds are fixed: the outcome is deterministic). The least-squares constant c (mean ~ c * exact) must also agree with
beta. k1 and rb see the same completions (same seeds, same policy), so their gradient variances compare paired.
"""

from __future__ import annotations

import pytest
import torch
import trl
from support import (
    MIXED_PROMPTS,
    VOCAB,
    compare,
    exact_mean_grad,
    flat_grad,
    mixed_batch,
    score_batch,
    stale_batch_grads,
)
from support import make_rloo_trainer as make_trainer

from trl_rb.exact import exact_kl_and_grad

pytestmark = pytest.mark.statistics  # ~12 s on one thread (the gradients of 2 x 200 batches, computed once per module)

SEED0 = 20_000
NB, BATCH, GROUP, MAX_LEN, BETA = 200, 64, 16, 4, 0.1
Z_MAX = 4.5


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, dict[str, float]]:
    """Gradient statistics for ``k1``, ``rb`` and ``rb_without_term`` (rb-scored batches, trl's loss alone)."""
    root = tmp_path_factory.mktemp("rloo_unbiased")
    grads: dict[str, list[torch.Tensor]] = {"k1": [], "rb": [], "rb_without_term": []}
    exact = None
    for estimator in ("k1", "rb"):
        trainer = make_trainer(estimator, root)
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if exact is None:
            kl, by_name = exact_kl_and_grad(
                trainer.model, trainer.ref_model, [0], max_new_tokens=MAX_LEN, eos_token_id=VOCAB - 1,
                params=dict(named),
            )
            assert kl > 0.5  # the pair differs: the KL gradient is far from 0
            exact = torch.cat([by_name[n].flatten() for n, _ in named])
        for b in range(NB):
            inputs = score_batch(trainer, BATCH, seed=SEED0 + b)
            grads[estimator].append(flat_grad(trainer.compute_loss(trainer.model, inputs), params))
            if estimator == "rb":
                plain = trl.RLOOTrainer._compute_loss(trainer, trainer.model, inputs)
                grads["rb_without_term"].append(flat_grad(plain, params))
    out = {name: compare(torch.stack(g), exact, BETA) for name, g in grads.items()}
    print(out)
    return out


@pytest.mark.parametrize("estimator", ["k1", "rb"])
def test_mean_gradient_is_beta_grad_kl(studies, estimator):
    study = studies[estimator]
    assert study["max_abs_z"] < Z_MAX, study
    assert abs(study["c"] - BETA) < Z_MAX * study["c_se"], study


def test_rb_needs_its_analytic_term(studies):
    """rb scoring with trl's loss alone (no beta * sum_n grad K_n) is biased by many standard errors."""
    study = studies["rb_without_term"]
    assert study["frac_over_4se"] > 0.5, study
    assert study["max_abs_z"] > 50, study
    assert abs(study["c"] - BETA) > 20 * study["c_se"], study


def test_rb_gradient_variance_below_k1(studies):
    """Same completions, same baseline: rb's per-batch gradient variance is a fraction of k1's (measured ~0.12)."""
    ratio = studies["rb"]["variance"] / studies["k1"]["variance"]
    assert ratio < 0.5, ratio


@pytest.mark.parametrize("estimator", ["k1", "rb"])
def test_unbiased_at_temperature_with_prompts_of_two_lengths(tmp_path, estimator):
    """The same at temperature 0.7 with two prompts of different lengths (left padding; KL averaged over prompts)."""
    trainer = make_trainer(estimator, tmp_path, temperature=0.7)
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    exact = exact_mean_grad(trainer.model, trainer.ref_model, named, MIXED_PROMPTS, 0.7)
    grads = [flat_grad(trainer.compute_loss(trainer.model, mixed_batch(trainer, MIXED_PROMPTS, seed=SEED0 + b)), params)
             for b in range(NB)]  # fmt: skip
    study = compare(torch.stack(grads), exact, BETA)
    print(estimator, "T=0.7, mixed prompts", study)
    assert study["max_abs_z"] < Z_MAX, study
    assert abs(study["c"] - BETA) < Z_MAX * study["c_se"], study


def test_rb_second_iteration_is_unbiased_with_importance_weights(tmp_path):
    """num_iterations=2 at unclipped ratios (epsilon 100): trl's ratio-weighted penalty plus the importance-weighted
    RB terms give beta * grad KL at the current policy; treating the stale batch as on-policy does not."""
    from trl_rb.trainers.rloo import OLD_TOKEN_KL_KEY, OLD_TOKEN_LOGPS_KEY

    trainer = make_trainer("rb", tmp_path, num_iterations=2, epsilon=100.0, rb_prefix_weight_cap=None)  # uncapped W
    grads, exact = stale_batch_grads(trainer, (), nb=2 * NB)
    study = compare(grads, exact, BETA)
    print("off-policy rb, weighted", study)
    assert study["max_abs_z"] < Z_MAX, study
    assert abs(study["c"] - BETA) < Z_MAX * study["c_se"], study
    grads, exact = stale_batch_grads(trainer, (OLD_TOKEN_LOGPS_KEY, OLD_TOKEN_KL_KEY), nb=NB // 2)
    stale = compare(grads, exact, BETA)
    print("off-policy rb, unweighted", stale)
    assert stale["frac_over_4se"] > 0.05 or abs(stale["c"] - BETA) > 10 * stale["c_se"], stale
