"""trl integration: trl-rb's GRPO and RLOO trainers and the machinery they share.

By concern: ``heads`` (LM heads as the sampler sees them, gathered under ZeRO-3 / FSDP2; hidden-state hooks),
``capture`` (recording trl's own scoring forwards), ``token_kl`` (the exact per-token KL from those recordings),
``fused_head`` (the rb loss's log-probs and K_n from one LM-head op inside trl's loss forward),
``reference`` (a user-chosen reference model, loaded like trl's), ``metrics`` (``kl/k1``, ``kl/rb``), ``sampling``
(which generation settings keep the sampled distribution); ``grpo`` and ``rloo`` (the drop-ins), ``patch``
(``patch_trl()``) and ``scripts`` / ``run_script`` (trl's CLI scripts with these trainers). Public names are
re-exported from ``trl_rb``.
"""
