"""The sentiment-control experiment: the offline review LM, rewards, prompt data, the training script
(``experiment``: ``python rloo_sentiment.py``), sweeps and the Pareto analysis. Needs the ``sentiment`` extra
(``pip install trl-rb[sentiment]``: VADER)."""
