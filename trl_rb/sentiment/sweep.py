"""``trl-rb sweep CONFIG``: the sentiment experiment over methods x KL coefficients x seeds, resumable.

CONFIG is a YAML file:

    output_dir: outputs/sweep-review-lm   # one subfolder per run, e.g. rloo-RB-beta0.05-seed0
    trainer: rloo                         # or grpo, or a list of both
    methods: [MC, RB]
    kl_coefs: [0.02, 0.1, 0.5]
    seeds: [0, 1]
    args:                                 # any rloo_sentiment.py flag, passed to every run
      max_steps: 60

Runs whose folder holds an ``eval.json`` are finished and skipped, so an interrupted sweep continues where it
stopped (a run's folder only appears once the run is complete). Each run is ``trl_rb.sentiment.experiment.main`` in this
process; a failing run is reported and the sweep goes on (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SweepConfig", "SweepError", "load_sweep_config", "main", "run_sweep", "sweep_runs"]

# Flags the sweep sets for each run; the config's `args` must not set them.
_RESERVED = {"method", "init_kl_coef", "beta", "seed", "trainer", "output_dir", "config", "overwrite"}


class SweepError(ValueError):
    """A bad sweep config; the message names the key and the fix."""


@dataclass
class SweepConfig:
    """A parsed sweep config (see the module docstring for the YAML form).

    Attributes:
        output_dir: folder holding one subfolder per run.
        trainers: ``rloo`` and/or ``grpo``.
        methods: KL estimators, ``MC``, ``RB`` or ``K3``, upper-cased.
        kl_coefs: KL coefficients (beta), each >= 0.
        seeds: integer seeds.
        args: extra rloo_sentiment.py flags for every run (name -> value).
    """

    output_dir: Path
    trainers: list[str]
    methods: list[str]
    kl_coefs: list[float]
    seeds: list[int]
    args: dict[str, Any] = field(default_factory=dict)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_sweep_config(path: str | Path, output_dir: str | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; ``output_dir`` overrides the file's."""
    import yaml

    from .experiment import METHODS, TRAINERS

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"cannot read {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must be a YAML mapping with methods, kl_coefs, seeds (and output_dir, args)")
    unknown = set(data) - {"output_dir", "trainer", "trainers", "methods", "kl_coefs", "seeds", "args"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; put rloo_sentiment.py flags under `args:`")
    missing = [k for k in ("methods", "kl_coefs", "seeds") if k not in data]
    if missing:
        raise SweepError(f"{path}: missing {missing} (lists of values to sweep)")
    out = output_dir or data.get("output_dir")
    if not out:
        raise SweepError(f"{path}: no output_dir; set it in the file or pass --output_dir")
    trainers = [str(t).lower() for t in _as_list(data.get("trainers", data.get("trainer", "rloo")))]
    methods = [str(m).upper() for m in _as_list(data["methods"])]
    bad = [t for t in trainers if t not in TRAINERS] + [m for m in methods if m not in METHODS]
    if bad:
        raise SweepError(f"{path}: unknown trainer/method {bad}; trainers: {list(TRAINERS)}, methods: {list(METHODS)}")
    try:
        kl_coefs = [float(c) for c in _as_list(data["kl_coefs"])]
        seeds = [int(s) for s in _as_list(data["seeds"])]
    except (TypeError, ValueError):
        raise SweepError(f"{path}: kl_coefs must be numbers and seeds integers") from None
    if any(c < 0 for c in kl_coefs):
        raise SweepError(f"{path}: kl_coefs must be >= 0")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise SweepError(f"{path}: args must be a mapping of rloo_sentiment.py flag names to values")
    reserved = sorted(_RESERVED & set(args))
    if reserved:
        raise SweepError(f"{path}: args sets {reserved}, which the sweep sets per run; remove them")
    if not (trainers and methods and kl_coefs and seeds):
        raise SweepError(f"{path}: trainer(s), methods, kl_coefs and seeds must each have at least one value")
    return SweepConfig(Path(out), trainers, methods, kl_coefs, seeds, args)


def _flag_values(name: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *(str(v) for v in value)]
    if isinstance(value, dict):
        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", str(value)]


def sweep_runs(config: SweepConfig) -> list[tuple[str, list[str]]]:
    """(run folder name, rloo_sentiment.py argv) for every combination, trainer x method x coefficient x seed."""
    from .experiment import run_name

    base = [item for name, value in config.args.items() for item in _flag_values(name, value)]
    runs = []
    for trainer, method, coef, seed in itertools.product(
        config.trainers, config.methods, config.kl_coefs, config.seeds
    ):
        name = run_name(trainer, method, coef, seed)
        argv = [
            "--trainer", trainer, "--method", method, "--init_kl_coef", repr(coef), "--seed", str(seed),
            "--output_dir", str(config.output_dir / name), *base,
        ]  # fmt: skip
        runs.append((name, argv))
    return runs


def run_sweep(config: SweepConfig, *, dry_run: bool = False) -> dict[str, list[str]]:
    """Run every unfinished run; returns the run names by outcome: ``done``, ``skipped``, ``failed``."""
    from .experiment import main as run_one

    runs = sweep_runs(config)
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    width = len(str(len(runs)))
    for i, (name, argv) in enumerate(runs, 1):
        tag = f"[{i:>{width}}/{len(runs)}] {name}"
        eval_path = config.output_dir / name / "eval.json"
        if eval_path.is_file():
            print(f"{tag}: finished earlier, skipped", flush=True)
            outcome["skipped"].append(name)
            continue
        if dry_run:
            print(f"{tag}: would run rloo_sentiment.py {' '.join(argv)}", flush=True)
            continue
        print(f"{tag}: running", flush=True)
        started = time.time()
        try:
            code = run_one(argv)
        except Exception:  # one broken run must not stop the sweep; the traceback says why
            traceback.print_exc()
            code = 1
        if code == 2 and not outcome["done"]:
            # Bad input in the first run is bad input for every run: stop instead of repeating the error.
            raise SweepError(f"run {name} rejected its arguments (see the message above); fix `args:` in the config")
        if code != 0 or not eval_path.is_file():
            print(f"{tag}: FAILED (exit code {code}) after {time.time() - started:.0f} s", flush=True)
            outcome["failed"].append(name)
            continue
        result = json.loads(eval_path.read_text())
        print(
            f"{tag}: reward {result['reward']:.3f} +- {result['reward_se']:.3f}, KL rb {result['kl_rb']:.3f} "
            f"+- {result['kl_rb_se']:.3f} ({time.time() - started:.0f} s)",
            flush=True,
        )
        outcome["done"].append(name)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """``trl-rb sweep CONFIG``: 0 when every run finished, 1 when some failed, 2 on a bad config."""
    parser = argparse.ArgumentParser(
        prog="trl-rb sweep",
        description="Run the sentiment experiment for every trainer x method x KL coefficient x seed in CONFIG "
        "(YAML), one subfolder per run; finished runs (with an eval.json) are skipped.",
    )
    parser.add_argument("config", metavar="CONFIG", help="sweep YAML (see configs/sweep_review_lm.yaml)")
    parser.add_argument("--output_dir", default=None, help="override the config's output_dir")
    parser.add_argument("--dry_run", action="store_true", help="list the runs without running them")
    args = parser.parse_args(argv)
    try:
        config = load_sweep_config(args.config, args.output_dir)
        n = len(config.trainers) * len(config.methods) * len(config.kl_coefs) * len(config.seeds)
        print(f"sweep: {n} runs into {config.output_dir}", flush=True)
        started = time.time()
        outcome = run_sweep(config, dry_run=args.dry_run)
    except SweepError as err:
        print(f"trl-rb sweep: error: {err}", file=sys.stderr)
        return 2
    print(
        f"sweep: {len(outcome['done'])} run, {len(outcome['skipped'])} skipped, {len(outcome['failed'])} failed "
        f"in {time.time() - started:.0f} s. Plot: trl-rb pareto {config.output_dir}",
        flush=True,
    )
    if outcome["failed"]:
        print(f"failed runs: {', '.join(outcome['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
