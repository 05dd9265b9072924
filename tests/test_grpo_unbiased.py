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

import math

import pytest
import torch
from test_grpo import VOCAB, make_trainer, score_batch

from trl_rb.exact import exact_kl_and_grad

SEED0 = 10_000
NB, BATCH, GROUP, MAX_LEN, BETA = 200, 64, 16, 4, 0.1
K3_NB = 100  # k3's bias is tens of standard errors: half the batches show it just as clearly


def gradient_study(estimator: str, tmp_path, nb: int = NB, **config) -> dict[str, float]:
    trainer, policy, reference = make_trainer(
        estimator, tmp_path, batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=BETA, **config
    )
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    _, exact = exact_kl_and_grad(
        policy, reference, [0], max_new_tokens=MAX_LEN, eos_token_id=VOCAB - 1, params=dict(named)
    )
    exact = torch.cat([exact[n].flatten() for n, _ in named])
    params = [p for _, p in named]
    grads = []
    for b in range(nb):
        inputs = score_batch(trainer, BATCH, seed=SEED0 + b)
        loss = trainer.compute_loss(trainer.model, inputs)
        parts = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(parts, params, strict=True)]))
    grads = torch.stack(grads)  # [NB, D]
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(nb)
    # Coordinates the KL does not depend on: position embeddings past the last step (exactly 0) and the attention key
    # biases (softmax is shift-invariant: rounding-level values ~1e-19 in both). Their z would compare rounding errors.
    keep = se > 1e-8 * se.max()
    assert int(keep.sum()) > 500
    assert exact[~keep].abs().max() < 1e-12
    m, s, e = mean[keep], se[keep], exact[keep]
    # c_hat = weights . mean, ordinary least squares: weights from 1/SE^2 would correlate with the means and bias c_hat.
    weights = e / (e @ e)
    c = float(weights @ m)
    c_se = float((grads[:, keep] @ weights).std() / math.sqrt(nb))  # from the per-batch c, so correlations count
    z = (m - c * e) / s
    return {
        "c": c,
        "c_se": c_se,
        "max_abs_z": float(z.abs().max()),
        "frac_over_4se": float((z.abs() > 4).double().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(m, e, dim=0)),
        "coordinates": int(keep.sum()),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator, expected_c",
    [("rb", BETA / MAX_LEN), ("k1", BETA * (GROUP - 1) / GROUP / MAX_LEN)],
)
def test_unbiased_estimators_follow_exact_grad_kl(tmp_path, estimator, expected_c):
    study = gradient_study(estimator, tmp_path)
    print(estimator, study)
    assert study["max_abs_z"] < 4.5, study
    assert abs(study["c"] - expected_c) < 4.5 * study["c_se"], study  # and the scale is the one the docs state


@pytest.mark.slow
@pytest.mark.parametrize("bias_correction", [True, False])
def test_trl_k3_gradient_is_biased(tmp_path, bias_correction):
    """trl's k3 term: its mean gradient is not parallel to grad KL (the finding the README reports)."""
    study = gradient_study("k3", tmp_path, nb=K3_NB, use_bias_correction_kl=bias_correction)
    print("k3", bias_correction, study)
    assert study["frac_over_4se"] > 0.2, study
    assert study["max_abs_z"] > 20, study
