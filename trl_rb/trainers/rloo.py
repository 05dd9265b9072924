"""RLOO with a choice of KL estimator in the reward penalty, the Rao-Blackwellized one by default: drop-ins for trl's.

``trl_rb.RLOOConfig`` / ``trl_rb.RLOOTrainer`` subclass ``trl.RLOOConfig`` / ``trl.RLOOTrainer`` (trl 1.16) and add
``kl_estimator`` (``k1``, ``k3``, ``rb``). How the trainer hooks into trl (docs/estimators.md, "Inside the trainers"):

- Scoring. trl computes the policy's per-token log-probs, then the reference's, with
  ``_get_per_token_logps_and_entropies``, and penalizes each reward with beta * sum_n (old_n - ref_n). While trl
  scores, both calls also record the last hidden states of the completion positions (a forward hook; no extra
  forward). The reference call then returns ``old - (a r + (1 - a) K)`` (``rb``, a = gamma / beta, see
  ``gamma``) or ``old - k3(old - ref)`` (``k3``) instead of its log-probs, so that trl's own code puts
  gamma * sum_n r_n + (beta - gamma) * sum_n K_n (resp. beta times the k3 sum) in the reward, gathers it across
  processes and takes its leave-one-out baseline. gamma is fixed before the batch is scored (``rb_gamma``, or the
  online fit over earlier batches), travels with the batch (``gamma.GAMMA_KEY``), and the batch then joins the fit.
  K_n = KL(p_n || q_n) comes from ``linear_token_kl`` on the hidden states and LM heads, at the sampling
  temperature: no [B, T, V] logits.
- Loss (``rb``). The detached penalty gives the score-function half of the gradient only; the loss also gets
  (beta - gamma) * mean_over_sequences(sum_n K_n) with gradient through the policy (hidden states and LM-head
  weight), averaged like trl's per-sequence loss. K_n there uses the policy's hidden states from trl's own loss forward and the
  reference's completion hidden states carried from scoring in the batch dict.

Cost. Forward passes are trl's in every mode: per generation batch the policy runs once without gradients for
scoring and once per iteration (``num_iterations``) with gradients for the loss; the reference runs once. Nothing
runs a backbone a second time. The extra work is in LM-head products of shape [tokens, H] x [H, V]: every mode
(``k1`` too, for the ``kl/rb`` metric) spends two while scoring (the policy's and the reference's logits, recomputed
chunk by chunk from the recorded hidden states). In the ``rb`` loss, trl's own log-prob head is replaced for that
forward by one that also returns K_n (``fused_head``): two more products than trl's four (the reference's logits,
in the forward and again in the backward), the policy's logits and its two gradient products being shared. Where the
heads are sharded (ZeRO-3, FSDP2), K_n is computed after trl's forward instead (``weighted_kl_sum_from_hidden``:
four more products, all in the forward), with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model

from ..kl import canonical_estimator, future_sum
from .capture import REF_HIDDEN_KEY, GenerationPositionsMixin, HiddenCaptureMixin, ScoredCall
from .fused_head import fused_loss_head, loss_head_for, weighted_sum
from .gamma import (
    GAMMA_HELP,
    GAMMA_KEY,
    GammaFit,
    check_gamma_settings,
    gamma_metrics,
    leave_one_out_centred,
    score_norm_proxy,
)
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

__all__ = ["RLOOConfig", "RLOOTrainer"]

# Keys in the batch dict of an rb run: the [B] indicator (1 = some reward function scored the completion) and, when
# batches are reused after optimizer steps, the sampling policy's per-token log-probs and exact KL [B, C].
SCORABLE_KEY = "rb_scorable"
OLD_TOKEN_LOGPS_KEY = "rb_old_per_token_logps"
OLD_TOKEN_KL_KEY = "rb_old_token_kl"

_ESTIMATORS = ("k1", "k3", "rb")


@dataclass
class ScoringPass:
    """What one scoring of a generation batch (one ``_generate_and_score_completions``) carries between trl's calls.

    Attributes:
        gamma: the batch's gamma (``rb``; fixed before the batch is drawn), 0 otherwise.
        policy: trl's first scoring call, the policy's (set when it runs).
        metrics: ``kl/k1`` and ``kl/rb`` per sequence [B], set at the reference's call.
        token_kl: [B, C] K_n of the sampled prefixes (when the ``kl/rb`` metric is computed), set at the same time.
    """

    gamma: float
    policy: ScoredCall | None = None
    metrics: dict[str, torch.Tensor] | None = None
    token_kl: torch.Tensor | None = None


@dataclass
class RLOOConfig(trl.RLOOConfig):
    r"""
    Configuration class for [`trl_rb.RLOOTrainer`]: every field of [`trl.RLOOConfig`], plus the choice of KL estimator
    in the reward penalty.

    Parameters:
        > Parameters that control the KL penalty (in addition to `beta`, the KL coefficient, from trl)

        kl_estimator (`str`, *optional*, defaults to `"rb"`):
            Per-sequence estimate of KL(policy || reference) subtracted, times `beta`, from each reward. One of
            `"k1"` (alias `"mc"`): sum of the sampled log ratios, trl's behaviour; `"k3"`: sum of
            exp(-r) - 1 + r per token (Schulman's estimator, >= 0); `"rb"` (alias `"full"`): sum of the exact KL of
            the next-token distributions at every step (Rao-Blackwellized: unbiased, >= 0, and in practice far
            lower variance than `"k1"`, though not provably so for a whole sequence). With `"rb"` the penalty is
            gamma * sum r + (beta - gamma) * sum K (`rb_gamma`: fitted online by default; 0 gives the plain RB
            penalty) and the loss also gets (beta - gamma) times the mean per-sequence RB KL with gradient through
            the policy, which makes the total gradient an unbiased gradient of E[reward] - beta * KL for any gamma
            fixed before the batch: the logged `kl/rb` is the plain RB value whatever gamma.
            Case-insensitive. `"rb"` needs untruncated sampling at `temperature` (any generation setting that
            changes the next-token distribution is refused, see `trl_rb.trainers.sampling`). Batches reused after an
            optimizer step (`num_iterations > 1`, `steps_per_generation > gradient_accumulation_steps`) get
            importance-weighted RB terms: with W_{<n} = p(y_<n) / p_old(y_<n), the analytic term becomes
            beta * sum_n sg(W_{<n}) K_n and a score-function correction sum_n (l_n - sg l_n) *
            sg(sum_{m>n} W_{<m} (K_m - K_m^old)) replaces the sampling policy's K in trl's ratio-weighted penalty by
            the current one: unbiased at unclipped ratios (trl's clipping of the sequence ratio, `epsilon`, biases the
            penalty's half as it biases the reward's) and uncapped weights (see `rb_prefix_weight_cap`).
        rb_gamma (`float` or `None`, *optional*, defaults to `None`):
            Coefficient of the control variate gamma * (sum_n grad K_n - (sum_n r_n - sum_n K_n) * S) that `"rb"` adds
            to its gradient (S the completion's score; unbiased for any gamma fixed before the batch is drawn, see
            `trl_rb.trainers.gamma`). `None`: fitted online, the ||S||^2-weighted least-squares slope of the advantage
            on sum r - sum K over earlier generation batches (an exponential moving average; MC's gamma = beta until
            there are statistics). A number fixes it: 0 is the plain RB gradient, `beta` is MC.
        rb_gamma_decay (`float`, *optional*, defaults to `0.9`):
            Weight of the earlier batches' statistics at each update of the online fit (0: the last batch only).
        rb_prefix_weight_cap (`float` or `None`, *optional*, defaults to `3.0`):
            Upper bound C on the prefix importance weights W_{<n} of the RB terms on reused batches: min(W, C),
            truncated importance sampling as in trl's vLLM correction (same default). It keeps the step finite (an
            uncapped W overflows float32 on long, far off-policy completions) and biases it where the current policy
            makes a prefix more than C times as likely as the sampling policy did (such prefixes are under-weighted).
            With `rb_gamma` != 0 the control variate's whole-completion weight is truncated too, which biases its term
            more where the cap binds. `None`: no cap, unbiased; a weight beyond float range then raises a `ValueError`.
            Under vLLM, trl's RLOO requests no log-probs from vLLM, so its samples count as the policy's (as in trl).
        rb_kl_metric (`bool`, *optional*, defaults to `True`):
            Whether `k1` and `k3` runs also log `kl/rb` (the exact per-token KL summed per sequence). It costs two
            LM-head products per generation batch; `rb` runs always log it. Where the heads cannot give it (no linear
            LM head), it is skipped with one warning.
        stepwise (`bool` or `None`, *optional*, defaults to `None`):
            The research code's switch, kept for its users: `True` means `kl_estimator="rb"`, `False` means
            `kl_estimator="k1"`. Setting it together with a `kl_estimator` that says otherwise is an error.
    """

    kl_estimator: str | None = field(
        default=None,
        metadata={
            "help": "KL estimator in the reward penalty (case-insensitive): 'rb' (alias 'full', default): exact "
            "per-step KL of the next-token distributions, Rao-Blackwellized, with its analytic gradient added to the "
            "loss; 'k1' (alias 'mc'): sampled log ratio, trl's behaviour; 'k3': exp(-r) - 1 + r per token.",
        },
    )
    rb_kl_metric: bool = field(
        default=True,
        metadata={"help": "Whether k1/k3 runs also log kl/rb (costs two LM-head products per generation batch)."},
    )
    rb_prefix_weight_cap: float | None = field(default=DEFAULT_PREFIX_WEIGHT_CAP, metadata={"help": PREFIX_WEIGHT_CAP_HELP})
    rb_gamma: float | None = field(default=None, metadata={"help": GAMMA_HELP})
    rb_gamma_decay: float = field(
        default=0.9,
        metadata={"help": "Weight of earlier generation batches' statistics in the online fit of rb_gamma (0: last only)."},
    )
    stepwise: bool | None = field(
        default=None,
        metadata={
            "help": "Research-code switch: True means kl_estimator='rb', False means kl_estimator='k1'. Contradicting "
            "an explicitly set kl_estimator is an error.",
        },
    )

    def __post_init__(self):
        # None means "not set": it lets a stepwise flag decide and contradictions be caught; it resolves to "rb".
        explicit = None if self.kl_estimator is None else canonical_estimator(self.kl_estimator, allowed=_ESTIMATORS)
        if isinstance(self.stepwise, str):  # a raw string from a config file
            self.stepwise = {"true": True, "false": False}.get(self.stepwise.lower(), self.stepwise)
        if self.stepwise is not None and not isinstance(self.stepwise, bool):
            raise ValueError(f"stepwise must be True, False or None, got {self.stepwise!r}.")
        implied = None if self.stepwise is None else ("rb" if self.stepwise else "k1")
        if explicit is not None and implied is not None and explicit != implied:
            raise ValueError(
                f"stepwise={self.stepwise} means kl_estimator={implied!r}, but kl_estimator={self.kl_estimator!r} was "
                "also given. Set only one of them (stepwise is the research code's name for 'rb' vs 'k1')."
            )
        self.kl_estimator = explicit or implied or "rb"
        check_prefix_weight_cap(self.rb_prefix_weight_cap)
        check_gamma_settings(self.rb_gamma, self.rb_gamma_decay)
        super().__post_init__()


class RLOOTrainer(HiddenCaptureMixin, GenerationPositionsMixin, trl.RLOOTrainer):
    """``trl.RLOOTrainer`` with the KL estimator chosen by ``args.kl_estimator`` (see [`RLOOConfig`]).

    Same constructor as trl's, plus ``ref_model``: a path or a model to regularize toward instead of the policy's
    starting point. It must share the policy's tokenizer; it gets trl's fused LM head at ``args.temperature`` and is
    prepared like trl's own reference (DeepSpeed / FSDP / accelerate evaluation mode); trl then builds no copy of the
    starting model. Without it the
    reference is trl's: a copy of the starting model, or, for a PEFT policy, the base model with adapters disabled.

    ``args`` may be a plain ``trl.RLOOConfig``; it then gets the default estimator ``rb``.

    Metrics, logged at every scoring (train and eval; like trl's reward metrics, once per generation batch when
    ``num_iterations`` or ``steps_per_generation`` > 1) in every mode, on the same samples, gathered across processes:
    ``kl/k1`` and ``kl/rb``, the mean over sequences of sum_n r_n and of sum_n K_n. trl's own ``kl`` metric is the
    per-token mean of the estimator in use.

    With ``beta == 0`` trl loads no reference and computes no KL, and no KL metric is logged (passing ``ref_model``
    with ``beta == 0`` is an error): every mode then trains like trl, except that models with absolute position
    embeddings (GPT-2) are scored at the positions generation used (``cumsum(attention_mask) - 1``; trl 1.16 passes
    none, which shifts left-padded rows).
    """

    _tag_names = [*trl.RLOOTrainer._tag_names, "trl-rb"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: trl.RLOOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        ref_model: str | torch.nn.Module | None = None,
    ):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = RLOOConfig(f"{name.split('/')[-1]}-RLOO")
        self.kl_estimator = canonical_estimator(getattr(args, "kl_estimator", None) or "rb", allowed=_ESTIMATORS)
        if ref_model is not None and args.beta == 0.0:
            raise ValueError("ref_model was given but beta=0.0, so no KL is computed; set beta > 0 or drop ref_model.")
        if ref_model is not None and args.sync_ref_model:
            raise ValueError(
                "ref_model and sync_ref_model=True contradict each other: syncing would overwrite the chosen reference "
                "with the policy. Use one of them."
            )
        if args.beta != 0.0:
            check_rb_sampling(args, self.kl_estimator)
        if self.kl_estimator == "rb" and args.beta != 0.0 and args.normalize_advantages:
            raise ValueError(
                "kl_estimator='rb' with normalize_advantages=True would divide the score-function half of the RB "
                "gradient (the KL penalty inside the advantages) by the advantages' standard deviation but not its "
                "analytic half, so the two would no longer add up to the KL gradient. Set normalize_advantages=False, "
                "or use kl_estimator='k1'."
            )
        # batches trained on after an optimizer step, i.e. sampled by an earlier policy
        self._reuses_batches = args.num_iterations > 1 or (
            (args.steps_per_generation or args.gradient_accumulation_steps) > args.gradient_accumulation_steps
        )
        init = dict(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if ref_model is None:
            super().__init__(**init)
        else:
            # trl builds no copy of the starting model (it could not for an in-memory policy); ours replaces it.
            super().__init__(**{**init, "args": args_for_trl(args, self.kl_estimator, beta=0.0)})
            self.beta = self.args.beta = args.beta
            loaded = load_reference_model(
                ref_model,
                policy=self.model,
                args=args,
                processing_class=self.processing_class,
                quantization_config=quantization_config,
            )
            self.ref_model = prepare_reference_model(self, loaded)
        if self.beta != 0.0:  # the checkpoint's generation config, known once trl has loaded the model
            check_rb_generation_config_of(self, self.kl_estimator)
        self._rb_policy_adapter = trained_adapter(self)  # named now: trl's reference forward switches adapters
        self._rb_metric = logs_rb_metric(self, self.kl_estimator)
        gamma = getattr(args, "rb_gamma", None)
        # the online fit starts at MC (gamma = beta), trl's own estimator, until earlier batches give a slope
        self._gamma_fit = GammaFit(prior=self.beta, decay=getattr(args, "rb_gamma_decay", 0.9), beta=self.beta)
        self._fixed_gamma = None if gamma is None else float(gamma)

    # ---------------------------------------------------------------------------------------------------------------
    # Scoring: the reference call's log-probs become old - (per-token estimate), so trl's penalty is the estimate.
    # ---------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if self.beta == 0.0:
            return super()._generate_and_score_completions(inputs)
        # rb: gamma is fixed before the batch is drawn, so it never depends on the batch's samples
        gamma = 0.0
        if self.kl_estimator == "rb":
            gamma = self._fixed_gamma if self._fixed_gamma is not None else self._gamma_fit.next_gamma()
        scoring = ScoringPass(gamma=gamma)
        with self._rb_recording(rewrite=partial(self._penalty_as_reference_logps, scoring)) as recording:
            output = super()._generate_and_score_completions(inputs)
        calls = recording.calls
        if len(calls) != 2 or scoring.metrics is None or SCORABLE_KEY not in recording.notes:
            raise RuntimeError(
                f"Expected trl to score the policy and then the reference (2 calls, saw {len(calls)}) and to compute "
                "the rewards; this trl version scores differently from the one trl_rb was written for (1.16)."
            )
        mode = "train" if self.model.training else "eval"
        log_sequence_metrics(self, mode, scoring.metrics)
        if self.kl_estimator == "rb":
            output[REF_HIDDEN_KEY] = calls[1].hidden.detach()
            if self._reuses_batches:  # what the sampling policy scored, for the importance-weighted RB terms
                output[OLD_TOKEN_LOGPS_KEY] = calls[0].logps.detach()
                output[OLD_TOKEN_KL_KEY] = scoring.token_kl
            # trl zeroes the advantage of completions no reward function scored, so their KL penalty (in the
            # reward) never acts; the analytic half of the RB gradient skips them too, as the two halves must match.
            scorable = recording.notes[SCORABLE_KEY]
            n = output["completion_mask"].shape[0]
            start = self.accelerator.process_index * n
            output[SCORABLE_KEY] = scorable[start : start + n].to(output["completion_mask"].dtype)
            self._fit_gamma(output, calls, scoring, scorable, mode)
        return output

    def _fit_gamma(
        self, output: dict[str, Any], calls: list[ScoredCall], scoring: ScoringPass, scorable: torch.Tensor, mode: str
    ) -> None:
        """Carry the batch's gamma in ``output``; log it; in training, add the batch to the online fit.

        trl's advantage is A = LOO(R - beta sum K - gamma d) (leave-one-out within each prompt's group), so the
        coefficient of S without the gamma term is y = A + gamma LOO(d), regressed on LOO(d), weighted by the
        ||S||^2 proxy; unscorable completions (no reward, advantage 0) weigh nothing."""
        gamma = scoring.gamma
        mask = output["completion_mask"]
        r = (calls[0].logps - calls[1].logps).float()
        d_local = masked_sequence_sum(r - scoring.token_kl.float(), mask)
        local = torch.stack([d_local, score_norm_proxy(calls[0].logps, mask), output["advantages"].float()], dim=1)
        d, w, advantages = self.accelerator.gather(local).unbind(1)
        group = self.num_generations if mode == "train" else self.num_generations_eval
        d_loo = leave_one_out_centred(d, group)
        y = advantages + gamma * d_loo
        w = w * scorable.to(w.dtype)
        for key, value in gamma_metrics(gamma, self.beta, y, d_loo, w).items():
            self._metrics[mode][key].append(value)
        if mode == "train" and self._fixed_gamma is None:
            self._gamma_fit.add(y, d_loo, w)
        output[GAMMA_KEY] = torch.full((mask.shape[0],), gamma, dtype=torch.float32, device=mask.device)

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)  # [all processes' B, reward functions]
        if self._rb_open is not None:  # inside a scoring pass: note which rows some reward function scored
            self._rb_open.notes[SCORABLE_KEY] = ~torch.isnan(rewards_per_func).all(dim=1)  # trl's own test
        return rewards_per_func

    def _penalty_as_reference_logps(self, scoring: ScoringPass, call: ScoredCall, logps: torch.Tensor) -> torch.Tensor:
        """The recording's rewrite while scoring: the policy's call passes unchanged; the reference's call returns
        old - e (e the per-token penalty of the chosen estimator), so that trl's own old - ref is e."""
        self._check_scoring_call(call)
        if call.index == 0:
            scoring.policy = call
            return logps
        policy = scoring.policy
        mask = call.completion_mask.bool()
        r = torch.where(mask, policy.logps - logps, torch.zeros((), dtype=logps.dtype, device=logps.device))
        scoring.metrics = {"kl/k1": masked_sequence_sum(r, mask)}
        if self._rb_metric:
            with torch.no_grad():
                k = token_kl_from_hidden(
                    policy.hidden,
                    policy_head(self, policy.model),
                    call.hidden,
                    reference_head(self),
                    temperature=self.temperature,
                    mask=mask,
                )
            scoring.metrics["kl/rb"] = masked_sequence_sum(k, mask)
            scoring.token_kl = k
        if self.kl_estimator == "rb":
            # the gamma family: penalty gamma * r_n + (beta - gamma) * K_n per token, per unit of beta
            alpha = scoring.gamma / self.beta
            per_token = (alpha * r + (1.0 - alpha) * k).to(logps.dtype)
        elif self.kl_estimator == "k3":
            per_token = k3_per_token(r)
        else:
            return logps
        # trl computes old - ref; with ref = old - e it gets e (exactly 0 on padding, which it masks anyway).
        return policy.logps - per_token

    def _check_scoring_call(self, call: ScoredCall) -> None:
        """The first scoring call is the policy's, the second the reference's: verify, don't assume."""
        if call.index == 0:
            ok = call.model is self.model
        elif call.index == 1:
            if self.ref_model is not None:
                ok = call.model is self.ref_model
            else:
                ok = call.model is self.model and is_peft_model(self.accelerator.unwrap_model(self.model))
        else:
            ok = False
        if not ok:
            raise RuntimeError(
                f"Unexpected scoring call #{call.index} on {type(call.model).__name__}: trl_rb expects trl 1.16's "
                "order (policy, then the reference model or the PEFT model with adapters disabled)."
            )

    # ---------------------------------------------------------------------------------------------------------------
    # Loss: the analytic half of the RB gradient, beta * mean_i sum_n K_n with gradient through the policy.
    # ---------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self.kl_estimator != "rb" or self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        if REF_HIDDEN_KEY not in inputs:
            raise RuntimeError(f"The batch lacks {REF_HIDDEN_KEY!r}: it was not scored by trl_rb.RLOOTrainer.")
        fused = loss_head_for(self, model, inputs)
        with self._rb_recording() as recording, fused_loss_head(fused):
            loss = super()._compute_loss(model, inputs)
        calls = recording.calls
        if len(calls) != 1:
            raise RuntimeError(f"Expected one policy forward in trl's loss, saw {len(calls)}.")
        mask = inputs["completion_mask"]
        gamma = float(inputs[GAMMA_KEY][0]) if GAMMA_KEY in inputs else 0.0
        # trl's policy-gradient loss is per_sequence_loss.mean(): the same mean over this batch's sequences, so each
        # real token's K_n has weight (beta - gamma) / B (0 in completions no reward function scored, see scoring):
        # trl's reward holds gamma * r_n + (beta - gamma) * K_n, and only K_n's analytic gradient is missing.
        scorable = inputs[SCORABLE_KEY].to(torch.float32).unsqueeze(1)
        weights = mask.to(torch.float32) * scorable / mask.shape[0]
        logps = calls[0].logps  # l_n with gradient, from trl's own loss forward
        old = inputs.get(OLD_TOKEN_LOGPS_KEY)
        # A batch sampled by an earlier policy (num_iterations > 1, steps_per_generation > accumulation): the prefixes
        # are re-weighted by W_{<n} = p(y_<n) / p_old(y_<n); on-policy W = 1.
        prefix = sampler_prefix_weights(self.args, logps, old, mask)
        kl_weights = weights if prefix is None else weights * prefix
        if fused is not None and fused.token_kl is not None:  # K_n from trl's loss forward, fused with its log-probs
            kl_term, kl_now = weighted_sum(kl_weights, fused.token_kl)
        else:
            kl_term, kl_now = weighted_kl_sum_from_hidden(
                calls[0].hidden,
                policy_head(self, model),
                inputs[REF_HIDDEN_KEY],
                reference_head(self),
                kl_weights,
                temperature=self.temperature,
                return_token_kl=True,
            )
        loss = loss + ((self.beta - gamma) * kl_term).to(loss.dtype)
        if prefix is None:
            return loss
        # trl's ratio-weighted penalty differentiates the sampling policy's r_n and K_n (scored then); the
        # score-function half needs the current ones: add sum_n (l_n - sg l_n) * sg(stale_n), 0 at ratio 1, with
        # stale_n = (beta - gamma) sum_{m>n} W_{<m} (K_m - K_m^old) + gamma sum_{m>=n} W_{<=m} (r_m - r_m^old)
        # (K_m depends on the tokens before m, r_m on those up to m; r_m - r_m^old = l_m - l_m^old).
        stale = (self.beta - gamma) * future_sum(prefix * (kl_now - inputs[OLD_TOKEN_KL_KEY]))
        if gamma != 0.0:
            drift = torch.where(mask.bool(), logps.detach() - old, torch.zeros((), dtype=old.dtype, device=old.device))
            through = sampler_prefix_weights(self.args, logps, old, mask, inclusive=True) * drift
            stale = stale + gamma * (future_sum(through) + through)
        correction = (weights * (logps - logps.detach()) * stale).sum()
        return loss + correction.to(loss.dtype)
