"""Input checks, compute dtype and chunk sizing, shared by every kernel of ``trl_rb.kl``.

Bad input fails here, with both shapes named, not deep inside torch.

Public: ``check_temperature`` (a finite number > 0), which ``trl_rb.exact`` uses too, so the oracle and the kernels
refuse the same temperatures with the same message. The rest are the package's own helpers:

- ``_check_float`` (a floating-point tensor), ``_check_logits_pair`` (policy and reference logits [..., V] of one
  shape, V last), ``_check_tokens`` (integer token ids with the logits' leading shape: ``logits[b, t]`` is the
  distribution ``tokens[b, t]`` was drawn from; a mask, when given, of the tokens' shape);
- ``_check_linear_inputs`` and ``_check_position_tokens``, for the hidden-state kernels (``linear``,
  ``fused_logprob``): hidden states [..., H_p] and [..., H_q] over the same positions, LM-head weights [V, H_p] and
  [V, H_q] sharing the vocabulary V, soft-caps > 0 or None, tokens long with the hidden states' leading shape;
- ``_compute_dtype``: float64 when any input is float64, else float32 (bf16 / fp16 / fp32 inputs alike);
- ``_default_chunk``: positions per chunk, from the element budgets below (``_CHUNK_ELEMENTS`` for the logits-based
  functions, ``_LINEAR_CHUNK_ROWS`` and ``_LINEAR_CHUNK_ELEMENTS`` for the hidden-state kernels) or the caller's
  ``chunk_size``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_temperature"]

# Elements of a [chunk, V] float32 temporary for the logits-based functions: 2**18 (1 MiB) keeps a chunk's few live
# temporaries in the L2 cache, which measured fastest (2**16 .. 2**21 tried, V = 50257 and 151936, see
# benchmarks/bench_kl.py), and bounds the extra memory at a few MiB whatever the number of positions.
_CHUNK_ELEMENTS = 2**18
# linear_token_kl and linear_weighted_kl_sum multiply each chunk of hidden states by the whole [V, H] LM-head weight,
# so every chunk streams the head through memory: a chunk must be hundreds of rows tall for the products to be
# compute-bound rather than memory-bound. Measured at the Qwen2.5-0.5B head
# (H=896, V=151936, N=512, 2 CPU threads): linear_weighted_kl_sum value+gradient 16.5 s with the former 27-row
# chunks (a 2**22-element budget), 8.9 s with 128 rows, 7.5 s with 512 rows. The default is a row count, capped so
# that one [chunk, V] float32 buffer stays within 2**26 elements (256 MiB; three to five are live, reused across
# chunks): 256 rows for any vocabulary up to 262144.
_LINEAR_CHUNK_ROWS = 256
_LINEAR_CHUNK_ELEMENTS = 2**26


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits), got dtype {tensor.dtype}; cast it with .float().")


def check_temperature(temperature: float) -> None:
    """Check a sampling temperature T (the logits are divided by it).

    Raises:
        ValueError: unless ``temperature`` is an int or float, finite and > 0.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


def _check_logits_pair(logits_p: torch.Tensor, logits_q: torch.Tensor) -> None:
    _check_float("logits_p", logits_p)
    _check_float("logits_q", logits_q)
    if logits_p.dim() < 1:
        raise ValueError("logits_p must have a vocabulary dimension (last), got a 0-d tensor.")
    if logits_p.shape[-1] != logits_q.shape[-1]:
        raise ValueError(
            f"logits_p and logits_q have different vocabulary sizes: logits_p {tuple(logits_p.shape)} vs logits_q "
            f"{tuple(logits_q.shape)}; both models must share one tokenizer and vocabulary."
        )
    if logits_p.shape != logits_q.shape:
        raise ValueError(
            f"logits_p and logits_q must have the same shape, got logits_p {tuple(logits_p.shape)} and logits_q "
            f"{tuple(logits_q.shape)}."
        )


def _check_tokens(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must match the logits without their vocabulary dimension: logits "
            f"{tuple(logits.shape)} -> expected tokens {tuple(logits.shape[:-1])} (logits[b, t] is the distribution "
            "tokens[b, t] was drawn from)."
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}.")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}.")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _default_chunk(vocab: int, chunk_size: int | None, elements: int | None = None, rows: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` when given, else as many as ``elements`` allow at this vocabulary (at most
    ``rows`` when given)."""
    if chunk_size is None:
        fitting = max(1, (elements or _CHUNK_ELEMENTS) // max(vocab, 1))
        return fitting if rows is None else min(rows, fitting)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return chunk_size


def _check_linear_inputs(hidden_p, weight_p, hidden_q, weight_q, temperature, softcap_p, softcap_q) -> None:
    for name, t in (("hidden_p", hidden_p), ("weight_p", weight_p), ("hidden_q", hidden_q), ("weight_q", weight_q)):
        _check_float(name, t)
    check_temperature(temperature)
    if weight_p.dim() != 2 or weight_q.dim() != 2:
        raise ValueError(f"weights must be [V, H], got weight_p {tuple(weight_p.shape)} and weight_q {tuple(weight_q.shape)}.")
    if weight_p.shape[0] != weight_q.shape[0]:
        raise ValueError(
            f"weight_p {tuple(weight_p.shape)} and weight_q {tuple(weight_q.shape)} have different vocabulary sizes; "
            "both models must share one vocabulary."
        )
    if hidden_p.shape[-1] != weight_p.shape[1] or hidden_q.shape[-1] != weight_q.shape[1]:
        raise ValueError(
            f"hidden sizes do not match the heads: hidden_p {tuple(hidden_p.shape)} vs weight_p {tuple(weight_p.shape)}, "
            f"hidden_q {tuple(hidden_q.shape)} vs weight_q {tuple(weight_q.shape)}."
        )
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(
            f"hidden_p {tuple(hidden_p.shape)} and hidden_q {tuple(hidden_q.shape)} must cover the same positions."
        )
    for cap in (softcap_p, softcap_q):
        if cap is not None and not cap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {cap!r}.")


def _check_position_tokens(tokens: torch.Tensor, hidden_p: torch.Tensor) -> None:
    if tokens.shape != hidden_p.shape[:-1] or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be long with hidden_p's leading shape {tuple(hidden_p.shape[:-1])}, got "
                         f"{tokens.dtype} {tuple(tokens.shape)}.")  # fmt: skip
