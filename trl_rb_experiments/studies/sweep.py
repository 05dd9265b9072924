"""``trl-rb sweep CONFIG``: the sentiment experiment over methods x KL coefficients x seeds, resumable.

CONFIG is a YAML file:

    output_dir: outputs/sweep-review-lm   # one subfolder per run, e.g. rloo-RB-beta0.05-seed0
    trainer: rloo                         # or grpo, or a list of both
    methods: [MC, RB]
    kl_coefs: [0.02, 0.1, 0.5]
    seeds: [0, 1]
    args:                                 # any rloo_sentiment.py flag, passed to every run
      max_steps: 60

Instead of ``trainer`` and ``methods``, ``arms`` lists trainers each with its own methods and flags, and optionally
its own ``kl_coefs`` (every arm runs its coefficients with every seed; its ``args`` add to, and override, the common
ones):

    arms:
      - {trainer: rloo, methods: [MC, RB]}
      - {trainer: grpo, methods: [K3, RB], kl_coefs: [0.1, 1.0], args: {loss_type: dr_grpo}}

Runs whose folder holds an ``eval.json`` are finished and skipped, so an interrupted sweep continues where it
stopped (a run's folder only appears once the run is complete). With ``--jobs 1`` (the default) each run is
``trl_rb_experiments.sentiment.experiment.main`` in this process; with more, runs go to that many child processes at a time,
each logging to ``{output_dir}/logs/{run}.log``. A failing run is reported and the sweep goes on (exit code 1 at the
end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SweepArm", "SweepConfig", "SweepError", "load_sweep_config", "main", "parse_sweep_config", "run_sweep",
    "sweep_runs",
]  # fmt: skip

# Flags the sweep sets for each run; the config's `args` must not set them.
_RESERVED = {"method", "init_kl_coef", "beta", "seed", "trainer", "output_dir", "config", "overwrite"}


class SweepError(ValueError):
    """A bad sweep config; the message names the key and the fix."""


@dataclass
class SweepArm:
    """One trainer with the methods it runs and its own flags.

    Attributes:
        trainer: ``rloo`` or ``grpo``.
        methods: KL estimators, ``MC``, ``RB`` or ``K3``, upper-cased.
        kl_coefs: KL coefficients (beta) of this arm, each >= 0.
        args: rloo_sentiment.py flags for this arm's runs (name -> value), over the common ``args``.
    """

    trainer: str
    methods: list[str]
    kl_coefs: list[float]
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """A parsed sweep config (see the module docstring for the YAML form).

    Attributes:
        output_dir: folder holding one subfolder per run.
        arms: the trainers, each with its methods, coefficients and flags (``trainer`` + ``methods`` + ``kl_coefs``
            give one arm per trainer).
        seeds: integer seeds.
        args: extra rloo_sentiment.py flags for every run (name -> value).
    """

    output_dir: Path
    arms: list[SweepArm]
    seeds: list[int]
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return sum(len(arm.methods) * len(arm.kl_coefs) for arm in self.arms) * len(self.seeds)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_sweep_config(path: str | Path, output_dir: str | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; ``output_dir`` overrides the file's."""
    return parse_sweep_config(_read_yaml(path), path, output_dir)


def _read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"cannot read {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must be a YAML mapping with methods, kl_coefs, seeds (and output_dir, args)")
    return data


