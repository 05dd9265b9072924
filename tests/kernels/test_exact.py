"""The enumeration oracle (trl_rb.exact) against independent computations: brute-force enumeration, a per-prefix
tree recursion, E_p[sum_n K_n], and finite differences for the gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from enumerable import TinyCausalLM, single_thread, tiny_gpt2_pair, tiny_pair

import trl_rb
from trl_rb.exact import (
    completion_table,
    count_completions,
    enumerate_completions,
    exact_kl,
    exact_kl_and_grad,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with single_thread():
        yield


def _brute_force(vocab: int, length: int, eos: int | None) -> set[tuple[int, ...]]:
    out = set()
    for seq in itertools.product(range(vocab), repeat=length):
        if eos is not None and eos in seq[:-1]:
            seq = seq[: seq.index(eos) + 1]
        out.add(seq)
    return out


@pytest.mark.parametrize("vocab,length,eos", [(4, 5, 3), (3, 4, 0), (2, 6, 1), (5, 1, 2), (3, 3, None), (1, 3, 0)])
def test_enumeration_matches_brute_force(vocab, length, eos):
    tokens, mask = enumerate_completions(vocab, length, eos)
    assert tokens.shape == mask.shape == (count_completions(vocab, length, eos), length)
    rows = [tuple(t[: int(m.sum())].tolist()) for t, m in zip(tokens, mask, strict=True)]
    assert len(set(rows)) == len(rows), "duplicate completions"
    assert set(rows) == _brute_force(vocab, length, eos)
    # Mask is a prefix of ones; padding uses EOS (0 without EOS) and never precedes a real token.
    lengths = mask.sum(-1)
    assert torch.equal(mask, (torch.arange(length) < lengths.unsqueeze(-1)).long())
    assert torch.all(tokens[mask == 0] == (eos if eos is not None else 0))


def test_too_many_completions_refused_before_building():
    # 50257^20 completions: refused arithmetically (building them would not fit in any memory).
    with pytest.raises(ValueError, match=r"\d+ completions .* exceed max_completions=200000"):
        enumerate_completions(50257, 20, 50256)
    with pytest.raises(ValueError, match="max_completions=363"):
        enumerate_completions(4, 5, 3, max_completions=363)
    assert enumerate_completions(4, 5, 3, max_completions=364)[0].shape == (364, 5)


@pytest.mark.parametrize("bad", [dict(vocab_size=0), dict(max_new_tokens=0), dict(eos_token_id=4), dict(eos_token_id=-1)])
def test_enumeration_bad_args(bad):
    args = dict(vocab_size=4, max_new_tokens=3, eos_token_id=3) | bad
    with pytest.raises(ValueError):
        enumerate_completions(args["vocab_size"], args["max_new_tokens"], args["eos_token_id"])


def _tree_kl(policy, reference, prefix: list[int], steps_left: int, eos: int, temperature: float) -> float:
    """KL by recursion over the prefix tree, one unbatched forward per prefix: independent of the oracle's batching,
    padding and alignment. KL = sum_v p(v) [log p(v)/q(v) + (v != EOS) KL(subtree after v)]."""
    ids = torch.tensor([prefix])
    with torch.no_grad():
        lp = torch.log_softmax(policy(ids)[0, -1].double() / temperature, -1)
        lq = torch.log_softmax(reference(ids)[0, -1].double() / temperature, -1)
    total = 0.0
    for v in range(lp.numel()):
        term = float(lp[v] - lq[v])
        if v != eos and steps_left > 1:
            term += _tree_kl(policy, reference, prefix + [v], steps_left - 1, eos, temperature)
        total += math.exp(float(lp[v])) * term
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_kl_matches_tree_recursion_and_rb_expectation(temperature):
    policy, reference = tiny_pair(vocab_size=3, seed=1)
    kw = dict(max_new_tokens=4, eos_token_id=2, temperature=temperature)
    kl = exact_kl(policy, reference, [0, 1], **kw)
    assert kl == pytest.approx(_tree_kl(policy, reference, [0, 1], 4, 2, temperature), rel=1e-12, abs=1e-13)
    table = completion_table(policy, reference, [0, 1], **kw)
    assert float(table.prob.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(table.prob, table.seq_logprob_p.exp())
    # KL = E_p[sum_n K_n] (the tower rule behind the RB estimator).
    assert float(table.expectation(table.rb_terms())) == pytest.approx(kl, rel=1e-12)
    assert table.kl() == kl
    assert kl > 0.05


def test_hf_model_matches_tree_recursion():
    policy, reference = tiny_gpt2_pair(vocab_size=4, seed=1)

    def call(model):
        return lambda ids: model(input_ids=ids).logits

    kl = exact_kl(policy, reference, [0], max_new_tokens=3, eos_token_id=3)
    assert kl == pytest.approx(_tree_kl(call(policy), call(reference), [0], 3, 3, 1.0), rel=1e-10)
    assert 0.1 < kl < 5


def test_table_alignment_and_dtypes():
    policy, reference = tiny_pair(vocab_size=4, seed=0)
    table = completion_table(policy, reference, [0], max_new_tokens=3, eos_token_id=3, temperature=1.3)
    m = 17
    ids = torch.cat([torch.tensor([0]), table.tokens[m]]).unsqueeze(0)
    with torch.no_grad():
        full = policy(ids)[0]
    # logits_p[m, t] is the distribution tokens[m, t] was drawn from: the model output one position earlier, raw.
    assert torch.allclose(table.logits_p[m], full[:-1].double())
    assert table.logits_p.dtype == table.prob.dtype == table.seq_logprob_p.dtype == torch.float64
    lp = torch.log_softmax(table.logits_p / 1.3, -1).gather(-1, table.tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose((lp * table.mask).sum(-1), table.seq_logprob_p)
    idx = table.sample(1000, torch.Generator().manual_seed(0))
    assert idx.shape == (1000,) and int(idx.max()) < table.num_completions


def test_plain_callable_and_float32_model():
    policy, reference = tiny_pair(vocab_size=4, seed=2, dtype=torch.float32)
    kl32 = exact_kl(lambda ids: policy(ids), reference, [0], max_new_tokens=4, eos_token_id=3)
    kl64 = exact_kl(policy.double(), reference.double(), [0], max_new_tokens=4, eos_token_id=3)
    assert kl32 == pytest.approx(kl64, rel=1e-5)


def test_no_eos_completions():
    policy, reference = tiny_pair(vocab_size=3, seed=3)
    table = completion_table(policy, reference, [1], max_new_tokens=3, eos_token_id=None)
    assert table.num_completions == 27 and bool(table.mask.all())
    assert table.kl() == pytest.approx(float(table.expectation(table.rb_terms())), rel=1e-12)


@pytest.mark.parametrize("kind,temperature", [("gru", 1.0), ("gru", 1.6), ("gpt2", 0.8)])
def test_exact_grad_matches_finite_differences(kind, temperature):
    policy, reference = tiny_pair(vocab_size=4, seed=4) if kind == "gru" else tiny_gpt2_pair(vocab_size=4, seed=2)
    kw = dict(max_new_tokens=3, eos_token_id=3, temperature=temperature)
    kl, grads = exact_kl_and_grad(policy, reference, [0], **kw)
    assert kl == pytest.approx(exact_kl(policy, reference, [0], **kw), rel=1e-12)
    named = dict(policy.named_parameters())
    assert set(grads) == set(named)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name in list(named)[:: max(1, len(named) // 5)]:
        p = named[name]
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype
        for flat in torch.randint(p.numel(), (1 if kind == "gpt2" else 2,), generator=gen).tolist():
            with torch.no_grad():
                p.view(-1)[flat] += eps
                up = exact_kl(policy, reference, [0], **kw)
                p.view(-1)[flat] -= 2 * eps
                down = exact_kl(policy, reference, [0], **kw)
                p.view(-1)[flat] += eps
            fd = (up - down) / (2 * eps)
            assert float(grads[name].view(-1)[flat]) == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, flat)


def test_grad_params_argument_and_existing_grads_untouched():
    policy, reference = tiny_pair(vocab_size=4, seed=5)
    head = [policy.head.weight, policy.head.bias]
    policy.head.weight.grad = torch.ones_like(policy.head.weight)
    kl, grads = exact_kl_and_grad(policy, reference, [0], max_new_tokens=3, eos_token_id=3, params=head)
    assert set(grads) == {"head.weight", "head.bias"}
    _, all_grads = exact_kl_and_grad(policy, reference, [0], max_new_tokens=3, eos_token_id=3)
    assert torch.allclose(grads["head.weight"], all_grads["head.weight"])
    assert torch.equal(policy.head.weight.grad, torch.ones_like(policy.head.weight))
    with pytest.raises(ValueError, match="params="):
        exact_kl_and_grad(lambda ids: policy(ids), reference, [0], max_new_tokens=3, eos_token_id=3)


def test_training_mode_restored():
    policy, reference = tiny_pair(vocab_size=4, seed=0)
    policy.train()
    exact_kl_and_grad(policy, reference, [0], max_new_tokens=2, eos_token_id=3)
    assert policy.training and not reference.training


def test_bad_inputs():
    policy, reference = tiny_pair(vocab_size=4, seed=0)
    other = TinyCausalLM(vocab_size=5, seed=1)
    kw = dict(max_new_tokens=3, eos_token_id=3)
    for fn in (exact_kl, exact_kl_and_grad, completion_table):
        with pytest.raises(ValueError, match=r"policy 4, reference 5"):
            fn(policy, other, [0], **kw)
        with pytest.raises(ValueError, match="exceed max_completions=10"):
            fn(policy, reference, [0], **kw, max_completions=10)
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            fn(policy, reference, [], **kw)
        with pytest.raises(ValueError, match="max_new_tokens"):
            fn(policy, reference, [0], max_new_tokens=0, eos_token_id=3)
        for t in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="temperature"):
                fn(policy, reference, [0], **kw, temperature=t)
        with pytest.raises(ValueError, match="eos_token_id"):
            fn(policy, reference, [0], max_new_tokens=3, eos_token_id=4)
        with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 4\)"):
            fn(policy, reference, [7], **kw)


def test_non_causal_model_detected():
    policy, reference = tiny_pair(vocab_size=4, seed=0)

    def peeks_ahead(ids):  # logits at position i depend on the last token: not a causal LM
        return policy(ids) + 3.0 * torch.nn.functional.one_hot(ids[:, -1:], 4).double()

    with pytest.raises(ValueError, match="not 1"):
        exact_kl(peeks_ahead, reference, [0], max_new_tokens=3, eos_token_id=3)


def test_the_oracle_is_imported_from_its_own_module():
    """The oracle's audience is researchers: ``trl_rb.exact``, not the top level (trainer and kernel users)."""
    for name in ("exact_kl", "exact_kl_and_grad", "enumerate_completions"):
        assert not hasattr(trl_rb, name), name
    assert callable(exact_kl) and callable(exact_kl_and_grad) and callable(enumerate_completions)


