"""KL(p || q) between two causal language models, with every estimator on the same samples, side by side.

``estimate_kl`` samples completions from the policy ``p`` (HF ``generate``: KV cache, batched, left padding, pure
sampling at ``temperature`` with no top-k / top-p truncation), scores every sample once with both models and builds
every estimator from the same per-position terms (``trl_rb.kl.sequence_kl_terms``):

- ``k1`` = sum_n r_n, ``k2`` = sum_n r_n^2 / 2, ``k3`` = sum_n (exp(-r_n) - 1 + r_n),
- ``cv`` = R + exp(-R) - 1 with R = sum_n r_n (the sequence-level control variate, coefficient 1),
- ``cv_opt`` = R + alpha (exp(-R) - 1) with alpha = -Cov(R, exp(-R) - 1) / Var(exp(-R) - 1) fitted on all the
  samples (E[exp(-R) - 1] = 0 under p, so any fixed alpha is unbiased; fitting alpha on the same samples adds a
  small O(1/N) bias),
- ``rb`` = sum_n K_n, the Rao-Blackwellized estimator (exact KL of the next-token distributions, summed).

Memory bound: one batch of ``batch_size`` sequences is generated and scored at a time. Scoring runs each model once
over prompt + completion with ``logits_to_keep=1`` and catches the backbone's last hidden states [b, L, H]; the
completion positions' logits are then made from those hidden states and the LM-head weights by
``trl_rb.kl.linear_kl_terms``, in chunks of ``chunk_elements / V`` positions (default: the kernel's, 256 positions,
fewer where a [chunk, V] float32 buffer would pass 2**26 elements). So beyond the models, the KV cache of one
generate batch and two [b, L, H] hidden state tensors, at most five [chunk, V] float32 tensors exist at once (155 MiB
each at V = 151936 by default) -- never a [samples, T, V] or even a [batch_size, T, V] logits tensor. (A model whose forward lacks ``logits_to_keep`` builds
its own [batch_size, L, V] logits once per batch; lower ``batch_size`` for those.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..exact import eval_mode
from ..kl import ESTIMATORS, canonical_estimator, linear_kl_terms
from ..trainers.heads import capture_last_hidden, head_params, unwrap_causal_lm, vocab_size

__all__ = ["ALL_ESTIMATORS", "EstimateResult", "check_tokenizers", "estimate_kl", "resolve_estimator"]

# Every estimator estimate_kl can report, in display order.
ALL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "cv", "cv_opt", "rb")
_CV_OPT_ALIASES = ("cv_opt", "cv-opt", "cvopt")
# Elements of one [chunk, V] float32 logits tensor while scoring: 2**22 = 16 MiB.


def resolve_estimator(name: str) -> str:
    """Canonical estimator name for ``name`` (case-insensitive; aliases ``mc`` = k1, ``full`` = rb, ``cv-opt``).

    Raises:
        ValueError: for an unknown name, listing every valid one.
    """
    if isinstance(name, str) and name.lower() in _CV_OPT_ALIASES:
        return "cv_opt"
    try:
        return canonical_estimator(name)
    except ValueError:
        valid = ", ".join(
            f"{n} (alias {', '.join(ESTIMATORS[n])})" if ESTIMATORS.get(n) else n for n in ALL_ESTIMATORS
        )
        raise ValueError(f"Unknown KL estimator {name!r}; valid estimators are: {valid} (case-insensitive).") from None


# --------------------------------------------------------------------------------------------------------------------
# The result object.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EstimateResult:
    """Per-sample KL estimates of every estimator on the same samples, and their summaries.

    Attributes:
        values: estimator name -> float64 array [n_prompts, samples_per_prompt]; ``values[e][i, j]`` is estimator
            ``e`` on the j-th completion sampled for prompt i.
        lengths: int array [n_prompts, samples_per_prompt], completion tokens of each sample (EOS included).
        completion_ids: ``completion_ids[i][j]`` the token ids of sample j of prompt i (EOS included, no padding).
        m_values: the sample counts M of the M-table.
        exact_kl: the exact KL averaged over prompts (from ``trl_rb.exact``), or None.
        exact_kl_per_prompt: exact KL of each prompt's completion distribution, or None.
        cv_opt_alpha: the fitted control-variate coefficient of ``cv_opt`` (None when cv_opt was not requested).
        sample_seconds, score_seconds: wall time spent generating and scoring.
        temperature, max_new_tokens, seed, batch_size: the settings used.
        metadata: free-form extra fields copied into ``to_dict`` (the CLI stores the model paths there).
    """

    values: dict[str, np.ndarray]
    lengths: np.ndarray
    completion_ids: list[list[list[int]]] = field(default_factory=list)
    m_values: tuple[int, ...] = (1, 5, 10)
    exact_kl: float | None = None
    exact_kl_per_prompt: list[float] | None = None
    cv_opt_alpha: float | None = None
    sample_seconds: float = 0.0
    score_seconds: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 0
    seed: int = 0
    batch_size: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def estimators(self) -> list[str]:
        return list(self.values)

    @property
    def n_prompts(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def samples_per_prompt(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def completion_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens generated and scored per second of wall time (sampling + scoring)."""
        seconds = self.sample_seconds + self.score_seconds
        return self.completion_tokens / seconds if seconds > 0 else float("nan")

    def summary(self, name: str) -> dict[str, Any]:
        """Summary statistics of one estimator over all n_prompts * samples_per_prompt samples.

        ``std`` is the sample standard deviation (ddof=1) of the per-sample values, ``se = std / sqrt(N)`` (this
        treats the samples as i.i.d. draws of (prompt, completion); with the same number of samples for every
        prompt it is conservative for the average over these prompts), ``ci95 = mean -/+ 1.96 se``,
        ``frac_negative`` the fraction of samples < 0, ``var_ratio_vs_k1 = std^2 / std_k1^2`` (None where k1's
        variance is 0 or unknown: the ratio is undefined). ``std_m`` maps each M
        to the M-table entry (see ``m_table``); with an exact KL, ``bias = mean - exact_kl`` and ``z = bias / se``.
        """
        v = self.values[name].reshape(-1)
        n = v.size
        mean = float(v.mean())
        var = float(v.var(ddof=1)) if n > 1 else float("nan")
        std = math.sqrt(var)
        se = std / math.sqrt(n)
        k1 = self.values.get("k1")
        var_k1 = float(k1.reshape(-1).var(ddof=1)) if k1 is not None and n > 1 else float("nan")
        table = self.m_table()
        out: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "se": se,
            "ci95": [mean - 1.959963984540054 * se, mean + 1.959963984540054 * se],
            "frac_negative": float((v < 0).mean()),
            # var / var_k1 from the same float computation: k1's own ratio is exactly 1 (std * std / var was not)
            # undefined (None, printed "undefined") when k1 does not vary: no ratio to it means anything, 0/0 included
            "var_ratio_vs_k1": var / var_k1 if var_k1 > 0 else None,
            "std_m": {str(m): table[name][m]["std"] for m in self.m_values},
            "std_m_formula": {str(m): table[name][m]["std_formula"] for m in self.m_values},
        }
        if self.exact_kl is not None:
            out["bias"] = mean - self.exact_kl
            out["z"] = (mean - self.exact_kl) / se if se > 0 else float("nan")
        return out

    def m_table(self) -> dict[str, dict[int, dict[str, float | None]]]:
        """Standard deviation of the M-sample estimate (mean of M samples of one prompt), for each M and estimator.

        ``std`` (empirical): each prompt's samples are split in order into floor(S / M) disjoint groups of M (the
        remainder is dropped), the unbiased variance (ddof=1) of the group means is taken per prompt, averaged over
        prompts, and its square root reported: the root-mean-square over prompts of the per-prompt standard
        deviation. (Averaging variances rather than standard deviations avoids the downward bias of a standard
        deviation from few groups, which would otherwise bend the curve at large M.) None when S / M < 2 groups.
        ``std_formula``: the same with each prompt's M-sample variance taken as s^2 / M (s^2 the prompt's sample
        variance over all S samples), valid because the samples are independent given the prompt.
        """
        out: dict[str, dict[int, dict[str, float | None]]] = {}
        for name, v in self.values.items():
            s = v.shape[1]
            per_prompt_var = v.var(axis=1, ddof=1) if s > 1 else np.full(v.shape[0], np.nan)
            out[name] = {}
            for m in self.m_values:
                groups = s // m
                std: float | None = None
                if groups >= 2:
                    means = v[:, : groups * m].reshape(v.shape[0], groups, m).mean(axis=2)
                    std = float(np.sqrt(means.var(axis=1, ddof=1).mean()))
                out[name][m] = {"std": std, "std_formula": float(np.sqrt(per_prompt_var.mean() / m)), "groups": groups}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, the ``estimators`` object (one summary per estimator), the M-table, timing."""
        table = self.m_table()
        return {
            **self.metadata,
            "n_prompts": self.n_prompts,
            "samples_per_prompt": self.samples_per_prompt,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "exact_kl": self.exact_kl,
            "exact_kl_per_prompt": self.exact_kl_per_prompt,
            "cv_opt_alpha": self.cv_opt_alpha,
            "estimators": {name: self.summary(name) for name in self.values},
            "m_table": {
                "m_values": list(self.m_values),
                "method": "std: disjoint groups of M samples per prompt, RMS over prompts; std_formula: sqrt(mean_prompts s^2 / M)",
                "std": {name: [table[name][m]["std"] for m in self.m_values] for name in self.values},
                "std_formula": {name: [table[name][m]["std_formula"] for m in self.m_values] for name in self.values},
            },
            "completion_tokens": self.completion_tokens,
            "mean_completion_length": float(self.lengths.mean()),
            "sample_seconds": self.sample_seconds,
            "score_seconds": self.score_seconds,
            "tokens_per_second": self.tokens_per_second,
        }

    def format_table(self) -> str:
        """A plain-text table: one row per estimator (and the exact KL when known)."""
        m_cols = [f"std@M={m}" for m in self.m_values]
        head = ["estimator", "mean", "std", "se", "ci95", "frac<0", "var/k1", *m_cols]
        if self.exact_kl is not None:
            head += ["bias", "z"]
        rows = [head]
        formula_used = False
        for name in self.values:
            s = self.summary(name)
            row = [
                name,
                _fmt(s["mean"]),
                _fmt(s["std"]),
                _fmt(s["se"]),
                f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]",
            ]
            ratio = s["var_ratio_vs_k1"]
            row += [f"{s['frac_negative']:.3f}", "undefined" if ratio is None else _fmt(ratio)]
            for m in self.m_values:
                if s["std_m"][str(m)] is None:
                    formula_used = True
                    row.append(_fmt(s["std_m_formula"][str(m)]) + "*")
                else:
                    row.append(_fmt(s["std_m"][str(m)]))
            if self.exact_kl is not None:
                row += [_fmt(s["bias"]), f"{s['z']:+.2f}"]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        header = (
            f"KL(p || q) over {self.n_prompts} prompts x {self.samples_per_prompt} samples, <= {self.max_new_tokens} "
            f"new tokens at temperature {self.temperature:g}; mean completion length {self.lengths.mean():.1f}; "
            f"{self.tokens_per_second:.1f} tokens/s"
        )
        if self.exact_kl is not None:
            header += f"\nexact KL = {self.exact_kl:.6g}"
        if self.cv_opt_alpha is not None:
            header += f"\ncv_opt fitted alpha = {self.cv_opt_alpha:.4g}"
        footer = []
        if formula_used:
            footer.append("* fewer than 2 disjoint groups of M samples per prompt: s / sqrt(M) shown instead.")
        return "\n".join([header, "", *lines, *footer])


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


# --------------------------------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------------------------------


def _context_length(model: torch.nn.Module) -> int | None:
    config = unwrap_causal_lm(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tokenizers(tokenizer_p: Any, tokenizer_q: Any) -> None:
    """Raise ValueError unless the policy and reference tokenizers map every token to the same id.

    The message gives both vocabulary sizes when they differ, otherwise up to five tokens whose ids differ.
    """
    vp, vq = tokenizer_p.get_vocab(), tokenizer_q.get_vocab()
    if len(vp) != len(vq):
        only_p = sorted(set(vp) - set(vq))[:5]
        only_q = sorted(set(vq) - set(vp))[:5]
        raise ValueError(
            f"The policy and reference tokenizers differ: the policy's has {len(vp)} tokens, the reference's "
            f"{len(vq)} (only in the policy's: {only_p}; only in the reference's: {only_q}). KL(p || q) needs both "
            "models on one tokenizer; pass the reference the policy was trained from."
        )
    diff = [(tok, i, vq.get(tok)) for tok, i in vp.items() if vq.get(tok) != i]
    if diff:
        shown = ", ".join(
            f"{tok!r}: policy id {i}, reference id {j}" for tok, i, j in sorted(diff, key=lambda d: d[1])[:5]
        )
        raise ValueError(
            f"The policy and reference tokenizers differ on {len(diff)} tokens ({shown}). KL(p || q) needs both models "
            "on one tokenizer; pass the reference the policy was trained from."
        )
    eos_p, eos_q = getattr(tokenizer_p, "eos_token_id", None), getattr(tokenizer_q, "eos_token_id", None)
    if eos_p != eos_q:
        raise ValueError(f"The policy and reference tokenizers have different EOS tokens: ids {eos_p} and {eos_q}.")


def _check_models(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any) -> None:
    vp, vq = vocab_size(policy), vocab_size(reference)
    if vp != vq:
        raise ValueError(
            f"The policy and reference have different vocabulary sizes: the policy's LM head has {vp} rows, the "
            f"reference's {vq}. KL(p || q) needs both models on one tokenizer and vocabulary."
        )
    if len(tokenizer) > vp:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the models' vocabulary only {vp}: the tokenizer does not "
            "belong to these models."
        )


def _check_settings(samples_per_prompt, max_new_tokens, temperature, batch_size, m_values, top_k, top_p) -> None:
    for name, value in (
        ("samples_per_prompt", samples_per_prompt),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r} (greedy decoding has no KL to sample)."
        )
    if not m_values or any(not isinstance(m, int) or m < 1 for m in m_values):
        raise ValueError(f"m_values must be a non-empty sequence of positive ints, got {m_values!r}.")
    if top_k not in (None, 0) or top_p not in (None, 1.0):
        raise ValueError(
            f"top_k={top_k!r} / top_p={top_p!r} truncate the sampling distribution, so the samples would not come from "
            "p = softmax(logits / temperature) that every estimator assumes. Use top_k=0 and top_p=1.0 (the default)."
        )


def _tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], context: int | None, max_new_tokens: int
) -> list[list[int]]:
    """Token ids of every prompt (no special tokens), checking each fits in ``context - max_new_tokens``."""
    max_prompt_tokens = None if context is None else context - max_new_tokens
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, got a single string; wrap it in a list.")
    if len(prompts) == 0:
        raise ValueError("The prompt list is empty: give at least one prompt.")
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt {i} is a {type(prompt).__name__}, not a string.")
        tokens = tokenizer(prompt)["input_ids"]  # as trl tokenizes prompts: special tokens (e.g. BOS) included
        if len(tokens) == 0:
            raise ValueError(
                f"Prompt {i} ({prompt!r}) is empty after tokenization; every prompt needs at least one token."
            )
        if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
            raise ValueError(
                f"Prompt {i} is {len(tokens)} tokens long, but the models' context allows at most {max_prompt_tokens} "
                f"prompt tokens (context length {context} minus max_new_tokens "
                f"{max_new_tokens}). Shorten the prompt or lower max_new_tokens."
            )
        ids.append(list(tokens))
    return ids


# --------------------------------------------------------------------------------------------------------------------
# Sampling and scoring one batch.
# --------------------------------------------------------------------------------------------------------------------


class _DropPaddingWarning(logging.Filter):
    """Drops transformers' "may be padded, pass an attention_mask" warning: generate's decoding steps feed the
    pad ids of finished rows without a mask, which is harmless here (finished rows are masked out when scoring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "since your input_ids may be padded" not in record.getMessage()


@contextmanager
def _quiet_padding_warning():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropPaddingWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return ids.to(device), mask.to(device)


def _generate(policy, prompt_ids, prompt_mask, *, max_new_tokens, temperature, eos_id, pad_id) -> torch.Tensor:
    """Sample one completion per row: [b, C] ids (C <= max_new_tokens; rows that stopped early padded with pad_id)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=float(temperature),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    # Swap in a clean generation config: a saved model's own (top_k=50, repetition_penalty, ...) must not leak in.
    lm = unwrap_causal_lm(policy)
    saved = lm.generation_config
    lm.generation_config = config
    try:
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        lm.generation_config = saved
    return out[:, prompt_ids.shape[1] :]


def _completion_mask(completions: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after (bool [b, C])."""
    if eos_id is None:
        return torch.ones_like(completions, dtype=torch.bool)
    is_eos = completions == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


def _hidden_before_completion(model, ids, attn, n_completion: int) -> torch.Tensor:
    """Last hidden states [b, C, H] at the positions that predict the C completion tokens.

    Position ids follow the attention mask (cumsum - 1), as ``generate`` builds them for left-padded prompts, so the
    scored distributions are exactly the ones sampled from.
    """
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    device = next(model.parameters()).device
    inputs = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": position_ids.to(device)}
    with capture_last_hidden(model) as captured:
        try:
            # Only the hidden states are needed: logits_to_keep=1 keeps the model from building [b, L, V] logits.
            model(**inputs, logits_to_keep=1)
        except TypeError:  # a model whose forward has no logits_to_keep: full logits, one batch at a time
            captured.clear()
            model(**inputs)
    return captured[-1][:, -n_completion - 1 : -1]


def _score_batch(
    policy, reference, prompt_ids, prompt_mask, completions, comp_mask, *, temperature, need_rb, chunk_rows
):
    """Per-position terms of one batch: dict of [b, C] tensors ``r`` and (with need_rb) ``K``, 0 on padding; float32
    (float64 for float64 models), on the CPU."""
    c = completions.shape[1]
    ids = torch.cat([prompt_ids, completions], dim=1)
    attn = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    hp = _hidden_before_completion(policy, ids, attn, c)
    hq = _hidden_before_completion(reference, ids, attn, c)
    head_p, head_q = head_params(policy), head_params(reference)
    rows = comp_mask.nonzero(as_tuple=True)
    terms = linear_kl_terms(
        hp[rows], head_p.weight, hq[rows], head_q.weight, completions[rows].to(hp.device), bias_p=head_p.bias,
        bias_q=head_q.bias, temperature=temperature, chunk_size=chunk_rows, logit_scale_p=head_p.logit_scale,
        logit_scale_q=head_q.logit_scale, softcap_p=head_p.softcap, softcap_q=head_q.softcap,
    )  # fmt: skip
    r, k = terms["r"], terms["K"] if need_rb else None
    dtype = r.dtype
    out = {}
    for name, flat in (("r", r), ("K", k)):
        if flat is not None:
            full = torch.zeros(completions.shape, dtype=dtype)
            full[rows[0].cpu(), rows[1].cpu()] = flat.cpu()
            out[name] = full
    return out


def _sequence_values(terms: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per-sequence values (float64 [b]) of every estimator that needs no fitting, from [b, C] terms."""
    r = terms["r"].double()
    big_r = r.sum(-1)
    out = {
        "k1": big_r,
        "k2": (0.5 * r * r).sum(-1),
        "k3": (torch.expm1(-r) + r).sum(-1),  # 0 on padding, where r = 0
        "cv": big_r + torch.expm1(-big_r),
    }
    if "K" in terms:
        # K_n >= 0; rounding can leave ~1e-7 negatives, so clamp the sum (not the terms).
        out["rb"] = terms["K"].double().sum(-1).clamp_min(0.0)
    return {name: v.numpy() for name, v in out.items()}


def _fit_cv_alpha(big_r: np.ndarray) -> float:
    """alpha* = -Cov(R, g) / Var(g), g = exp(-R) - 1, over all samples; 0 when g is constant or not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        g = np.expm1(-big_r)
    if big_r.size < 2 or not np.all(np.isfinite(g)):
        return 0.0
    var_g = g.var(ddof=1)
    if not var_g > 0:
        return 0.0
    cov = np.cov(big_r, g, ddof=1)[0, 1]
    alpha = -cov / var_g
    return float(alpha) if math.isfinite(alpha) else 0.0


# --------------------------------------------------------------------------------------------------------------------
# The API.
# --------------------------------------------------------------------------------------------------------------------


def estimate_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int = 20,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    estimators: Sequence[str] = ALL_ESTIMATORS,
    batch_size: int = 32,
    seed: int = 0,
    m_values: Sequence[int] = (1, 5, 10),
    exact: bool = False,
    exact_max_completions: int = 200_000,
    reference_tokenizer: Any | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    chunk_elements: int | None = None,
    progress: bool = True,
) -> EstimateResult:
    """Estimate KL(p || q) between ``policy`` (p) and ``reference`` (q) with several estimators on the same samples.

    For every prompt, ``samples_per_prompt`` completions of at most ``max_new_tokens`` tokens are sampled from the
    policy at ``temperature`` (EOS stops a completion; no top-k / top-p truncation), and every requested estimator
    is evaluated on each completion. The KL is that of the sampling distributions (logits / temperature), given
    the prompt, over whole completions, averaged over prompts.

    Args:
        policy, reference: causal LMs (transformers ``PreTrainedModel``) sharing ``tokenizer``'s vocabulary. They are
            put in eval mode for the call (their training flags are restored after); no gradients are computed.
        tokenizer: the policy's tokenizer; prompts are tokenized as trl does (``tokenizer(prompt)``, so with BOS when
            the tokenizer adds one). Its ``eos_token_id`` stops sampling; ``pad_token_id`` (EOS when unset) pads.
        prompts: non-empty sequence of prompt strings.
        samples_per_prompt: completions per prompt (S). The M-table's empirical column for M needs S >= 2 M.
        max_new_tokens: completion length limit.
        temperature: sampling temperature (> 0).
        estimators: names among ``k1`` (``mc``), ``k2``, ``k3``, ``cv``, ``cv_opt``, ``rb`` (``full``). ``k1`` is
            always reported too (last, when not asked for): it is the baseline of ``var_ratio_vs_k1`` and costs nothing.
        batch_size: sequences generated and scored together; bounds the memory (see the module docstring).
        seed: sampling seed. Results are deterministic for a given (seed, batch_size, prompts, models); the global
            torch RNG state is left untouched.
        m_values: the sample counts M of the M-table.
        exact: also compute the exact KL per prompt by enumerating every completion (``trl_rb.exact.exact_kl``);
            only for tiny models. ValueError when there are more than ``exact_max_completions`` completions.
        reference_tokenizer: when given, checked to map every token to the same id as ``tokenizer``.
        top_k, top_p: accepted only as 0 / 1.0 (or None): truncated sampling would bias every estimator.
        chunk_elements: size (elements) of the largest [chunk, V] logits tensor built while scoring (None: the
            kernel's default, 256 positions capped at 2**26 elements; lower it to save memory).
        progress: show a tqdm progress bar while sampling and scoring.

    Returns:
        An ``EstimateResult`` with per-sample values [n_prompts, samples_per_prompt] for each estimator.

    Raises:
        ValueError: empty prompt list, a prompt longer than the context minus ``max_new_tokens``, different
            vocabulary sizes or tokenizers, an unknown estimator, bad settings, or ``exact`` on a model too large to
            enumerate.
    """
    _check_settings(samples_per_prompt, max_new_tokens, temperature, batch_size, tuple(m_values), top_k, top_p)
    names = list(dict.fromkeys(resolve_estimator(e) for e in estimators))
    if not names:
        raise ValueError(f"Give at least one estimator among {', '.join(ALL_ESTIMATORS)}.")
    if reference_tokenizer is not None:
        check_tokenizers(tokenizer, reference_tokenizer)
    _check_models(policy, reference, tokenizer)
    contexts = [c for c in (_context_length(policy), _context_length(reference)) if c is not None]
    context = min(contexts) if contexts else None
    if context is not None and context - max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the models' context of {context} tokens."
        )
    prompt_ids = _tokenize_prompts(tokenizer, prompts, context, max_new_tokens)

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id if eos_id is not None else 0)
    vocab = vocab_size(policy)
    chunk_rows = None if chunk_elements is None else max(1, chunk_elements // vocab)
    need_rb = "rb" in names

    exact_per_prompt = None
    with eval_mode(policy, reference), torch.no_grad(), _quiet_padding_warning():
        if exact:
            exact_per_prompt = _exact_per_prompt(
                policy, reference, prompt_ids, max_new_tokens, eos_id, temperature, exact_max_completions
            )
        run = _Samples.empty(len(prompt_ids), samples_per_prompt)
        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(samples_per_prompt)]
        device = next(policy.parameters()).device
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        bar = _progress_bar(len(jobs), progress)
        with torch.random.fork_rng(devices=cuda):
            for b, start in enumerate(range(0, len(jobs), batch_size)):
                # Per-batch seeds: batch b's samples do not depend on how many random numbers earlier batches drew.
                torch.manual_seed(seed * 1_000_003 + b)
                batch = jobs[start : start + batch_size]
                ids, attn = _left_pad([prompt_ids[i] for i, _ in batch], pad_id, device)
                t0 = time.perf_counter()
                completions = _generate(
                    policy,
                    ids,
                    attn,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    eos_id=eos_id,
                    pad_id=pad_id,
                )
                t1 = time.perf_counter()
                comp_mask = _completion_mask(completions, eos_id)
                terms = _score_batch(
                    policy,
                    reference,
                    ids,
                    attn,
                    completions,
                    comp_mask,
                    temperature=temperature,
                    need_rb=need_rb,
                    chunk_rows=chunk_rows,
                )
                run.add(batch, completions, comp_mask, _sequence_values(terms), t1 - t0, time.perf_counter() - t1)
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(
                        tok_s=f"{run.lengths.sum() / max(run.sample_seconds + run.score_seconds, 1e-9):.0f}"
                    )
        if bar is not None:
            bar.close()
    collected = run.values

    alpha = None
    out_values: dict[str, np.ndarray] = {}
    for name in names:
        if name == "cv_opt":
            big_r = collected["k1"]
            alpha = _fit_cv_alpha(big_r.reshape(-1))
            out_values[name] = big_r + alpha * np.expm1(-big_r) if alpha != 0 else big_r.copy()
        else:
            out_values[name] = collected[name]
    if "k1" not in out_values:
        # var_ratio_vs_k1 needs k1; it is free (the same r_n), so keep it, last, rather than report NaN ratios.
        out_values["k1"] = collected["k1"]
    exact_mean = float(np.mean(exact_per_prompt)) if exact_per_prompt is not None else None
    return EstimateResult(
        values=out_values,
        lengths=run.lengths,
        completion_ids=run.completion_ids,
        m_values=tuple(int(m) for m in m_values),
        exact_kl=exact_mean,
        exact_kl_per_prompt=exact_per_prompt,
        cv_opt_alpha=alpha,
        sample_seconds=run.sample_seconds,
        score_seconds=run.score_seconds,
        temperature=float(temperature),
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )


