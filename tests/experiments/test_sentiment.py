"""rloo_sentiment.py / trl_rb_experiments.sentiment: short runs of each method, the run folder, evaluation facts, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("trl")

from transformers.utils import logging as hf_logging  # noqa: E402

from trl_rb_experiments.sentiment.experiment import evaluate_policy, main, parse_args  # noqa: E402
from trl_rb_experiments.sentiment.review_lm import load_review_lm, review_prompts  # noqa: E402
from trl_rb_experiments.sentiment.rewards import vader_reward  # noqa: E402

hf_logging.set_verbosity_error()

# A quicker review LM than the default build (same recipe, fewer texts and steps), built once per session.
FAST_BUILD = dict(n_texts=2000, steps=150, progress=False)
TINY_RUN = [
    "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "2",
    "--max_completion_length", "8", "--eval_prompts", "8", "--eval_samples_per_prompt", "4",
    "--eval_reference", "false", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="session")
def review_cache(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "review-lm-cache"
    load_review_lm(cache, **FAST_BUILD)
    return cache


@pytest.fixture
def offline(review_cache, monkeypatch):
    """The default model resolves to the session's review LM."""
    monkeypatch.setenv("TRL_RB_CACHE", str(review_cache))
    return review_cache


def _prompt_files(folder, train=None, test=None):
    folder.mkdir(parents=True, exist_ok=True)
    for split, prompts in (("train", train), ("test", test)):
        prompts = review_prompts(split)[:40] if prompts is None else prompts
        (folder / f"reviews-{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return ["--filepath", str(folder), "--filename", "reviews"]


def _tiny_classifier(path):
    """A randomly initialized 2-class GPT-2 classifier over the review vocabulary, saved to ``path``."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from trl_rb_experiments.sentiment.review_lm import build_review_tokenizer

    tok = build_review_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, pad_token_id=tok.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _no_output(out):
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize(
    ("trainer", "method", "prompt_source"),
    [("rloo", "MC", "jsonl"), ("rloo", "rb", "default"), ("grpo", "RB", "default")],
)
def test_short_run_writes_a_complete_folder(offline, tmp_path, trainer, method, prompt_source, monkeypatch):
    import trl_rb_experiments.sentiment.experiment as sentiment

    titles = []
    plot = sentiment.plot_metrics
    monkeypatch.setattr(sentiment, "plot_metrics", lambda *a, title="": (titles.append(title), plot(*a, title=title)))
    out = tmp_path / "run"
    argv = ["--trainer", trainer, "--method", method, "--init_kl_coef", "0.1", "--output_dir", str(out), *TINY_RUN]
    if prompt_source == "jsonl":
        argv += _prompt_files(tmp_path / "data")
        argv += ["--reward_model", _tiny_classifier(tmp_path / "clf"), "--positive_label", "POSITIVE"]
    else:
        # An earlier finished run is replaced only with --overwrite.
        out.mkdir()
        (out / "eval.json").write_text("{}")
        argv.append("--overwrite")
    assert main(argv) == 0
    assert not out.with_name("run.partial").exists()
    for name in ("eval.json", "metrics.jsonl", "run_config.yaml", "training.png", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles == [f"{trainer.upper()} {method.upper()}, beta 0.1, seed 0"]  # not the folder's name

    result = json.loads((out / "eval.json").read_text())
    assert result["method"] == method.upper() and result["trainer"] == trainer and result["beta"] == 0.1
    assert result["kl_estimator"] == {"MC": "k1", "RB": "rb"}[method.upper()]
    assert result["n_prompts"] == 8 and result["samples_per_prompt"] == 4
    assert all(math.isfinite(result[k]) for k in ("reward", "reward_se", "kl_k1", "kl_k1_se", "kl_rb", "kl_rb_se"))
    assert result["kl_rb"] >= 0
    assert result["reward_model"] == ("vader" if prompt_source == "default" else str(tmp_path / "clf"))
    if prompt_source == "default":
        assert -1 <= result["reward"] <= 1  # VADER's compound score
    # k1 and rb estimate the same KL: they agree within their standard errors.
    assert abs(result["kl_k1"] - result["kl_rb"]) <= 4 * math.hypot(result["kl_k1_se"], result["kl_rb_se"]) + 1e-6

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("kl/rb" in r and "kl/k1" in r and math.isfinite(r["loss"]) for r in steps)

    import yaml

    config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert config["output_dir"] == str(out) and config["beta"] == 0.1 and config["disable_dropout"] is True
    assert not (out / "checkpoint-2").exists()


def test_parse_args_precedence_and_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: mc\ninit_kl_coef: 0.2\nlearning_rate: 3.0e-5\nmax_completion_length: 53\n")
    script, config, _ = parse_args(["--config", str(cfg), "--learning_rate", "2e-4", "--seed", "3"])
    assert script.method == "MC" and config.kl_estimator == "k1" and config.beta == 0.2
    assert config.learning_rate == 2e-4 and config.max_completion_length == 53 and config.seed == 3
    assert config.disable_dropout is True and config.save_strategy == "no" and config.logging_steps == 1
    assert config.output_dir.endswith("rloo-MC-beta0.2-seed3")
    script, config, _ = parse_args(["--method", "RB"])
    assert config.kl_estimator == "rb" and config.beta == 0.05 and script.model_name_or_path is None


def test_evaluation_facts(offline):
    torch.manual_seed(0)
    policy, tok = load_review_lm(offline)
    prompts = review_prompts("test")[:16]
    same = evaluate_policy(policy, policy, tok, prompts, vader_reward, samples_per_prompt=4, max_new_tokens=10,
                           progress=False)  # fmt: skip
    assert same["kl_k1"] == 0 and same["kl_rb"] == 0
    reference = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    res = evaluate_policy(policy, reference, tok, prompts, vader_reward, samples_per_prompt=8, max_new_tokens=10,
                          batch_size=24, progress=False)  # fmt: skip
    assert res["kl_rb"] > 0.05
    assert abs(res["kl_k1"] - res["kl_rb"]) <= 4 * math.hypot(res["kl_k1_se"], res["kl_rb_se"])
    # Seeded: the same call gives the same samples, and leaves the global RNG as it was.
    state = torch.random.get_rng_state()
    again = evaluate_policy(policy, reference, tok, prompts, vader_reward, samples_per_prompt=8, max_new_tokens=10,
                            batch_size=24, progress=False)  # fmt: skip
    assert again == res and torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("case", ["unknown_method", "missing_file", "no_prompt_field", "empty_file", "bad_trainer"])
def test_bad_input_exits_2_and_writes_nothing(offline, tmp_path, capsys, case):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), *TINY_RUN]
    data = tmp_path / "data"
    if case == "unknown_method":
        argv += ["--method", "PPO"]
        expected = "--method 'PPO' is not one of MC, RB"
    elif case == "missing_file":
        data.mkdir()
        argv += ["--filepath", str(data), "--filename", "imdb"]
        expected = "no train prompts for --filename 'imdb'"
    elif case == "no_prompt_field":
        argv += _prompt_files(data)
        (data / "reviews-test.jsonl").write_text('{"text": "the movie"}\n')
        expected = "no 'prompt' field"
    elif case == "empty_file":
        argv += _prompt_files(data)
        (data / "reviews-train.jsonl").write_text("")
        expected = "no train prompts"
    else:
        argv += ["--trainer", "ppo"]
        expected = "--trainer 'ppo' is not one of rloo, grpo"
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
    assert _no_output(out)


def test_a_finished_run_is_not_overwritten(offline, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "eval.json").write_text('{"reward": 1}')
    assert main(["--output_dir", str(out), *TINY_RUN]) == 2
    assert "already holds a finished run; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["eval.json"] and (out / "eval.json").read_text() == '{"reward": 1}'
    assert main(["--method", "RB", "--kl_estimator", "k1", "--output_dir", str(tmp_path / "x")]) == 2
    assert "contradicts --method RB" in capsys.readouterr().err
