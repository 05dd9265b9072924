"""``trl-rb pareto`` on synthetic runs with a known frontier; ``trl-rb sweep`` config checks and resumption."""

from __future__ import annotations

import json

import pytest

from trl_rb_experiments.studies import pareto, sweep
from trl_rb_experiments.studies.pareto import RunPoint, frontier, frontier_shares, load_points

# (name, method, kl, reward). Frontier by increasing KL: a (0.1, 0.2), c (0.5, 0.5), d (1.0, 0.7), g (2.0, 0.9).
# b is dominated by a (more KL, less reward), e by d, f ties d's reward with more KL, h (2.0, 0.9) ties g exactly.
SYNTHETIC = [
    ("a", "RB", 0.1, 0.2), ("b", "MC", 0.3, 0.1), ("c", "MC", 0.5, 0.5), ("d", "RB", 1.0, 0.7),
    ("e", "MC", 1.2, 0.6), ("f", "MC", 1.5, 0.7), ("g", "RB", 2.0, 0.9), ("h", "RB", 2.0, 0.9),
]  # fmt: skip


def _write_runs(root, points=SYNTHETIC):
    for name, method, kl, reward in points:
        folder = root / f"rloo-{method}-{name}"
        folder.mkdir(parents=True)
        data = {"method": method, "reward": reward, "reward_se": 0.01, "kl_rb": kl, "kl_rb_se": 0.02, "kl_k1": kl}
        (folder / "eval.json").write_text(json.dumps(data))


def test_frontier_of_known_points():
    points = [RunPoint(name=n, method=m, kl=k, reward=r) for n, m, k, r in SYNTHETIC]
    assert [p.name for p in frontier(points)] == ["a", "c", "d", "g", "h"]
    assert frontier_shares(points) == {"MC": pytest.approx(1 / 5), "RB": pytest.approx(4 / 5)}
    # Each frontier point has the best reward among the points with at most its KL.
    for p in frontier(points):
        assert p.reward == max(q.reward for q in points if q.kl <= p.kl)
    assert frontier([]) == [] and frontier_shares([]) == {}


def test_pareto_cli_plots_and_prints_shares(tmp_path, capsys):
    _write_runs(tmp_path / "runs")
    assert pareto.main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "8 runs, 5 on the frontier" in out
    assert "RB: 80% of the frontier (4 of 5; 4 runs)" in out and "MC: 20% of the frontier (1 of 5; 4 runs)" in out
    assert (tmp_path / "runs" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert pareto.main([str(tmp_path / "runs"), "--output", str(tmp_path / "p" / "x.png")]) == 0
    assert (tmp_path / "p" / "x.png").is_file()
    assert [p.name for p in load_points(tmp_path / "runs")][:2] == ["rloo-MC-b", "rloo-MC-c"]


def test_pareto_cli_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pareto.main([str(tmp_path / "empty")]) == 2
    assert "no eval.json under" in capsys.readouterr().err
    assert pareto.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "odd" / "r").mkdir(parents=True)
    (tmp_path / "odd" / "r" / "eval.json").write_text('{"score": 1}')
    assert pareto.main([str(tmp_path / "odd")]) == 2
    assert not (tmp_path / "empty" / "pareto.png").exists()


