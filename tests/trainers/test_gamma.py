"""The gamma control variate of ``rb`` (``trl_rb.trainers.gamma``) in RLOO and GRPO.

Exact enumeration on the tiny GPT-2 pair (121 completions of the prompt) with a reward that is a fixed function of
the completion, built from the completion table: ``corr`` = 0.9 * z(log p/q) + 0.44 * z(noise) (the RLHF case: the
policy has moved toward what pays), ``zero``, ``random`` = z(noise), ``anti`` = -z(log p/q). Both trainers'
gradients (trl's scoring and loss, optimizer never stepped) are averaged over independent batches and z-tested
against the exact gradient of E[R] - beta KL (the constant each trainer's normalization implies), and their
batch-to-batch variance (the trace of the covariance, the same completions for every estimator: same seeds, same
policy) is compared with k1's.

Constants. RLOO (leave-one-out baseline, mean over sequences): E[grad loss] = -(grad E[R] - beta grad KL). GRPO
(``dr_grpo``, ``scale_rewards="none"``, group-mean baseline): E[grad loss] = -((G - 1) / G grad E[R] - beta grad KL)
/ max_len. The control variate has mean 0 for any gamma fixed before the batch, so neither constant depends on it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from enumerable import tiny_gpt2_pair
from support import MODEL_KW, VOCAB, compare, flat_grad, score_batch, stale_batch_grads
from support import make_rloo_trainer as make_rloo
from support import make_trainer as make_grpo

from trl_rb.exact import completion_table, exact_kl_and_grad, exact_reward_and_grad
from trl_rb.trainers.grpo import GRPOConfig
from trl_rb.trainers.rloo import RLOOConfig

BATCH, GROUP, MAX_LEN, BETA = 64, 16, 4, 0.1
NB_MEAN, NB_VARIANCE = 200, 100
SEED0 = 40_000
Z_MAX = 4.5  # ~950 coordinates, Bonferroni at ~1% (see trainers/test_grpo_unbiased.py)


# ----------------------------------------------------------------------------------------------------------------
# Configuration (the online fit and its pieces, without a trainer: tests/kernels/test_gamma_fit.py)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [RLOOConfig, GRPOConfig])
@pytest.mark.parametrize(("field", "value"), [("rb_gamma", float("nan")), ("rb_gamma", "0.1"), ("rb_gamma_decay", 1.0),
                                              ("rb_gamma_decay", -0.1)])  # fmt: skip
def test_config_refuses_bad_settings(tmp_path, config_class, field, value):
    with pytest.raises(ValueError, match=field):
        config_class(output_dir=str(tmp_path), report_to=[], **{field: value})


# ----------------------------------------------------------------------------------------------------------------
# Rewards from the completion table, and the exact target
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _table():
    policy, reference = tiny_gpt2_pair(VOCAB, seed=0, **MODEL_KW)
    return completion_table(policy, reference, [0], max_new_tokens=MAX_LEN, eos_token_id=VOCAB - 1)


@functools.cache
def _reward_values(kind: str) -> dict[tuple[int, ...], float]:
    table = _table()
    prob = table.prob

    def z(x: torch.Tensor) -> torch.Tensor:
        x = x - (prob * x).sum()
        return x / (prob * x * x).sum().sqrt()

    log_ratio = z(table.seq_logprob_p - table.seq_logprob_q)
    noise = z(torch.randn(len(prob), generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    values = {"zero": torch.zeros_like(prob), "corr": 0.9 * log_ratio + math.sqrt(1 - 0.81) * noise,
              "random": noise, "anti": -log_ratio}[kind]  # fmt: skip
    lengths = table.mask.sum(-1).tolist()
    return {tuple(table.tokens[i, :n].tolist()): float(values[i]) for i, n in enumerate(lengths)}


def _reward(kind: str):
    values = _reward_values(kind)

    def reward(completion_ids, **_):
        return [values[tuple(ids)] for ids in completion_ids]

    reward.__name__ = f"{kind}_reward"
    return reward


def _exact_target(trainer, kind: str, reward_scale: float) -> torch.Tensor:
    """reward_scale * grad E[R] - beta * grad KL, flattened like the trainer's trainable parameters."""
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    values = _reward_values(kind)

    def reward(tokens, mask):
        return torch.tensor([values[tuple(t[: int(m.sum())].tolist())] for t, m in zip(tokens, mask, strict=True)])

    _, by_reward = exact_reward_and_grad(trainer.model, [0], reward, max_new_tokens=MAX_LEN, eos_token_id=VOCAB - 1,
                                         params=dict(named))  # fmt: skip
    _, by_kl = exact_kl_and_grad(trainer.model, trainer.ref_model, [0], max_new_tokens=MAX_LEN,
                                 eos_token_id=VOCAB - 1, params=dict(named))  # fmt: skip
    return torch.cat([(reward_scale * by_reward[n] - BETA * by_kl[n]).flatten() for n, _ in named])


