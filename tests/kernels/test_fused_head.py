"""The fused log-prob + entropy + K head (``linear_logprob_kl``) and the ``FusedLossHead`` that stands in for trl's log-prob
head inside its loss forward, on tensors (no trainer; the trainers' losses with the fused head:
``tests/trainers/test_fused_head_trainers.py``)."""

from __future__ import annotations

import pytest
import torch

from trl_rb.kl import linear_logprob_kl
from trl_rb.trainers import fused_head
from trl_rb.trainers.heads import HeadParams

N, H, HQ, V = 13, 6, 5, 11


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    policy = (randn(N, H, grad=True), randn(V, H, grad=True), randn(V, grad=True))
    reference = (randn(N, HQ), randn(V, HQ), randn(V))
    return policy, reference, torch.randint(0, V, (N,), generator=g)


def _materialized(policy, reference, tokens, temperature, scale_p, scale_q, softcap):
    def logits(h, w, b, scale, cap):
        raw = (h @ w.T + b) * scale
        return (raw if cap is None else cap * torch.tanh(raw / cap)) / temperature

    logp = torch.log_softmax(logits(*policy, scale_p, softcap), -1)
    logq = torch.log_softmax(logits(*reference, scale_q, None), -1)
    p = logp.exp()
    return logp.gather(1, tokens[:, None]).squeeze(1), -(p * logp).sum(-1), (p * (logp - logq)).sum(-1)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_values_and_every_gradient_combination_match_full_logits(softcap):
    policy, reference, tokens = _inputs()
    kw = dict(temperature=0.7, logit_scale_p=1.3, logit_scale_q=0.8)
    out = linear_logprob_kl(policy[0], policy[1], tokens, reference[0], reference[1], bias_p=policy[2],
                            bias_q=reference[2], softcap_p=softcap, chunk_size=4, **kw)  # fmt: skip
    ref = _materialized(policy, reference, tokens, kw["temperature"], 1.3, 0.8, softcap)
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    upstream = [torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    upstream[2][3] = 0  # a position whose KL the loss does not use
    def total(values, used):
        return sum(g * v for g, v, u in zip(upstream, values, used, strict=True) if u).sum()

    for used in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1)]:
        got = torch.autograd.grad(total(out, used), policy, retain_graph=True)
        want = torch.autograd.grad(total(ref, used), policy, retain_graph=True)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), used


