"""The enumeration oracle: exact KL(p || q) over completions, and its exact gradient, for tiny causal LMs.

For a vocabulary of a few tokens and a handful of steps every completion can be listed, so the sequence-level KL

    KL(p || q) = sum_y p(y | x) (log p(y | x) - log q(y | x))

is a finite sum, and autograd on that sum gives its exact gradient with respect to the policy's parameters. Tests use
it as ground truth for the estimators in ``trl_rb.kl``.

Completions: every token sequence that ends with the first EOS, or is cut at ``max_new_tokens`` (then it may end with
any token, EOS included); with ``eos_token_id=None`` every sequence of exactly ``max_new_tokens`` tokens.

Models: a Hugging Face causal LM (anything with a ``config`` whose call ``model(input_ids=..., attention_mask=...)``
returns ``.logits``), or a plain callable / ``nn.Module`` mapping ids [N, L] to causal logits [N, L, V] (``logits[:, i]``
is the distribution of token ``i + 1``). The forwards run in the models' own dtype; build the models in float64 for a
float64-exact oracle. Everything after the forward (log-probs, KL, probabilities) is float64. Modules are put in eval
mode for the call (dropout would make the oracle random) and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .kl import token_kl, token_logprobs
from .kl.checks import check_temperature

__all__ = [
    "CompletionTable",
    "completion_table",
    "count_completions",
    "enumerate_completions",
    "eval_mode",
    "exact_kl",
    "exact_kl_and_grad",
    "exact_reward_and_grad",
]

# Rows per forward pass: bounds the activations of one forward whatever the number of completions.
_BATCH_ROWS = 8192
# sum_y p(y) must be 1; a larger gap means the model is not causal (logits depend on later tokens) or not a model.
_PROB_SUM_TOL = 1e-4


def count_completions(vocab_size: int, max_new_tokens: int, eos_token_id: int | None) -> int:
    """Number of completions ``enumerate_completions`` lists (exact Python int, computed without building them).

    With EOS: (V-1)^(n-1) completions of each length n < L (n-1 non-EOS tokens, then EOS), plus V (V-1)^(L-1)
    of length L (L-1 non-EOS tokens, then any token). Without EOS: V^L.
    """
    _check_enumeration_args(vocab_size, max_new_tokens, eos_token_id)
    v, length = vocab_size, max_new_tokens
    if eos_token_id is None:
        return v**length
    return sum((v - 1) ** (n - 1) for n in range(1, length)) + v * (v - 1) ** (length - 1)


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")


def _check_enumeration_args(vocab_size: int, max_new_tokens: int, eos_token_id: int | None) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}.")
    _check_max_new_tokens(max_new_tokens)
    if eos_token_id is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id must be None or an int in [0, {vocab_size}), got {eos_token_id!r}.")


def _all_sequences(symbols: torch.Tensor, length: int) -> torch.Tensor:
    """Every sequence of ``length`` symbols, [len(symbols)**length, length], lexicographic order."""
    k = symbols.numel()
    idx = torch.arange(k**length, dtype=torch.long)
    digits = [(idx // k ** (length - 1 - j)) % k for j in range(length)]
    return symbols[torch.stack(digits, dim=-1)] if length else torch.zeros(1, 0, dtype=torch.long)


def enumerate_completions(
    vocab_size: int, max_new_tokens: int, eos_token_id: int | None, *, max_completions: int = 200_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every completion that ends with EOS or is cut at ``max_new_tokens``, right-padded.

    Args:
        vocab_size: V, the number of token ids (0 .. V-1).
        max_new_tokens: L >= 1, the length limit.
        eos_token_id: the EOS id (a completion stops at its first EOS), or None (every completion has length L).
        max_completions: refuse beyond this many completions.

    Returns:
        ``(tokens, mask)``, both [M, L] long: ``tokens[m, :n_m]`` is completion m (EOS included), padded with EOS (0
        without EOS) where ``mask`` is 0. Ordered by length, then lexicographically.

    Raises:
        ValueError: M > max_completions (the message gives both), or invalid arguments.
    """
    count = count_completions(vocab_size, max_new_tokens, eos_token_id)
    if count > max_completions:
        raise ValueError(
            f"{count} completions (vocabulary {vocab_size}, max_new_tokens {max_new_tokens}) exceed max_completions="
            f"{max_completions}; use a smaller vocabulary or fewer steps, or raise max_completions."
        )
    length = max_new_tokens
    if eos_token_id is None:
        tokens = _all_sequences(torch.arange(vocab_size), length)
        return tokens, torch.ones_like(tokens)
    non_eos = torch.tensor([v for v in range(vocab_size) if v != eos_token_id], dtype=torch.long)
    tok_blocks, mask_blocks = [], []
    for n in range(1, length + 1):
        stems = _all_sequences(non_eos, n - 1)  # [(V-1)^(n-1), n-1]
        if n < length:
            lasts = torch.tensor([eos_token_id])
        else:
            lasts = torch.arange(vocab_size)
        body = torch.cat(
            [stems.repeat_interleave(lasts.numel(), dim=0), lasts.repeat(stems.shape[0]).unsqueeze(-1)], dim=-1
        )
        pad = torch.full((body.shape[0], length - n), eos_token_id, dtype=torch.long)
        tok_blocks.append(torch.cat([body, pad], dim=-1))
        mask = torch.zeros(body.shape[0], length, dtype=torch.long)
        mask[:, :n] = 1
        mask_blocks.append(mask)
    tokens, mask = torch.cat(tok_blocks), torch.cat(mask_blocks)
    assert tokens.shape[0] == count, (tokens.shape, count)
    return tokens, mask


