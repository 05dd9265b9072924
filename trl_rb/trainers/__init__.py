"""trl integration: trl-rb's GRPO, RLOO and distillation trainers and the machinery they share.

By concern: ``heads`` (LM heads as the sampler sees them, gathered under ZeRO-3 / FSDP2; hidden-state hooks),
``capture`` (recording trl's own scoring forwards; generation's position ids), ``token_kl`` (the exact per-token KL
from those recordings), ``fused_head`` (the rb loss's log-probs and K_n from one LM-head op inside trl's loss
forward), ``gamma`` (the control variate and its online fit), ``off_policy`` (capped prefix weights),
``reference`` (a user-chosen reference model, loaded like trl's; the config trl's ``__init__`` sees), ``metrics``
(``kl/k1``, ``kl/rb``), ``sampling`` (which generation settings keep the sampled distribution); ``grpo``, ``rloo``
and ``distillation`` (the drop-ins), ``patch`` (``patch_trl()``) and ``scripts`` / ``run_script`` (trl's CLI
scripts with these trainers). Public names are re-exported from ``trl_rb``.

How the trainers hook into trl 1.16: every override calls trl's method (``super()``) and works on what trl passes
and returns; what one call of an override carries between trl's inner calls is one object opened by that call
(``capture.Recording``, RLOO's ``ScoringPass``), never a flag or a coefficient toggled on the trainer.
``tests/trainers/test_trl_hooks.py`` pins, per override, the trl call order it relies on, and fails if trl's changes.

==========================================  ==================  ============================================================
override (class)                            replaces in trl     why
==========================================  ==================  ============================================================
``__init__`` (GRPO, RLOO)                   trainer ``__init__`` refusals (sampling, heads, configs) before trl builds
                                                                anything; with ``ref_model=`` trl gets a copy of the args
                                                                with beta 0 (``reference.args_for_trl``: it builds no
                                                                reference) and ours is installed after; GRPO ``k1``/``rb``:
                                                                the copy has ``use_bias_correction_kl=False``
``_get_per_token_logps_and_entropies``      the scoring and     scores at generation's position ids
(``capture.GenerationPositionsMixin``)      loss forward        (``cumsum(mask) - 1``; trl passes none: GPT-2 rows shift)
``_get_per_token_logps_and_entropies``      same                while a ``Recording`` is open, records the completion
(``capture.HiddenCaptureMixin``)                                hidden states of trl's own forward (no extra forward) and
                                                                applies the recording's ``rewrite`` to the log-probs
``_generate_and_score_completions`` (RLOO)  scoring             opens a ``Recording`` whose rewrite turns the reference's
                                                                log-probs into old - (per-token penalty), so that trl's own
                                                                reward penalty, gather and leave-one-out baseline use the
                                                                chosen estimator (gamma r + (beta - gamma) K for ``rb``);
                                                                carries the reference hidden states, gamma and the sampling
                                                                policy's scores in the batch dict; logs ``kl/*``
``_calculate_rewards`` (RLOO)               reward functions    notes in the open recording which rows a reward function
                                                                scored (trl zeroes the others' advantages)
``_compute_loss`` (RLOO ``rb``)             loss                trl's loss plus the analytic half of the RB gradient
                                                                (and the off-policy corrections), from trl's own forward
``_generate_and_score_completions`` (GRPO)  scoring             carries the reference hidden states and gamma in the batch
                                                                dict; ``k1``: the penalty in the advantages
``_compute_loss`` (GRPO)                    loss                ``k1``/``rb``: trl's loss minus the beta k3 term trl added
                                                                (the same expression of the same log-probs), plus the
                                                                chosen KL term; logs ``kl/*`` and gamma
``trl.trainer.utils._ChunkedLogProbFunction``  trl's fused        ``fused_head.fused_loss_head``: for one ``rb`` loss forward
(module attribute, swapped in a block)      log-prob head       only, a head that also returns K_n (trl has no hook there)
``compute_loss`` (distillation)             loss                ``kl_gradient='rb'``: trl's module function
                                                                ``_chunked_divergence_loss`` swapped for that call only
                                                                (no hook either); trl still runs its forward and gathers
``_get_train_sampler`` (distillation)        prompt sampler      each prompt drawn ``num_generations`` times in a row
``_prepare_inputs`` (distillation)          batch shuffling     rb-loo: trl's module function ``shuffle_sequence_dict``
                                                                swapped for one that keeps prompt groups whole
``_generate_and_score_completions``         scoring             the batch's sequence count and prompt groups, for the
(distillation)                                                  normalization and the leave-one-out baseline
==========================================  ==================  ============================================================
"""
