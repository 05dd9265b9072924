"""``trl-rb grpo`` / ``rloo`` / ``distill``: trl's own ``trl grpo`` / ``rloo`` / ``distillation`` scripts, run with
trl-rb's trainers.

The command lines are trl 1.16's (``trl/scripts/grpo.py``, ``rloo.py``, ``distillation.py``: ``ScriptArguments``,
``ModelConfig``, ``DatasetMixtureConfig``, ``--config recipe.yaml``, ``--reward_funcs`` by name or import path,
``--reward_model_name_or_path``, ``--teacher_model_name_or_path``, ``--use_peft`` and the ``--lora_*`` flags, local
folders for ``--model_name_or_path`` and ``--dataset_name``), plus trl-rb's config fields (``--kl_estimator``,
``--stepwise`` for RLOO, ``--kl_gradient`` for distillation). Nothing of the scripts is copied: ``trl_rb.patch_trl()``
makes the ``from trl import GRPOConfig, GRPOTrainer`` inside them resolve to trl-rb's classes, then trl's
``make_parser`` and ``main`` run as they are.
"""

from __future__ import annotations

import importlib
import sys

from .patch import patch_trl

SCRIPTS = ("grpo", "rloo", "distillation")


def run(name: str, argv: list[str], command: str | None = None) -> int:
    """Parse ``argv`` with trl's parser for script ``name`` (with trl-rb's config) and run trl's ``main``; ``command``
    is the ``trl-rb`` subcommand shown in messages (default: ``name``)."""
    command = command or name
    if name not in SCRIPTS:
        raise ValueError(f"Unknown trl script {name!r}; trl-rb wraps {', '.join(SCRIPTS)}.")
    patch_trl()
    script = importlib.import_module(f"trl.scripts.{name}")
    parser = script.make_parser(prog=f"trl-rb {command}")
    try:
        parsed = parser.parse_args_and_config(args=argv, fail_with_unknown_args=False)
    except ValueError as err:  # trl_rb's config refusals (a contradictory kl_estimator / stepwise / kl_gradient, ...)
        print(f"trl-rb {command}: {err}", file=sys.stderr)
        return 2
    script.main(*parsed)
    return 0


def grpo_main(argv: list[str]) -> int:
    return run("grpo", argv)


def rloo_main(argv: list[str]) -> int:
    return run("rloo", argv)


def distill_main(argv: list[str]) -> int:
    return run("distillation", argv, command="distill")
