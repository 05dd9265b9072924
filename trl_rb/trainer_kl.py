"""The RB-KL machinery shared by trl_rb's trainers (RLOO, GRPO): capture, exact per-token KL, metrics, reference.

trl's RLOO and GRPO trainers score completions and compute their loss through one method,
``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)``, whose forward runs
trl's fused LM head (per-token log-probs, no [B, T, V] logits). ``HiddenCaptureMixin`` wraps that method: while a
recording is open (``with self._rb_recording() as calls``), every call also records the backbone's last hidden
states of the completion positions (a forward hook, so no extra forward pass) in a ``ScoredCall``; a subclass may
rewrite the returned log-probs in ``_rb_transform_call``. The exact per-token KL K_n then comes from those hidden
states and each model's LM head through ``trl_rb.kl.linear_token_kl``.

Alignment: every [B, C, ...] tensor here is completion-aligned like trl's ``logits_to_keep``: position i belongs to
completion token i (for hidden states, the hidden state just *before* token i, which predicts it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .kl import linear_token_kl
from .lm_head import HeadParams, capture_last_hidden, completion_hidden, head_params, unwrap_causal_lm

__all__ = [
    "REF_HIDDEN_KEY",
    "HiddenCaptureMixin",
    "ScoredCall",
    "check_rb_sampling",
    "k3_per_token",
    "load_reference_model",
    "log_sequence_metrics",
    "masked_sequence_sum",
    "prepare_reference_model",
    "reference_head",
    "token_kl_from_hidden",
    "weighted_kl_sum_from_hidden",
]

# Key of the reference's completion hidden states [B, C, H_ref] (detached) in the dict that
# `_generate_and_score_completions` returns; trl shuffles and splits it along dim 0 with every other tensor.
REF_HIDDEN_KEY = "rb_ref_completion_hidden"


@dataclass
class ScoredCall:
    """One call of ``_get_per_token_logps_and_entropies`` seen while a recording was open.

    Attributes:
        index: position of the call within the recording (0 = first).
        model: the model argument trl passed (the policy, possibly wrapped, or the reference model).
        hidden: [B, C, H] last hidden states predicting the C completion tokens (keeps its autograd graph when the
            forward ran with gradients).
        completion_mask: [B, C] the attention mask of the completion positions (1 = real token, 0 = padding).
        logps: [B, C] the per-token log-probs trl's fused head returned (as returned, before any rewrite).
    """

    index: int
    model: nn.Module
    hidden: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor


class HiddenCaptureMixin:
    """Mixin for trl's RLOO / GRPO trainers: records completion hidden states of trl's own scoring forwards.

    Put it before the trl trainer in the bases: ``class MyTrainer(HiddenCaptureMixin, trl.RLOOTrainer)``.
    Outside ``_rb_recording()`` the wrapped method is exactly trl's.
    """

    _rb_calls: list[ScoredCall] | None = None

    @contextmanager
    def _rb_recording(self) -> Iterator[list[ScoredCall]]:
        """Record every ``_get_per_token_logps_and_entropies`` call made inside the block, in call order."""
        if self._rb_calls is not None:
            raise RuntimeError("A hidden-state recording is already open; recordings do not nest.")
        calls: list[ScoredCall] = []
        self._rb_calls = calls
        try:
            yield calls
        finally:
            self._rb_calls = None

    def _rb_transform_call(self, call: ScoredCall, logps: torch.Tensor) -> torch.Tensor:
        """Hook: the per-token log-probs [B, C] trl receives from a recorded call. Default: unchanged."""
        return logps

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._rb_calls is None:
            return super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with capture_last_hidden(model) as captured:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(  # type: ignore[misc]
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if not captured:
            raise RuntimeError(f"No hidden states were captured from {type(model).__name__}'s forward.")
        call = ScoredCall(
            index=len(self._rb_calls),
            model=model,
            # slice before concatenating: the result does not keep the prompts' hidden states alive
            hidden=torch.cat([completion_hidden(h, logits_to_keep) for h in captured], dim=0),
            completion_mask=attention_mask[:, -logits_to_keep:],
            logps=logps,
        )
        self._rb_calls.append(call)
        return self._rb_transform_call(call, logps), entropies, aux


def token_kl_from_hidden(
    policy_hidden: torch.Tensor,
    policy_head: HeadParams,
    ref_hidden: torch.Tensor,
    ref_head: HeadParams,
    *,
    temperature: float,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact per-token KL(p_n || q_n) [B, C] from the two models' completion hidden states and LM heads.

    Args:
        policy_hidden: [B, C, H_p] policy hidden states, completion-aligned; gradients flow into them and into
            ``policy_head``'s weight (and bias).
        ref_hidden: [B, C, H_q] reference hidden states; the reference side is detached (it is a constant).
        temperature: the sampling temperature (trl's ``args.temperature``).
        mask: optional [B, C]; only positions where it is 1 are computed, the others are exactly 0.

    Returns:
        [B, C] float32 (float64 for float64 inputs).
    """
    keep = None if mask is None else mask.bool()
    hp, hq = (policy_hidden, ref_hidden) if keep is None else (policy_hidden[keep], ref_hidden[keep])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (policy_hidden, policy_head.weight, policy_head.bias)
    )
    if not needs_grad:
        # values only (scoring, metrics): the buffer-reusing single pass, no autograd bookkeeping
        flat_p, flat_q = hp.reshape(-1, hp.shape[-1]), hq.reshape(-1, hq.shape[-1]).detach()
        chunk = _chunk_rows(policy_head.weight.shape[0], chunk_size)
        with torch.no_grad():
            k, _ = _kl_pass(flat_p, policy_head, flat_q, _detached(ref_head), temperature, chunk)
        k = k.view(hp.shape[:-1])
    else:
        k = linear_token_kl(
            hp,
            policy_head.weight,
            hq.detach(),
            ref_head.weight.detach(),
            bias_p=policy_head.bias,
            bias_q=None if ref_head.bias is None else ref_head.bias.detach(),
            temperature=temperature,
            chunk_size=chunk_size,
            logit_scale_p=policy_head.logit_scale,
            logit_scale_q=ref_head.logit_scale,
            softcap_p=policy_head.softcap,
            softcap_q=ref_head.softcap,
        )
    if keep is None:
        return k
    # only real tokens are computed (padding costs nothing); padding is exactly 0
    return k.new_zeros(keep.shape).masked_scatter(keep, k)


