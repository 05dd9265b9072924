"""trl_rb.RLOOConfig: estimator names, the research code's `stepwise` flag, and parsing with trl.TrlParser."""

from __future__ import annotations

import dataclasses

import pytest
import trl

from trl_rb.trainers.rloo import RLOOConfig

BASE = {"output_dir": "unused", "bf16": False, "report_to": "none"}


@pytest.mark.parametrize(
    ("given", "canonical"),
    [(None, "rb"), ("rb", "rb"), ("RB", "rb"), ("full", "rb"), ("Full", "rb"), ("k1", "k1"), ("MC", "k1"),
     ("k3", "k3"), ("K3", "k3")],
)
def test_estimator_names(given, canonical):
    kwargs = {} if given is None else {"kl_estimator": given}
    assert RLOOConfig(**BASE, **kwargs).kl_estimator == canonical


@pytest.mark.parametrize(
    ("stepwise", "estimator", "canonical"),
    [(True, None, "rb"), (False, None, "k1"), (True, "full", "rb"), (False, "mc", "k1"), (None, "k3", "k3")],
)
def test_stepwise(stepwise, estimator, canonical):
    config = RLOOConfig(**BASE, stepwise=stepwise, kl_estimator=estimator)
    assert config.kl_estimator == canonical
    # the resolved config is consistent: rebuilding it from its own values does not raise
    again = RLOOConfig(**BASE, stepwise=config.stepwise, kl_estimator=config.kl_estimator)
    assert again.kl_estimator == canonical


@pytest.mark.parametrize("name", ["k2", "cv", "kl", "", "rb2"])
def test_unknown_estimator(name):
    with pytest.raises(ValueError, match="valid estimators are: k1 \\(alias mc\\), k3, rb \\(alias full\\)"):
        RLOOConfig(**BASE, kl_estimator=name)


@pytest.mark.parametrize(("stepwise", "estimator"), [(True, "k1"), (True, "k3"), (False, "rb"), (False, "full")])
def test_contradicting_stepwise(stepwise, estimator):
    with pytest.raises(ValueError, match="stepwise"):
        RLOOConfig(**BASE, stepwise=stepwise, kl_estimator=estimator)


def test_fields_documented():
    doc = RLOOConfig.__doc__
    for f in dataclasses.fields(RLOOConfig):
        if f.name in ("kl_estimator", "stepwise"):
            assert f"{f.name} (`" in doc
            assert f.metadata.get("help")
    assert issubclass(RLOOConfig, trl.RLOOConfig)


def test_trl_parser_command_line():
    (config,) = trl.TrlParser((RLOOConfig,)).parse_args_and_config(
        ["--output_dir", "x", "--kl_estimator", "MC", "--beta", "0.1", "--bf16", "false", "--report_to", "none"]
    )
    assert isinstance(config, RLOOConfig) and config.kl_estimator == "k1" and config.beta == 0.1
    (config,) = trl.TrlParser((RLOOConfig,)).parse_args_and_config(
        ["--output_dir", "x", "--stepwise", "true", "--bf16", "false", "--report_to", "none"]
    )
    assert config.kl_estimator == "rb" and config.stepwise is True
    (config,) = trl.TrlParser((RLOOConfig,)).parse_args_and_config(["--output_dir", "x", "--bf16", "false"])
    assert config.kl_estimator == "rb" and config.stepwise is None


def test_trl_parser_yaml(tmp_path):
    path = tmp_path / "rloo.yaml"
    path.write_text("output_dir: out\nkl_estimator: k3\nbeta: 0.02\nbf16: false\nreport_to: none\n")
    (config,) = trl.TrlParser((RLOOConfig,)).parse_args_and_config(["--config", str(path)])
    assert config.kl_estimator == "k3" and config.beta == 0.02
    # the command line overrides the file
    (config,) = trl.TrlParser((RLOOConfig,)).parse_args_and_config(["--config", str(path), "--kl_estimator", "full"])
    assert config.kl_estimator == "rb"
    path.write_text("output_dir: out\nstepwise: false\nkl_estimator: rb\nbf16: false\n")
    with pytest.raises(ValueError, match="stepwise"):
        trl.TrlParser((RLOOConfig,)).parse_args_and_config(["--config", str(path)])


def test_help_mentions_estimators(capsys):
    with pytest.raises(SystemExit):
        trl.TrlParser((RLOOConfig,)).parse_args_and_config(["--help"])
    out = capsys.readouterr().out
    assert "--kl_estimator" in out and "Rao-Blackwellized" in out and "--stepwise" in out