# ----------------------------------------------------------------------------------------------------------------
# The trainers' gradients over independent batches
# ----------------------------------------------------------------------------------------------------------------


def _trainer(trainer_name: str, root, kind: str, estimator: str, gamma, beta: float = BETA):
    extra = {} if estimator == "k1" else {"rb_gamma": gamma}
    if trainer_name == "grpo":
        trainer, _, _ = make_grpo(estimator, root, batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=beta,
                                  reward=_reward(kind), **extra)  # fmt: skip
    else:
        trainer = make_rloo(estimator, root, reward=_reward(kind), beta=beta, **extra)
    return trainer


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """(trainer, reward kind, estimator, gamma, batches, beta) -> (per-batch gradients [nb, D], the trainer, kl/gamma
    log)."""
    cache = {}

    def run(trainer_name: str, kind: str, estimator: str, gamma=None, nb: int = NB_VARIANCE, beta: float = BETA):
        key = (trainer_name, kind, estimator, gamma, nb, beta)
        if key not in cache:
            trainer = _trainer(trainer_name, tmp_path_factory.mktemp(trainer_name), kind, estimator, gamma, beta)
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            grads = [flat_grad(trainer.compute_loss(trainer.model, score_batch(trainer, BATCH, seed=SEED0 + b)), params)
                     for b in range(nb)]  # fmt: skip
            cache[key] = (torch.stack(grads), trainer, trainer._metrics["train"].get("kl/gamma", []))
        return cache[key]

    return run


def _constants(trainer_name: str) -> tuple[float, float]:
    """(scale of grad E[R] in the target, c with E[grad loss] = c * target)."""
    if trainer_name == "grpo":
        return (GROUP - 1) / GROUP, -1.0 / MAX_LEN
    return 1.0, -1.0


@pytest.mark.statistics
@pytest.mark.parametrize("gamma", [None, 0.5], ids=["online", "fixed_5beta"])
@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_unbiased_with_a_reward(gradients, trainer_name, gamma):
    """The whole gradient (reward and KL) is unbiased with the control variate: a fixed gamma far from [0, beta], and
    the online fit (gamma from earlier batches only)."""
    grads, trainer, logged = gradients(trainer_name, "corr", "rb", gamma, NB_MEAN)
    reward_scale, c = _constants(trainer_name)
    study = compare(grads, _exact_target(trainer, "corr", reward_scale), c)
    print(trainer_name, gamma, study, logged[:3], logged[-1])
    assert study["max_abs_z"] < Z_MAX, study
    assert abs(study["c"] - c) < Z_MAX * study["c_se"], study
    if gamma is None:
        assert logged[0] == pytest.approx(BETA)  # no statistics yet: MC
        assert len({round(g, 6) for g in logged[1:]}) > 1  # then fitted, batch after batch
    else:
        assert all(g == pytest.approx(gamma) for g in logged)


VARIANCE_BOUNDS = [  # (beta, reward, largest allowed online / k1 variance ratio)
    (0.1, "corr", 0.8), (0.1, "zero", 0.3), (0.1, "random", 1.05), (0.1, "anti", 1.05),
    (0.03, "corr", 1.05), (0.03, "zero", 0.3), (0.03, "random", 1.05), (0.03, "anti", 1.05),
    (1.0, "corr", 1.05), (1.0, "zero", 0.3), (1.0, "random", 1.05), (1.0, "anti", 1.05),
]  # fmt: skip


@pytest.mark.statistics
@pytest.mark.parametrize(("beta", "kind", "at_most"), VARIANCE_BOUNDS)
@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_variance_against_k1(gradients, trainer_name, beta, kind, at_most):
    """The online gamma's whole-gradient variance against k1's on the same completions: at most 0.8x with a reward
    correlated with log p/q at beta 0.1, 0.3x at reward 0, and never above 1.05x (beta 0.03, 0.1, 1; uncorrelated and
    anti-correlated rewards too)."""
    k1 = gradients(trainer_name, kind, "k1", beta=beta)[0].var(0).sum()
    online = gradients(trainer_name, kind, "rb", beta=beta)[0].var(0).sum()
    ratio = float(online / k1)
    print(trainer_name, beta, kind, "online / k1", ratio)
    assert ratio <= at_most


