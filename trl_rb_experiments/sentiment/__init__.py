"""The sentiment-control task: the offline review LM (``review_lm``), rewards (``rewards``), prompt files
(``data``) and the training run behind ``python rloo_sentiment.py`` (``experiment``). Needs the ``sentiment`` extra
(``pip install trl-rb[sentiment]``: VADER)."""