def parse_sweep_config(data: dict, path: str | Path, output_dir: str | None = None) -> SweepConfig:
    """Validate a sweep config's mapping (``path`` names it in messages); ``output_dir`` overrides its own."""
    unknown = set(data) - {"output_dir", "trainer", "trainers", "methods", "arms", "kl_coefs", "seeds", "args"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; put rloo_sentiment.py flags under `args:`")
    arms_coefs = isinstance(data.get("arms"), list) and all(isinstance(a, dict) and "kl_coefs" in a for a in data["arms"])
    missing = [k for k in ("kl_coefs", "seeds") if k not in data and not (k == "kl_coefs" and arms_coefs)]
    missing += [] if "arms" in data or "methods" in data else ["methods"]
    if missing:
        raise SweepError(f"{path}: missing {missing} (lists of values to sweep)")
    out = output_dir or data.get("output_dir")
    if not out:
        raise SweepError(f"{path}: no output_dir; set it in the file or pass --output_dir")
    try:
        seeds = [int(s) for s in _as_list(data["seeds"])]
    except (TypeError, ValueError):
        raise SweepError(f"{path}: seeds must be integers") from None
    args = _check_args(data.get("args"), path, "args")
    arms = _parse_arms(data, path, _coefs(data.get("kl_coefs", []), path, "kl_coefs"))
    if not (arms and all(arm.methods and arm.kl_coefs for arm in arms) and seeds):
        raise SweepError(f"{path}: trainer(s), methods, kl_coefs and seeds must each have at least one value")
    return SweepConfig(Path(out), arms, seeds, args)


def _coefs(values: Any, path: str | Path, key: str) -> list[float]:
    try:
        coefs = [float(c) for c in _as_list(values)]
    except (TypeError, ValueError):
        raise SweepError(f"{path}: {key} must be numbers") from None
    if any(c < 0 for c in coefs):
        raise SweepError(f"{path}: {key} must be >= 0")
    return coefs


def _parse_arms(data: dict, path: str | Path, kl_coefs: list[float]) -> list[SweepArm]:
    from ..sentiment.experiment import METHODS, TRAINERS

    if "arms" in data:
        clash = sorted({"trainer", "trainers", "methods"} & set(data))
        if clash:
            raise SweepError(f"{path}: `arms` gives each trainer its methods; remove the top-level {clash}")
        if not isinstance(data["arms"], list) or not all(isinstance(a, dict) for a in data["arms"]):
            raise SweepError(f"{path}: arms must be a list of mappings with trainer, methods (and args)")
        raw = data["arms"]
    else:
        trainers = _as_list(data.get("trainers", data.get("trainer", "rloo")))
        raw = [{"trainer": t, "methods": data["methods"]} for t in trainers]
    arms = []
    for i, arm in enumerate(raw):
        unknown = sorted(set(arm) - {"trainer", "methods", "kl_coefs", "args"})
        if unknown or "trainer" not in arm or "methods" not in arm:
            raise SweepError(
                f"{path}: arms[{i}] needs trainer and methods (and optionally kl_coefs, args), got {sorted(arm)}"
            )
        trainer = str(arm["trainer"]).lower()
        methods = [str(m).upper() for m in _as_list(arm["methods"])]
        bad = [t for t in [trainer] if t not in TRAINERS] + [m for m in methods if m not in METHODS]
        if bad:
            raise SweepError(
                f"{path}: unknown trainer/method {bad}; trainers: {list(TRAINERS)}, methods: {list(METHODS)}"
            )
        coefs = _coefs(arm["kl_coefs"], path, f"arms[{i}].kl_coefs") if "kl_coefs" in arm else kl_coefs
        arms.append(SweepArm(trainer, methods, coefs, _check_args(arm.get("args"), path, f"arms[{i}].args")))
    trainers = [arm.trainer for arm in arms]
    if len(set(trainers)) != len(trainers):
        raise SweepError(f"{path}: a trainer appears in two arms ({trainers}); give it one arm with all its methods")
    return arms


def _check_args(args: Any, path: str | Path, key: str) -> dict[str, Any]:
    args = args or {}
    if not isinstance(args, dict):
        raise SweepError(f"{path}: {key} must be a mapping of rloo_sentiment.py flag names to values")
    reserved = sorted(_RESERVED & set(args))
    if reserved:
        raise SweepError(f"{path}: {key} sets {reserved}, which the sweep sets per run; remove them")
    return args


def _flag_values(name: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *(str(v) for v in value)]
    if isinstance(value, dict):
        return [f"--{name}", json.dumps(value)]
    return [f"--{name}", str(value)]


def sweep_runs(config: SweepConfig) -> list[tuple[str, list[str]]]:
    """(run folder name, rloo_sentiment.py argv) for every combination, arm x method x coefficient x seed."""
    from ..sentiment.experiment import run_name

    runs = []
    for arm in config.arms:
        flags = {**config.args, **arm.args}
        base = [item for name, value in flags.items() for item in _flag_values(name, value)]
        for method, coef, seed in itertools.product(arm.methods, arm.kl_coefs, config.seeds):
            name = run_name(arm.trainer, method, coef, seed)
            argv = [
                "--trainer", arm.trainer, "--method", method, "--init_kl_coef", repr(coef), "--seed", str(seed),
                "--output_dir", str(config.output_dir / name), *base,
            ]  # fmt: skip
            runs.append((name, argv))
    return runs


def _run_in_process(argv: list[str]) -> int:
    from ..sentiment.experiment import main as run_one

    try:
        return run_one(argv)
    except Exception:  # one broken run must not stop the sweep; the traceback says why
        traceback.print_exc()
        return 1


def _run_in_child(argv: list[str], log: Path) -> tuple[int, float]:
    """(exit code, seconds) of one run in a child process, its output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as handle:
        command = [sys.executable, "-m", "trl_rb_experiments.sentiment.experiment", *argv, "--disable_tqdm", "true"]
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.time() - started


def run_sweep(
    config: SweepConfig, *, dry_run: bool = False, jobs: int = 1, runs: list[tuple[str, list[str]]] | None = None
) -> dict[str, list[str]]:
    """Run every unfinished run (``runs``, default ``sweep_runs(config)``), ``jobs`` at a time; returns the run
    names by outcome: ``done``, ``skipped``, ``failed``."""
    runs = sweep_runs(config) if runs is None else runs
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    width = len(str(len(runs)))
    todo = []
    for i, (name, argv) in enumerate(runs, 1):
        tag = f"[{i:>{width}}/{len(runs)}] {name}"
        if (config.output_dir / name / "eval.json").is_file():
            print(f"{tag}: finished earlier, skipped", flush=True)
            outcome["skipped"].append(name)
        elif dry_run:
            print(f"{tag}: would run rloo_sentiment.py {' '.join(argv)}", flush=True)
        else:
            todo.append((tag, name, argv))
    if jobs <= 1:
        for tag, name, argv in todo:
            print(f"{tag}: running", flush=True)
            started = time.time()
            code = _run_in_process(argv)
            if code == 2 and not outcome["done"]:
                # Bad input in the first run is bad input for every run: stop instead of repeating the error.
                raise SweepError(f"run {name} rejected its arguments (see the message above); fix `args:` in the config")
            _report(config, tag, name, code, time.time() - started, outcome)
        return outcome
    print(f"sweep: {len(todo)} runs, {jobs} at a time; logs in {config.output_dir / 'logs'}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(_run_in_child, argv, config.output_dir / "logs" / f"{name}.log"): (tag, name)
            for tag, name, argv in todo
        }
        for future in as_completed(futures):
            tag, name = futures[future]
            _report(config, tag, name, *future.result(), outcome)
    return outcome


def _report(config: SweepConfig, tag: str, name: str, code: int, seconds: float, outcome: dict) -> None:
    eval_path = config.output_dir / name / "eval.json"
    if code != 0 or not eval_path.is_file():
        print(f"{tag}: FAILED (exit code {code}) after {seconds:.0f} s", flush=True)
        outcome["failed"].append(name)
        return
    result = json.loads(eval_path.read_text())
    print(
        f"{tag}: reward {result['reward']:.3f} +- {result['reward_se']:.3f}, KL rb {result['kl_rb']:.3f} "
        f"+- {result['kl_rb_se']:.3f} ({seconds:.0f} s)",
        flush=True,
    )
    outcome["done"].append(name)


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
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    args = parser.parse_args(argv)
    try:
        config = load_sweep_config(args.config, args.output_dir)
        print(f"sweep: {config.n_runs} runs into {config.output_dir}", flush=True)
        started = time.time()
        outcome = run_sweep(config, dry_run=args.dry_run, jobs=args.jobs)
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
