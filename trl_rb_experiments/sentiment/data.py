"""Prompt files for the sentiment experiment, and ``trl-rb prepare-imdb`` to make them from a local IMDB copy.

A prompt set is a pair of splits, ``{filepath}/{filename}-train.*`` and ``{filepath}/{filename}-test.*``, each with
a ``prompt`` column (one JSON object per line with a ``prompt`` field, as the research code read). Accepted forms
for each split, tried in this order:

    {filename}-{split}.jsonl | .json (JSON lines) | .parquet | .csv | a ``datasets.save_to_disk`` folder
    {filename}/ a ``datasets.DatasetDict.save_to_disk`` folder with ``train`` and ``test`` splits

Prompts are de-duplicated keeping the first occurrence, so the order (and a seeded run) is reproducible; the
research code used ``set()``, whose order changes from one process to the next.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import tempfile
import zlib
from pathlib import Path

__all__ = ["DataError", "dedup", "load_prompt_split", "load_prompts", "main", "prepare_imdb", "write_jsonl"]

SPLITS = ("train", "test")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Bad input data: a missing file, a missing ``prompt`` column, an empty split. The message names the fix."""


def dedup(items: list[str]) -> list[str]:
    """``items`` without repeats, in first-seen order."""
    return list(dict.fromkeys(items))


def _read_jsonl(path: Path, column: str) -> list:
    values = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); expected one object per line"
                ) from None
            if not isinstance(row, dict) or column not in row:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}, line {number}: no {column!r} field (found {found}); every line needs one")
            values.append(row[column])
    return values


def _read_csv(path: Path, column: str) -> list:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return []
        if column not in reader.fieldnames:
            raise DataError(f"{path}: no {column!r} column (found {reader.fieldnames}); add a header named {column!r}")
        return [row[column] for row in reader]


def _read_parquet(path: Path, column: str) -> list:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise DataError(f"{path}: no {column!r} column (found {table.column_names})")
    return table.column(column).to_pylist()


def _read_dataset_folder(path: Path, column: str, split: str | None) -> list:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a folder that is not one of its own
        raise DataError(f"{path}: not a datasets.save_to_disk folder ({err})") from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path}: a DatasetDict without a {split!r} split (found {list(data)})")
        data = data[split]
    if column not in data.column_names:
        raise DataError(f"{path}: no {column!r} column (found {data.column_names})")
    return data[column]


def _find_split(filepath: Path, filename: str, split: str) -> tuple[Path, str | None]:
    """The file or folder holding ``split``, and the split name to select inside it (for a DatasetDict)."""
    base = filepath / f"{filename}-{split}"
    for suffix in _FILE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate, None
    if base.is_dir():
        return base, split
    whole = filepath / filename
    if whole.is_dir():
        return whole, split
    tried = ", ".join(f"{base.name}{s}" for s in _FILE_SUFFIXES)
    raise DataError(
        f"no {split} prompts for --filename {filename!r} in {filepath}: looked for {tried}, a folder {base.name}/, "
        f"or a DatasetDict folder {filename}/ (make them with `trl-rb prepare-imdb SRC {filepath}`)"
    )


def load_prompt_split(filepath: str | os.PathLike, filename: str, split: str, column: str = "prompt") -> list[str]:
    """The de-duplicated prompts of one split (see the module docstring for the accepted files)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    filepath = Path(filepath)
    if not filepath.is_dir():
        raise DataError(f"--filepath {str(filepath)!r} is not a folder")
    path, inner = _find_split(filepath, filename, split)
    if path.is_dir():
        values = _read_dataset_folder(path, column, inner)
    elif path.suffix in (".jsonl", ".json"):
        values = _read_jsonl(path, column)
    elif path.suffix == ".parquet":
        values = _read_parquet(path, column)
    else:
        values = _read_csv(path, column)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise DataError(f"{path}: {len(bad)} {column!r} values are not strings (first: {bad[0]!r})")
    prompts = dedup([v for v in values if v.strip()])
    if not prompts:
        raise DataError(f"{path}: no {split} prompts (the file is empty or every {column!r} is blank)")
    return prompts


def load_prompts(filepath: str | os.PathLike, filename: str, column: str = "prompt") -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}``, each de-duplicated in first-seen order."""
    return {split: load_prompt_split(filepath, filename, split, column) for split in SPLITS}


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# prepare-imdb
# ---------------------------------------------------------------------------------------------------------------

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _clean(text: str) -> str:
    return " ".join(_BREAK.sub(" ", text).split())


