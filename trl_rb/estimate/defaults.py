"""The default reference model and prompts of ``trl-rb estimate``, supplied by another installed package.

Without ``--reference`` (and with no adapter base or run folder to name one), or without ``--prompts`` and
``--dataset``, ``trl-rb estimate`` uses the ``EstimateDefaults`` object registered under the entry-point group
``trl_rb.estimate_defaults``; trl-rb's experiments package registers the offline review LM of its sentiment task
and that task's test prompts::

    [project.entry-points."trl_rb.estimate_defaults"]
    review-lm = "trl_rb_experiments.plugins:REVIEW_LM_DEFAULTS"

With nothing registered those flags are required. The library never imports the package that registers them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "DefaultsError", "EstimateDefaults", "registered_defaults"]

ENTRY_POINT_GROUP = "trl_rb.estimate_defaults"


@dataclass(frozen=True)
class EstimateDefaults:
    """What ``trl-rb estimate`` uses when no reference model or no prompts are given.

    Args:
        description (`str`): one line naming the defaults, shown in ``trl-rb estimate --help``.
        load_reference (`Callable[[bool], tuple]`): ``load_reference(progress)`` -> ``(model, tokenizer or None,
            name)``: the reference model (on the CPU; the command moves it to its device), its tokenizer and the name
            the output gives it. ``progress``: whether a first build may show a progress bar.
        load_prompts (`Callable[[], list[str]]`): the default prompts.
        prompts_source (`str`): how the output names the default prompts.
    """

    description: str
    load_reference: Callable[[bool], tuple[Any, Any, str]]
    load_prompts: Callable[[], list[str]]
    prompts_source: str


class DefaultsError(Exception):
    """The registered defaults are ambiguous (more than one) or cannot be loaded."""


def registered_defaults() -> EstimateDefaults | None:
    """The ``EstimateDefaults`` registered under ``ENTRY_POINT_GROUP``, or None when none is.

    Raises `DefaultsError` when more than one is registered or the registered object cannot be loaded or is not an
    ``EstimateDefaults``.
    """
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"{ep.name} ({ep.value})" for ep in found)
        raise DefaultsError(f"several packages register defaults under {ENTRY_POINT_GROUP!r}: {names}")
    (ep,) = found
    try:
        value = ep.load()
    except Exception as err:  # a broken plug-in is reported, not a traceback
        raise DefaultsError(
            f"the defaults {ep.name} ({ep.value}) cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(value, EstimateDefaults):
        raise DefaultsError(
            f"the defaults {ep.name} ({ep.value}) are a {type(value).__name__}, not an EstimateDefaults"
        )
    return value
