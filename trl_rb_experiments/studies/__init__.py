"""Studies over the sentiment task: ``trl-rb sweep`` (``sweep``), ``trl-rb pareto`` (``pareto``), ``trl-rb study``
(``study``, with the statistics in ``study_report``) and ``trl-rb distill-study`` (``distillation_study``: the review
LM distilled into a 1-layer student)."""
