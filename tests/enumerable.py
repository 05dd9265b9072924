"""Tiny causal LMs whose completions can all be enumerated: shared fixtures for tests (ground truth via trl_rb.exact).

- ``TinyCausalLM``: a plain torch module (eval mode) (embedding -> GRU -> linear head), ids [N, L] -> logits [N, L, V], causal by
  construction (a GRU only looks back). Float64 by default so the oracle is exact to ~1e-15.
- ``tiny_gpt2``: a Hugging Face ``GPT2LMHeadModel`` with a tiny vocabulary (last id = EOS), no dropout, eval mode,
  weights drawn large enough that the next-token distributions are far from uniform.
- ``tiny_pair`` / ``tiny_gpt2_pair``: a policy and a reference with distinct weights, KL(p || q) of order 0.1-2 nats
  over short completions.

Token-id conventions for all of them: ids 0 .. V-1, EOS = V-1 (``EOS_ID(vocab_size)``), prompts such as ``[0]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["TinyCausalLM", "eos_id", "single_thread", "tiny_gpt2", "tiny_gpt2_pair", "tiny_pair", "word_tokenizer"]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: tiny models are dispatch-bound, and on a shared machine extra
    intra-op threads only add contention (3x slower measured on 2 loaded cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def eos_id(vocab_size: int) -> int:
    """The EOS id the fixtures use: the last id."""
    return vocab_size - 1


class TinyCausalLM(nn.Module):
    """Embedding -> one GRU layer -> linear head; ids [N, L] long -> logits [N, L, V] (``logits[:, i]`` predicts
    token ``i + 1``).

    Args:
        vocab_size: V (EOS is V-1 by convention).
        hidden: GRU width.
        seed: parameter initialisation seed (the global RNG is left untouched).
        logit_scale: multiplies the head's initial weights: larger gives peakier next-token distributions.
        dtype: parameter dtype (float64 by default for an exact oracle).
    """

    def __init__(
        self,
        vocab_size: int = 4,
        hidden: int = 8,
        seed: int = 0,
        *,
        logit_scale: float = 0.4,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                std = logit_scale if name.startswith("head") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.to(dtype).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # attention_mask is accepted (and ignored: right padding cannot reach earlier positions of a causal model).
        h, _ = self.rnn(self.embed(input_ids))
        return self.head(h)


def tiny_pair(
    vocab_size: int = 4, hidden: int = 8, seed: int = 0, *, logit_scale: float = 0.4, dtype: torch.dtype = torch.float64
) -> tuple[TinyCausalLM, TinyCausalLM]:
    """(policy, reference): two ``TinyCausalLM`` with independent weights (seeds ``2 seed`` and ``2 seed + 1``)."""
    policy = TinyCausalLM(vocab_size, hidden, 2 * seed, logit_scale=logit_scale, dtype=dtype)
    reference = TinyCausalLM(vocab_size, hidden, 2 * seed + 1, logit_scale=logit_scale, dtype=dtype)
    return policy, reference


def tiny_gpt2(
    vocab_size: int = 4,
    seed: int = 0,
    *,
    n_embd: int = 16,
    n_layer: int = 2,
    n_head: int = 2,
    init_std: float = 0.2,
    dtype: torch.dtype = torch.float64,
):
    """A randomly initialised ``GPT2LMHeadModel`` (tied head, no dropout, eval mode) with EOS = V-1.

    ``init_std`` replaces GPT-2's 0.02 so the logits are not nearly uniform.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=init_std,
        bos_token_id=0,
        eos_token_id=eos_id(vocab_size),
        pad_token_id=eos_id(vocab_size),
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            # GPT-2's init scales residual projections down and zeroes biases; draw every weight at init_std instead.
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()


def tiny_gpt2_pair(vocab_size: int = 4, seed: int = 0, **kwargs):
    """(policy, reference): two ``tiny_gpt2`` models with independent weights (seeds ``2 seed``, ``2 seed + 1``)."""
    return tiny_gpt2(vocab_size, 2 * seed, **kwargs), tiny_gpt2(vocab_size, 2 * seed + 1, **kwargs)


def word_tokenizer(tokens: tuple[str, ...], *, eos: str, bos: str | None = None):
    """A word-level ``PreTrainedTokenizerFast`` whose ids follow ``tokens`` (so it matches a tiny model's vocabulary);
    ``eos`` also pads and stands for unknown words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos)