# Elements of one [chunk, V] float32 buffer of the kernel below (16 MiB; three or four are live). Row chunks this
# tall matter on CPU: every chunk streams the whole [V, H] head through the cache, so short chunks are slow.
_CHUNK_ELEMENTS = 2**22


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return chunk_size


class _Buffers:
    """Reusable [rows, V] buffers (allocating fresh ones per chunk costs page faults on CPU)."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, softcap: bool):
        def make() -> torch.Tensor:
            return torch.empty(rows, vocab, dtype=dtype, device=device)

        self.p, self.q, self.tmp = make(), make(), make()
        self.deriv = make() if softcap else None


def _log_softmax_into(
    out: torch.Tensor, tmp: torch.Tensor, hidden: torch.Tensor, head: HeadParams, temperature: float,
    deriv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write log softmax of the sampling logits of ``hidden`` [n, H] into ``out`` [n, V]; leaves exp(z - max) in
    ``tmp`` and returns the row sums [n, 1] of it (so p = tmp / sums). With soft-capping, ``deriv`` receives
    d z / d raw = (1 - tanh^2) * scale / T."""
    w, b = head.weight, head.bias
    if hidden.dtype == w.dtype == out.dtype and (b is None or b.dtype == out.dtype):
        torch.mm(hidden, w.t(), out=out) if b is None else torch.addmm(b, hidden, w.t(), out=out)
    else:  # low-precision model: the product runs in its dtype (as in trl's fused head), then one float32 copy
        raw = hidden.to(w.dtype) @ w.t()
        out.copy_(raw if b is None else raw + b)
        del raw
    if head.softcap is None:
        if head.logit_scale != temperature:  # skip a pass over [n, V] in the common case scale = T = 1
            out.mul_(head.logit_scale / temperature)
    elif deriv is None:
        out.mul_(head.logit_scale / head.softcap).tanh_().mul_(head.softcap / temperature)
    else:
        torch.tanh(out.mul_(head.logit_scale / head.softcap), out=deriv)
        out.copy_(deriv).mul_(head.softcap / temperature)
        deriv.mul_(deriv).neg_().add_(1).mul_(head.logit_scale / temperature)
    rowmax = out.amax(dim=-1, keepdim=True)
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))  # an all -inf row: no NaN
    out.sub_(rowmax)
    sums = torch.exp(out, out=tmp).sum(dim=-1, keepdim=True)
    out.sub_(sums.log())
    return sums