# --------------------------------------------------------------------------------------------------------------------
# Running the models.
# --------------------------------------------------------------------------------------------------------------------

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def _is_hf(model: Model) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "config")


@contextmanager
def eval_mode(*models: Model) -> Iterator[None]:
    """Put the models that are modules in eval mode (no dropout) for the block, restoring their training flags."""
    modules = [m for m in models if isinstance(m, nn.Module)]
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


def _model_device(model: Model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _forward(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Causal logits [N, L, V] for ids [N, L] (``logits[:, i]`` predicts token ``i + 1``)."""
    ids = ids.to(_model_device(model))
    if _is_hf(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    else:
        out = model(ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must map ids {tuple(ids.shape)} to logits [N, L, V]; got {shape}.")
    if not logits.is_floating_point():
        raise TypeError(f"the model returned logits of dtype {logits.dtype}; expected floating point.")
    return logits


def _check_prompt(prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    if prompt.numel() == 0:
        raise ValueError("prompt_ids is empty: the first completion token needs a prompt to condition on (e.g. BOS).")
    return prompt


def _vocab_size(policy: Model, reference: Model, prompt: torch.Tensor) -> int:
    """V from one forward of each model on a one-token input (id 0 is always valid); both must agree."""
    probe = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        vp = _forward(policy, probe).shape[-1]
        vq = _forward(reference, probe).shape[-1]
    if vp != vq:
        raise ValueError(
            f"the policy and the reference have different vocabulary sizes: policy {vp}, reference {vq}; the KL "
            "needs both models over one vocabulary."
        )
    if int(prompt.max()) >= vp or int(prompt.min()) < 0:
        raise ValueError(f"prompt ids must lie in [0, {vp}), got {prompt.tolist()}.")
    return vp


def _completion_logits(model: Model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Completion-aligned logits [M, L, V] (model dtype, not divided by the temperature), in batches of rows."""
    prompt_len, length = prompt.numel(), tokens.shape[1]
    blocks = []
    for s in range(0, tokens.shape[0], _BATCH_ROWS):
        rows = tokens[s : s + _BATCH_ROWS]
        ids = torch.cat([prompt.expand(rows.shape[0], -1), rows], dim=-1)
        # Logits at position i predict token i + 1: the completion's distributions sit at prompt_len - 1 ... .
        blocks.append(_forward(model, ids)[:, prompt_len - 1 : prompt_len - 1 + length])
    return torch.cat(blocks)


def _seq_logprob(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    lp = token_logprobs(logits.double(), tokens, temperature=temperature)
    return (lp * mask).sum(-1)


# --------------------------------------------------------------------------------------------------------------------
# The table of all completions and the exact quantities.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CompletionTable:
    """Every completion of one prompt with both models' logits and its exact probability under the policy.

    Attributes:
        tokens: [M, L] long, the completions right-padded (see ``enumerate_completions``).
        mask: [M, L] long, 1 for real completion tokens (EOS included), 0 for padding.
        logits_p: [M, L, V] float64 policy logits, completion-aligned (``logits_p[m, t]`` is the distribution
            ``tokens[m, t]`` was drawn from), raw: *not* divided by the temperature (pass ``temperature=`` to the
            ``trl_rb.kl`` functions). Detached.
        logits_q: [M, L, V] float64 reference logits, the same alignment and scale.
        seq_logprob_p: [M] float64, log p(y | x) at the temperature (padding excluded).
        seq_logprob_q: [M] float64, log q(y | x) at the temperature.
        prob: [M] float64, p(y | x) = exp(seq_logprob_p); sums to 1 up to rounding (checked).
        temperature: the sampling temperature the probabilities are at.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    logits_p: torch.Tensor
    logits_q: torch.Tensor
    seq_logprob_p: torch.Tensor
    seq_logprob_q: torch.Tensor
    prob: torch.Tensor
    temperature: float

    @property
    def num_completions(self) -> int:
        return self.tokens.shape[0]

    def kl(self) -> float:
        """Exact KL(p || q) = sum_y p(y) (log p(y) - log q(y)); +inf when q(y) = 0 < p(y) for some y."""
        diff = self.seq_logprob_p - self.seq_logprob_q
        return float(torch.where(self.prob > 0, self.prob * diff, torch.zeros_like(diff)).sum())

    def expectation(self, values: torch.Tensor) -> torch.Tensor:
        """E_p[values] = sum_m prob[m] values[m] for values [M, ...]."""
        p = self.prob.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
        return (p * values).sum(0)

    def rb_terms(self) -> torch.Tensor:
        """[M] float64, sum_n K_n for every completion (the RB estimate); ``expectation`` of it is the exact KL."""
        k = token_kl(self.logits_p, self.logits_q, temperature=self.temperature)
        return (k * self.mask).sum(-1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices [num_samples] of completions drawn i.i.d. from p (exact sampling; index the table with them)."""
        return torch.multinomial(self.prob, num_samples, replacement=True, generator=generator)


def completion_table(
    policy: Model,
    reference: Model,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 1.0,
    max_completions: int = 200_000,
) -> CompletionTable:
    """Enumerate every completion of ``prompt_ids`` and run both models on all of them (no gradient).

    Raises:
        ValueError: empty prompt, max_new_tokens < 1, temperature <= 0, different vocabulary sizes, more than
            ``max_completions`` completions, or probabilities that do not sum to 1 (a non-causal model).
    """
    check_temperature(temperature)
    prompt = _check_prompt(prompt_ids)
    _check_max_new_tokens(max_new_tokens)
    with torch.no_grad(), eval_mode(policy, reference):
        vocab = _vocab_size(policy, reference, prompt)
        tokens, mask = enumerate_completions(vocab, max_new_tokens, eos_token_id, max_completions=max_completions)
        logits_p = _completion_logits(policy, prompt, tokens).double().cpu()
        logits_q = _completion_logits(reference, prompt, tokens).double().cpu()
    lp = _seq_logprob(logits_p, tokens, mask, temperature)
    lq = _seq_logprob(logits_q, tokens, mask, temperature)
    prob = lp.exp()
    _check_prob_sum(prob)
    return CompletionTable(tokens, mask, logits_p, logits_q, lp, lq, prob, float(temperature))


def _check_prob_sum(prob: torch.Tensor) -> None:
    total = float(prob.sum())
    if not abs(total - 1.0) <= _PROB_SUM_TOL:
        raise ValueError(
            f"the policy's completion probabilities sum to {total!r}, not 1: its logits at position i must depend only "
            "on tokens 0..i (a causal model), and be finite."
        )


def exact_kl(
    policy: Model,
    reference: Model,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 1.0,
    max_completions: int = 200_000,
) -> float:
    """Exact KL(p || q) = sum_y p(y|x) (log p(y|x) - log q(y|x)) over every completion, float64.

    p and q are the models' sampling distributions at ``temperature`` (both divided by it). It also equals
    E_p[sum_n K_n] (``completion_table(...).expectation(table.rb_terms())``). Errors: see ``completion_table``.
    """
    return completion_table(
        policy,
        reference,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        temperature=temperature,
        max_completions=max_completions,
    ).kl()


def _named_params(
    policy: Model, params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    if isinstance(params, Mapping):
        named = dict(params)
    elif params is None:
        if not isinstance(policy, nn.Module):
            raise ValueError("the policy is not an nn.Module: pass params= (the tensors to differentiate).")
        named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    else:
        names = {id(p): n for n, p in policy.named_parameters()} if isinstance(policy, nn.Module) else {}
        named = {names.get(id(p), f"param{i}"): p for i, p in enumerate(params)}
    if not named:
        raise ValueError("no parameters to differentiate: none of the policy's parameters requires grad.")
    for name, p in named.items():
        if not (isinstance(p, torch.Tensor) and p.requires_grad):
            raise ValueError(f"parameter {name!r} must be a tensor that requires grad.")
    return named


def exact_kl_and_grad(
    policy: Model,
    reference: Model,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 1.0,
    max_completions: int = 200_000,
    params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Exact KL(p || q) and its exact gradient with respect to the policy's parameters (the reference is constant).

    Autograd through the finite sum sum_y p_theta(y) (log p_theta(y) - log q(y)), batch by batch of completions.

    Args:
        params: the tensors to differentiate: None (every ``named_parameters()`` entry that requires grad), a dict
            name -> tensor, or an iterable of tensors (named after the policy's parameter names when found).

    Returns:
        ``(kl, grads)``: the KL (float) and a dict name -> gradient (same shape and dtype as the parameter; zeros
        for a parameter the KL does not depend on). Existing ``.grad`` fields are left untouched.
    """
    prompt = _check_prompt(prompt_ids)

    def kl_terms(lp: torch.Tensor, rows: torch.Tensor, rows_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lq = _seq_logprob(_completion_logits(reference, prompt, rows).cpu(), rows, rows_mask, temperature)
        return lp - lq

    with eval_mode(policy, reference):
        _vocab_size(policy, reference, prompt)
        return _expectation_and_grad(policy, prompt, kl_terms, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos_token_id, temperature=temperature,
                                     max_completions=max_completions, params=params)  # fmt: skip


def exact_reward_and_grad(
    policy: Model,
    prompt_ids: Sequence[int] | torch.Tensor,
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 1.0,
    max_completions: int = 200_000,
    params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Exact E_p[R(y)] and its exact gradient with respect to the policy's parameters, for a reward that is a fixed
    function of the completion.

    Args:
        reward: maps completions ``tokens`` [M, L] long and their ``mask`` [M, L] (1 = a token, EOS included; as
            ``enumerate_completions`` lays them out) to rewards [M] (any float dtype; taken as constants).
        params: as in ``exact_kl_and_grad``.

    Returns:
        ``(expected_reward, grads)`` as ``exact_kl_and_grad`` returns the KL and its gradient.
    """
    prompt = _check_prompt(prompt_ids)

    def reward_terms(lp: torch.Tensor, rows: torch.Tensor, rows_mask: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(reward(rows, rows_mask)).detach().to(torch.float64)
        if values.shape != lp.shape:
            raise ValueError(f"reward returned shape {tuple(values.shape)} for {lp.shape[0]} completions; expected [M].")
        return values

    return _expectation_and_grad(policy, prompt, reward_terms, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_token_id, temperature=temperature,
                                 max_completions=max_completions, params=params)  # fmt: skip


def _expectation_and_grad(
    policy: Model,
    prompt: torch.Tensor,
    values: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float,
    max_completions: int,
    params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """sum_y p_theta(y) f(y) and its gradient by autograd through the finite sum, batch by batch of completions;
    ``values(lp, rows, rows_mask)`` gives f [M] from the completions' log-probs lp (with gradient: f may depend on
    theta, as log p - log q does)."""
    check_temperature(temperature)
    _check_max_new_tokens(max_new_tokens)
    named = _named_params(policy, params)
    tensors = list(named.values())
    grads = [torch.zeros_like(p) for p in tensors]
    total, total_prob = 0.0, 0.0
    with eval_mode(policy):
        vocab = _vocab_size(policy, policy, prompt)
        tokens, mask = enumerate_completions(vocab, max_new_tokens, eos_token_id, max_completions=max_completions)
        for s in range(0, tokens.shape[0], _BATCH_ROWS):
            rows, rows_mask = tokens[s : s + _BATCH_ROWS], mask[s : s + _BATCH_ROWS]
            with torch.enable_grad():
                lp = _seq_logprob(_completion_logits(policy, prompt, rows).cpu(), rows, rows_mask, temperature)
                prob = lp.exp()
                term = torch.where(prob > 0, prob * values(lp, rows, rows_mask), torch.zeros_like(lp)).sum()
                parts = torch.autograd.grad(term, tensors, allow_unused=True)
            for g, part in zip(grads, parts, strict=True):
                if part is not None:
                    g += part
            total += float(term.detach())
            total_prob += float(prob.detach().sum())
    _check_prob_sum(torch.tensor(total_prob))
    return total, dict(zip(named, grads, strict=True))