def test_minus_infinity_logits():
    """Tokens with p = 0 contribute 0 to the entropy and the KL (not 0 * -inf), and a KL of +inf (q = 0 where p > 0)
    that the loss does not use leaves every gradient finite."""
    policy, reference, tokens = _inputs(1)
    bias_p = policy[2].detach().clone()
    bias_q = reference[2].clone()
    bias_p[[2, 4]] = -torch.inf  # p = 0 at 2 (where q = 0 too) and 4
    bias_q[2] = -torch.inf
    tokens[(tokens == 2) | (tokens == 4)] = 0  # sampled tokens have p > 0
    out = linear_logprob_kl(policy[0], policy[1], tokens, reference[0], reference[1], bias_p=bias_p, bias_q=bias_q,
                            chunk_size=5)  # fmt: skip
    logp = torch.log_softmax(policy[0] @ policy[1].T + bias_p, -1)
    logq = torch.log_softmax(reference[0] @ reference[1].T + bias_q, -1)
    p, possible = logp.exp(), torch.isfinite(logp)  # sums over the tokens with p > 0, -inf kept out of autograd
    safe_logp, safe_logq = (torch.where(possible, x, torch.zeros_like(x)) for x in (logp, logq))
    want = (logp.gather(1, tokens[:, None]).squeeze(1), -(p * safe_logp).sum(-1), (p * (safe_logp - safe_logq)).sum(-1))
    for got, w in zip(out, want, strict=True):
        assert torch.allclose(got, w, rtol=1e-12, atol=1e-13)
    grads_out = torch.autograd.grad(sum(x.sum() for x in out), policy[:2])
    grads_want = torch.autograd.grad(sum(x.sum() for x in want), policy[:2])
    for a, b in zip(grads_out, grads_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    bias_p[2] = 0.0  # now p > 0 where q = 0: every KL is +inf
    logprob, entropy, kl = linear_logprob_kl(policy[0], policy[1], tokens, reference[0], reference[1],
                                             bias_p=bias_p, bias_q=bias_q)  # fmt: skip
    assert torch.isposinf(kl).all()
    unused = torch.where(torch.zeros(N, dtype=torch.bool), kl, torch.zeros_like(kl))
    grad_h, grad_w = torch.autograd.grad((logprob + entropy + unused).sum(), policy[:2])
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()


def test_float32_and_bfloat16_heads():
    policy, reference, tokens = _inputs(2)
    want = _materialized(policy, reference, tokens, 1.0, 1.0, 1.0, None)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        cast = [t.detach().to(dtype) for t in (*policy, *reference)]
        out = linear_logprob_kl(cast[0], cast[1], tokens, cast[3], cast[4], bias_p=cast[2], bias_q=cast[5])
        for got, w in zip(out, want, strict=True):
            assert got.dtype == torch.float32  # the softmax math stays in float32 for low-precision heads
            torch.testing.assert_close(got.double(), w.detach(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------------------------
# Inside trl's loss forward: the FusedLossHead against trl's own head function
# --------------------------------------------------------------------------------------------------------------------


def _head_call(layout: str, seed: int = 0):
    """A FusedLossHead for a batch of 3 x (prompt 2 + completion 4) and trl's arguments in one of its two layouts."""
    g = torch.Generator().manual_seed(seed)
    b, prompt, c = 3, 2, 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    completion = torch.randint(0, V, (b, c), generator=g) * mask
    hidden = torch.randn(b, prompt + c - 1, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(b, c, HQ, generator=g, dtype=torch.float64)
    ref_head = HeadParams(weight=torch.randn(V, HQ, generator=g, dtype=torch.float64), bias=None)
    head = fused_head.FusedLossHead(completion, mask, ref_hidden, ref_head)
    full_mask = torch.zeros(b, prompt + c - 1, dtype=torch.bool)
    full_mask[:, -c:] = mask.bool()
    targets = torch.cat([torch.zeros(b, prompt - 1, dtype=torch.long), completion], 1)
    if layout == "compact":  # trl on Triton devices: only the labelled rows
        rows, tokens = hidden[full_mask], targets[full_mask]
    else:  # elsewhere: every shifted position, labels clamped to 0
        rows, tokens = hidden.reshape(-1, H), targets.reshape(-1)
    return head, (rows, weight, None, tokens, 0.9, 4096, None, 1.0, ("log_probs", "entropy")), full_mask, hidden


def test_both_trl_layouts_give_the_same_token_kl_and_log_probs():
    results = {}
    for layout in ("compact", "full"):
        head, args, full_mask, hidden = _head_call(layout)
        logprob, entropy, *rest = head.apply(*args)
        assert rest == [None, None, None] and head.calls == 1
        if layout == "full":
            logprob, entropy = logprob.view(full_mask.shape)[full_mask], entropy.view(full_mask.shape)[full_mask]
        k = head.token_kl
        assert k.shape == head.completion_mask.shape and (k[head.completion_mask == 0] == 0).all()
        grad = torch.autograd.grad((logprob.sum() + k.sum()), hidden)[0]
        results[layout] = (logprob.detach(), entropy.detach(), k.detach(), grad)
    for a, b in zip(results["compact"], results["full"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the values are those of linear_logprob_kl on the completion rows
    head, args, full_mask, hidden = _head_call("compact")
    want = linear_logprob_kl(hidden[full_mask], args[1], args[3], head.ref_hidden[head.completion_mask.bool()],
                             head.ref_head.weight, temperature=0.9)  # fmt: skip
    torch.testing.assert_close(results["compact"][2][head.completion_mask.bool()], want[2].detach())


def test_unexpected_calls_are_refused():
    head, args, _, _ = _head_call("compact")
    bad = list(args)
    bad[3] = (args[3] + 1) % V
    with pytest.raises(RuntimeError, match="other tokens"):
        head.apply(*bad)
    head, args, _, _ = _head_call("compact")
    head.apply(*args)
    with pytest.raises(RuntimeError, match="more than once"):
        head.apply(*args)


def test_head_dtype_follows_trl_and_other_outputs_go_to_trl():
    """The policy's product runs in trl's compute dtype (the autocast dtype, else the hidden states'): the log-probs
    match trl's own head; a call asking for outputs the fused head does not compute is trl's, and K_n is left None."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import _ChunkedLogProbFunction

    # float32 hidden states and a float64 head: trl computes in float32; under bf16 autocast, in bf16
    for autocast, weight_dtype in ((False, torch.float64), (True, torch.float32)):
        head, args, _, _ = _head_call("compact")
        call = (args[0].detach().float(), args[1].detach().to(weight_dtype), *args[2:])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with fused_head.fused_loss_head(head):
                got = head.apply(*call)
            want = _ChunkedLogProbFunction.apply(*call)
        assert head.token_kl is not None
        tol = 2e-2 if autocast else 1e-5  # bf16 products: the same rounding in both, summed in other orders
        torch.testing.assert_close(got[0].float(), want[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got[1].float(), want[1], rtol=tol, atol=tol)
    head, args, _, _ = _head_call("compact")
    call = (*args[:-1], ("log_probs", "log_sum_sq_probs"))
    with fused_head.fused_loss_head(head):
        got = head.apply(*call)
        assert trl_utils._ChunkedLogProbFunction is head
    assert trl_utils._ChunkedLogProbFunction is _ChunkedLogProbFunction  # restored
    assert head.token_kl is None and got[2] is not None


