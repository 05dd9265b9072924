"""Per-sequence KL metrics of the trainers (``kl/k1``, ``kl/rb``), gathered across processes."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["log_sequence_metrics", "masked_sequence_sum"]


def masked_sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_n per_token[b, n] over real tokens: [B, C], [B, C] -> [B] (padding contributes exactly 0)."""
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask.bool(), per_token, zero).sum(-1)


def log_sequence_metrics(trainer: Any, mode: str, values: dict[str, torch.Tensor]) -> None:
    """Append the across-process mean of each per-sequence value [B] to ``trainer._metrics[mode][name]``.

    Every process must call this with the same names in the same order (it gathers).
    """
    names = sorted(values)
    local = torch.stack([values[n].detach().float() for n in names], dim=1)  # [B, M]
    gathered = trainer.accelerator.gather(local)  # [B * processes, M]
    means = gathered.mean(dim=0).tolist()
    for name, mean in zip(names, means, strict=True):
        trainer._metrics[mode][name].append(mean)
