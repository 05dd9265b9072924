"""Helpers of the tool tests (``trl-rb estimate``, the ``trl-rb`` dispatcher): plain functions, imported as
``from tools_support import ...`` (pytest's ``prepend`` import mode puts this folder on ``sys.path``)."""

from __future__ import annotations

from enumerable import word_tokenizer


def tiny_tokenizer(words: tuple[str, ...] = ("a", "b", "c")):
    """A word-level tokenizer: ids 0.. for ``words``, then ``</s>`` (EOS = pad = last id), matching ``tiny_gpt2``."""
    return word_tokenizer((*words, "</s>"), eos="</s>")


class FakeEntryPoint:
    """Stands in for an ``importlib.metadata.EntryPoint``: ``load()`` returns ``obj`` (or raises it if an exception)."""

    def __init__(self, name: str, obj, value: str | None = None):
        self.name, self.obj, self.value = name, obj, value or f"fake.module:{name}"

    def load(self):
        if isinstance(self.obj, BaseException):
            raise self.obj
        return self.obj


def fake_entry_points(monkeypatch, module, groups: dict[str, list[FakeEntryPoint]]) -> None:
    """Make ``module.entry_points(group=...)`` return ``groups[group]`` (none for other groups)."""
    monkeypatch.setattr(module, "entry_points", lambda group: list(groups.get(group, [])))
