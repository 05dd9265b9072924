"""``trl_rb.patch_trl()`` and ``trl-rb run``: an unmodified trl script trains with trl-rb's trainers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import trl

import trl_rb
from trl_rb import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, compute_kl

# A plain trl script: nothing in it mentions trl-rb.
PLAIN_TRL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completion_ids, **_):
        return [sum(3 <= t < 23 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    args = GRPOConfig(output_dir=sys.argv[2], per_device_train_batch_size=8, num_generations=4, beta=0.1,
                      max_completion_length=6, max_steps=2, logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, bf16=False, learning_rate=0.05, disable_tqdm=True)
    prompts = Dataset.from_dict({"prompt": [f"w{i + 5} w{i + 6}" for i in range(16)]})
    trainer = GRPOTrainer(sys.argv[1], reward, args=args, train_dataset=prompts)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({"class": type(trainer).__module__, "estimator": getattr(args, "kl_estimator", None), "logs": logs}))
    """
)


@pytest.fixture
def restore_trl():
    yield
    trl_rb.unpatch_trl()


def test_patch_swaps_and_unpatch_restores(restore_trl):
    originals = (trl.GRPOTrainer, trl.GRPOConfig, trl.RLOOTrainer, trl.RLOOConfig)
    distill_originals = (trl.DistillationTrainer, trl.DistillationConfig)
    trl_rb.patch_trl()
    trl_rb.patch_trl()  # idempotent
    from trl import GRPOConfig as PatchedConfig
    from trl.trainer import RLOOTrainer as PatchedRLOO
    from trl.trainer.utils import compute_kl as patched_kl

    assert trl_rb.is_trl_patched()
    assert (trl.GRPOTrainer, trl.GRPOConfig, trl.RLOOTrainer, trl.RLOOConfig) == (GRPOTrainer, GRPOConfig, RLOOTrainer,
                                                                               RLOOConfig)  # fmt: skip
    assert PatchedConfig is GRPOConfig and PatchedRLOO is RLOOTrainer and patched_kl is compute_kl
    assert trl.DistillationTrainer is trl_rb.DistillationTrainer and trl.DistillationConfig is trl_rb.DistillationConfig
    trl_rb.unpatch_trl()
    trl_rb.unpatch_trl()  # a no-op
    assert (trl.GRPOTrainer, trl.GRPOConfig, trl.RLOOTrainer, trl.RLOOConfig) == originals
    assert trl.DistillationTrainer is distill_originals[0] and trl.DistillationConfig is distill_originals[1]
    import trl.trainer.utils as utils

    assert not hasattr(utils, "compute_kl") and not trl_rb.is_trl_patched()


@pytest.mark.cli
def test_trl_rb_run_trains_a_plain_trl_script_with_rb(tmp_path):
    from support import build_lm

    model = build_lm(tmp_path / "lm", seed=0)
    script = tmp_path / "train_grpo.py"
    script.write_text(PLAIN_TRL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for launcher in (["-m", "trl_rb.cli", "run"], []):  # trl-rb run script.py, then plain python script.py
        cmd = [sys.executable, *launcher, str(script), model, str(tmp_path / f"out{len(launcher)}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results["patched" if launcher else "plain"] = json.loads(line[len("RESULT ") :])
    patched, plain = results["patched"], results["plain"]
    assert patched["class"] == "trl_rb.trainers.grpo" and patched["estimator"] == "rb"
    assert all("kl/rb" in h and h["kl/rb"] >= 0.0 for h in patched["logs"])
    assert patched["logs"][-1]["kl/rb"] > 1e-4
    assert plain["class"] == "trl.trainer.grpo_trainer" and not any("kl/rb" in h for h in plain["logs"])


REWARD_MODULE = textwrap.dedent(
    """
    def low_words(completion_ids, **_):
        return [sum(3 <= t < 23 for t in ids) / max(len(ids), 1) for ids in completion_ids]
    """
)


@pytest.mark.cli
@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("grpo", ["--kl_estimator", "rb", "--loss_type", "dr_grpo"]),
        ("rloo", ["--stepwise", "true", "--use_peft", "--lora_r", "4", "--lora_target_modules", "c_attn", "c_fc"]),
    ],
)
def test_trl_rb_grpo_rloo_cli_with_trl_flags(tmp_path, script, extra):
    """trl's own command lines (local model folder, local jsonl dataset folder, reward function by import path, a
    --config recipe, LoRA flags) train with trl-rb's trainers and save the model (or the adapter)."""
    from support import build_lm

    model = build_lm(tmp_path / "lm", seed=0)
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"w{i + 5} w{i + 6}"}) + "\n" for i in range(16)))
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 0.1\nmax_steps: 2\nlogging_steps: 1\nnum_generations: 4\nper_device_train_batch_size: 8\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trl_rb.cli", script, "--config", str(recipe), "--model_name_or_path", model,
           "--dataset_name", str(data), "--reward_funcs", "my_rewards.low_words", "--output_dir", str(out),
           "--max_completion_length", "6", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
           "--save_strategy", "no", "--disable_tqdm", "true", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    saved = {p.name for p in out.iterdir()}
    if "--use_peft" in extra:
        assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    else:
        assert "model.safetensors" in saved
    assert state is None or state["global_step"] == 2
    assert "kl/rb" in proc.stdout + proc.stderr  # trl's logger prints the metrics dict of every step


@pytest.mark.cli
def test_trl_rb_distill_cli_with_trl_flags(tmp_path):
    """trl's `trl distillation` command line (student and teacher folders, a local dataset) trains with trl-rb's
    DistillationTrainer (--kl_gradient rb) and logs kl/rb; an rb-incompatible flag exits 2 with the fix."""
    from support import build_lm

    student, teacher = build_lm(tmp_path / "student", seed=1), build_lm(tmp_path / "teacher", seed=0)
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"w{i + 5} w{i + 6}"}) + "\n" for i in range(16)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trl_rb.cli", "distill", "--model_name_or_path", student,
           "--teacher_model_name_or_path", teacher, "--dataset_name", str(data), "--output_dir", str(out),
           "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8",
           "--max_completion_length", "6", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
           "--save_strategy", "no", "--disable_tqdm", "true", "--kl_gradient", "rb"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.safetensors" in {p.name for p in out.iterdir()}
    assert "kl/rb" in proc.stdout + proc.stderr and "kl/k1" in proc.stdout + proc.stderr

    refused = subprocess.run([*cmd, "--top_k", "5"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert refused.returncode == 2
    assert "trl-rb distill: kl_gradient='rb'" in refused.stderr and "top_k=5" in refused.stderr
    assert "kl_gradient='pathwise'" in refused.stderr
