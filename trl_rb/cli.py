"""The ``trl-rb`` command: one subcommand per tool, each implemented in its own module.

Every subcommand names a ``module`` whose ``main(argv: list[str]) -> int`` runs it (or ``module:function``); exit code 2 means bad input (with a message on
stderr naming the problem and the fix), as argparse does.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "grpo": ("trl_rb.trainers.scripts:grpo_main", "trl's `trl grpo` script and flags, with trl-rb's GRPOTrainer"),
    "rloo": ("trl_rb.trainers.scripts:rloo_main", "trl's `trl rloo` script and flags, with trl-rb's RLOOTrainer"),
    "distill": (
        "trl_rb.trainers.scripts:distill_main",
        "trl's `trl distillation` script and flags, with trl-rb's DistillationTrainer (--kl_gradient rb|pathwise)",
    ),
    "estimate": ("trl_rb.estimate.cli", "KL(p || q) between two language models with every estimator, side by side"),
    "prepare-imdb": ("trl_rb.sentiment.data", "turn a local IMDB copy into imdb-train.jsonl / imdb-test.jsonl prompt files"),
    "sweep": ("trl_rb.sentiment.sweep", "run methods x KL coefficients x seeds of the sentiment experiment, resumable"),
    "pareto": ("trl_rb.sentiment.pareto", "plot eval reward against eval KL for a folder of runs, with the frontier"),
    "study": ("trl_rb.sentiment.study", "the powered estimator study: sweep, gradient noise, report with intervals"),
    "distill-study": (
        "trl_rb.sentiment.distillation_study",
        "distil the review LM into a 1-layer student: trl's pathwise gradient against the RB gradient, over seeds",
    ),
    "run": ("trl_rb.trainers.run_script", "run an unmodified trl script with trl-rb's trainers (trl_rb.patch_trl() first)"),
}


def _usage() -> str:
    lines = ["usage: trl-rb {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<14}{text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"trl-rb: unknown subcommand {name!r}.\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
