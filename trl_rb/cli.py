"""The ``trl-rb`` command: one subcommand per tool, each implemented in its own module.

Every subcommand module exposes ``main(argv: list[str]) -> int``; exit code 2 means bad input (with a message on
stderr naming the problem and the fix), as argparse does.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("trl_rb.estimate_cli", "KL(p || q) between two language models with every estimator, side by side"),
    "prepare-imdb": ("trl_rb.data", "turn a local IMDB copy into imdb-train.jsonl / imdb-test.jsonl prompt files"),
    "sweep": ("trl_rb.sweep", "run methods x KL coefficients x seeds of the sentiment experiment, resumable"),
    "pareto": ("trl_rb.pareto", "plot eval reward against eval KL for a folder of runs, with the frontier"),
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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
