"""The offline review LM: grammar, tokenizer, deterministic build, cache safety, and the rewards."""

from __future__ import annotations

import os

import pytest
import torch

from trl_rb_experiments.sentiment import review_lm
from trl_rb_experiments.sentiment.review_lm import (
    build_review_lm,
    build_review_tokenizer,
    generate_reviews,
    load_review_lm,
    review_lm_path,
    review_prompts,
)
from trl_rb_experiments.sentiment.rewards import classifier_reward, vader_reward

# A build small enough for a test (seconds), with the real recipe.
TINY = dict(n_texts=200, steps=6, batch_size=8, n_layer=1, n_embd=32, n_head=2, progress=False)


def test_tokenizer_covers_the_grammar_and_decodes_with_spaces():
    tok = build_review_tokenizer()
    texts = generate_reviews(300, seed=3)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == " " + text
    # trl decodes the completion alone and scores prompt + completion: the words must not run together.
    ids = tok("the movie was great .")["input_ids"]
    prompt, completion = tok.decode(ids[1:3]).strip(), tok.decode(ids[3:])
    assert prompt + completion == "the movie was great ."
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id} == {0, 1, 2, 3}
    assert 250 <= len(tok) <= 500


def test_grammar_text_is_of_mixed_sentiment():
    scores = vader_reward(generate_reviews(2000, seed=0))
    mean = sum(scores) / len(scores)
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert abs(mean) < 0.25
    assert positive > 0.25 and negative > 0.25


def test_prompts_are_held_out_and_deterministic():
    train, test = review_prompts("train"), review_prompts("test")
    assert len(train) > 200 and len(test) > 40
    assert not set(train) & set(test)
    assert len(set(train)) == len(train)
    assert review_prompts("test") == test
    assert all(2 <= len(p.split()) <= 4 for p in train + test)
    with pytest.raises(ValueError, match="split"):
        review_prompts("validation")


def test_build_is_deterministic(tmp_path):
    a, _ = build_review_lm(tmp_path / "a", seed=7, **TINY)
    b, _ = build_review_lm(tmp_path / "b", seed=7, **TINY)
    c, _ = build_review_lm(tmp_path / "c", seed=8, **TINY)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.generation_config.eos_token_id == 2 and a.generation_config.pad_token_id == 0


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_RB_CACHE", str(tmp_path / "c1"))
    assert review_lm_path() == tmp_path / "c1" / f"review-lm-v{review_lm.REVIEW_LM_VERSION}"
    monkeypatch.delenv("TRL_RB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert review_lm_path().parent == tmp_path / "xdg" / "trl-rb"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert review_lm_path().parent == tmp_path / "home" / ".cache" / "trl-rb"
    assert review_lm_path(tmp_path / "x").parent == tmp_path / "x"


def _load_in_child(cache_dir, marker_dir, index, queue):
    """Run in a forked process: load the review LM, record whether this process built it."""
    real_build = review_lm.build_review_lm

    def counting_build(out_dir, **kwargs):
        (marker_dir / f"built-{index}").touch()
        return real_build(out_dir, **kwargs)

    review_lm.build_review_lm = counting_build
    try:
        model, _ = load_review_lm(cache_dir, **TINY)
        queue.put((index, model.state_dict()["lm_head.weight"].sum().item()))
    except Exception as err:  # reported to the parent
        queue.put((index, repr(err)))


def test_concurrent_processes_build_once_and_leave_no_temp_folders(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    cache, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(cache, markers, i, queue)) for i in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, float) for v in results.values()), results
    assert len(set(results.values())) == 1  # every process loaded the same weights
    assert len(list(markers.iterdir())) == 1  # exactly one of them built
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [review_lm_path(cache).name]


def test_an_incomplete_cache_folder_is_rebuilt(tmp_path):
    path = review_lm_path(tmp_path)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"half written")
    model, tok = load_review_lm(tmp_path, **TINY)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert model.config.vocab_size == len(tok)


def test_failed_build_leaves_nothing(monkeypatch, tmp_path):
    def broken_build(out_dir, **kwargs):
        os.makedirs(out_dir, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(review_lm, "build_review_lm", broken_build)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_review_lm(tmp_path, **TINY)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_vader_reward_signs():
    good, bad, plain = vader_reward(["a wonderful , brilliant film .", "an awful , boring mess .", "i saw it ."])
    assert good > 0.5 and bad < -0.5 and plain == 0.0
    # Conversational completions: the last message's text is scored.
    assert vader_reward([[{"role": "assistant", "content": "great !"}]])[0] > 0


def test_classifier_reward_is_the_positive_logit(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = build_review_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=0,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompts, completions = ["the movie", "it is"], [" was great .", " a long film . i hated the plot ."]
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        with torch.no_grad():
            expected.append(model(**tok(p + c, return_tensors="pt")).logits[0, 1].item())
    reward = classifier_reward(tmp_path, batch_size=1)
    assert reward(completions=completions, prompts=prompts) == pytest.approx(expected, abs=1e-5)
    by_name = classifier_reward(tmp_path, positive_label="negative", batch_size=2)
    negative = by_name(completions=completions, prompts=prompts)
    assert negative != pytest.approx(expected)
    with pytest.raises(ValueError, match="not one of the model's labels"):
        classifier_reward(tmp_path, positive_label="neutral")
