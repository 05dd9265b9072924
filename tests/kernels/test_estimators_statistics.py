"""Statistical facts about the KL estimators and gradient surrogates, checked against the enumeration oracle.

On tiny causal LMs every completion is enumerated (trl_rb.exact), so expectations over y ~ p are finite sums:
unbiasedness, the variance ordering var(rb) <= var(k1) and the gradient MSE ordering are asserted exactly (to
rounding), and sampled means over 20,000 exact draws are asserted within 4 standard errors (5 per gradient coordinate)
of the exact values. Fixed seeds throughout.
"""

from __future__ import annotations

import pytest
import torch
from enumerable import single_thread, tiny_gpt2_pair, tiny_pair

from trl_rb.exact import completion_table, exact_kl_and_grad
from trl_rb.kl import kl_estimate, kl_surrogate


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with single_thread():
        yield


NUM_SAMPLES = 20_000
PROMPT = [0]

# (model kind, seed, vocabulary incl. EOS = V-1, max_new_tokens, temperature); exact KLs 0.35 - 3.2 nats.
CASES = [
    ("gru", 0, 4, 5, 1.0),
    ("gru", 1, 4, 5, 1.0),
    ("gru", 2, 4, 5, 0.7),
    ("gru", 3, 3, 6, 1.5),
    ("gpt2", 1, 4, 5, 1.0),
    ("gpt2", 2, 4, 5, 1.3),
]


def _models(kind: str, seed: int, vocab: int):
    return tiny_pair(vocab_size=vocab, seed=seed) if kind == "gru" else tiny_gpt2_pair(vocab_size=vocab, seed=seed)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def case(request):
    kind, seed, vocab, length, temperature = request.param
    policy, reference = _models(kind, seed, vocab)
    table = completion_table(
        policy, reference, PROMPT, max_new_tokens=length, eos_token_id=vocab - 1, temperature=temperature
    )
    return table, seed


def _estimates(table, estimator: str, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    return kl_estimate(
        table.logits_p[rows],
        table.logits_q[rows],
        table.tokens[rows],
        table.mask[rows],
        estimator,
        temperature=table.temperature,
    )


def test_exact_expectations_and_variance_order(case):
    table, _ = case
    kl = table.kl()
    assert kl > 0.3
    values = {name: _estimates(table, name) for name in ("k1", "k2", "k3", "cv", "rb")}
    means = {name: float(table.expectation(v)) for name, v in values.items()}
    variances = {name: float(table.expectation((v - means[name]) ** 2)) for name, v in values.items()}
    for name in ("k1", "k3", "cv", "rb"):  # unbiased: E_p[estimate] = KL exactly, up to float64 rounding
        assert means[name] == pytest.approx(kl, rel=1e-10), name
    assert abs(means["k2"] - kl) > 0.01 * kl  # k2 is biased on every case here
    assert variances["rb"] < 0.5 * variances["k1"]  # Rao-Blackwell: never larger; here at least 2x smaller


def test_sampled_means_within_four_standard_errors(case):
    table, seed = case
    kl = table.kl()
    idx = table.sample(NUM_SAMPLES, torch.Generator().manual_seed(seed))
    samples = {name: _estimates(table, name, idx) for name in ("k1", "k2", "k3", "cv", "rb")}
    for name in ("k1", "k3", "cv", "rb"):
        se = float(samples[name].std()) / NUM_SAMPLES**0.5
        assert abs(float(samples[name].mean()) - kl) < 4 * se, (name, float(samples[name].mean()), kl, se)
    assert float(samples["rb"].var()) < float(samples["k1"].var())
    # k2's bias is many standard errors wide at this sample size.
    se_k2 = float(samples["k2"].std()) / NUM_SAMPLES**0.5
    assert abs(float(samples["k2"].mean()) - kl) > 4 * se_k2


# --------------------------------------------------------------------------------------------------------------------
# Gradients of the surrogates against the exact gradient.
# --------------------------------------------------------------------------------------------------------------------

# Vocabulary 3 (two tokens and EOS): 63 completions of up to 5 tokens, 31 of up to 4.
GRAD_CASES = [("gru", 0, 3, 5, 1.0), ("gru", 2, 3, 5, 1.5), ("gpt2", 1, 3, 4, 0.8)]


def _policy_logits(policy, tokens: torch.Tensor) -> torch.Tensor:
    """Completion-aligned policy logits [M, L, V] with gradient (prompt PROMPT before every row)."""
    ids = torch.cat([torch.tensor(PROMPT).expand(tokens.shape[0], -1), tokens], dim=-1)
    out = policy(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = getattr(out, "logits", out)
    return logits[:, len(PROMPT) - 1 : len(PROMPT) - 1 + tokens.shape[1]]


def _flat_grad(out: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor | None = None) -> torch.Tensor:
    grads = torch.autograd.grad(out, params, cotangent, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)])


