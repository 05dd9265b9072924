"""Two processes: ``accelerate launch --num_processes 2 --cpu`` of a 2-step trl_rb GRPO run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from test_grpo import make_trainer, length_reward

torch.set_num_threads(1)
trainer, _, _ = make_trainer({estimator!r}, {out!r}, batch=8, group=4, beta=0.1, reward=length_reward, max_steps=2,
                             learning_rate=1e-2, scale_rewards="group")
trainer.train()
if trainer.accelerator.is_main_process:
    print("LOGS " + json.dumps([h for h in trainer.state.log_history if "loss" in h]))
"""


@pytest.mark.slow
# k1 exercises every cross-process path: the penalty's group centring (gather) and the metrics' gather; rb's extra
# loss term is local to each process.
@pytest.mark.parametrize("estimator", ["k1"])
def test_two_process_run(tmp_path, estimator):
    script = tmp_path / "run.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(SCRIPT.format(tests=tests, estimator=estimator, out=str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOGS "))
    logs = json.loads(line[5:])
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["kl/k1"]) and h["kl/rb"] >= 0.0
