"""trl_rb.estimate_kl on tiny GPT-2 pairs: per-sample values against an independent computation, summaries against
numpy, means against the exact KL (trl_rb.exact), the M-table against 1/sqrt(M), and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from enumerable import tiny_gpt2, tiny_gpt2_pair
from tools_support import tiny_tokenizer

from trl_rb.estimate.api import check_tokenizers, estimate_kl
from trl_rb.exact import exact_kl


@pytest.fixture(scope="module")
def pair():
    return tiny_gpt2_pair(4, seed=0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _direct_values(policy, reference, prompt_ids: list[int], completion: list[int], temperature: float) -> dict:
    """Every estimator of one sample from unpadded float64 forwards of both models (independent of estimate.py)."""
    ids = torch.tensor([prompt_ids + completion])
    n0 = len(prompt_ids) - 1
    with torch.no_grad():
        lp = torch.log_softmax(policy(ids).logits[0, n0 : n0 + len(completion)].double() / temperature, -1)
        lq = torch.log_softmax(reference(ids).logits[0, n0 : n0 + len(completion)].double() / temperature, -1)
    y = torch.tensor(completion)
    r = (lp - lq)[torch.arange(len(completion)), y]
    big_r = float(r.sum())
    return {
        "k1": big_r,
        "k2": float((r * r / 2).sum()),
        "k3": float((torch.exp(-r) - 1 + r).sum()),
        "cv": big_r + math.exp(-big_r) - 1,
        "rb": float((lp.exp() * (lp - lq)).sum()),
    }


def test_per_sample_values_match_an_independent_computation(pair, tok):
    policy, reference = pair
    prompts = ["a b c a b", "c"]  # different lengths: the batch is left-padded
    res = estimate_kl(
        policy,
        reference,
        tok,
        prompts,
        samples_per_prompt=6,
        max_new_tokens=4,
        temperature=0.8,
        batch_size=5,
        seed=3,
        progress=False,
    )
    assert set(res.values) == {"k1", "k2", "k3", "cv", "cv_opt", "rb"}
    for i, prompt in enumerate(prompts):
        prompt_ids = tok(prompt)["input_ids"]
        for j in range(6):
            completion = res.completion_ids[i][j]
            assert 1 <= len(completion) == res.lengths[i, j] <= 4
            assert completion[-1] == tok.eos_token_id or len(completion) == 4
            assert tok.eos_token_id not in completion[:-1]
            direct = _direct_values(policy, reference, prompt_ids, completion, 0.8)
            for name, value in direct.items():
                assert res.values[name][i, j] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, i, j)
    # cv_opt = R + alpha (exp(-R) - 1) with alpha the variance-minimising coefficient over all samples.
    big_r = res.values["k1"].ravel()
    g = np.expm1(-big_r)
    alpha = -np.cov(big_r, g)[0, 1] / g.var(ddof=1)
    assert res.cv_opt_alpha == pytest.approx(alpha, rel=1e-10)
    np.testing.assert_allclose(res.values["cv_opt"].ravel(), big_r + alpha * g, rtol=1e-12)
    assert res.values["cv_opt"].var() <= min(res.values["k1"].var(), res.values["cv"].var())


def test_summary_matches_numpy(pair, tok):
    policy, reference = pair
    res = estimate_kl(
        policy,
        reference,
        tok,
        ["a", "b c", "c c a"],
        samples_per_prompt=12,
        max_new_tokens=3,
        estimators=("rb", "k3", "cv"),
        m_values=(1, 3, 5, 7),
        batch_size=8,
        seed=1,
        progress=False,
    )
    assert list(res.values) == ["rb", "k3", "cv", "k1"]  # k1 is kept as the var_ratio baseline
    d = res.to_dict()
    for name, v in res.values.items():
        flat = v.ravel()
        s = d["estimators"][name]
        assert s["mean"] == pytest.approx(flat.mean(), rel=1e-12)
        assert s["std"] == pytest.approx(flat.std(ddof=1), rel=1e-12)
        assert s["se"] == pytest.approx(flat.std(ddof=1) / 6.0, rel=1e-12)  # N = 36
        assert s["ci95"] == pytest.approx([flat.mean() - 1.96 * s["se"], flat.mean() + 1.96 * s["se"]], rel=1e-3)
        assert s["frac_negative"] == pytest.approx((flat < 0).mean())
        assert s["var_ratio_vs_k1"] == pytest.approx(flat.var() / res.values["k1"].var(), rel=1e-10)
        for m in (1, 3, 5, 7):
            groups = 12 // m
            expected = None
            if groups >= 2:
                means = v[:, : groups * m].reshape(3, groups, m).mean(-1)
                expected = math.sqrt(np.mean([np.var(row, ddof=1) for row in means]))
            assert s["std_m"][str(m)] == (pytest.approx(expected, rel=1e-10) if expected is not None else None)
            formula = math.sqrt(np.mean([np.var(row, ddof=1) for row in v]) / m)
            assert s["std_m_formula"][str(m)] == pytest.approx(formula, rel=1e-10)
    assert d["m_table"]["m_values"] == [1, 3, 5, 7]
    assert d["m_table"]["std"]["rb"][3] is None  # 12 // 7 = 1 group: no empirical spread
    assert d["completion_tokens"] == int(res.lengths.sum())
    assert d["tokens_per_second"] > 0
    assert d["estimators"]["rb"]["frac_negative"] == 0.0 and d["estimators"]["k3"]["frac_negative"] == 0.0


def test_deterministic_for_a_seed_and_leaves_the_global_rng_alone(pair, tok):
    policy, reference = pair
    kwargs = dict(samples_per_prompt=5, max_new_tokens=3, estimators=("k1",), batch_size=4, progress=False)
    state = torch.random.get_rng_state()
    a = estimate_kl(policy, reference, tok, ["a b", "c"], seed=7, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = estimate_kl(policy, reference, tok, ["a b", "c"], seed=7, **kwargs)
    c = estimate_kl(policy, reference, tok, ["a b", "c"], seed=8, **kwargs)
    assert a.completion_ids == b.completion_ids and np.array_equal(a.values["k1"], b.values["k1"])
    assert a.completion_ids != c.completion_ids


def test_position_chunking_does_not_change_the_values(pair, tok):
    policy, reference = pair
    kwargs = dict(samples_per_prompt=4, max_new_tokens=4, batch_size=8, seed=5, progress=False)
    whole = estimate_kl(policy, reference, tok, ["a b", "c"], **kwargs)
    one_row = estimate_kl(policy, reference, tok, ["a b", "c"], chunk_elements=4, **kwargs)  # V = 4: 1 position
    assert whole.completion_ids == one_row.completion_ids
    for name in whole.values:
        np.testing.assert_allclose(one_row.values[name], whole.values[name], rtol=1e-12, atol=1e-15)


def test_identical_models_give_zero_for_every_estimator(pair, tok):
    policy, _ = pair
    res = estimate_kl(
        policy, policy, tok, ["a", "b"], samples_per_prompt=4, max_new_tokens=3, batch_size=8, progress=False
    )
    for name, v in res.values.items():
        assert np.abs(v).max() < 1e-12, name


def test_means_within_4_se_of_exact_and_rb_has_the_smallest_spread(pair, tok):
    policy, reference = pair
    prompts = ["a b", "c"]
    res = estimate_kl(
        policy,
        reference,
        tok,
        prompts,
        samples_per_prompt=1500,
        max_new_tokens=4,
        exact=True,
        batch_size=500,
        seed=0,
        progress=False,
    )
    per_prompt = [exact_kl(policy, reference, tok(p)["input_ids"], max_new_tokens=4, eos_token_id=3) for p in prompts]
    assert res.exact_kl_per_prompt == pytest.approx(per_prompt, rel=1e-12)
    assert res.exact_kl == pytest.approx(np.mean(per_prompt), rel=1e-12)
    summary = res.to_dict()["estimators"]
    for name in ("k1", "rb", "k3", "cv"):  # the unbiased ones
        s = summary[name]
        assert abs(s["mean"] - res.exact_kl) < 4 * s["se"], (name, s["mean"], res.exact_kl, s["se"])
        assert s["z"] == pytest.approx((s["mean"] - res.exact_kl) / s["se"])
    assert summary["rb"]["std"] < summary["k1"]["std"]
    assert summary["rb"]["std"] < min(summary[n]["std"] for n in ("k2", "k3", "cv", "cv_opt"))
    assert summary["k1"]["frac_negative"] > 0.05 and summary["rb"]["frac_negative"] == 0.0


def test_m_table_shrinks_like_one_over_sqrt_m(pair, tok):
    """std_M * sqrt(M) / std_1 = 1 for independent samples. At M = 10 there are 8 prompts x 20 groups, 152 degrees
    of freedom for the pooled variance; for near-normal group means the relative standard error of a standard
    deviation is 1 / sqrt(2 dof) = 0.057, so a 0.2 tolerance is 3.5 standard errors (M = 5: 0.04, 5 SE)."""
    policy, reference = pair
    res = estimate_kl(
        policy,
        reference,
        tok,
        ["a", "b", "c", "a b", "b c", "c a", "a a", "c c"],
        samples_per_prompt=200,
        max_new_tokens=4,
        estimators=("k1", "rb"),
        m_values=(1, 5, 10),
        batch_size=400,
        seed=2,
        progress=False,
    )
    table = res.m_table()
    for name in ("k1", "rb"):
        std1 = table[name][1]["std"]
        assert std1 == pytest.approx(table[name][1]["std_formula"], rel=1e-12)
        for m in (5, 10):
            assert table[name][m]["std"] * math.sqrt(m) / std1 == pytest.approx(1.0, abs=0.2), (name, m)
            assert table[name][m]["std_formula"] == pytest.approx(std1 / math.sqrt(m), rel=1e-12)
        assert table[name][1]["std"] > table[name][5]["std"] > table[name][10]["std"]


# --------------------------------------------------------------------------------------------------------------------
# Bad input: ValueError with a message that names the problem.
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input(pair, tok):
    policy, reference = pair
    kw = dict(samples_per_prompt=2, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="empty"):
        estimate_kl(policy, reference, tok, [], **kw)
    with pytest.raises(
        ValueError, match=r"Prompt 1 is 29 tokens long.*at most 28.*context length 32 minus max_new_tokens 4"
    ):
        estimate_kl(policy, reference, tok, ["a", " ".join(["b"] * 29)], **kw)
    with pytest.raises(ValueError, match=r"Unknown KL estimator 'k4'.*cv_opt"):
        estimate_kl(policy, reference, tok, ["a"], estimators=("k1", "k4"), **kw)
    with pytest.raises(ValueError, match=r"vocabulary sizes.*4 rows.*5"):
        estimate_kl(policy, tiny_gpt2(5, seed=1), tok, ["a"], **kw)
    with pytest.raises(ValueError, match="top_k"):
        estimate_kl(policy, reference, tok, ["a"], top_k=50, **kw)
    with pytest.raises(ValueError, match="temperature"):
        estimate_kl(policy, reference, tok, ["a"], temperature=0.0, **kw)
    with pytest.raises(ValueError, match="completions"):
        estimate_kl(
            policy,
            reference,
            tok,
            ["a"],
            samples_per_prompt=2,
            max_new_tokens=12,
            exact=True,
            exact_max_completions=1000,
            progress=False,
        )


def test_check_tokenizers_names_the_difference():
    check_tokenizers(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"4 tokens.*5"):
        check_tokenizers(tiny_tokenizer(), tiny_tokenizer(("a", "b", "c", "d")))
    with pytest.raises(ValueError, match=r"'a': policy id 0, reference id 1"):
        check_tokenizers(tiny_tokenizer(), tiny_tokenizer(("b", "a", "c")))
