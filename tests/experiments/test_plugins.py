"""The experiments plug into the library through entry points (pyproject.toml): their ``trl-rb`` subcommands
(``trl_rb.commands``) and the review LM as ``trl-rb estimate``'s default reference and prompts
(``trl_rb.estimate_defaults``). Needs the package installed (``pip install -e .``), as every other test does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import trl_rb_experiments
from trl_rb.cli import main as trl_rb_main
from trl_rb.cli import plugin_commands
from trl_rb.estimate.cli import main as estimate_main
from trl_rb.estimate.defaults import registered_defaults
from trl_rb_experiments import plugins
from trl_rb_experiments.sentiment.review_lm import review_lm_path, review_prompts

COMMANDS = {
    "prepare-imdb": "turn a local IMDB copy into imdb-train.jsonl / imdb-test.jsonl prompt files",
    "sweep": "run methods x KL coefficients x seeds of the sentiment experiment, resumable",
    "pareto": "plot eval reward against eval KL for a folder of runs, with the frontier",
    "study": "the powered estimator study: sweep, gradient noise, report with intervals",
    "distill-study": "distil the review LM into a 1-layer student: trl's pathwise gradient against the RB gradient, "
    "over seeds",
}


def test_the_experiment_subcommands_are_registered(capsys):
    registered = plugin_commands()
    assert set(COMMANDS) <= set(registered)
    for name in COMMANDS:
        assert registered[name].value.startswith("trl_rb_experiments.plugins:")
    assert trl_rb_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, text in COMMANDS.items():
        assert f"\n  {name:<14}{text}" in out
    for name in COMMANDS:
        try:
            code = trl_rb_main([name, "--help"])
        except SystemExit as exit_:  # some commands let argparse exit, as a console script may
            code = exit_.code
        assert code in (0, None)
        assert f"usage: trl-rb {name}" in " ".join(capsys.readouterr().out.split())


def test_the_trl_rb_command_lists_them():
    """In a fresh process: the entry points come from the installed package's metadata."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from trl_rb.cli import main; sys.exit(main(['--help']))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert f"\n  {name:<14}" in proc.stdout


def test_the_review_lm_is_the_estimate_default():
    assert registered_defaults() is plugins.REVIEW_LM_DEFAULTS
    assert plugins.REVIEW_LM_DEFAULTS.load_prompts() == review_prompts("test")
    assert plugins.REVIEW_LM_DEFAULTS.prompts_source == "review_prompts('test')"


def test_the_experiment_api():
    from trl_rb_experiments.sentiment import review_lm, rewards

    assert set(trl_rb_experiments.__all__) == {
        "build_review_lm", "load_review_lm", "review_prompts", "review_lm_path", "vader_reward", "classifier_reward",
    }  # fmt: skip
    for name in trl_rb_experiments.__all__:
        source = review_lm if name in review_lm.__all__ else rewards
        assert getattr(trl_rb_experiments, name) is getattr(source, name), name
    with pytest.raises(AttributeError):
        trl_rb_experiments.nothing  # noqa: B018


def _review_lm_ready() -> bool:
    return (review_lm_path() / "config.json").is_file() and (review_lm_path() / "tokenizer.json").is_file()


@pytest.mark.skipif(
    not _review_lm_ready(), reason="the review LM is not built yet (building it is not worth test time)"
)
def test_default_reference_is_the_review_lm(tmp_path, capsys):
    """``trl-rb estimate`` without --reference and --prompts: the review LM and its test prompts. Policy = the
    review LM, so KL = 0."""
    out_json = tmp_path / "kl.json"
    code = estimate_main([str(a) for a in [
        "--policy", review_lm_path(), "--max-prompts", 3, "--samples-per-prompt", 2, "--max-new-tokens", 6,
        "--no-progress", "--output", out_json,
    ]])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    assert data["reference"].startswith("review LM") and data["prompts"] == "review_prompts('test')"
    assert data["n_prompts"] == 3
    for entry in data["estimators"].values():
        assert abs(entry["mean"]) < 1e-6