def _review_texts(src: Path) -> dict[str, list[str]]:
    """Review texts per split from an aclImdb folder ({split}/pos, {split}/neg) or a datasets folder."""
    if (src / "train" / "pos").is_dir() or (src / "train" / "neg").is_dir():
        out = {}
        for split in SPLITS:
            files = [f for label in ("pos", "neg") for f in sorted((src / split / label).glob("*.txt"))]
            out[split] = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        return out
    if (src / "dataset_dict.json").is_file() or (src / "dataset_info.json").is_file():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(src))
        if isinstance(data, DatasetDict):
            missing = [s for s in SPLITS if s not in data]
            if missing:
                raise DataError(f"{src}: the DatasetDict has no {missing} split(s) (found {list(data)})")
            parts = {s: data[s] for s in SPLITS}
        else:
            parts = {"all": data}
        for part in parts.values():
            if "text" not in part.column_names:
                raise DataError(f"{src}: no 'text' column (found {part.column_names})")
        if "all" not in parts:
            return {s: list(parts[s]["text"]) for s in SPLITS}
        # One unsplit Dataset: a stable hash of each text puts 1 in 10 reviews in the test split.
        texts = list(parts["all"]["text"])
        return {
            "train": [t for t in texts if zlib.crc32(t.encode()) % 10 != 0],
            "test": [t for t in texts if zlib.crc32(t.encode()) % 10 == 0],
        }
    raise DataError(
        f"{src} is neither an aclImdb folder (train/pos, train/neg, test/pos, test/neg with .txt reviews) "
        "nor a datasets.save_to_disk folder with a 'text' column"
    )


def prepare_imdb(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str = "imdb",
    min_words: int = 2,
    max_words: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``{out}/{name}-train.jsonl`` and ``-test.jsonl``: each review's first k words as ``{"prompt": ...}``.

    k is drawn uniformly from ``[min_words, max_words]`` with a seeded generator (trl's sentiment examples cut
    the query to 2-8 tokens); HTML line breaks are removed; repeated prompts are kept once, in first-seen order.
    Returns the paths written.
    """
    if not 1 <= min_words <= max_words:
        raise DataError(f"need 1 <= --min_words <= --max_words, got {min_words} and {max_words}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"SRC {str(src)!r} is not a folder (give the aclImdb folder or a datasets folder)")
    targets = {split: out / f"{name}-{split}.jsonl" for split in SPLITS}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    texts = _review_texts(src)
    rng = random.Random(seed)
    prompts = {}
    for split in SPLITS:
        cut = [" ".join(_clean(t).split()[: rng.randint(min_words, max_words)]) for t in texts[split]]
        prompts[split] = dedup([p for p in cut if p])
        if not prompts[split]:
            raise DataError(f"{src}: no {split} reviews found")
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_jsonl(targets[split], [{"prompt": p} for p in prompts[split]])
    return targets


def main(argv: list[str] | None = None) -> int:
    """``trl-rb prepare-imdb SRC OUT``: exit 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="trl-rb prepare-imdb",
        description="Turn a local IMDB copy (the aclImdb folder of the Stanford release, or a datasets.save_to_disk "
        "folder with a 'text' column) into {OUT}/imdb-train.jsonl and imdb-test.jsonl prompt files.",
    )
    parser.add_argument("src", metavar="SRC", help="aclImdb folder or datasets folder")
    parser.add_argument("out", metavar="OUT", help="output folder (created)")
    parser.add_argument("--name", default="imdb", help="file name prefix (default: imdb)")
    parser.add_argument("--min_words", type=int, default=2, help="shortest prompt, in words (default: 2)")
    parser.add_argument("--max_words", type=int, default=8, help="longest prompt, in words (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompt lengths (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing prompt files")
    args = parser.parse_args(argv)
    try:
        paths = prepare_imdb(
            args.src,
            args.out,
            name=args.name,
            min_words=args.min_words,
            max_words=args.max_words,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except DataError as err:
        print(f"trl-rb prepare-imdb: error: {err}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        count = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"wrote {count} {split} prompts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
