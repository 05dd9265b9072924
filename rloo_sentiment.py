"""Sentiment control with RLOO (or GRPO) and the MC or Rao-Blackwellized KL: the research code's experiment.

    python rloo_sentiment.py --method RB                      # offline default: review LM, VADER reward
    python rloo_sentiment.py --init_kl_coef 0.05 --method RB --seed 0 --filepath /data --filename imdb \\
        --config configs/sentiment_gpt2_imdb.yaml             # the paper's setup (needs the lvwerra models)

Every trl_rb.RLOOConfig field is a flag too (trl's parser conventions). See trl_rb_experiments/sentiment/experiment.py.
"""

import sys

from trl_rb_experiments.sentiment.experiment import main

if __name__ == "__main__":
    sys.exit(main())
