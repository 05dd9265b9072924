"""``trl-rb estimate`` end to end on tiny GPT-2 models saved to temporary folders: table, JSON, CSV and PNG, and
exit code 2 with a clear message on bad input."""

from __future__ import annotations

import csv
import json

import pytest
from enumerable import tiny_gpt2, tiny_gpt2_pair
from tools_support import FakeEntryPoint, fake_entry_points, tiny_tokenizer

import trl_rb.estimate.defaults as defaults_module
from trl_rb.cli import main as trl_rb_main
from trl_rb.estimate.cli import main
from trl_rb.estimate.defaults import ENTRY_POINT_GROUP, EstimateDefaults

ESTIMATOR_KEYS = {"mean", "std", "se", "ci95", "frac_negative", "var_ratio_vs_k1", "std_m", "std_m_formula"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate-cli")
    policy, reference = tiny_gpt2_pair(4, seed=1)
    for model, name, tok in (
        (policy, "policy", tiny_tokenizer()),
        (reference, "reference", tiny_tokenizer()),
        (tiny_gpt2(5, seed=3), "other-vocab", tiny_tokenizer(("a", "b", "c", "d"))),
        (reference, "swapped-tokens", tiny_tokenizer(("b", "a", "c"))),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "prompts.txt").write_text("a b\n\nc\nb c a\n")
    return root


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_with_exact_json_csv_png(models, tmp_path, capsys):
    out_json = tmp_path / "res" / "kl.json"
    code, out, err = _run(
        capsys,
        [
            "--policy",
            models / "policy",
            "--reference",
            models / "reference",
            "--prompts",
            models / "prompts.txt",
            "--samples-per-prompt",
            10,
            "--max-new-tokens",
            3,
            "--batch-size",
            16,
            "--exact",
            "--output",
            out_json,
            "--no-progress",
        ],
    )
    assert code == 0, err
    assert "exact KL =" in out and "std@M=10" in out
    for name in ("k1", "k2", "k3", "cv", "cv_opt", "rb"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    data = json.loads(out_json.read_text())
    assert set(data["estimators"]) == {"k1", "k2", "k3", "cv", "cv_opt", "rb"}
    for entry in data["estimators"].values():
        assert ESTIMATOR_KEYS | {"bias", "z"} <= set(entry)
        assert len(entry["ci95"]) == 2 and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
        assert set(entry["std_m"]) == {"1", "5", "10"}
    assert data["n_prompts"] == 3 and data["samples_per_prompt"] == 10
    assert data["m_table"]["m_values"] == [1, 5, 10]
    assert isinstance(data["exact_kl"], float) and len(data["exact_kl_per_prompt"]) == 3
    assert data["policy"] == str(models / "policy") and data["reference"] == str(models / "reference")
    assert data["estimators"]["k1"]["var_ratio_vs_k1"] == pytest.approx(1.0, abs=1e-12)
    with open(out_json.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30
    assert set(rows[0]) == {
        "prompt_index",
        "sample_index",
        "completion_tokens",
        "completion",
        "k1",
        "k2",
        "k3",
        "cv",
        "cv_opt",
        "rb",
    }
    mean_k1 = sum(float(r["k1"]) for r in rows) / 30
    assert mean_k1 == pytest.approx(data["estimators"]["k1"]["mean"], rel=1e-9)
    assert out_json.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out_json.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_jsonl_prompts_estimator_subset_and_the_cli_dispatcher(models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "c b"}\n')
    code = trl_rb_main(
        [
            "estimate",
            "--policy",
            str(models / "policy"),
            "--reference",
            str(models / "reference"),
            "--prompts",
            str(prompts),
            "--samples-per-prompt",
            "4",
            "--max-new-tokens",
            "2",
            "--estimators",
            "RB,mc",
            "--m-values",
            "1,2",
            "--no-progress",
            "--output",
            str(tmp_path / "o.json"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads((tmp_path / "o.json").read_text())
    assert list(data["estimators"]) == ["rb", "k1"] and data["n_prompts"] == 2


def test_dataset_folder(models, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"prompt": ["a"]}), "test": Dataset.from_dict({"prompt": ["b", "c"]})}
    ).save_to_disk(tmp_path / "ds")
    code, out, err = _run(
        capsys,
        [
            "--policy",
            models / "policy",
            "--reference",
            models / "reference",
            "--dataset",
            tmp_path / "ds",
            "--samples-per-prompt",
            2,
            "--max-new-tokens",
            2,
            "--estimators",
            "k1",
            "--no-progress",
        ],
    )
    assert code == 0, err
    assert "over 2 prompts" in out  # the test split


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"--policy": "{root}/missing"}, "no such model folder: {root}/missing"),
        ({"--reference": "{root}/other-vocab"}, "policy's has 4 tokens, the reference's 5"),
        ({"--reference": "{root}/swapped-tokens"}, "'a': policy id 0, reference id 1"),
        ({"--prompts": "{root}/empty.txt"}, "no prompts in"),
        ({"--prompts": "{root}/long.txt"}, "Prompt 1 is 40 tokens long"),
        ({"--prompts": "{root}/bad.jsonl"}, "line 2 has no string 'prompt' field"),
        ({"--prompts": "{root}/nope.txt"}, "no such file"),
        ({"--estimators": "k1,k9"}, "Unknown KL estimator 'k9'"),
        ({"--max-new-tokens": "20", "--exact": None}, "--exact enumerates every completion"),
        ({"--prompts": None, "--dataset": "{root}/nope"}, "no such folder"),
    ],
)
def test_bad_input_exits_2_with_a_message(models, capsys, overrides, message):
    root = models
    (root / "empty.txt").write_text("\n\n")
    (root / "long.txt").write_text("a\n" + " ".join(["b"] * 40) + "\n")
    (root / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    argv = {
        "--policy": "{root}/policy",
        "--reference": "{root}/reference",
        "--prompts": "{root}/prompts.txt",
        "--samples-per-prompt": "2",
        "--max-new-tokens": "3",
        "--no-progress": None,
    }
    argv.update(overrides)
    args = []
    for flag, value in argv.items():
        if flag in overrides and value is None and flag != "--exact":
            continue  # an override of None removes the flag
        args += [flag] if value is None else [flag, value.format(root=root)]
    code, out, err = _run(capsys, args)
    assert code == 2
    assert message.format(root=root) in err, err
    assert "Traceback" not in err


def test_argparse_errors_return_2(capsys):
    assert main([]) == 2  # --policy is required
    assert "--policy" in capsys.readouterr().err


def _flat(text: str) -> str:
    """``text`` without whitespace: argparse re-wraps help lines."""
    return "".join(text.split())


def _fake_defaults(models, calls: list) -> EstimateDefaults:
    """Defaults as a plug-in registers them: the tiny reference model (no tokenizer) and two prompts."""

    def load_reference(progress: bool):
        from transformers import AutoModelForCausalLM

        calls.append(progress)
        return AutoModelForCausalLM.from_pretrained(models / "reference"), None, "fake reference"

    return EstimateDefaults(
        description="a fake reference and its prompts",
        load_reference=load_reference,
        load_prompts=lambda: ["a", "b c"],
        prompts_source="fake prompts",
    )


def test_registered_defaults_give_the_reference_and_the_prompts(models, tmp_path, capsys, monkeypatch):
    """Without --reference and --prompts: the EstimateDefaults registered under trl_rb.estimate_defaults."""
    calls = []
    entries = [FakeEntryPoint("fake", _fake_defaults(models, calls))]
    fake_entry_points(monkeypatch, defaults_module, {ENTRY_POINT_GROUP: entries})
    assert main(["--help"]) == 0
    assert _flat("a fake reference and its prompts") in _flat(capsys.readouterr().out)
    out_json = tmp_path / "kl.json"
    code, out, err = _run(capsys, [
        "--policy", models / "policy", "--samples-per-prompt", 2, "--max-new-tokens", 2, "--no-progress",
        "--output", out_json,
    ])  # fmt: skip
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["reference"] == "fake reference" and data["prompts"] == "fake prompts" and data["n_prompts"] == 2
    assert calls == [False]  # loaded once, without a progress bar (--no-progress)


def test_without_registered_defaults_the_reference_and_prompts_are_required(models, tmp_path, capsys, monkeypatch):
    fake_entry_points(monkeypatch, defaults_module, {})
    assert main(["--help"]) == 0
    assert _flat(f"none is registered under the entry-point group {ENTRY_POINT_GROUP}") in _flat(capsys.readouterr().out)
    code, out, err = _run(capsys, ["--policy", models / "policy", "--no-progress"])
    assert code == 2 and "no default reference model and prompts are registered" in err, err
    assert "give --reference and --prompts or --dataset." in err and "Traceback" not in err
    code, out, err = _run(capsys, ["--policy", models / "policy", "--reference", models / "reference"])
    assert code == 2 and err.rstrip().endswith("give --prompts or --dataset."), err
    code, out, err = _run(capsys, [
        "--policy", models / "policy", "--reference", models / "reference", "--prompts", models / "prompts.txt",
        "--samples-per-prompt", 2, "--max-new-tokens", 2, "--no-progress",
    ])  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "entries, message",
    [
        ([FakeEntryPoint("one", object()), FakeEntryPoint("two", object())], "several packages register defaults"),
        ([FakeEntryPoint("broken", ImportError("no module x"))], "cannot be loaded: ImportError: no module x"),
        ([FakeEntryPoint("wrong", object())], "are a object, not an EstimateDefaults"),
    ],
)
def test_unusable_registered_defaults_are_bad_input(models, capsys, monkeypatch, entries, message):
    fake_entry_points(monkeypatch, defaults_module, {ENTRY_POINT_GROUP: entries})
    assert main(["--help"]) == 0 and "unusable:" in capsys.readouterr().out
    code, out, err = _run(capsys, ["--policy", models / "policy", "--prompts", models / "prompts.txt"])
    assert code == 2 and message in err and err.rstrip().endswith("give --reference."), err
    assert "Traceback" not in err


