"""The README's main job, end to end: `python rloo_sentiment.py --method RB` with nothing else, from an empty cache.

It builds the offline review LM, trains with RLOO and the RB KL, and evaluates on the held-out prompts. The fact to
keep true is that the trained policy's reward is clearly above the reference model's, by many standard errors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.experiment
def test_default_rb_run_raises_the_reward(tmp_path):
    env = {**os.environ, "TRL_RB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "rloo_sentiment.py"), "--method", "RB", "--output_dir", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    gain = result["reward"] - result["reference_reward"]
    se = (result["reward_se"] ** 2 + result["reference_reward_se"] ** 2) ** 0.5
    assert gain > 0.2 and gain > 6 * se, result
    assert result["kl_rb"] > 0 and result["kl_estimator"] == "rb"
    assert (out / "metrics.jsonl").stat().st_size > 0 and (out / "training.png").exists()
