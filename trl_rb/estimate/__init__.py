"""``trl-rb estimate``: KL(policy || reference) between two language models with every estimator side by side
(``api``: ``estimate_kl``; ``cli``: the command; ``defaults``: the default reference model and prompts, which another
installed package registers under the entry-point group ``trl_rb.estimate_defaults``: trl-rb's experiments register
the offline review LM)."""