def test_rloo_gamma_beta_is_k1(tmp_path, monkeypatch):
    """RLOO with gamma = beta is trl's k1 penalty exactly: the same advantages and the same loss gradient. The rb loss
    forward runs trl's own log-prob head here (the separate K_n pass): the fused head computes the same log-probs in
    another kernel (float64 for these float64 models, where trl's head rounds to float32: 5.7e-7 apart, measured)."""
    import trl_rb.trainers.rloo as rloo_module

    monkeypatch.setattr(rloo_module, "loss_head_for", lambda *_args, **_kwargs: None)
    batches, grads = {}, {}
    for estimator, gamma in (("k1", None), ("rb", BETA)):
        trainer = _trainer("rloo", tmp_path / estimator, "corr", estimator, gamma)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        batches[estimator] = score_batch(trainer, BATCH, seed=SEED0)
        grads[estimator] = flat_grad(trainer.compute_loss(trainer.model, batches[estimator]), params)
    torch.testing.assert_close(batches["rb"]["completion_ids"], batches["k1"]["completion_ids"], rtol=0, atol=0)
    torch.testing.assert_close(batches["rb"]["advantages"], batches["k1"]["advantages"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["rb"], grads["k1"], rtol=1e-7, atol=1e-8 * grads["k1"].abs().max().item())


@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_gamma_and_the_variance_estimate_are_logged(tmp_path, trainer_name):
    trainer = _trainer(trainer_name, tmp_path, "corr", "rb", None)
    trainer.args.max_steps, trainer.args.logging_steps = 3, 1
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["kl/gamma"] == pytest.approx(BETA)  # the first batch: MC
    assert logs[-1]["kl/gamma"] != pytest.approx(BETA)  # fitted from the earlier batches
    assert all(math.isfinite(h["kl/var_ratio_vs_mc"]) and h["kl/var_ratio_vs_mc"] > 0 for h in logs[1:])
    assert all("kl/rb" in h and "kl/k1" in h for h in logs)


@pytest.mark.statistics
@pytest.mark.parametrize("trainer_name", ["rloo", "grpo"])
def test_second_iteration_is_unbiased_with_a_fixed_gamma(tmp_path, trainer_name):
    """num_iterations=2 at unclipped ratios and uncapped weights, reward 0, gamma = 5 beta: the importance-weighted
    control variate keeps the stale batch's gradient at c * grad KL of the current policy (RLOO: its penalty's r_n and
    K_n made current by score-function corrections; GRPO: the score part weighted by the completion's weight)."""
    config = dict(num_iterations=2, rb_prefix_weight_cap=None, rb_gamma=0.5)
    if trainer_name == "grpo":
        trainer, _, _ = make_grpo("rb", tmp_path, batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=BETA, **config)
        expected = BETA / MAX_LEN
    else:
        trainer = make_rloo("rb", tmp_path, epsilon=100.0, **config)
        expected = BETA
    grads, exact = stale_batch_grads(trainer, (), nb=2 * NB_MEAN)
    study = compare(grads, exact, expected)
    print(trainer_name, "off-policy gamma 0.5", study)
    assert study["max_abs_z"] < Z_MAX, study
    assert abs(study["c"] - expected) < Z_MAX * study["c_se"], study


@pytest.mark.statistics
def test_grpo_control_variate_has_mean_zero_under_group_scaling(tmp_path):
    """trl's default ``scale_rewards="group"`` divides each group's reward advantages by their standard deviation
    (trl's self-normalized reward gradient, biased as in trl). The control variate is added outside the advantage,
    so it still has mean 0: on the same completions, gamma = 5 beta minus gamma = 0 (the plain RB gradient, unbiased
    for its KL part) averages to 0 in every coordinate, while each batch's difference is far from 0."""
    diffs, norms = [], []
    trainers = {g: make_grpo("rb", tmp_path / str(g), batch=BATCH, group=GROUP, max_len=MAX_LEN, beta=BETA,
                             reward=_reward("corr"), scale_rewards="group", rb_gamma=g)[0]
                for g in (0.0, 0.5)}  # fmt: skip
    params = {g: [p for p in t.model.parameters() if p.requires_grad] for g, t in trainers.items()}
    for b in range(NB_MEAN):
        batches = {g: score_batch(t, BATCH, seed=SEED0 + b) for g, t in trainers.items()}
        torch.testing.assert_close(batches[0.5]["advantages"], batches[0.0]["advantages"], rtol=0, atol=0)
        grads = {g: flat_grad(t.compute_loss(t.model, batches[g]), params[g]) for g, t in trainers.items()}
        diffs.append(grads[0.5] - grads[0.0])
        norms.append(float(grads[0.0].norm()))
    diff = torch.stack(diffs)
    se = diff.std(0) / math.sqrt(NB_MEAN)
    live = se > 0
    z = diff.mean(0)[live] / se[live]
    print("group scaling: max |z| of the control variate's mean", float(z.abs().max()), int(live.sum()))
    assert int(live.sum()) > 500 and float(z.abs().max()) < Z_MAX
    assert float(diff.norm(dim=1).mean()) > 0.1 * float(np.mean(norms))  # the term does change each batch's gradient
