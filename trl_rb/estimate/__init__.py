"""``trl-rb estimate``: KL(policy || reference) between two language models with every estimator side by side
(``api``: ``estimate_kl``; ``cli``: the command). Its only tie to the sentiment experiment is the default reference
and prompts (the offline review LM)."""
