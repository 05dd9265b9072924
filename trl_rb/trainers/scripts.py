"""``trl-rb grpo`` / ``trl-rb rloo``: trl's own ``trl grpo`` / ``trl rloo`` scripts, run with trl-rb's trainers.

The command lines are trl 1.16's (``trl/scripts/grpo.py``, ``rloo.py``: ``ScriptArguments``, ``ModelConfig``,
``DatasetMixtureConfig``, ``--config recipe.yaml``, ``--reward_funcs`` by name or import path,
``--reward_model_name_or_path``, ``--use_peft`` and the ``--lora_*`` flags, local folders for ``--model_name_or_path``
and ``--dataset_name``), plus trl-rb's config fields (``--kl_estimator``, and ``--stepwise`` for RLOO). Nothing of the
scripts is copied: ``trl_rb.patch_trl()`` makes the ``from trl import GRPOConfig, GRPOTrainer`` inside them resolve
to trl-rb's classes, then trl's ``make_parser`` and ``main`` run as they are.
"""

from __future__ import annotations

import importlib
import sys

from .patch import patch_trl

SCRIPTS = ("grpo", "rloo")


def run(name: str, argv: list[str]) -> int:
    """Parse ``argv`` with trl's parser for script ``name`` (with trl-rb's config) and run trl's ``main``."""
    if name not in SCRIPTS:
        raise ValueError(f"Unknown trl script {name!r}; trl-rb wraps {', '.join(SCRIPTS)}.")
    patch_trl()
    script = importlib.import_module(f"trl.scripts.{name}")
    parser = script.make_parser(prog=f"trl-rb {name}")
    try:
        parsed = parser.parse_args_and_config(args=argv, fail_with_unknown_args=False)
    except ValueError as err:  # trl_rb's config refusals (a contradictory kl_estimator / stepwise, ...)
        print(f"trl-rb {name}: {err}", file=sys.stderr)
        return 2
    script.main(*parsed)
    return 0


def grpo_main(argv: list[str]) -> int:
    return run("grpo", argv)


def rloo_main(argv: list[str]) -> int:
    return run("rloo", argv)
