"""``trl-rb estimate``: KL(p || q) between two language models with every estimator, side by side.

Example::

    trl-rb estimate --policy runs/rb-0.05 --output runs/rb-0.05/kl.json
    trl-rb estimate --policy P --reference Q --prompts prompts.txt --samples-per-prompt 20 --exact

Prints a table (one row per estimator); with ``--output OUT.json`` also writes ``OUT.json`` (summary), ``OUT.csv``
(per-sample values) and ``OUT.png`` (distributions and standard deviation against M), each atomically.
Exit code 2 on bad input, with a message naming the problem.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .api import ALL_ESTIMATORS, EstimateResult, resolve_estimator
from .defaults import ENTRY_POINT_GROUP, DefaultsError, EstimateDefaults, registered_defaults

__all__ = ["main", "read_prompts", "write_outputs"]


class UsageError(Exception):
    """Bad command-line input: reported as ``trl-rb estimate: error: ...`` with exit code 2."""


def _defaults_help() -> str:
    """The registered defaults (``trl_rb.estimate.defaults``) in a few words, for ``--help``."""
    try:
        registered = registered_defaults()
    except DefaultsError as err:
        return f"unusable: {err}"
    if registered is None:
        return f"none is registered under the entry-point group {ENTRY_POINT_GROUP}, so give --reference"
    return registered.description


def _registered_defaults(need_reference: bool, need_prompts: bool) -> EstimateDefaults:
    """The registered defaults, or a UsageError naming the flags to give instead."""
    missing = " and ".join(
        flag for flag, needed in (("--reference", need_reference), ("--prompts or --dataset", need_prompts)) if needed
    )
    try:
        registered = registered_defaults()
    except DefaultsError as err:
        raise UsageError(f"{err}; give {missing}.") from None
    if registered is None:
        raise UsageError(
            f"no default reference model and prompts are registered (entry-point group {ENTRY_POINT_GROUP}; "
            f"trl-rb's experiments package registers the review LM): give {missing}."
        )
    return registered


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-rb estimate",
        description="Estimate KL(policy || reference) with every estimator on the same samples (k1, k2, k3, cv, "
        "cv_opt, rb) and compare their means, spreads and, with --exact, their bias against the truth.",
    )
    p.add_argument(
        "--policy",
        required=True,
        help="folder of the policy: a save_pretrained model or a PEFT adapter folder (e.g. a run's output_dir)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="folder of the reference model (a model or an adapter folder). Default: an adapter policy's base model "
        "(adapter_config.json), else the model a run folder was trained from, else the registered default "
        f"reference ({_defaults_help()})",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts",
        default=None,
        help="text file with one prompt per line (blank lines skipped), or .jsonl with a 'prompt' field; any readable "
        "path (a pipe, <(...)), or - for standard input. Default (without --dataset): the registered default prompts",
    )
    src.add_argument("--dataset", default=None, help="a datasets.save_to_disk folder with a prompt column")
    p.add_argument(
        "--split",
        default=None,
        help="split of a --dataset DatasetDict (default: 'test' if present, else the only split)",
    )
    p.add_argument(
        "--prompt-column", default="prompt", help="column of --dataset holding the prompts (default: prompt)"
    )
    p.add_argument("--max-prompts", type=int, default=64, help="use the first N prompts (default: 64)")
    p.add_argument("--output", default=None, help="write OUT.json, and OUT.csv / OUT.png beside it")
    p.add_argument(
        "--samples-per-prompt", type=int, default=20, help="completions per prompt (default: 20, so M=10 has 2 groups)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="completion length limit (default: the run folder's max_completion_length, else 32)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: the run folder's temperature, else 1.0)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences generated and scored at once (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--estimators", default=",".join(ALL_ESTIMATORS), help=f"comma-separated (default: {','.join(ALL_ESTIMATORS)})"
    )
    p.add_argument("--m-values", default="1,5,10", help="sample counts M of the M-table (default: 1,5,10)")
    p.add_argument(
        "--exact", action="store_true", help="add the exact KL by enumerating every completion (tiny models only)"
    )
    p.add_argument(
        "--max-completions", type=int, default=200_000, help="enumeration limit of --exact (default: 200000)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); small models on a busy machine run much faster with 1",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a ``.jsonl`` file with a ``prompt`` field.

    ``path`` is any readable path: a regular file, a pipe or process substitution (``<(...)``), a FIFO or ``/dev/stdin``;
    ``-`` reads standard input. Their contents are text (one prompt per line) unless the name ends in ``.jsonl``.

    Raises:
        UsageError: a path that does not exist or cannot be read, a malformed JSON line or a line without a string
            ``prompt`` field (the line is named).
    """
    if str(path) == "-":
        path, text = Path("-"), sys.stdin.read()
    else:
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"--prompts: {path} is a folder; give a file (or --dataset for a saved dataset).")
        try:
            with open(path, encoding="utf-8") as handle:  # not is_file(): pipes and FIFOs are readable too
                text = handle.read()
        except FileNotFoundError:
            raise UsageError(f"--prompts: no such file: {path}") from None
        except OSError as err:
            raise UsageError(f"--prompts: cannot read {path}: {err.strerror or err}") from None
    if path.suffix.lower() != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--prompts {path}: line {number} is not valid JSON ({err.msg}).") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise UsageError(f"--prompts {path}: line {number} has no string 'prompt' field (got {line[:80]!r}).")
        prompts.append(prompt)
    return prompts


