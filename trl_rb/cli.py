"""The ``trl-rb`` command: one subcommand per tool, each implemented in its own module.

Every built-in subcommand names a ``module`` whose ``main(argv: list[str]) -> int`` runs it (or ``module:function``);
exit code 2 means bad input (with a message on stderr naming the problem and the fix), as argparse does.

Other installed packages add subcommands under the entry-point group ``trl_rb.commands``: each entry point's name is
the subcommand and its object a ``main(argv: list[str]) -> int`` whose docstring's first line is the help line.
trl-rb's experiments package adds ``prepare-imdb``, ``sweep``, ``pareto``, ``study`` and ``distill-study`` so::

    [project.entry-points."trl_rb.commands"]
    sweep = "trl_rb_experiments.plugins:sweep"

A built-in name cannot be taken by a plug-in. The library never imports a plug-in except to run or list it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "trl_rb.commands"

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "grpo": ("trl_rb.trainers.scripts:grpo_main", "trl's `trl grpo` script and flags, with trl-rb's GRPOTrainer"),
    "rloo": ("trl_rb.trainers.scripts:rloo_main", "trl's `trl rloo` script and flags, with trl-rb's RLOOTrainer"),
    "distill": (
        "trl_rb.trainers.scripts:distill_main",
        "trl's `trl distillation` script and flags, with trl-rb's DistillationTrainer (--kl_gradient rb|pathwise)",
    ),
    "estimate": ("trl_rb.estimate.cli", "KL(p || q) between two language models with every estimator, side by side"),
    "run": ("trl_rb.trainers.run_script", "run an unmodified trl script with trl-rb's trainers (trl_rb.patch_trl() first)"),
}


def plugin_commands() -> dict[str, EntryPoint]:
    """Subcommands registered under ``trl_rb.commands`` by installed packages (name -> entry point), in the order
    the packages declare them, less any that would shadow a built-in."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in SUBCOMMANDS:
            found.setdefault(ep.name, ep)
    return found


def _plugin_help(ep: EntryPoint) -> str:
    try:
        doc = getattr(ep.load(), "__doc__", None) or ""
    except Exception as err:  # one broken plug-in does not break the listing
        return f"(from {ep.value}; cannot be loaded: {type(err).__name__}: {err})"
    return doc.strip().splitlines()[0] if doc.strip() else f"(from {ep.value})"


def _usage() -> str:
    plugins = plugin_commands()
    entries = [(name, text) for name, (_, text) in SUBCOMMANDS.items()]
    entries += [(name, _plugin_help(ep)) for name, ep in plugins.items()]
    lines = ["usage: trl-rb {" + ",".join([*SUBCOMMANDS, *plugins]) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<14}{text}" for name, text in entries]
    return "\n".join(lines)


def _entry(name: str) -> Callable[[list[str]], int] | None:
    if name in SUBCOMMANDS:
        module_name, _, function = SUBCOMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module_name), function or "main")
    ep = plugin_commands().get(name)
    return None if ep is None else ep.load()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    entry = _entry(name)
    if entry is None:
        print(f"trl-rb: unknown subcommand {name!r}.\n{_usage()}", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