def test_adapter_folder_as_policy_and_run_folder_defaults(models, tmp_path, capsys):
    """A PEFT adapter folder is a policy (its base, from adapter_config.json, is the default reference), and a run
    folder's saved settings give the defaults of --max-new-tokens and --temperature."""
    import peft
    import yaml
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models / "reference")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    adapter = tmp_path / "adapter-run"
    lora.save_pretrained(adapter)
    tiny_tokenizer().save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(models / "reference")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "run_config.yaml").write_text(yaml.safe_dump({"max_completion_length": 2, "temperature": 0.7}))
    out_json = tmp_path / "kl.json"
    argv = ["--policy", adapter, "--prompts", models / "prompts.txt", "--samples-per-prompt", 10, "--exact",
            "--output", out_json, "--no-progress"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["reference"] == str(models / "reference")  # the adapter's base
    assert data["max_new_tokens"] == 2 and data["temperature"] == pytest.approx(0.7)  # from run_config.yaml
    # the adapter (init_lora_weights=False: not the identity) moved the model; rb agrees with the exact KL
    assert data["exact_kl"] > 1e-3
    rb = data["estimators"]["rb"]
    assert abs(rb["mean"] - data["exact_kl"]) < 5 * rb["se"] + 1e-9
    # an explicit flag wins over the run folder
    code, _, err = _run(capsys, [*argv, "--max-new-tokens", 3])
    assert code == 0, err
    assert json.loads(out_json.read_text())["max_new_tokens"] == 3


def test_run_defaults_from_a_trainer_run_folder(tmp_path):
    """``trl-rb grpo|rloo`` (any HF Trainer) saves its arguments as training_args.bin: sampling settings come from it."""
    import torch

    from trl_rb.estimate.cli import run_defaults
    from trl_rb.trainers.grpo import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), max_completion_length=7, temperature=0.9, use_cpu=True, report_to=[])
    torch.save(args, tmp_path / "training_args.bin")
    assert run_defaults(tmp_path) == {"max_new_tokens": 7, "temperature": 0.9}
    assert run_defaults(tmp_path / "missing") == {}


