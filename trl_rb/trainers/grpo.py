"""GRPO with a choice of KL estimator: ``GRPOConfig`` / ``GRPOTrainer``, drop-ins for trl 1.16's classes.

trl's GRPOTrainer adds beta * k3_t = beta * (exp(-r_t) - 1 + r_t) to every completion token's loss and
differentiates it with the sampled tokens held fixed (``r_t = l_t - log q_t(y_t)``, ``l_t = log p_t(y_t)``). Its
expected gradient is not the gradient of KL(p || q): without ``use_bias_correction_kl`` it is
E[sum_t (1 - q_t/p_t) grad l_t] = -E[sum_t sum_v q_t(v) grad log p_t(v)] (a cross-entropy toward q); with it (trl's
default) the term is multiplied by the importance ratio, and the expected gradient becomes E[sum_t grad K_t] with
the prefixes held fixed. Either way the score-function part, how the KL of later steps depends on earlier tokens,
is missing. ``kl_estimator`` chooses:

- ``k3``: trl's behaviour, unchanged.
- ``k1``: the detached per-sequence k1 = sum_t r_t enters the advantages, an unbiased score-function gradient.
- ``rb`` (the default, as in trl_rb's RLOO): each completion token t adds
  beta * [K_t + (l_t - sg l_t) * sg(sum_{m>t} K_m)] to the per-token loss
  (docs/estimators.md, surrogate S_rb), with K_t the exact KL of the two next-token distributions, aggregated by the
  configured ``loss_type``: the unbiased Rao-Blackwellized gradient, scaled by the constant the aggregation implies.

How the hooks work (no trl code is copied): ``_generate_and_score_completions`` runs trl's under a hidden-state
recording (``capture.HiddenCaptureMixin``), so the reference's last hidden states of trl's own reference forward
ride in the batch dict (``capture.REF_HIDDEN_KEY``); ``_compute_loss`` runs trl's loss, records the policy's hidden
states and per-token log-probs l_t (with gradient) from trl's own loss forward, and (``k1``, ``rb``) subtracts the
beta * k3 term trl added, the same expression of the same log-probs (the table in ``trl_rb.trainers`` lists every
override); K_t comes from ``trl_rb.kl`` on the two hidden states and LM heads
(never [B, T, V] logits). Forward passes per generation batch (num_iterations = 1, aligned steps; generation aside):

=========  ==========================================  ==================
mode       policy                                      reference
=========  ==========================================  ==================
k3 (trl)   1 forward + backward (loss)                 1 forward (scoring)
rb         1 forward + backward (loss)                 1 forward (scoring)
k1         1 no-grad forward (scoring) + 1 fwd + bwd   1 forward (scoring)
=========  ==========================================  ==================

k1 needs log p(y) before the advantages are built, so it scores the policy once more during scoring (trl's RLOO does
the same), unless trl already computed the old log-probs there (misaligned steps, vLLM importance sampling). Beyond
the forwards, every mode with beta > 0 evaluates the exact KL once on the loss batch (two LM-head products per chunk
of positions): ``k1`` / ``k3`` without gradient, for the kl/rb metric (``linear_token_kl``). ``rb`` gets K_t
from trl's own loss forward: for that forward trl's log-prob head is replaced by one that also returns K_t
(``fused_head``), two products more than trl's four (the reference's logits, forward and again backward), which
also gives the K_t values of the future sums and the metric. Where the heads are sharded (ZeRO-3, FSDP2), K_t
and its gradient come from one weighted pass after trl's forward instead (``linear_weighted_kl_sum``: four more
products, no backward over the heads), with the same result.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import grpo_trainer as trl_grpo_trainer

from ..kl import canonical_estimator, future_sum
from .capture import REF_HIDDEN_KEY, GenerationPositionsMixin, HiddenCaptureMixin, ScoredCall
from .fused_head import fused_loss_head, loss_head_for, weighted_sum
from .gamma import GAMMA_HELP, GAMMA_KEY, GammaFit, check_gamma_settings, gamma_metrics, score_norm_proxy
from .metrics import log_sequence_metrics, masked_sequence_sum
from .off_policy import (
    DEFAULT_PREFIX_WEIGHT_CAP,
    PREFIX_WEIGHT_CAP_HELP,
    check_prefix_weight_cap,
    sampler_prefix_weights,
)
from .reference import args_for_trl, load_reference_model, prepare_reference_model
from .sampling import check_rb_generation_config_of, check_rb_sampling
from .token_kl import (
    k3_per_token,
    logs_rb_metric,
    policy_head,
    reference_head,
    token_kl_from_hidden,
    trained_adapter,
    weighted_kl_sum_from_hidden,
)

__all__ = ["GRPO_KL_ESTIMATORS", "GRPOConfig", "GRPOTrainer", "loss_type_weights", "reduce_like_loss_type"]

GRPO_KL_ESTIMATORS = ("k1", "k3", "rb")


@dataclass
class GRPOConfig(trl.GRPOConfig):
    r"""
    Configuration class for [`trl_rb.GRPOTrainer`]: every field of [`trl.GRPOConfig`], plus the choice of KL estimator.

    Parameters:
        kl_estimator (`str`, *optional*, defaults to `"rb"`):
            Which estimator of KL(policy || reference) regularizes the policy (case-insensitive; aliases `mc` for
            `k1`, `full` for `rb`). The default is `"rb"`, as in [`trl_rb.RLOOConfig`]: with trl's default
            `beta=0.0` there is no KL term (trl loads no reference) and no KL metric is logged: every mode then
            trains like trl, except that models with absolute position embeddings (GPT-2) are scored at the positions
            generation used (`cumsum(attention_mask) - 1`; trl 1.16 passes none, which shifts left-padded rows).

            - `"k3"`: trl's GRPO term beta * (exp(-r_t) - 1 + r_t) added to each token's loss, with
              r_t = log p(y_t) - log q(y_t), trl's behaviour. Its gradient is biased for grad KL (see the module
              docstring).
            - `"k1"`: the per-sequence estimate sum_t r_t (detached) is subtracted, times beta, from each
              completion's advantage, centred by its group's mean like the reward. The KL part of the gradient is
              then (G - 1) / G * beta * an unbiased score-function estimate of grad KL (G = `num_generations`), and
              the loss type's normalization multiplies it. The penalty is *not* divided by the reward standard
              deviation that `scale_rewards` uses: if it were, with a constant reward in a group beta would cancel
              and the KL part would estimate grad KL divided by the (random) standard deviation of the group's KL
              values, which is no fixed multiple of grad KL. beta therefore keeps its meaning for every
              `scale_rewards`.
            - `"rb"`: each completion token t adds beta * [K_t + (l_t - sg l_t) * sg(sum_{m>t} K_m)] to its loss,
              where K_t is the exact KL of the two next-token distributions (at `temperature`) and l_t the policy's
              log-prob of the sampled token: an unbiased Rao-Blackwellized gradient; plus the control variate
              gamma * [(l_t - sg l_t) * sg(d) - K_t] with d = sum_m r_m - sum_m K_m (mean 0, see `rb_gamma`), which
              lets the KL term cancel the part of the reward's noise that follows log p/q. The constant it estimates
              depends on `loss_type`: beta / `max_completion_length` * grad KL for `dr_grpo` (exact, unbiased),
              beta * grad KL for `luspo`; `bnpo`, `dapo`, `cispo`, `vespo` divide by the batch's token count, so they
              estimate beta * grad KL / E[completion length] consistently (a ratio estimator: not unbiased for a finite
              batch, and the count's dependence on the policy is not differentiated); `grpo` and `sapo` divide each
              sequence by its own length, which weights sequences by 1 / length and estimates no multiple of grad KL
              (use `dr_grpo` when the KL gradient matters). Off-policy updates (`num_iterations > 1`,
              `steps_per_generation > gradient_accumulation_steps`) train on batches sampled by an older policy:
              each prefix is then weighted by W_{<t} = p(y_<t) / p_old(y_<t) (from trl's old log-probs, unclipped),
              beta * [sg(W_{<t}) K_t + (l_t - sg l_t) * sg(sum_{m>t} W_{<m} K_m)], which keeps the gradient
              unbiased up to the cap on W (`rb_prefix_weight_cap`); trl's clipping of its own policy-gradient term is
              unchanged. With vLLM generation the sampler is vLLM itself: W_{<t} then uses vLLM's log-probs (trl
              always requests them), which corrects for the vLLM-trainer mismatch too, with trl's
              `vllm_importance_sampling_correction` on or off (that flag and `vllm_importance_sampling_mode` govern
              trl's own policy-gradient term). The KL logged and optimized is the trainer's model's, KL(p || q) in
              the trainer's dtype: the model being trained and saved, not vLLM's copy of it.
        rb_kl_metric (`bool`, *optional*, defaults to `True`):
            Whether `k1` and `k3` runs also log `kl/rb` (the exact per-token KL summed per sequence). It costs two
            LM-head products per loss batch; `rb` runs always log it (they compute it anyway). Where the heads cannot
            give it (no linear LM head), it is skipped with one warning.
        rb_gamma (`float` or `None`, *optional*, defaults to `None`):
            Coefficient of the control variate gamma * (sum_n grad K_n - (sum_n r_n - sum_n K_n) * S) that `"rb"` adds
            to its gradient (S the completion's score; unbiased for any gamma fixed before the batch is drawn, see
            `trl_rb.trainers.gamma`). `None`: fitted online, the ||S||^2-weighted least-squares slope of the advantage
            on sum r - sum K over earlier generation batches (an exponential moving average; MC's gamma = beta until
            there are statistics). A number fixes it: 0 is the plain RB gradient, `beta` is MC. The term is added
            outside trl's advantage, so it has mean 0 under every `scale_rewards`: with `"group"` or `"batch"` the
            reward part stays trl's self-normalized estimate (biased, as in trl), the KL part stays unbiased for the
            constant `loss_type` gives, and gamma is fitted against the scaled advantage (the units it multiplies).
        rb_gamma_decay (`float`, *optional*, defaults to `0.9`):
            Weight of the earlier batches' statistics at each update of the online fit (0: the last batch only).
        rb_prefix_weight_cap (`float` or `None`, *optional*, defaults to `3.0`):
            Upper bound C on the prefix importance weights W_{<t} of the `rb` terms on batches the current policy did
            not sample (reused batches, vLLM with the correction): min(W, C), truncated importance sampling as in
            trl's vLLM correction (same default). It keeps the step finite (an uncapped W overflows float32 on long,
            far off-policy completions) and biases it where the current policy makes a prefix more than C times as
            likely as the sampler did (such prefixes are under-weighted). With `rb_gamma` != 0 the control variate's
            whole-completion weight is truncated too, which biases its term more where the cap binds (the README's
            vLLM section has the numbers). `None`: no cap, unbiased; a weight beyond float range then raises a
            `ValueError`.
        use_bias_correction_kl (`bool` or `None`, *optional*, defaults to `None`):
            trl's option to multiply the k3 term by the importance-sampling ratio. `None` means trl's default
            (`True`) for `kl_estimator="k3"` and `False` otherwise; it only applies to `k3`, so `True` with `k1` or
            `rb` raises a `ValueError`.
    """

    kl_estimator: str = field(
        default="rb",
        metadata={
            "help": "KL estimator: 'rb' (alias 'full'; default): Rao-Blackwellized surrogate with the exact per-token "
            "KL, unbiased, typically lower variance; 'k3': trl's per-token k3 in the loss, biased gradient; 'k1' "
            "(alias 'mc'): detached sum of log ratios in the advantages, unbiased score-function gradient. "
            "Case-insensitive. With beta=0 there is no KL term and every mode trains like trl, except that absolute-position "
            "models (GPT-2) are scored at generation's position ids."
        },
    )
    rb_kl_metric: bool = field(
        default=True,
        metadata={"help": "Whether k1/k3 runs also log kl/rb (costs two LM-head products per loss batch)."},
    )
    rb_prefix_weight_cap: float | None = field(default=DEFAULT_PREFIX_WEIGHT_CAP, metadata={"help": PREFIX_WEIGHT_CAP_HELP})
    rb_gamma: float | None = field(default=None, metadata={"help": GAMMA_HELP})
    rb_gamma_decay: float = field(
        default=0.9,
        metadata={"help": "Weight of earlier generation batches' statistics in the online fit of rb_gamma (0: last only)."},
    )
    use_bias_correction_kl: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to multiply trl's k3 KL term by the importance sampling ratio. None (default): trl's "
            "default (True) for kl_estimator='k3', False otherwise. Only applies to 'k3'; True with 'k1' or 'rb' is "
            "an error."
        },
    )

    def __post_init__(self):
        self.kl_estimator = canonical_estimator(self.kl_estimator, allowed=GRPO_KL_ESTIMATORS)
        check_prefix_weight_cap(self.rb_prefix_weight_cap)
        check_gamma_settings(self.rb_gamma, self.rb_gamma_decay)
        if self.use_bias_correction_kl is None:
            self.use_bias_correction_kl = self.kl_estimator == "k3"
        elif self.use_bias_correction_kl and self.kl_estimator != "k3":
            raise ValueError(
                f"use_bias_correction_kl=True multiplies trl's k3 term by the importance ratio; it has no meaning for "
                f"kl_estimator={self.kl_estimator!r}. Leave use_bias_correction_kl unset (None) or set it to False."
            )
        super().__post_init__()


def loss_type_weights(
    mask: torch.Tensor,
    *,
    loss_type: str,
    max_completion_length: int,
    accumulation_steps: float,
    num_items_in_batch: torch.Tensor | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """[B, C] weights w (0 on padding) such that trl 1.16's GRPO reduces per-token loss terms x to sum(w * x).

    trl's normalizations, by ``loss_type`` (A = ``accumulation_steps`` in training, 1 in evaluation; n_b the
    sequence's token count, B the batch's sequences): ``grpo``/``sapo``: 1 / (n_b B A) (the mean over sequences of
    each sequence's masked mean); ``bnpo``: 1 / (sum_b n_b A); ``dr_grpo``: 1 / (B ``max_completion_length`` A);
    ``dapo``/``cispo``/``vespo``: 1 / (``num_items_in_batch`` / processes, times A / ``steps_per_generation`` in
    training); ``luspo``: 1 / (B A) (the mean over sequences of each sequence's masked sum). Every reduction trl makes
    is linear in x, so these weights are the whole of it (``tests/trainers/test_grpo.py`` checks them against trl's
    own loss for every loss type).
    """
    m = mask.bool()
    w = m.to(dtype)
    counts = w.sum(-1, keepdim=True)
    accum = accumulation_steps if training else 1.0
    batch = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        return w / counts.clamp(min=1.0) / (batch * accum)
    if loss_type == "bnpo":
        return w / counts.sum().clamp(min=1.0) / accum
    if loss_type == "dr_grpo":
        return w / (batch * max_completion_length * accum)
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} normalizes by num_items_in_batch; pass it.")
        normalizer = num_items_in_batch.to(device=w.device, dtype=dtype).clamp(min=1.0) / num_processes
        if training:
            normalizer = normalizer * accumulation_steps / steps_per_generation
        return w / normalizer
    if loss_type == "luspo":
        return w / (batch * accum)
    raise ValueError(f"Unknown loss_type {loss_type!r} (trl 1.16 GRPO: grpo, sapo, bnpo, dr_grpo, dapo, cispo, vespo, luspo).")


def reduce_like_loss_type(per_token: torch.Tensor, mask: torch.Tensor, **normalization: Any) -> torch.Tensor:
    """Reduce per-token loss terms [B, C] to the scalar trl 1.16's GRPO would make of its per-token loss:
    sum(``loss_type_weights(mask, **normalization)`` * per_token), in ``per_token``'s dtype.

    Args:
        per_token: [B, C] float terms, completion-aligned; mask: [B, C] (1 = counted token). Padding may hold any
            finite or non-finite value: it is replaced by 0.

    Returns:
        A 0-d tensor, differentiable with respect to ``per_token``.
    """
    weights = loss_type_weights(mask, dtype=per_token.dtype, **normalization)
    masked = torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return (weights * masked).sum()


def _trl_init_argument(name: str, *args: Any, **kwargs: Any) -> Any:
    """The value ``trl.GRPOTrainer.__init__`` receives for parameter ``name`` from these arguments (or its default)."""
    # the defining module's class: `trl.GRPOTrainer` is trl-rb's own after trl_rb.patch_trl()
    bound = inspect.signature(trl_grpo_trainer.GRPOTrainer.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments[name]


class GRPOTrainer(HiddenCaptureMixin, GenerationPositionsMixin, trl.GRPOTrainer):
    """trl's ``GRPOTrainer`` with the KL estimator chosen by ``args.kl_estimator`` (``trl_rb.GRPOConfig``).

    Same constructor as ``trl.GRPOTrainer``, plus ``ref_model``: an optional reference (a path or a model sharing the
    policy's vocabulary) to regularize toward instead of the policy's starting point; it needs ``beta > 0``. A plain
    ``trl.GRPOConfig`` gets the default ``kl_estimator="rb"`` (with a warning when beta > 0, since its
    ``use_bias_correction_kl=True``, a k3-only option, is then ignored); for trl's k3 term use
    ``trl_rb.GRPOConfig(kl_estimator="k3")``.

    Logged every step when ``beta > 0``, on the batch of the loss, whatever the mode: ``kl/k1`` and ``kl/rb``, the mean
    over sequences of sum_t r_t and of sum_t K_t (both estimate KL(p || q) per completion; kl/rb with less variance).
    The reference is trl's (the policy's starting point), or for a PEFT policy the base model with adapters disabled
    (or trl's "ref" adapter), as trl does. Refused at construction: ``rb`` with top-k / top-p / min-p / repetition
    penalty sampling, a LoRA adapter on the LM head, or an FSDP-sharded head; ``use_bias_correction_kl=True`` with
    ``k1`` / ``rb``; ``sync_ref_model`` with an explicit ``ref_model``.
    """

    _tag_names = [*trl.GRPOTrainer._tag_names, "trl-rb"]

    def __init__(self, model, reward_funcs=None, args=None, *pos_args, ref_model=None, **kwargs):
        estimator = canonical_estimator(getattr(args, "kl_estimator", "rb"), allowed=GRPO_KL_ESTIMATORS)
        if args is not None:
            if args.beta != 0.0:
                check_rb_sampling(args, estimator)
            if estimator != "k3" and getattr(args, "use_bias_correction_kl", False):
                if isinstance(args, GRPOConfig):
                    raise ValueError(
                        f"use_bias_correction_kl=True only applies to trl's k3 term, not kl_estimator={estimator!r}; "
                        "set it to False (trl_rb.GRPOConfig does that by default)."
                    )
                if args.beta != 0.0:  # a plain trl.GRPOConfig: True is trl's default there, not the user's choice
                    warnings.warn(
                        f"A plain trl.GRPOConfig gives trl_rb.GRPOTrainer its default kl_estimator={estimator!r}; "
                        "use_bias_correction_kl (a k3-only option, True by default in trl) has no effect. Use "
                        "trl_rb.GRPOConfig(kl_estimator='k3') for trl's KL term.",
                        stacklevel=2,
                    )
        if ref_model is not None:
            if args is None or args.beta == 0.0:
                raise ValueError("ref_model= is a KL reference: it needs args with beta > 0.")
            if args.sync_ref_model:
                raise ValueError("sync_ref_model=True with an explicit ref_model= is not supported; drop one of them.")
            quantization = _trl_init_argument("quantization_config", model, reward_funcs, args, *pos_args, **kwargs)
            # trl builds no reference of its own (nor a PEFT "ref" adapter); ours is installed right after.
            super().__init__(model, reward_funcs, args_for_trl(args, estimator, beta=0.0), *pos_args, **kwargs)
            self.beta = self.args.beta = args.beta
            self.ref_model = prepare_reference_model(
                self,
                load_reference_model(
                    ref_model,
                    policy=self.model,
                    args=args,
                    processing_class=self.processing_class,
                    quantization_config=quantization,
                ),
            )
        else:
            super().__init__(model, reward_funcs, args_for_trl(args, estimator), *pos_args, **kwargs)
        self.kl_estimator = estimator
        if self.beta != 0.0:  # the checkpoint's generation config, known once trl has loaded the model
            check_rb_generation_config_of(self, estimator)
        self._rb_policy_adapter = trained_adapter(self)  # named now: trl's reference forward switches adapters
        self._rb_metric = logs_rb_metric(self, estimator)
        gamma = getattr(self.args, "rb_gamma", None)
        # the online fit starts at MC (gamma = beta), trl's own estimator, until earlier batches give a slope
        self._gamma_fit = GammaFit(prior=self.beta, decay=getattr(self.args, "rb_gamma_decay", 0.9), beta=self.beta)
        self._fixed_gamma = None if gamma is None else float(gamma)

    # ---------------------------------------------------------------------------------------------------------------
    # Scoring: carry the reference's completion hidden states; k1 goes into the advantages.
    # ---------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if self.beta == 0.0:
            return super()._generate_and_score_completions(inputs)
        with self._rb_recording() as recording:
            output = super()._generate_and_score_completions(inputs)
        calls = recording.calls
        ref_call = self._reference_call(calls)
        if self.kl_estimator == "rb":  # fixed before the batch is drawn: it never depends on the batch's samples
            gamma = self._gamma_for_batch(training=self.model.training)
            output[GAMMA_KEY] = torch.full((output["completion_mask"].shape[0],), gamma, dtype=torch.float32,
                                           device=output["completion_mask"].device)  # fmt: skip
        if self._rb_metric:
            # A contiguous copy: the slice would otherwise keep the prompt positions' hidden states alive.
            output[REF_HIDDEN_KEY] = ref_call.hidden.detach().contiguous()
        if self.kl_estimator == "k1":
            self._add_k1_penalty(output, calls[:-1], ref_call)
        return output

    def _gamma_for_batch(self, *, training: bool) -> float:
        """The fixed ``rb_gamma``, or the online fit: in training, the statistics of the micro-batches trained on since the
        last generation batch (every process's) folded in first; in evaluation, the latest gamma."""
        if self._fixed_gamma is not None:
            return self._fixed_gamma
        if not training:
            return self._gamma_fit.current if self._gamma_fit.current is not None else self._gamma_fit.prior

        def across_processes(sums: torch.Tensor) -> torch.Tensor:
            device = self.accelerator.device
            return self.accelerator.reduce(sums.to(device), reduction="sum").cpu()

        return self._gamma_fit.next_gamma(across_processes)

    def _reference_call(self, calls: list[ScoredCall]) -> ScoredCall:
        # trl scores the reference last (after the optional old-policy scoring), with self.ref_model or, for PEFT,
        # with the policy under disabled adapters.
        if not calls or (self.ref_model is not None and calls[-1].model is not self.ref_model):
            raise RuntimeError(
                "trl_rb.GRPOTrainer did not see trl's reference forward during scoring; this trl version scores "
                "differently from the one trl_rb supports (1.16)."
            )
        return calls[-1]

    def _add_k1_penalty(self, output: dict[str, Any], policy_calls: list[ScoredCall], ref_call: ScoredCall) -> None:
        """advantages -= beta * (k1_i - mean of k1 over i's group), with k1_i = sum_t r_t (detached) over the tokens the
        policy sampled (tool-call outputs, ``tool_mask`` 0, are inserted text: they are not in the sum)."""
        mask = output["completion_mask"]
        sampled = mask * output["tool_mask"] if "tool_mask" in output else mask
        if policy_calls:  # trl already scored the sampling policy (misaligned steps or vLLM correction)
            policy_logps = policy_calls[0].logps
        else:
            # The policy on exactly the inputs trl gave the reference (multimodal fields and the train / eval batch
            # size included), scored the way trl scores old log-probs: no gradient, no gradient checkpointing.
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                policy_logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, *ref_call.args, **ref_call.kwargs
                )
        k1 = masked_sequence_sum(policy_logps.float() - ref_call.logps.float(), sampled)
        everyone = self.accelerator.gather(k1)  # groups may span processes: centre them globally, like the rewards
        group = self.num_generations if self.model.training else self.num_generations_eval
        grouped = everyone.view(-1, group)
        centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
        start = self.accelerator.process_index * k1.shape[0]
        advantages = output["advantages"]
        output["advantages"] = advantages - self.beta * centred[start : start + k1.shape[0]].to(advantages.dtype)

    # ---------------------------------------------------------------------------------------------------------------
    # Loss: trl's loss without its KL term, plus the chosen KL term; the KL metrics.
    # ---------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        beta = self.beta
        fused = loss_head_for(self, model, inputs) if self.kl_estimator == "rb" else None
        with self._rb_recording() as recording, fused_loss_head(fused):
            loss = super()._compute_loss(model, inputs)
        if len(recording.calls) != 1:
            raise RuntimeError(f"expected one policy forward in trl's loss, saw {len(recording.calls)}.")
        policy = recording.calls[0]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        if self.kl_estimator != "k3":
            # trl added beta * k3_t of these very log-probs (use_bias_correction_kl is off: see args_for_trl); the
            # same term taken back out leaves trl's loss without its KL term, value and gradient (to rounding).
            k3 = k3_per_token(policy.logps - inputs["ref_per_token_logps"])
            loss = loss - beta * self._reduce(k3, mask, inputs, mode)

        kl_terms = None
        if self.kl_estimator == "rb":
            # The K_t part of the surrogate is linear in K with weights known now (beta times the loss_type
            # normalization), so one pass gives its value, its gradient and the K_t values the future sums need.
            logps = policy.logps  # l_t with its gradient, from trl's own loss forward
            # A batch sampled by another policy (an earlier one, or vLLM's copy): its prefixes are re-weighted by
            # W_{<t} = p(y_<t) / p_sampler(y_<t), which keeps both halves of the gradient unbiased.
            sampler = self._sampler_logps(inputs)
            prefix = sampler_prefix_weights(self.args, logps, sampler, mask)
            gamma = float(inputs[GAMMA_KEY][0]) if GAMMA_KEY in inputs else 0.0
            weights = self._reduce_weights(mask, inputs, mode)
            if prefix is not None:
                weights = weights * prefix
            if fused is not None and fused.token_kl is not None:  # K_t from trl's loss forward, with its log-probs
                kl_loss, kl_terms = weighted_sum(weights, fused.token_kl)
            else:
                kl_loss, kl_terms = self._weighted_token_kl(model, policy.hidden, inputs[REF_HIDDEN_KEY], weights)
            future = future_sum(kl_terms if prefix is None else prefix * kl_terms)
            score = logps - logps.detach()
            # The gamma control variate: its K_t part joins the analytic term's coefficient (beta - gamma); its score
            # part, gamma * (sum_t r_t - sum_t K_t) per completion times each token's score, is weighted by the whole
            # completion's importance weight on batches another policy sampled.
            loss = loss + (beta - gamma) * kl_loss + beta * self._reduce(score * future, mask, inputs, mode)
            d = masked_sequence_sum(logps.detach() - inputs["ref_per_token_logps"] - kl_terms, mask)
            if gamma != 0.0:
                whole = 1.0 if prefix is None else sampler_prefix_weights(self.args, logps, sampler, mask, inclusive=True)[:, -1]
                loss = loss + gamma * self._reduce(score * (whole * d).unsqueeze(1), mask, inputs, mode)
            self._observe_gamma(inputs, d, kl_terms, logps, mask, gamma, mode)
        elif self._rb_metric:
            with torch.no_grad():
                kl_terms = self._token_kl(model, policy.hidden, inputs[REF_HIDDEN_KEY], mask)

        metrics = {"kl/k1": masked_sequence_sum(policy.logps.detach() - inputs["ref_per_token_logps"], mask)}
        if kl_terms is not None:
            metrics["kl/rb"] = masked_sequence_sum(kl_terms.detach(), mask)
        log_sequence_metrics(self, mode, metrics)
        return loss

    def _observe_gamma(self, inputs, d, kl_terms, logps, mask, gamma: float, mode: str) -> None:
        """Log gamma and the variance-ratio estimate; in training, add the micro-batch to the online fit (used from the
        next generation batch on). The coefficient of S without the gamma term is approximated per completion by
        y = A - beta sum_t K_t (trl's advantage, and the RB penalty in its sequence form)."""
        y = inputs["advantages"].detach().double() - self.beta * masked_sequence_sum(kl_terms.detach(), mask).double()
        w = score_norm_proxy(logps, mask)
        everyone = self.accelerator.gather(torch.stack([y, d.double(), w.double()], dim=1))
        for key, value in gamma_metrics(gamma, self.beta, *everyone.unbind(1)).items():
            self._metrics[mode][key].append(value)
        if mode == "train" and self._fixed_gamma is None:
            self._gamma_fit.add(y, d, w)

    def _sampler_logps(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """[B, C] per-token log-probs of the policy that sampled the batch, or None when that is the current one.

        Whenever trl has the sampler's own log-probs (vLLM's, which trl 1.16 always requests and requires
        "processed": of the distribution it sampled from, temperature included; or a ``rollout_func``'s), those, with
        trl's importance-sampling correction on or off: the RB terms are the KL of the trainer's model, and weighting
        by p / p_vllm covers both the vLLM-trainer mismatch and stale batches (trl's correction flag governs its own
        policy-gradient term only). Otherwise the trainer's at sampling time, which trl records only when batches are
        reused after an update.
        """
        if inputs.get("sampling_per_token_logps") is not None:
            return inputs["sampling_per_token_logps"]
        return inputs.get("old_per_token_logps")

    def _token_kl(self, model, policy_hidden, ref_hidden, mask) -> torch.Tensor:
        """K_t [B, C] from the captured hidden states (with gradient to the policy when grad mode is on)."""
        head = policy_head(self, model)
        ref_head = reference_head(self)
        if not torch.is_grad_enabled():
            policy_hidden = policy_hidden.detach()
        return token_kl_from_hidden(
            policy_hidden.to(head.weight.dtype),
            head,
            ref_hidden.to(ref_head.weight.dtype),
            ref_head,
            temperature=self.temperature,
            mask=mask,
        )

    def _weighted_token_kl(self, model, policy_hidden, ref_hidden, weights) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_t weights_t K_t with gradient to the policy, K_t [B, C] detached; 0 where the weight is 0)."""
        head = policy_head(self, model)
        ref_head = reference_head(self)
        return weighted_kl_sum_from_hidden(
            policy_hidden.to(head.weight.dtype),
            head,
            ref_hidden.to(ref_head.weight.dtype),
            ref_head,
            weights,
            temperature=self.temperature,
            return_token_kl=True,
        )

    def _reduce_weights(self, mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """[B, C] float64 weights w with ``_reduce(x) == (w * x).sum()`` (trl's normalization, ``loss_type_weights``);
        float64 so that a float64 model's loss keeps its precision."""
        return loss_type_weights(mask, **self._normalization(inputs, mode))

    def _normalization(self, inputs: dict[str, Any], mode: str) -> dict[str, Any]:
        return dict(
            loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            # transformers sets it inside the training loop only (evaluate() may come first); evaluation never
            # accumulates
            accumulation_steps=self.current_gradient_accumulation_steps if mode == "train" else 1.0,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation,
            training=mode == "train",
        )

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        return reduce_like_loss_type(per_token, mask, **self._normalization(inputs, mode))