def _dataset_prompts(path: str, split: str | None, column: str) -> list[str]:
    if not Path(path).is_dir():
        raise UsageError(f"--dataset: no such folder: {path}")
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(f"--dataset {path} is not a datasets.save_to_disk folder: {err}") from None
    if isinstance(data, DatasetDict):
        splits = list(data)
        if split is None:
            split = "test" if "test" in data else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise UsageError(f"--dataset {path} has splits {splits}; choose one with --split.")
        if split not in data:
            raise UsageError(f"--dataset {path} has no split {split!r}; its splits are {splits}.")
        data = data[split]
    elif split is not None:
        raise UsageError(f"--split {split!r} given, but --dataset {path} is a single dataset without splits.")
    if column not in data.column_names:
        raise UsageError(
            f"--dataset {path} has no column {column!r}; its columns are {data.column_names} (use --prompt-column)."
        )
    prompts = data[column]
    bad = next((i for i, x in enumerate(prompts) if not isinstance(x, str)), None)
    if bad is not None:
        raise UsageError(
            f"--dataset {path}: column {column!r} must hold strings; row {bad} is a {type(prompts[bad]).__name__} "
            "(conversational prompts are not supported: render them to text first)."
        )
    return list(prompts)


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model of a PEFT adapter folder (``base_model_name_or_path`` of its adapter_config.json), or None
    when ``path`` is not an adapter folder."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{config} names no base_model_name_or_path: pass the base model with --reference.")
    return str(base)


def run_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """What a training run folder says about how its completions were sampled: ``max_new_tokens``, ``temperature``
    and the ``reference`` it was trained against (keys absent when unknown).

    Read from ``run_config.yaml`` (``rloo_sentiment.py``) or ``training_args.bin`` (the trainer's arguments, saved
    by ``trl-rb grpo|rloo`` and any HF Trainer run; unpickled, so only for folders you trust: your own runs).
    """
    folder = Path(path)
    values: dict[str, Any] = {}
    if (folder / "run_config.yaml").is_file():
        import yaml

        config = yaml.safe_load((folder / "run_config.yaml").read_text()) or {}
        values = {"max_new_tokens": config.get("max_completion_length"), "temperature": config.get("temperature")}
        values["reference"] = config.get("model_name_or_path")
    elif (folder / "training_args.bin").is_file():
        import torch

        args = torch.load(folder / "training_args.bin", weights_only=False)
        values = {"max_new_tokens": getattr(args, "max_completion_length", None)}
        values["temperature"] = getattr(args, "temperature", None)
    return {k: v for k, v in values.items() if v is not None}


