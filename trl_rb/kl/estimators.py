"""Estimator names: the canonical names of the sequence-level KL estimators and the aliases each accepts.

``ESTIMATORS`` maps each canonical name to its aliases: ``k1`` (alias ``mc``), ``k2``, ``k3``, ``cv``, ``rb`` (alias
``full``); ``canonical_estimator`` resolves a user-given name or alias, case-insensitively, and refuses an unknown one
with the list of valid names. What each estimator computes is in ``trl_rb.kl.sequence`` (``kl_estimate``,
``kl_surrogate``) and docs/estimators.md.
"""

from __future__ import annotations

__all__ = ["ESTIMATORS", "canonical_estimator"]

# Canonical estimator names and their accepted aliases (matched case-insensitively).
ESTIMATORS: dict[str, tuple[str, ...]] = {
    "k1": ("mc",),
    "k2": (),
    "k3": (),
    "cv": (),
    "rb": ("full",),
}
_ALIASES = {alias: name for name, aliases in ESTIMATORS.items() for alias in (name, *aliases)}


def canonical_estimator(name: str, allowed: tuple[str, ...] | None = None) -> str:
    """Map an estimator name or alias (case-insensitive) to its canonical name.

    Args:
        name: e.g. ``"RB"``, ``"full"``, ``"mc"``, ``"k3"``.
        allowed: canonical names the caller supports; all of ``ESTIMATORS`` when ``None``.

    Raises:
        ValueError: for an unknown name, listing the valid ones (aliases included).
    """
    allowed = tuple(ESTIMATORS) if allowed is None else allowed
    key = name.lower() if isinstance(name, str) else name
    canonical = _ALIASES.get(key)
    if canonical is None or canonical not in allowed:
        valid = ", ".join(f"{n} (alias {', '.join(ESTIMATORS[n])})" if ESTIMATORS[n] else n for n in allowed)
        raise ValueError(f"Unknown KL estimator {name!r}; valid estimators are: {valid} (case-insensitive).")
    return canonical
