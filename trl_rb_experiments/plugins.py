"""What this package plugs into the ``trl-rb`` library, through entry points declared in pyproject.toml.

- ``trl_rb.commands``: the experiment's ``trl-rb`` subcommands. Each is a ``main(argv) -> int`` whose docstring's
  first line is its ``trl-rb --help`` line; the module behind it is imported only when the subcommand runs.
- ``trl_rb.estimate_defaults``: ``REVIEW_LM_DEFAULTS``, the default reference model and prompts of
  ``trl-rb estimate`` (the offline review LM and its held-out test prompts).

Light on purpose: ``trl-rb --help`` imports this module to list the subcommands.
"""

from __future__ import annotations

import sys
from typing import Any

from trl_rb.estimate.defaults import EstimateDefaults

__all__ = ["REVIEW_LM_DEFAULTS", "distill_study", "pareto", "prepare_imdb", "study", "sweep"]


def prepare_imdb(argv: list[str]) -> int:
    """turn a local IMDB copy into imdb-train.jsonl / imdb-test.jsonl prompt files"""
    from .sentiment.data import main

    return main(argv)


def sweep(argv: list[str]) -> int:
    """run methods x KL coefficients x seeds of the sentiment experiment, resumable"""
    from .studies.sweep import main

    return main(argv)


def pareto(argv: list[str]) -> int:
    """plot eval reward against eval KL for a folder of runs, with the frontier"""
    from .studies.pareto import main

    return main(argv)


def study(argv: list[str]) -> int:
    """the powered estimator study: sweep, gradient noise, report with intervals"""
    from .studies.study import main

    return main(argv)


def distill_study(argv: list[str]) -> int:
    """distil the review LM into a 1-layer student: trl's pathwise gradient against the RB gradient, over seeds"""
    from .studies.distillation_study import main

    return main(argv)


def _review_lm_reference(progress: bool) -> tuple[Any, Any, str]:
    from .sentiment.review_lm import load_review_lm, review_lm_path

    if not (review_lm_path() / "config.json").is_file():
        print(f"Building the offline review LM into {review_lm_path()} (first use, about a minute)...", file=sys.stderr)
    model, tokenizer = load_review_lm(progress=progress)
    return model, tokenizer, f"review LM ({review_lm_path()})"


def _review_test_prompts() -> list[str]:
    from .sentiment.review_lm import review_prompts

    return review_prompts("test")


REVIEW_LM_DEFAULTS = EstimateDefaults(
    description="the offline review LM of trl-rb's sentiment experiment, built on first use; prompts: its test prompts",
    load_reference=_review_lm_reference,
    load_prompts=_review_test_prompts,
    prompts_source="review_prompts('test')",
)