def _prompt_run(capsys, models, prompts_arg: str, tmp_path) -> dict:
    code, out, err = _run(capsys, ["--policy", models / "policy", "--reference", models / "reference", "--prompts",
                                   prompts_arg, "--samples-per-prompt", 2, "--max-new-tokens", 2, "--no-progress",
                                   "--output", tmp_path / "o.json"])  # fmt: skip
    assert code == 0, err
    return json.loads((tmp_path / "o.json").read_text())


def test_prompts_from_stdin_a_pipe_and_a_fifo(models, tmp_path, capsys, monkeypatch):
    import io
    import os
    import threading

    from trl_rb.estimate.cli import read_prompts

    monkeypatch.setattr("sys.stdin", io.StringIO("a b\n\nc\n"))
    assert _prompt_run(capsys, models, "-", tmp_path)["n_prompts"] == 2
    read_end, write_end = os.pipe()  # what the shell's <(...) hands over: /dev/fd/N
    os.write(write_end, b"b c\na\nc a b\n")
    os.close(write_end)
    try:
        assert _prompt_run(capsys, models, f"/dev/fd/{read_end}", tmp_path)["n_prompts"] == 3
    finally:
        os.close(read_end)
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a\nb\n"))
    writer.start()
    assert read_prompts(fifo) == ["a", "b"]
    writer.join()
    code, _, err = _run(capsys, ["--policy", models / "policy", "--prompts", tmp_path / "missing.txt"])
    assert code == 2 and "no such file" in err
    code, _, err = _run(capsys, ["--policy", models / "policy", "--prompts", tmp_path])
    assert code == 2 and "is a folder" in err


def test_variance_ratio_is_undefined_when_k1_does_not_vary():
    import numpy as np

    from trl_rb.estimate.api import EstimateResult

    values = {"k1": np.zeros((2, 4)), "rb": np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.5]])}
    result = EstimateResult(values=values, lengths=np.full((2, 4), 3), m_values=(1, 2))
    assert result.summary("rb")["var_ratio_vs_k1"] is None and result.summary("k1")["var_ratio_vs_k1"] is None
    rows = {line.split()[0]: line for line in result.format_table().splitlines()[1:] if line.strip()}
    assert "undefined" in rows["rb"] and "undefined" in rows["k1"]
