"""``trl-rb distill-study``: the summary arithmetic on known curves, and a tiny end-to-end run (resumable, PNG)."""

from __future__ import annotations

import json

import pytest

from trl_rb_experiments.studies.distillation_study import main, summarize


def record(gradient: str, seed: int, kls: list[float], seconds: list[float], lr: float = 1e-3) -> dict:
    curve = [{"step": 10 * i, "train_seconds": t, "kl_rb": k} for i, (k, t) in enumerate(zip(kls, seconds, strict=True))]
    return {"gradient": gradient, "lr": lr, "seed": seed, "curve": curve}


def test_summary_at_equal_steps_and_equal_wall_time():
    records = [
        record("pathwise", 0, [2.0, 1.0, 0.5], [0.0, 5.0, 10.0]),
        record("pathwise", 1, [2.0, 1.2, 0.7], [0.0, 5.0, 10.0]),
        record("rb", 0, [2.0, 1.5, 0.4], [0.0, 10.0, 20.0]),
        record("rb", 1, [2.0, 1.1, 0.2], [0.0, 10.0, 20.0]),
    ]
    part = summarize(records)["0.001"]
    assert part["equal_wall_time_seconds"] == pytest.approx(10.0)
    steps = part["methods"]["rb"]["kl_equal_steps"]
    assert steps[0] == pytest.approx(0.3) and steps[1] == pytest.approx(0.1)  # SE of (0.4, 0.2): 0.1414 / sqrt 2
    assert part["methods"]["rb"]["kl_equal_time"][0] == pytest.approx((1.5 + 1.1) / 2)  # rb at 10 s
    assert part["methods"]["pathwise"]["kl_equal_time"][0] == pytest.approx(0.6)
    diff, diff_se = part["rb_minus_pathwise_equal_steps"]
    assert diff == pytest.approx(-0.3) and diff_se == pytest.approx(0.2)  # paired: -0.1, -0.5
    assert part["rb_minus_pathwise_equal_time"][0] == pytest.approx(1.3 - 0.6)


@pytest.mark.experiment
def test_tiny_study_runs_resumes_and_plots(tmp_path):
    from trl_rb_experiments.sentiment.review_lm import load_review_lm

    tiny = dict(n_texts=200, steps=6, batch_size=8, n_layer=2, n_embd=32, n_head=2, progress=False)
    load_review_lm(tmp_path / "cache", **tiny)
    argv = ["--out", str(tmp_path / "study"), "--seeds", "0", "--steps", "2", "--eval_every", "1", "--lrs", "1e-3",
            "--batch_size", "4", "--max_new_tokens", "6", "--eval_prompts", "2", "--eval_samples", "2",
            "--cache_dir", str(tmp_path / "cache"), "--no_progress", "--noise_batches", "3"]  # fmt: skip
    assert main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "study" / "runs").iterdir())
    assert runs == ["pathwise-lr0.001-seed0.json", "rb-loo-lr0.001-seed0.json", "rb-lr0.001-seed0.json"]
    run = json.loads((tmp_path / "study" / "runs" / runs[2]).read_text())
    assert [p["step"] for p in run["curve"]] == [0, 1, 2] and run["curve"][0]["kl_rb"] > 0
    assert (tmp_path / "study" / "distillation_study.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert set(summary["0.001"]["methods"]) == {"pathwise", "rb", "rb-loo"}
    assert "rb-loo_minus_pathwise_equal_steps" in summary["0.001"]
    noise = summary["gradient_noise"]
    methods = ("pathwise", "rb", "rb-loo", "rb-groups")
    assert noise["batches"] == 3 and all(noise[g]["per_batch_variance_trace"] > 0 for g in methods)
    assert all(-1 <= noise[g]["cosine_to_pathwise"] <= 1 for g in methods)
    before = (tmp_path / "study" / "runs" / runs[0]).stat().st_mtime_ns
    assert main(argv) == 0  # resumed: finished runs are read, not rerun
    assert (tmp_path / "study" / "runs" / runs[0]).stat().st_mtime_ns == before
