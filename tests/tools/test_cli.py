"""The ``trl-rb`` dispatcher with plug-in subcommands (entry-point group ``trl_rb.commands``), the layout rule (the
library never imports the experiments package) and the top-level API (what a trainer or kernel user needs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from tools_support import FakeEntryPoint, fake_entry_points

import trl_rb
import trl_rb.cli as cli
import trl_rb.kl

LIBRARY = Path(trl_rb.__file__).resolve().parent
BUILTINS = ["grpo", "rloo", "distill", "estimate", "run"]


def test_plugin_subcommands_are_listed_and_run(monkeypatch, capsys):
    calls = []

    def hello(argv):
        """say hello to the arguments"""
        calls.append(argv)
        return 3

    def undocumented(argv):
        return 0

    entries = [
        FakeEntryPoint("hello", hello),
        FakeEntryPoint("undocumented", undocumented),
        FakeEntryPoint("broken", ImportError("no module x")),
        FakeEntryPoint("estimate", hello),  # a built-in's name: ignored
    ]
    fake_entry_points(monkeypatch, cli, {cli.ENTRY_POINT_GROUP: entries})
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trl-rb {" + ",".join([*BUILTINS, "hello", "undocumented", "broken"]) + "} ...")
    assert "\n  hello         say hello to the arguments\n" in out
    assert "\n  undocumented  (from fake.module:undocumented)\n" in out
    assert "\n  broken        (from fake.module:broken; cannot be loaded: ImportError: no module x)" in out
    assert cli.main(["hello", "x", "--y"]) == 3 and calls == [["x", "--y"]]
    assert cli.main(["estimate", "--help"]) == 0 and calls == [["x", "--y"]]  # still the library's estimate
    assert "usage: trl-rb estimate" in capsys.readouterr().out
    with pytest.raises(ImportError, match="no module x"):  # running a broken plug-in shows its error
        cli.main(["broken"])


def test_without_plugins_only_the_builtins(monkeypatch, capsys):
    fake_entry_points(monkeypatch, cli, {})
    assert cli.main([]) == 2  # usage, exit code 2
    assert capsys.readouterr().out.startswith("usage: trl-rb {" + ",".join(BUILTINS) + "} ...")
    assert cli.main(["sweep", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-rb: unknown subcommand 'sweep'.\nusage: trl-rb {")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``, and of every ``import_module("...")`` with a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_the_library_never_imports_the_experiments():
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{path.relative_to(LIBRARY.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imported_modules(path)
        if module.split(".")[0] == "trl_rb_experiments"
    ]
    assert not offenders, offenders


def test_importing_the_library_and_its_commands_stays_light():
    code = (
        "import sys, trl_rb, trl_rb.cli, trl_rb.estimate.cli, trl_rb.estimate.defaults\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'trl', 'transformers', 'trl_rb_experiments'})\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


USER_NAMES = {
    "RLOOConfig", "RLOOTrainer", "GRPOConfig", "GRPOTrainer", "DistillationConfig", "DistillationTrainer",
    "patch_trl", "unpatch_trl", "is_trl_patched", "estimate_kl", "EstimateResult",
}  # fmt: skip
REMOVED = {
    # the oracle: trl_rb.exact
    "exact_kl", "exact_kl_and_grad", "enumerate_completions", "completion_table", "CompletionTable", "count_completions",
    # the experiment: trl_rb_experiments
    "build_review_lm", "load_review_lm", "vader_reward", "classifier_reward", "review_prompts", "review_lm_path",
}  # fmt: skip


def test_top_level_api_is_the_trainer_and_kernel_users_api():
    assert len(trl_rb.__all__) == len(set(trl_rb.__all__))
    assert set(trl_rb.__all__) == set(trl_rb.kl.__all__) | USER_NAMES
    for name in trl_rb.kl.__all__:
        assert getattr(trl_rb, name) is getattr(trl_rb.kl, name), name
    for name in trl_rb.__all__:
        assert getattr(trl_rb, name) is not None and name in dir(trl_rb)
    for name in REMOVED:
        assert not hasattr(trl_rb, name), name
    from trl_rb.estimate.api import estimate_kl
    from trl_rb.trainers.rloo import RLOOTrainer

    assert trl_rb.estimate_kl is estimate_kl and trl_rb.RLOOTrainer is RLOOTrainer
