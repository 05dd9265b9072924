"""``patch_trl()``: make an unmodified trl script train with trl-rb's trainers (the way Liger-Kernel's
``apply_liger_kernel_to_*`` swaps modules in place).

After ``trl_rb.patch_trl()``, ``trl.GRPOTrainer``, ``trl.GRPOConfig``, ``trl.RLOOTrainer``, ``trl.RLOOConfig``,
``trl.DistillationTrainer`` and ``trl.DistillationConfig``
(attribute access, and any later ``from trl import ...``, also through ``trl.trainer``) are trl-rb's subclasses, so
the RB KL (trl-rb's default estimator) applies as soon as the script sets a ``beta`` (distillation keeps trl's
gradient by default, ``kl_gradient="pathwise"``, and logs ``kl/rb``); ``trl.trainer.utils.compute_kl``
is ``trl_rb.compute_kl`` (the research fork's function). ``unpatch_trl()`` restores trl exactly. A script that
already ran ``from trl import GRPOTrainer`` before the patch keeps the class it imported: patch first. Without editing
the script: ``trl-rb run script.py [args...]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["is_trl_patched", "patch_trl", "unpatch_trl"]

_MISSING = object()
# (module path, attribute) -> (trl_rb module, attribute)
_REPLACEMENTS: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (where, name): (f"trl_rb.trainers.{source}", name)
        for where in ("trl", "trl.trainer")
        for name, source in (
            ("GRPOTrainer", "grpo"),
            ("GRPOConfig", "grpo"),
            ("RLOOTrainer", "rloo"),
            ("RLOOConfig", "rloo"),
            ("DistillationTrainer", "distillation"),
            ("DistillationConfig", "distillation"),
        )
    },
    ("trl.trainer.utils", "compute_kl"): ("trl_rb.kl", "compute_kl"),
}
# What each patched attribute held before the patch (_MISSING: nothing); empty while trl is not patched.
_ORIGINALS: dict[tuple[str, str], Any] = {}


def _module(path: str) -> ModuleType:
    return importlib.import_module(path)


def is_trl_patched() -> bool:
    """Whether ``patch_trl()`` is in effect."""
    return bool(_ORIGINALS)


def patch_trl() -> None:
    """Swap trl's GRPO / RLOO / distillation trainers and configs (and ``trl.trainer.utils.compute_kl``) for trl-rb's. Idempotent."""
    if _ORIGINALS:
        return
    replacements = {key: getattr(_module(mod), attr) for key, (mod, attr) in _REPLACEMENTS.items()}
    for (where, name), value in replacements.items():
        module = _module(where)
        _ORIGINALS[(where, name)] = getattr(module, name, _MISSING)
        setattr(module, name, value)


def unpatch_trl() -> None:
    """Restore what ``patch_trl()`` replaced. A no-op when trl is not patched."""
    for (where, name), original in _ORIGINALS.items():
        module = _module(where)
        if original is _MISSING:
            delattr(module, name)
        else:
            setattr(module, name, original)
    _ORIGINALS.clear()