@dataclass
class _Samples:
    """What the sampling loop accumulates: per-sample values [n_prompts, S] per estimator, lengths, token ids."""

    values: dict[str, np.ndarray]
    lengths: np.ndarray
    completion_ids: list[list[list[int]]]
    sample_seconds: float = 0.0
    score_seconds: float = 0.0

    @classmethod
    def empty(cls, n_prompts: int, s: int) -> _Samples:
        ids: list[list[list[int]]] = [[[] for _ in range(s)] for _ in range(n_prompts)]
        return cls({}, np.zeros((n_prompts, s), dtype=np.int64), ids)

    def add(self, batch, completions, comp_mask, values, sample_seconds, score_seconds) -> None:
        """Store one batch: ``batch`` the (prompt, sample) index of each row, [b, C] completions and mask."""
        rows = np.array([i for i, _ in batch]), np.array([j for _, j in batch])
        self.lengths[rows] = comp_mask.sum(-1).cpu().numpy()
        for (i, j), ids_row, mask_row in zip(batch, completions.cpu(), comp_mask.cpu(), strict=True):
            self.completion_ids[i][j] = ids_row[mask_row].tolist()
        for name, v in values.items():
            self.values.setdefault(name, np.zeros(self.lengths.shape, dtype=np.float64))[rows] = v
        self.sample_seconds += sample_seconds
        self.score_seconds += score_seconds


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling + scoring", unit="sample")


def _exact_per_prompt(
    policy, reference, prompt_ids, max_new_tokens, eos_id, temperature, max_completions
) -> list[float]:
    from ..exact import exact_kl

    return [
        float(
            exact_kl(
                policy,
                reference,
                ids,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                temperature=temperature,
                max_completions=max_completions,
            )
        )
        for ids in prompt_ids
    ]