@pytest.fixture(scope="module", params=GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def grad_case(request):
    kind, seed, vocab, length, temperature = request.param
    policy, reference = _models(kind, seed, vocab)
    kw = dict(max_new_tokens=length, eos_token_id=vocab - 1, temperature=temperature)
    table = completion_table(policy, reference, PROMPT, **kw)
    kl, exact = exact_kl_and_grad(policy, reference, PROMPT, **kw)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    params = [dict(policy.named_parameters())[n] for n in names]
    g_star = torch.cat([exact[n].reshape(-1) for n in names])
    # Per-completion surrogate gradients g_est(y) [M, P]. Each surrogate depends on its own row of logits only, so one
    # backward gives every row's logits-gradient G; row m's parameter gradient is then the vector-Jacobian product of
    # the batched forward with G restricted to row m.
    logits = _policy_logits(policy, table.tokens)
    leaf = logits.detach().requires_grad_()
    per = {"k1": [], "rb": []}
    for name in per:
        s = kl_surrogate(leaf, table.logits_q, table.tokens, table.mask, name, temperature=temperature)
        g_logits = torch.autograd.grad(s.sum(), leaf)[0]
        for m in range(table.num_completions):
            cotangent = torch.zeros_like(logits)
            cotangent[m] = g_logits[m]
            per[name].append(_flat_grad(logits, params, cotangent))
    per = {name: torch.stack(v) for name, v in per.items()}
    return dict(policy=policy, params=params, table=table, kl=kl, g_star=g_star, per=per, seed=seed)


def test_surrogate_gradients_exactly_unbiased_and_rb_mse_smaller(grad_case):
    table, g_star, per = grad_case["table"], grad_case["g_star"], grad_case["per"]
    assert g_star.norm() > 0.1
    mse = {}
    for name, g in per.items():
        mean = table.expectation(g)
        # E_p[g_est(y)] = grad KL exactly: the finite sum over all completions, up to float64 rounding.
        assert torch.allclose(mean, g_star, rtol=1e-8, atol=1e-10 * float(g_star.abs().max())), name
        mse[name] = float(table.expectation(((g - g_star) ** 2).sum(-1)))
    assert mse["rb"] < mse["k1"]


def test_sampled_mean_surrogate_gradient_matches_exact(grad_case):
    table, policy, params = grad_case["table"], grad_case["policy"], grad_case["params"]
    g_star, per = grad_case["g_star"], grad_case["per"]
    idx = table.sample(NUM_SAMPLES, torch.Generator().manual_seed(100 + grad_case["seed"]))
    weights = torch.bincount(idx, minlength=table.num_completions).double() / NUM_SAMPLES
    logits = _policy_logits(policy, table.tokens)
    for name in ("k1", "rb"):
        s = kl_surrogate(logits, table.logits_q, table.tokens, table.mask, name, temperature=table.temperature)
        # The mean over samples of per-sample gradients is the gradient of the weighted mean of the surrogates.
        mean = _flat_grad((weights * s).sum(), params)
        assert torch.allclose(mean, weights @ per[name], rtol=1e-8, atol=1e-12)
        sample_var = weights @ (per[name] - mean) ** 2
        se = (sample_var * NUM_SAMPLES / (NUM_SAMPLES - 1) / NUM_SAMPLES).sqrt()
        live = se > 1e-12
        # Coordinates no completion moves (e.g. the EOS embedding) have exactly zero gradient.
        assert torch.all((mean - g_star)[~live].abs() < 1e-10)
        z = (mean - g_star)[live] / se[live]
        assert live.sum() > 20
        assert float(z.abs().max()) < 5, (name, float(z.abs().max()))
        assert float((z * z).mean()) < 2.0, (name, float((z * z).mean()))