def _sweep_config(tmp_path, **overrides):
    """A sweep YAML; an override of None removes that key."""
    data = {
        "output_dir": str(tmp_path / "sweep"),
        "methods": ["MC", "rb"],
        "kl_coefs": [0.1, 0.5],
        "seeds": [0],
        "args": {"max_steps": 3, "eval_prompts": 4},
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "sweep.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_runs_every_combination_and_resumes(tmp_path, monkeypatch, capsys):
    calls, failing = [], ["rloo-MC-beta0.5-seed0"]

    def fake_run(argv):
        """Stands in for rloo_sentiment.py: records the call and writes an eval.json (one run fails)."""
        calls.append(argv)
        out = argv[argv.index("--output_dir") + 1]
        if out.endswith(tuple(failing)):
            return 1
        import os

        os.makedirs(out)
        with open(os.path.join(out, "eval.json"), "w") as handle:
            json.dump({"reward": 0.5, "reward_se": 0.1, "kl_rb": 1.0, "kl_rb_se": 0.1, "method": "?"}, handle)
        return 0

    monkeypatch.setattr("trl_rb_experiments.sentiment.experiment.main", fake_run)
    config = _sweep_config(tmp_path)
    assert sweep.main([str(config)]) == 1  # one run failed
    out = capsys.readouterr().out
    names = ["rloo-MC-beta0.1-seed0", "rloo-MC-beta0.5-seed0", "rloo-RB-beta0.1-seed0", "rloo-RB-beta0.5-seed0"]
    assert [c[c.index("--output_dir") + 1].rsplit("/", 1)[1] for c in calls] == names
    assert "[2/4] rloo-MC-beta0.5-seed0: FAILED" in out and "[3/4] rloo-RB-beta0.1-seed0: reward 0.500" in out
    first = calls[0]
    assert first[:8] == ["--trainer", "rloo", "--method", "MC", "--init_kl_coef", "0.1", "--seed", "0"]
    assert dict(zip(first[-4::2], first[-3::2], strict=True)) == {"--max_steps": "3", "--eval_prompts": "4"}

    calls.clear()
    failing.clear()
    assert sweep.main([str(config)]) == 0  # resumes: only the failed run runs again
    assert [c[c.index("--output_dir") + 1].rsplit("/", 1)[1] for c in calls] == ["rloo-MC-beta0.5-seed0"]
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    calls.clear()
    assert sweep.main([str(config)]) == 0 and calls == []


def test_sweep_arms_give_each_trainer_its_methods_coefficients_and_flags(tmp_path):
    arms = [{"trainer": "rloo", "methods": ["MC", "RB"]},
            {"trainer": "grpo", "methods": ["k3", "RB"], "kl_coefs": [1.0], "args": {"loss_type": "dr_grpo", "max_steps": 5}}]  # fmt: skip
    config = sweep.load_sweep_config(_sweep_config(tmp_path, methods=None, arms=arms))
    runs = dict(sweep.sweep_runs(config))
    assert config.n_runs == len(runs) == 6
    assert sorted(runs) == sorted(["rloo-MC-beta0.1-seed0", "rloo-MC-beta0.5-seed0", "rloo-RB-beta0.1-seed0",
                                   "rloo-RB-beta0.5-seed0", "grpo-K3-beta1-seed0", "grpo-RB-beta1-seed0"])  # fmt: skip
    grpo = runs["grpo-K3-beta1-seed0"]
    flags = dict(zip(grpo[10::2], grpo[11::2], strict=True))
    assert flags == {"--max_steps": "5", "--eval_prompts": "4", "--loss_type": "dr_grpo"}  # the arm's value wins
    assert "--loss_type" not in runs["rloo-MC-beta0.1-seed0"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arms": [{"trainer": "rloo", "methods": ["MC"]}]}, "remove the top-level ['methods']"),
        ({"methods": None, "arms": [{"trainer": "rloo", "methods": ["MC"], "betas": [1]}]}, "arms[0] needs trainer"),
        ({"methods": None, "arms": [{"trainer": "rloo", "methods": ["MC"]}, {"trainer": "rloo", "methods": ["RB"]}]},
         "a trainer appears in two arms"),
        ({"methods": None, "arms": [{"trainer": "rloo", "methods": ["MC"], "args": {"beta": 1}}]},
         "arms[0].args sets ['beta']"),
        ({"methods": None, "arms": [{"trainer": "rloo", "methods": ["MC"], "kl_coefs": [-1]}]},
         "arms[0].kl_coefs must be >= 0"),
        ({"methods": ["PPO"]}, "unknown trainer/method ['PPO']"),
        ({"kl_coefs": [-1]}, "kl_coefs must be >= 0"),
        ({"args": {"seed": 3}}, "args sets ['seed']"),
        ({"max_steps": 3}, "unknown keys ['max_steps']"),
        ({"seeds": []}, "at least one value"),
        ({"trainer": "ppo"}, "unknown trainer/method ['ppo']"),
    ],
)
def test_sweep_rejects_bad_configs(tmp_path, capsys, overrides, message):
    assert sweep.main([str(_sweep_config(tmp_path, **overrides))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_sweep_missing_config(tmp_path, capsys):
    assert sweep.main([str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.experiment
def test_real_sweep_of_one_run_then_pareto(tmp_path, monkeypatch, tmp_path_factory, capsys):
    """One real (tiny) run through the sweep, then pareto on its folder."""
    from trl_rb_experiments.sentiment.review_lm import load_review_lm

    cache = tmp_path_factory.getbasetemp() / "review-lm-cache"
    load_review_lm(cache, n_texts=2000, steps=150, progress=False)  # shared with test_sentiment.py's session build
    monkeypatch.setenv("TRL_RB_CACHE", str(cache))
    args = {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 2, "max_completion_length": 8,
            "eval_prompts": 4, "eval_reference": False, "disable_tqdm": True}  # fmt: skip
    config = _sweep_config(tmp_path, methods=["RB"], kl_coefs=[0.1], args=args)
    assert sweep.main([str(config)]) == 0
    result = json.loads((tmp_path / "sweep" / "rloo-RB-beta0.1-seed0" / "eval.json").read_text())
    assert result["method"] == "RB" and result["beta"] == 0.1
    assert pareto.main([str(tmp_path / "sweep")]) == 0
    assert "RB: 100% of the frontier (1 of 1; 1 runs)" in capsys.readouterr().out
    # Two more runs in two child processes (--jobs 2), each logging to its own file; the finished run is skipped.
    config = _sweep_config(tmp_path, methods=["MC", "RB"], kl_coefs=[0.1], args=args)
    assert sweep.main([str(config), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "finished earlier, skipped" in out and "sweep: 1 run, 1 skipped, 0 failed" in out
    mc = json.loads((tmp_path / "sweep" / "rloo-MC-beta0.1-seed0" / "eval.json").read_text())
    assert mc["method"] == "MC" and (tmp_path / "sweep" / "logs" / "rloo-MC-beta0.1-seed0.log").stat().st_size > 0