def _load_model(path: str, flag: str, device: str):
    """A causal LM folder, or a PEFT adapter folder (its base model with the adapter merged in)."""
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        raise UsageError(f"{flag}: no such model folder: {path}")
    base = adapter_base(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path if base is None else base)
        if base is not None:
            from peft import PeftModel

            # merged: the exact KL reads plain LM heads, and a LoRA'd head would otherwise be missed
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"{flag} {path} is not a loadable causal LM or adapter folder: {err}") from None
    return model.to(device).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse_list(text: str, flag: str, convert: Callable[[str], Any]) -> list[Any]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{flag} is empty.")
    try:
        return [convert(x) for x in items]
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# Outputs, each written to a temporary file in the target folder and moved into place.
# --------------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(result: EstimateResult, output: str | os.PathLike, tokenizer: Any | None = None) -> list[Path]:
    """Write ``output`` (JSON), and the ``.csv`` and ``.png`` of the same stem beside it; returns the three paths.

    The CSV has one row per sample: prompt_index, sample_index, completion_tokens, one column per estimator and,
    with a ``tokenizer``, the decoded completion.
    """
    json_path = Path(output)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = json_path.with_suffix(".csv"), json_path.with_suffix(".png")

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_json_safe(result.to_dict()), f, indent=2)
            f.write("\n")

    def write_csv(tmp: str) -> None:
        names = result.estimators
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            text = ["completion"] if tokenizer is not None and result.completion_ids else []
            writer.writerow(["prompt_index", "sample_index", "completion_tokens", *names, *text])
            for i in range(result.n_prompts):
                for j in range(result.samples_per_prompt):
                    row = [i, j, int(result.lengths[i, j]), *(repr(float(result.values[n][i, j])) for n in names)]
                    if text:
                        row.append(tokenizer.decode(result.completion_ids[i][j]))
                    writer.writerow(row)

    _atomic_write(json_path, write_json)
    _atomic_write(csv_path, write_csv)
    _atomic_write(png_path, lambda tmp: _plot(result, tmp))
    return [json_path, csv_path, png_path]


