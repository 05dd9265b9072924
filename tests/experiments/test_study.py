"""``trl-rb study``: config checks, the statistics on synthetic runs with known answers, and a real tiny study."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from trl_rb_experiments.studies import study
from trl_rb_experiments.studies.pareto import RunPoint, frontier, frontier_shares, load_points
from trl_rb_experiments.studies.study_report import dominated, write_report

BETAS = (0.03, 0.1, 0.3)
SEEDS = (0, 1, 2, 3, 4, 5)
GAIN = 0.05  # RB's reward advantage at equal KL in the synthetic runs


def _config(tmp_path, **study_overrides):
    data = {
        "output_dir": str(tmp_path / "study"),
        "seeds": list(SEEDS),
        "args": {"max_steps": 80},
        "arms": [{"trainer": "rloo", "methods": ["MC", "RB"], "kl_coefs": list(BETAS)}],
        "study": {"noise": {"rloo": {"method": "RB", "kl_coef": 0.1, "seed": 0}}, "bootstrap": 400, **study_overrides},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _synthetic_runs(root, steps=80):
    """Runs whose reward is 0.3 + 0.2 log KL (+ GAIN for RB) plus seed noise; training reward rises then is flat."""
    rng = np.random.default_rng(1)
    for method in ("MC", "RB"):
        for beta in BETAS:
            for seed in SEEDS:
                kl = 0.5 / beta * (1.3 if method == "RB" else 1.0) * math.exp(rng.normal(0, 0.05))
                reward = 0.3 + 0.2 * math.log(kl) + (GAIN if method == "RB" else 0.0) + rng.normal(0, 0.01)
                folder = root / f"rloo-{method}-beta{beta:g}-seed{seed}"
                folder.mkdir(parents=True)
                (folder / "eval.json").write_text(json.dumps({
                    "method": method, "trainer": "rloo", "beta": beta, "seed": seed, "reward": reward,
                    "reward_se": 0.01, "kl_rb": kl, "kl_rb_se": 0.01, "train_seconds": 10.0,
                }))  # fmt: skip
                curve = np.minimum(np.arange(steps) / 40, 1.0) * reward
                rows = [{"step": s + 1, "reward": float(r), "kl/rb": kl} for s, r in enumerate(curve)]
                if method == "RB":  # gamma 2 beta in the first half of the steps, beta (1 + seed / 10) in the second
                    for row in rows:
                        late = row["step"] > steps // 2
                        row["kl/gamma"] = beta * (1 + seed / 10) if late else 2 * beta
                        row["kl/var_ratio_vs_mc"] = 0.5 + seed / 10 if late else 9.0
                rows.append({"step": steps, "train_runtime": 10.0})
                (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dominated_matches_pareto_frontier():
    rng = np.random.default_rng(0)
    kl, reward = rng.uniform(0, 1, 40).round(1), rng.uniform(0, 1, 40).round(1)  # rounding makes ties
    points = [RunPoint(name=str(i), method="RB", kl=k, reward=r) for i, (k, r) in enumerate(zip(kl, reward, strict=True))]
    on_front = {p.name for p in frontier(points)}
    assert {str(i) for i in np.flatnonzero(~dominated(kl, reward))} == on_front


def test_report_recovers_known_differences(tmp_path):
    config = study.load_study_config(_config(tmp_path))
    _synthetic_runs(config.sweep.output_dir)
    report = write_report(config, {})
    part = report["arms"]["rloo"]
    assert part["runs"] == 36 and part["seeds"] == list(SEEDS)
    # The RB curve lies GAIN above MC's everywhere, so at every matched KL the difference is GAIN up to the seeds'
    # noise (reward sd 0.01 per run: about 0.006 on a difference of two 6-seed means), and it excludes 0.
    assert len(part["matched_kl"]["levels"]) == 3
    for level in part["matched_kl"]["levels"]:
        diff = level["RB-MC"]
        assert diff["difference"] == pytest.approx(GAIN, abs=0.012)
        assert 0 < diff["ci95"][0] < diff["difference"] < diff["ci95"][1] < diff["ci95"][0] + 0.03
    # The shares are pareto's on all runs; each lies inside its bootstrap interval.
    share = part["frontier_share"]
    expected = frontier_shares(load_points(config.sweep.output_dir))
    for method in ("MC", "RB"):
        assert share[method]["share"] == pytest.approx(expected[method])
        assert share[method]["ci95"][0] <= share[method]["share"] <= share[method]["ci95"][1]
    assert share["RB"]["share"] + share["MC"]["share"] == pytest.approx(1.0)
    # Stability rows are the seeds' mean and sd; the synthetic training reward is flat over the last steps.
    row = next(r for r in part["stability"] if r["beta"] == 0.1 and r["method"] == "RB")
    rewards = [json.loads((config.sweep.output_dir / f"rloo-RB-beta0.1-seed{s}" / "eval.json").read_text())["reward"]
               for s in SEEDS]  # fmt: skip
    assert row["reward_mean"] == pytest.approx(np.mean(rewards)) and row["reward_sd"] == pytest.approx(np.std(rewards, ddof=1))
    for lv in part["levelling"]:
        assert abs(lv["last_rise"][0]) < 1e-9 and lv["total_rise"][0] > 0
    # The gamma table: second half of the steps only, mean +- SE over seeds
    assert [g["beta"] for g in part["gamma"]] == list(BETAS)
    seed_mean, seed_se = np.mean(SEEDS) / 10, np.std(np.array(SEEDS) / 10, ddof=1) / math.sqrt(len(SEEDS))
    for g in part["gamma"]:
        assert g["gamma_over_beta"] == pytest.approx([1 + seed_mean, seed_se])
        assert g["gamma"][0] == pytest.approx(g["beta"] * (1 + seed_mean))
        assert g["logged_variance_ratio"] == pytest.approx([0.5 + seed_mean, seed_se])
    assert "| γ / beta |" in (config.sweep.output_dir / "study.md").read_text()
    for name in ("study.md", "study.json"):
        assert (config.sweep.output_dir / name).stat().st_size > 0
    for name in ("study_pareto.png", "study_reward_vs_step.png"):
        assert (config.sweep.output_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert "| RB |" in (config.sweep.output_dir / "study.md").read_text()


def test_study_runs_save_checkpoints_for_the_noise_run_only(tmp_path):
    config = study.load_study_config(_config(tmp_path))
    runs = dict(study.study_runs(config))
    assert len(runs) == 36
    assert runs["rloo-RB-beta0.1-seed0"][-6:] == ["--save_strategy", "steps", "--save_steps", "20", "--save_only_model", "true"]
    assert "--save_steps" not in runs["rloo-MC-beta0.1-seed0"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise": {"rloo": {"method": "RB", "kl_coef": 0.5, "seed": 0}}}, "is not one of the sweep's runs"),
        ({"noise": {"rloo": {"method": "RB"}}}, "needs method, kl_coef and seed"),
        ({"bootstrap": 10}, "bootstrap >= 100"),
        ({"folds": 3}, "unknown keys under study"),
    ],
)
def test_study_rejects_bad_configs(tmp_path, capsys, overrides, message):
    assert study.main([str(_config(tmp_path, **overrides))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


@pytest.mark.experiment
def test_real_tiny_study(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """Two seeds of RLOO MC/RB for 4 steps, the noise at 3 checkpoints, the report; both methods' gradients are
    measured on the same completions."""
    from trl_rb_experiments.sentiment.review_lm import load_review_lm

    cache = tmp_path_factory.getbasetemp() / "review-lm-cache"
    load_review_lm(cache, n_texts=2000, steps=150, progress=False)  # shared with test_sentiment.py's session build
    monkeypatch.setenv("TRL_RB_CACHE", str(cache))
    data = {
        "output_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "args": {"max_steps": 4, "per_device_train_batch_size": 8, "num_generations": 2, "max_completion_length": 8,
                 "eval_prompts": 4, "eval_samples_per_prompt": 2, "eval_reference": False, "disable_tqdm": True},
        "arms": [{"trainer": "rloo", "methods": ["MC", "RB"], "kl_coefs": [0.1]}],
        "study": {"noise": {"rloo": {"method": "RB", "kl_coef": 0.1, "seed": 0}}, "noise_batches": 3, "bootstrap": 100},
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert study.main([str(path)]) == 0
    out = tmp_path / "study"
    noise = [json.loads((out / "noise" / f"rloo-RB-beta0.1-seed0-step{s}.json").read_text()) for s in (1, 2, 4)]
    for n in noise:
        assert n["vs_rb"]["MC"]["max_batch_reward_difference"] < 1e-12  # same completions for both methods
        assert 0 < n["vs_rb"]["MC"]["cosine_of_means"] <= 1 + 1e-9
    report = json.loads((out / "study.json").read_text())
    assert report["arms"]["rloo"]["runs"] == 4 and len(report["noise"]["rloo"]) == 3
    capsys.readouterr()
    assert study.main([str(path)]) == 0  # everything resumes from disk
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_report_only_without_runs_is_an_error(tmp_path, capsys):
    assert study.main([str(_config(tmp_path)), "--report_only"]) == 2
    assert "no finished run in" in capsys.readouterr().err


def test_resampled_variance_equals_the_variance_of_the_resampled_rows():
    import torch

    from trl_rb_experiments.studies.study import _resampled_variance

    g = torch.randn(12, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 12, 12) for _ in range(5)]
    counts = np.stack([np.bincount(d, minlength=12) for d in draws])
    expected = [float(g[torch.from_numpy(d)].var(0).sum()) for d in draws]
    assert np.allclose(_resampled_variance(g, counts), expected, rtol=1e-10)