def test_exact_reward_gradient_matches_the_explicit_sum():
    """sum_y p(y) R(y) and its gradient against an explicit float64 computation from the completion table."""
    from trl_rb.exact import exact_reward_and_grad

    policy, reference = tiny_pair(4, 8, 0)

    def reward(tokens, mask):
        return (tokens == 1).double().mul(mask).sum(-1) - 0.3 * mask.sum(-1)

    value, grads = exact_reward_and_grad(policy, [0], reward, max_new_tokens=3, eos_token_id=3)
    table = completion_table(policy, reference, [0], max_new_tokens=3, eos_token_id=3)
    assert value == pytest.approx(float((table.prob * reward(table.tokens, table.mask)).sum()), rel=1e-12)
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    ids = torch.cat([torch.zeros(table.tokens.shape[0], 1, dtype=torch.long), table.tokens], dim=1)
    logits = policy(ids)[:, :-1].double()  # logits[:, i] predicts completion token i
    lp = (torch.log_softmax(logits, -1).gather(-1, table.tokens.unsqueeze(-1)).squeeze(-1) * table.mask).sum(-1)
    expected = torch.autograd.grad((lp.exp() * reward(table.tokens, table.mask)).sum(), list(named.values()))
    for name, e in zip(named, expected, strict=True):
        torch.testing.assert_close(grads[name], e, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="expected \\[M\\]"):
        exact_reward_and_grad(policy, [0], lambda t, m: torch.zeros(2), max_new_tokens=3, eos_token_id=3)
