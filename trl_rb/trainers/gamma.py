"""The gamma control variate of the RB gradient: the whole-loss estimator ``rb`` trains with (docs/estimators.md,
"The whole loss"; docs/EVIDENCE.md for what it buys).

With S = sum_t grad log p(y_t) (the sequence score), r_t the sampled log ratio and K_t the exact per-step KL,
d = sum_t r_t - sum_t K_t has E[d S] = E[sum_t grad K_t], so for any gamma fixed before the batch is drawn

    g_gamma = g_RB(beta) + gamma * (sum_t grad K_t - d S)

is unbiased for the gradient of E[R] - beta KL: gamma = 0 is the plain RB gradient, and in RLOO gamma = beta is MC
(trl's k1 penalty) exactly. MC's penalty doubles as a control variate for the reward (R correlates with log p/q once
the policy has moved toward what pays), which plain RB throws away; gamma keeps it and the RB part's low noise.

The gamma that minimizes the variance is close to the least-squares slope of the per-sample coefficient of S,
y = (the advantage without the gamma term), on d, each sample weighted by ||S||^2 (exact enumeration: within 5% of
the best). ``GammaFit`` estimates it online from *earlier* generation batches only (an exponential moving average of
weighted moments), so the gamma a batch trains with never depends on its own samples: every step stays unbiased.
``score_norm_proxy`` stands in for ||S||^2 without a per-sample backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GAMMA_HELP",
    "GAMMA_KEY",
    "GammaFit",
    "check_gamma_settings",
    "gamma_metrics",
    "leave_one_out_centred",
    "score_norm_proxy",
]

GAMMA_KEY = "rb_gamma"
"""Batch-dict key of the gamma a generation batch trains with: [B], the same value in every row (so trl's shuffles and
splits carry it to every micro-batch)."""

MAX_GAMMA_RATIO = 100.0
"""|gamma| <= MAX_GAMMA_RATIO * beta: a bound on a fitted gamma (the exact-enumeration optima reach 69 beta)."""

MIN_D_VARIANCE = 1e-8
"""The weighted variance of d (nats^2) below which the fit keeps the prior: d's spread is then float rounding (the
policy at its reference: measured ~1e-7 nats per completion in float32), and a slope on it would be noise."""

GAMMA_HELP = (
    "Coefficient gamma of the control variate gamma * (sum grad K - (sum r - sum K) * score) added to the RB "
    "gradient (kl_estimator='rb'). None (default): fitted online, the ||score||^2-weighted least-squares slope of the "
    "advantage on (sum r - sum K) over earlier generation batches (so each step stays unbiased). A number fixes it: "
    "0 is the plain RB gradient, beta is MC (trl's k1 penalty)."
)


def check_gamma_settings(gamma: Any, decay: Any) -> None:
    """Raise a ValueError naming the field unless ``gamma`` is None or a finite number and ``decay`` is in [0, 1)."""
    if gamma is not None and (
        isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma)
    ):
        raise ValueError(f"rb_gamma={gamma!r}: use a number (0 = plain RB, beta = MC) or None to fit it online.")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(
            f"rb_gamma_decay={decay!r}: use a number in [0, 1) (the weight of earlier batches' statistics)."
        )


def score_norm_proxy(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sample stand-in for ||S||^2, S = sum_t grad log p(y_t): sum_t (1 - p_t(y_t))^2, [B, C] -> [B] float32.

    (1 - p_t(y_t))^2 is the sampled token's part of ||e_{y_t} - p_t||^2, the squared norm of log p(y_t)'s gradient
    with respect to the logits; a token the policy is sure of contributes nothing, as its score nearly vanishes.

    Args:
        logps: [B, C] the policy's per-token log-probs of the sampled tokens; mask: [B, C] 1 = a sampled token.
    """
    p = logps.detach().float().exp()
    return ((1.0 - p).square() * mask.float()).sum(-1)


def leave_one_out_centred(x: torch.Tensor, group: int) -> torch.Tensor:
    """x_i - mean_{j != i} x_j within consecutive groups of ``group`` rows ([N] -> [N]; groups of 1: x itself)."""
    if group < 2:
        return x
    grouped = x.view(-1, group)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).reshape(-1)


@dataclass
class GammaFit:
    """Online estimate of gamma: an exponential moving average, over generation batches, of the weighted moments of
    (y, d), and the weighted least-squares slope (with intercept) of y on d they give.

    ``add`` accumulates samples of the batch in training; ``next_gamma`` folds them into the average (after the
    processes' sums are combined by ``reduce``) and returns the gamma for the next batch. Before any statistics, or
    while d's spread is below ``MIN_D_VARIANCE`` (rounding), gamma is ``prior`` (beta: MC, trl's own estimator).

    Attributes:
        prior: gamma without statistics. decay: weight of the earlier average at each fold (0: last batch only).
        beta: the KL coefficient (bounds the fitted gamma to MAX_GAMMA_RATIO * beta).
    """

    prior: float
    decay: float
    beta: float
    moments: torch.Tensor | None = None  # [5] float64: E_w-normalized sum w, w y, w d, w y d, w d d
    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    current: float | None = None

    def add(self, y: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> None:
        """Accumulate samples ([N] each; rows with w = 0 count for nothing)."""
        y, d, w = (t.detach().double().cpu() for t in (y, d, w))
        self.pending += torch.stack([w.sum(), (w * y).sum(), (w * d).sum(), (w * y * d).sum(), (w * d * d).sum()])

    def next_gamma(self, reduce=None) -> float:
        """Fold the pending samples (``reduce``: sums them across processes) and return the gamma to train with."""
        pending = self.pending if reduce is None else reduce(self.pending)
        self.pending = torch.zeros(5, dtype=torch.float64)
        if float(pending[0]) > 0:
            batch = pending / pending[0]
            self.moments = batch if self.moments is None else self.decay * self.moments + (1 - self.decay) * batch
        self.current = self._slope()
        return self.current

    def _slope(self) -> float:
        if self.moments is None:
            return self.prior
        w, wy, wd, wyd, wdd = (float(x) for x in self.moments)
        var_d = wdd / w - (wd / w) ** 2
        cov = wyd / w - (wy / w) * (wd / w)
        if not var_d > MIN_D_VARIANCE or not math.isfinite(cov / var_d):
            return self.prior
        bound = MAX_GAMMA_RATIO * abs(self.beta)
        return float(min(max(cov / var_d, -bound), bound))


def gamma_metrics(gamma: float, beta: float, y: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """``kl/gamma`` and ``kl/var_ratio_vs_mc``: the gamma in use and, on this batch, the weighted sum of squared
    coefficients of S under it over the same under MC (gamma = beta), sum w (y - gamma d)^2 / sum w (y - beta d)^2
    with the weighted means removed (an estimate of the whole-gradient variance ratio; the analytic term is left out).
    """
    y, d, w = (t.detach().double() for t in (y, d, w))
    total = w.sum()
    metrics = {"kl/gamma": float(gamma)}
    if total > 0:

        def spread(c: float) -> float:
            a = y - c * d
            a = a - (w * a).sum() / total
            return float((w * a * a).sum())

        mc = spread(beta)
        metrics["kl/var_ratio_vs_mc"] = spread(gamma) / mc if mc > 0 else float("nan")
    return metrics