def _kl_pass(
    hp: torch.Tensor, head_p: HeadParams, hq: torch.Tensor, head_q: HeadParams, temperature: float, chunk: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """One pass over [chunk, V] logits: per-row KL(p || q) [N], and, when ``weights`` [N] is given, the gradients of
    sum_n weights_n * KL_n with respect to hp, head_p.weight and head_p.bias (float32 math, float64 for float64)."""
    wp = head_p.weight
    dtype = torch.float64 if torch.float64 in (hp.dtype, wp.dtype, hq.dtype, head_q.weight.dtype) else torch.float32
    n_rows, vocab = hp.shape[0], wp.shape[0]
    rows = min(chunk, max(n_rows, 1))
    buf = _Buffers(rows, vocab, dtype, hp.device, head_p.softcap is not None)
    kl_all = torch.empty(n_rows, dtype=dtype, device=hp.device)
    grads = None
    if weights is not None:
        grad_h = torch.empty_like(hp)
        grad_w = torch.zeros(wp.shape, dtype=dtype, device=wp.device)
        grad_b = None if head_p.bias is None else torch.zeros(vocab, dtype=dtype, device=wp.device)
        grads = (grad_h, grad_w, grad_b)
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        logp, logq, p = buf.p[: e - s], buf.q[: e - s], buf.tmp[: e - s]
        deriv = None if buf.deriv is None else buf.deriv[: e - s]
        _log_softmax_into(logq, p, hq[s:e], head_q, temperature)
        sums = _log_softmax_into(logp, p, hp[s:e], head_p, temperature, deriv)
        p.div_(sums)
        diff = logp.sub_(logq)  # log p - log q, in place of log p
        kl = torch.linalg.vecdot(p, diff)
        bad = torch.isnan(kl)
        if bad.any():
            # 0 * -inf where p is 0 (a -inf logit): those entries contribute 0. Only such rows pay for the fix.
            diff[bad] = diff[bad].masked_fill(p[bad] == 0, 0)
            kl = torch.linalg.vecdot(p, diff)
        kl_all[s:e] = kl
        if grads is None:
            continue
        # d KL_n / d z_v = p_v (log p_v - log q_v - KL_n), times weights_n (and d z / d raw)
        row_weight = weights[s:e].to(dtype).unsqueeze(-1)
        if deriv is None:  # d z / d raw is the scalar scale / T: fold it into the row weights
            row_weight = row_weight * (head_p.logit_scale / temperature)
        graw = diff.sub_(kl.unsqueeze(-1)).mul_(p).mul_(row_weight)
        if deriv is not None:
            graw.mul_(deriv)
        grad_h, grad_w, grad_b = grads
        grad_h[s:e] = (graw.to(wp.dtype) @ wp).to(hp.dtype)
        grad_w.addmm_(graw.t(), hp[s:e].to(dtype))
        if grad_b is not None:
            grad_b += graw.sum(0)
    return kl_all, grads


class _WeightedKLSum(torch.autograd.Function):
    """sum_n w_n KL(p_n || q_n) from hidden states and LM heads; the gradient is computed in the forward pass.

    The weights w are known when the loss is built, so one pass over the [chunk, V] logits gives both the value and
    d/d(hidden_p, weight_p, bias_p); the backward only scales them. That saves recomputing the logits of both models
    in the backward (two of the six [N, H] x [H, V] products a recompute-in-backward kernel needs).
    """

    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, weights, temperature, scale_p, scale_q, cap_p, cap_q, chunk):  # type: ignore[override]
        head_p, head_q = HeadParams(wp, bp, scale_p, cap_p), HeadParams(wq, bq, scale_q, cap_q)
        # under no_grad (e.g. evaluation) only the value is computed
        need_grad = any(ctx.needs_input_grad[:3])
        kl, grads = _kl_pass(hp, head_p, hq, head_q, temperature, chunk, weights if need_grad else None)
        total = (weights.to(kl.dtype) * kl).sum()
        if grads is None:
            ctx.save_for_backward(None, None, None)
        else:
            grad_h, grad_w, grad_b = grads
            ctx.save_for_backward(grad_h, grad_w.to(wp.dtype), None if grad_b is None else grad_b.to(bp.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        scaled = [
            (grad_out.to(x.dtype) * x) if (x is not None and need[i]) else None
            for i, x in zip((0, 1, 2), (grad_h, grad_w, grad_b), strict=True)
        ]
        return (*scaled, *([None] * 10))


def weighted_kl_sum_from_hidden(
    policy_hidden: torch.Tensor,
    policy_head: HeadParams,
    ref_hidden: torch.Tensor,
    ref_head: HeadParams,
    weights: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """sum_{b,n} weights[b, n] * KL(p_{b,n} || q_{b,n}): a scalar loss term with gradient through the policy only.

    Args:
        policy_hidden: [B, C, H_p] completion-aligned policy hidden states (gradients flow into them and into the
            policy head's weight and bias).
        ref_hidden: [B, C, H_q] reference hidden states (constant).
        weights: [B, C] constant weights, e.g. beta * mask / B; positions with weight 0 are skipped entirely (so
            padding costs nothing and its hidden states never matter).
        temperature: the sampling temperature.
        chunk_size: positions per chunk (default about 2**20 / V).

    Returns:
        0-d float32 tensor (float64 for float64 inputs). Its value and gradient equal those of ``(weights * token_kl_from_hidden(...)).sum()``;
        the gradient is computed in the forward pass (the weights being known), which halves the LM-head work.
    """
    if weights.shape != policy_hidden.shape[:-1] or ref_hidden.shape[:-1] != policy_hidden.shape[:-1]:
        raise ValueError(
            f"weights {tuple(weights.shape)}, policy_hidden {tuple(policy_hidden.shape)} and ref_hidden "
            f"{tuple(ref_hidden.shape)} must cover the same [B, C] positions."
        )
    if policy_head.weight.shape[0] != ref_head.weight.shape[0]:
        raise ValueError("The policy and reference heads have different vocabulary sizes; they must share one.")
    keep = weights != 0
    hp, hq, w = policy_hidden[keep], ref_hidden[keep].detach(), weights.detach()[keep]
    chunk = _chunk_rows(policy_head.weight.shape[0], chunk_size)
    return _WeightedKLSum.apply(
        hp,
        policy_head.weight,
        policy_head.bias,
        hq,
        ref_head.weight.detach(),
        None if ref_head.bias is None else ref_head.bias.detach(),
        w,
        float(temperature),
        float(policy_head.logit_scale),
        float(ref_head.logit_scale),
        policy_head.softcap,
        ref_head.softcap,
        chunk,
    )


def _detached(head: HeadParams) -> HeadParams:
    bias = None if head.bias is None else head.bias.detach()
    return HeadParams(head.weight.detach(), bias, head.logit_scale, head.softcap)


def k3_per_token(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 term exp(-r) - 1 + r (>= 0) of per-token log ratios r = log p - log q, any shape."""
    return torch.expm1(-log_ratio) + log_ratio


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


def reference_head(trainer: Any) -> HeadParams:
    """The reference's LM head: ``trainer.ref_model``'s, or, without one (PEFT policy, adapters disabled), the policy
    model's base head (head_params refuses a LoRA'd head). Weights are detached: the reference is a constant."""
    source = trainer.ref_model if getattr(trainer, "ref_model", None) is not None else trainer.model
    head = head_params(source)
    return HeadParams(
        weight=head.weight.detach(),
        bias=None if head.bias is None else head.bias.detach(),
        logit_scale=head.logit_scale,
        softcap=head.softcap,
    )


def check_rb_sampling(args: Any, estimator: str) -> None:
    """Refuse sampling settings under which the RB KL (a full-softmax expectation) is not the sampled distribution.

    trl's fused head scores with softmax(logits / temperature) over the whole vocabulary; top-k, top-p, min-p and a
    repetition penalty sample from a different distribution, so K_n would be the KL of distributions the tokens were
    not drawn from.

    Raises:
        ValueError: naming the setting and the fix.
    """
    if estimator != "rb":
        return
    # generation_kwargs override the named settings (trl merges them last)
    settings = {name: getattr(args, name, None) for name in ("top_k", "top_p", "min_p", "repetition_penalty")}
    settings.update({k: v for k, v in (getattr(args, "generation_kwargs", None) or {}).items() if k in settings})
    harmless = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (0.0, None), "repetition_penalty": (1.0, None)}
    fixes = {"top_k": "0", "top_p": "1.0", "min_p": "None", "repetition_penalty": "1.0"}
    problems = [f"{k}={v!r} (use {fixes[k]})" for k, v in settings.items() if v not in harmless[k]]
    if problems:
        raise ValueError(
            "kl_estimator='rb' computes the exact KL of the full next-token distributions softmax(logits / "
            f"temperature), but {', '.join(problems)} samples from a truncated or reweighted one. Change those "
            "settings, or use kl_estimator='k1'."
        )


def _vocab_size(model: nn.Module) -> int:
    head = unwrap_causal_lm(model).get_output_embeddings()
    return int(head.weight.shape[0])


def load_reference_model(
    ref_model: str | nn.Module,
    *,
    policy: nn.Module,
    processing_class: Any = None,
    model_init_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A user-chosen reference model: loaded from a path (like trl loads its ref model) or taken as given.

    The reference must share the policy's vocabulary: the same LM-head size, and, when ``ref_model`` is a path that
    holds a tokenizer, the same token -> id map as ``processing_class``.

    Args:
        ref_model: a path (or hub id) or a ``PreTrainedModel``.
        policy: the policy model (possibly PEFT-wrapped); its dtype and attention implementation are the defaults.
        processing_class: the trainer's tokenizer (or processor).
        model_init_kwargs: ``from_pretrained`` kwargs for a path (trl's ``args.model_init_kwargs``).

    Raises:
        ValueError: vocabularies differ; TypeError: ``ref_model`` is neither a string nor a module.
    """
    from trl.trainer.utils import create_model_from_path

    if isinstance(ref_model, str):
        kwargs = dict(model_init_kwargs or {})
        base = unwrap_causal_lm(policy)
        kwargs.setdefault("dtype", base.dtype)
        kwargs.setdefault("attn_implementation", base.config._attn_implementation)
        path = ref_model
        ref_model = create_model_from_path(path, **kwargs)
        _check_tokenizer(path, processing_class)
    elif not isinstance(ref_model, nn.Module):
        raise TypeError(f"ref_model must be a path string or a model, got {type(ref_model).__name__}.")
    if _vocab_size(ref_model) != _vocab_size(policy):
        raise ValueError(
            f"ref_model has a vocabulary of {_vocab_size(ref_model)} tokens but the policy has {_vocab_size(policy)}; "
            "the KL between two models needs one shared tokenizer and vocabulary. Pick a reference trained with the "
            "policy's tokenizer."
        )
    return ref_model


def _check_tokenizer(path: str, processing_class: Any) -> None:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return
    try:
        from transformers import AutoTokenizer

        ref_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return  # no tokenizer saved with the reference: the vocabulary-size check is all we can do
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The tokenizer saved with ref_model {path!r} differs from the trainer's (token -> id maps differ); the KL "
            "between two models needs one shared tokenizer and vocabulary."
        )


def prepare_reference_model(trainer: Any, ref_model: nn.Module) -> nn.Module:
    """Make ``ref_model`` a reference like trl makes its own: dropout off (if ``args.disable_dropout``), trl's fused
    LM head at the trainer's temperature, no gradients, and prepared by accelerate (DeepSpeed / FSDP / plain)."""
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    if trainer.args.disable_dropout:
        disable_dropout_in_model(ref_model)
    # Patching twice is harmless: the outermost fused forward calls the backbone directly, at this temperature.
    add_fused_lm_head(ref_model, temperature=trainer.temperature)
    ref_model.requires_grad_(False)
    ref_model.eval()
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)
