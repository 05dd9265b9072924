"""Prompt files in every accepted format, their errors, and ``trl-rb prepare-imdb`` on a fake aclImdb tree."""

from __future__ import annotations

import json

import pytest

from trl_rb_experiments.sentiment.data import DataError, load_prompt_split, load_prompts, main, prepare_imdb

# Repeats on purpose: the loaded prompts are de-duplicated in first-seen order.
TRAIN = ["the movie", "it was", "the movie", "i saw this", "it was", "a film"]
TEST = ["the plot", "my wife and", "the plot"]
EXPECTED = {"train": ["the movie", "it was", "i saw this", "a film"], "test": ["the plot", "my wife and"]}


def _write_jsonl(path, prompts, field="prompt"):
    path.write_text("".join(json.dumps({field: p, "extra": 1}) + "\n" for p in prompts))


def _write(fmt, folder, name="imdb"):
    from datasets import Dataset, DatasetDict

    splits = {"train": TRAIN, "test": TEST}
    if fmt == "jsonl":
        for split, prompts in splits.items():
            _write_jsonl(folder / f"{name}-{split}.jsonl", prompts)
    elif fmt == "parquet":
        for split, prompts in splits.items():
            Dataset.from_dict({"prompt": prompts}).to_parquet(str(folder / f"{name}-{split}.parquet"))
    elif fmt == "csv":
        for split, prompts in splits.items():
            Dataset.from_dict({"prompt": prompts, "n": list(range(len(prompts)))}).to_csv(
                str(folder / f"{name}-{split}.csv"), index=False
            )
    elif fmt == "dataset_per_split":
        for split, prompts in splits.items():
            Dataset.from_dict({"prompt": prompts}).save_to_disk(str(folder / f"{name}-{split}"))
    elif fmt == "dataset_dict":
        DatasetDict({s: Dataset.from_dict({"prompt": p}) for s, p in splits.items()}).save_to_disk(str(folder / name))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "dataset_per_split", "dataset_dict"])
def test_every_format_gives_the_same_deduplicated_prompts(tmp_path, fmt):
    _write(fmt, tmp_path)
    assert load_prompts(tmp_path, "imdb") == EXPECTED


def test_missing_files_name_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=r"imdb-train\.jsonl.*prepare-imdb"):
        load_prompts(tmp_path, "imdb")
    with pytest.raises(DataError, match="not a folder"):
        load_prompts(tmp_path / "nope", "imdb")
    _write_jsonl(tmp_path / "imdb-train.jsonl", TRAIN)  # test split still missing
    with pytest.raises(DataError, match="no test prompts"):
        load_prompts(tmp_path, "imdb")


def test_bad_contents_are_rejected_with_the_line(tmp_path):
    path = tmp_path / "a-train.jsonl"
    path.write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n')
    with pytest.raises(DataError, match=r"line 2: no 'prompt' field"):
        load_prompt_split(tmp_path, "a", "train")
    path.write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_prompt_split(tmp_path, "a", "train")
    path.write_text("")
    with pytest.raises(DataError, match="no train prompts"):
        load_prompt_split(tmp_path, "a", "train")
    path.write_text('{"prompt": "  "}\n')
    with pytest.raises(DataError, match="no train prompts"):
        load_prompt_split(tmp_path, "a", "train")
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="not strings"):
        load_prompt_split(tmp_path, "a", "train")
    (tmp_path / "b-train.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="no 'prompt' column"):
        load_prompt_split(tmp_path, "b", "train")


def _fake_aclimdb(root):
    reviews = {
        ("train", "pos"): [
            "A wonderful film.<br /><br />Loved every minute of it, truly.",
            "Great acting and a fine story",
        ],
        ("train", "neg"): ["Terrible. Just terrible, from start to end", "Great acting and a fine story"],
        ("test", "pos"): ["One of the best films of the year, go and see it"],
        ("test", "neg"): ["I walked out<br/>after ten minutes of this nonsense"],
    }
    for (split, label), texts in reviews.items():
        folder = root / split / label
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(text)
    (root / "train" / "unsup").mkdir()  # present in the real release, not used


def _read(path):
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_prepare_imdb_from_an_aclimdb_tree(tmp_path, capsys):
    src, out = tmp_path / "aclImdb", tmp_path / "data"
    _fake_aclimdb(src)
    assert main([str(src), str(out)]) == 0
    assert "train prompts" in capsys.readouterr().out
    train, test = _read(out / "imdb-train.jsonl"), _read(out / "imdb-test.jsonl")
    assert 2 <= len(train) <= 4 and len(test) == 2
    for prompt in train + test:
        assert "<br" not in prompt and 2 <= len(prompt.split()) <= 8
    assert train[0].startswith("A wonderful film.")
    assert test[1].startswith("I walked out after")
    # The prompts load back, and the same seed gives the same files.
    assert load_prompts(out, "imdb")["test"] == test
    again = tmp_path / "again"
    prepare_imdb(src, again)
    assert _read(again / "imdb-train.jsonl") == train


def test_prepare_imdb_refuses_to_overwrite_and_bad_sources(tmp_path, capsys):
    src, out = tmp_path / "aclImdb", tmp_path / "data"
    _fake_aclimdb(src)
    assert main([str(src), str(out)]) == 0
    before = (out / "imdb-train.jsonl").read_text()
    assert main([str(src), str(out), "--min_words", "1", "--max_words", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "imdb-train.jsonl").read_text() == before
    assert main([str(src), str(out), "--min_words", "1", "--max_words", "1", "--overwrite"]) == 0
    assert all(len(p.split()) == 1 for p in _read(out / "imdb-train.jsonl"))
    assert main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert main([str(out), str(tmp_path / "o3")]) == 2  # a folder of jsonl files is not a source
    assert "neither an aclImdb folder" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "o4"), "--min_words", "5", "--max_words", "2"]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_prepare_imdb_from_a_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    texts = {"train": ["good movie, would watch again", "bad movie<br />really"], "test": ["okay I guess it was fine"]}
    DatasetDict({s: Dataset.from_dict({"text": t, "label": [0] * len(t)}) for s, t in texts.items()}).save_to_disk(
        str(tmp_path / "imdb_ds")
    )
    prepare_imdb(tmp_path / "imdb_ds", tmp_path / "out", min_words=2, max_words=2)
    assert _read(tmp_path / "out" / "imdb-train.jsonl") == ["good movie,", "bad movie"]
    assert _read(tmp_path / "out" / "imdb-test.jsonl") == ["okay I"]
    Dataset.from_dict({"review": ["x y z"]}).save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(DataError, match="no 'text' column"):
        prepare_imdb(tmp_path / "no_text", tmp_path / "out2")