def _mpl_version() -> tuple[int, int]:
    import matplotlib

    major, minor = matplotlib.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _plot(result: EstimateResult, path: str) -> None:
    """Left: per-sample estimates per estimator (box plots, mean marked, exact KL as a line). Right: standard
    deviation of the M-sample estimate against M, log-log, with each estimator's c / sqrt(M) line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = result.estimators
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(names) + 3.5))
    data = [result.values[n].reshape(-1) for n in names]
    # Spelled per matplotlib version: orientation= replaced vert= (3.10), tick_labels= replaced labels= (3.9).
    style = {"orientation": "horizontal"} if _mpl_version() >= (3, 10) else {"vert": False}
    style["tick_labels" if _mpl_version() >= (3, 9) else "labels"] = names
    ax1.boxplot(data, **style, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax1.scatter([d.mean() for d in data], range(1, len(names) + 1), marker="D", color="C3", zorder=3, label="mean")
    pooled = np.abs(np.concatenate(data))
    typical = float(np.quantile(pooled, 0.99)) if pooled.size else 0.0
    if typical > 0 and float(pooled.max()) > 20 * typical:
        # A few huge values (cv's exp(-R)) would squash every box: symlog keeps the bulk readable.
        ax1.set_xscale("symlog", linthresh=max(typical, 1e-6))
    if result.exact_kl is not None:
        ax1.axvline(result.exact_kl, color="k", ls="--", lw=1, label=f"exact KL {result.exact_kl:.4g}")
    ax1.invert_yaxis()
    ax1.set_xlabel("per-sample estimate of KL(p || q) (nats)")
    ax1.set_title(f"{result.n_prompts} prompts x {result.samples_per_prompt} samples")
    ax1.legend(loc="best", fontsize=8)

    table = result.m_table()
    ms = np.array(result.m_values, dtype=float)
    for k, name in enumerate(names):
        color = colors[k % len(colors)]
        emp = [table[name][m]["std"] for m in result.m_values]
        formula = np.array([table[name][m]["std_formula"] for m in result.m_values])
        pts = [(m, s) for m, s in zip(ms, emp, strict=True) if s is not None and s > 0]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", color=color, label=name)
        anchor = (
            pts[0][1] * math.sqrt(pts[0][0]) if pts else (formula[0] * math.sqrt(ms[0]) if formula[0] > 0 else None)
        )
        if anchor:
            ax2.plot(ms, anchor / np.sqrt(ms), ":", color=color, lw=1, label=None if pts else f"{name} (s/sqrt(M))")
    if not ax2.get_lines():  # every spread is 0 (e.g. the policy is the reference): nothing to draw on log axes
        ax2.text(0.5, 0.5, "no spread: every estimate is constant", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xticks(ms, [str(m) for m in result.m_values])
    ax2.set_xlabel("M (samples per prompt averaged)")
    ax2.set_ylabel("std of the M-sample estimate")
    ax2.set_title("spread against M (dotted: 1/sqrt(M) from the first point)")
    if ax2.get_lines():
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# main.
# --------------------------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    import torch

    from .api import estimate_kl

    defaults = run_defaults(args.policy) if Path(args.policy).is_dir() else {}
    if args.max_new_tokens is None:
        args.max_new_tokens = int(defaults.get("max_new_tokens", 32))
    if args.temperature is None:
        args.temperature = float(defaults.get("temperature", 1.0))
    if args.reference is None and Path(args.policy).is_dir():
        args.reference = adapter_base(args.policy) or defaults.get("reference")
    estimators = _parse_list(args.estimators, "--estimators", resolve_estimator)
    m_values = _parse_list(args.m_values, "--m-values", _positive_int)
    for flag, value in (
        ("--max-prompts", args.max_prompts),
        ("--samples-per-prompt", args.samples_per_prompt),
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)

    need_prompts = args.prompts is None and args.dataset is None
    registered = (
        _registered_defaults(args.reference is None, need_prompts) if need_prompts or args.reference is None else None
    )
    if args.prompts is not None:
        prompts, source = read_prompts(args.prompts), str(args.prompts)
    elif args.dataset is not None:
        prompts, source = _dataset_prompts(args.dataset, args.split, args.prompt_column), str(args.dataset)
    else:
        prompts, source = registered.load_prompts(), registered.prompts_source
    if not prompts:
        raise UsageError(f"no prompts in {source}: give a file or dataset with at least one prompt.")
    prompts = prompts[: args.max_prompts]

    policy = _load_model(args.policy, "--policy", device)
    if args.reference is None:
        reference, ref_tokenizer, reference_name = registered.load_reference(not args.no_progress)
        reference = reference.to(device).eval()
    else:
        reference = _load_model(args.reference, "--reference", device)
        ref_tokenizer = _load_tokenizer(args.reference)
        reference_name = str(args.reference)
    tokenizer = _load_tokenizer(args.policy)
    if tokenizer is None:
        if ref_tokenizer is None:
            raise UsageError(
                f"neither --policy {args.policy} nor the reference has a tokenizer saved beside the model."
            )
        print(f"note: no tokenizer in {args.policy}; using the reference's tokenizer.", file=sys.stderr)
        tokenizer, ref_tokenizer = ref_tokenizer, None

    try:
        result = estimate_kl(
            policy,
            reference,
            tokenizer,
            prompts,
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            estimators=estimators,
            batch_size=args.batch_size,
            seed=args.seed,
            m_values=m_values,
            exact=args.exact,
            exact_max_completions=args.max_completions,
            reference_tokenizer=ref_tokenizer,
            progress=not args.no_progress,
        )
    except ValueError as err:
        hint = ""
        if args.exact and "max_completions" in str(err):
            hint = " (--exact enumerates every completion: use it only with tiny vocabularies and short --max-new-tokens, or raise --max-completions)"
        raise UsageError(f"{err}{hint}") from None
    result.metadata.update(policy=str(args.policy), reference=reference_name, prompts=source)
    print(f"policy: {args.policy}\nreference: {reference_name}\nprompts: {source}")
    print(result.format_table())
    if args.output is not None:
        for path in write_outputs(result, args.output, tokenizer):
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trl-rb estimate``; returns the exit code (2 for bad input)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse prints its own message; --help exits 0, bad flags 2
        return int(exit_.code or 0)
    try:
        return _run(args)
    except UsageError as err:
        print(f"trl-rb estimate: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad estimator name and other API input errors raised before estimate_kl
        print(f"trl-rb estimate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
