"""``trl-rb study CONFIG``: the sentiment sweep, gradient-noise measurements and a report with confidence intervals.

CONFIG is a sweep YAML (see ``trl_rb_experiments.studies.sweep``) with one more section:

    study:
      noise:                 # per trainer: the run whose checkpoints the gradient noise is measured at
        rloo: {method: RB, kl_coef: 0.1, seed: 0}
        grpo: {method: RB, kl_coef: 0.3, seed: 0}
      noise_batches: 32      # generation batches per measurement (learning rate 0)
      bootstrap: 2000        # resamples of the seeds for the intervals
      kl_levels: 3           # KL levels at which rewards are compared

One command does everything, resumably: (1) the sweep (finished runs skipped; the noise runs also save their model
every quarter of their steps); (2) for each noise run and each of its checkpoints at a quarter, half and all of its
steps (at step 0, the reference itself, every estimator's KL term and its gradient are exactly 0, so all methods
give one gradient) and each of its arm's methods, the gradient of the loss on ``noise_batches`` batches at learning
rate 0 (after ``NOISE_WARMUP`` unrecorded ones), same batches and completions for every method (``{output_dir}/noise/*.json``); (3) the report: ``study.md``, ``study.json``,
``study_pareto.png`` and ``study_reward_vs_step.png`` in ``output_dir``. The statistics are in ``study_report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sweep import SweepConfig, SweepError, parse_sweep_config, run_sweep, sweep_runs

__all__ = ["NoiseRun", "StudyConfig", "load_study_config", "main", "measure_gradient_noise", "study_runs"]


@dataclass(frozen=True)
class NoiseRun:
    """The run of one trainer whose checkpoints the gradient noise is measured at."""

    trainer: str
    method: str
    kl_coef: float
    seed: int


@dataclass
class StudyConfig:
    """A parsed study config.

    Attributes:
        sweep: the runs (every arm x method x coefficient x seed).
        noise: the noise run per trainer (trainers without one get no noise measurement).
        noise_batches: generation batches per gradient-noise measurement.
        bootstrap: resamples of the seeds behind every interval.
        kl_levels: how many KL levels rewards are compared at.
    """

    sweep: SweepConfig
    noise: dict[str, NoiseRun]
    noise_batches: int = 32
    bootstrap: int = 2000
    kl_levels: int = 3

    @property
    def max_steps(self) -> int:
        from ..sentiment.experiment import EXPERIMENT_DEFAULTS

        return int(self.sweep.args.get("max_steps", EXPERIMENT_DEFAULTS["max_steps"]))


def load_study_config(path: str | Path, output_dir: str | None = None) -> StudyConfig:
    """Read and validate a study YAML (a sweep config plus ``study:``); ``output_dir`` overrides the file's."""
    from ..sentiment.experiment import run_name
    from .sweep import _read_yaml

    data = _read_yaml(path)
    study = data.pop("study", None) or {}
    sweep = parse_sweep_config(data, path, output_dir)
    unknown = sorted(set(study) - {"noise", "noise_batches", "bootstrap", "kl_levels"})
    if unknown:
        raise SweepError(f"{path}: unknown keys under study: {unknown} (noise, noise_batches, bootstrap, kl_levels)")
    try:
        numbers = {k: int(study.get(k, d)) for k, d in (("noise_batches", 32), ("bootstrap", 2000), ("kl_levels", 3))}
    except (TypeError, ValueError):
        raise SweepError(f"{path}: study.noise_batches, bootstrap and kl_levels must be integers") from None
    if numbers["noise_batches"] < 2 or numbers["bootstrap"] < 100 or numbers["kl_levels"] < 1:
        raise SweepError(f"{path}: study needs noise_batches >= 2, bootstrap >= 100 and kl_levels >= 1")
    names = {name for name, _ in sweep_runs(sweep)}
    noise = {}
    for trainer, spec in (study.get("noise") or {}).items():
        try:
            run = NoiseRun(str(trainer).lower(), str(spec["method"]).upper(), float(spec["kl_coef"]), int(spec["seed"]))
        except (KeyError, TypeError, ValueError):
            raise SweepError(f"{path}: study.noise.{trainer} needs method, kl_coef and seed") from None
        if run_name(run.trainer, run.method, run.kl_coef, run.seed) not in names:
            raise SweepError(f"{path}: study.noise.{trainer} ({spec}) is not one of the sweep's runs")
        noise[run.trainer] = run
    config = StudyConfig(sweep, noise, **numbers)
    if noise and config.max_steps < 4:
        raise SweepError(f"{path}: the noise runs need args.max_steps >= 4 (checkpoints every quarter of the steps)")
    return config


def study_runs(config: StudyConfig) -> list[tuple[str, list[str]]]:
    """The sweep's runs; each noise run also saves its model every quarter of its steps (``checkpoint-{step}``)."""
    from ..sentiment.experiment import run_name

    noise_names = {run_name(r.trainer, r.method, r.kl_coef, r.seed) for r in config.noise.values()}
    save = ["--save_strategy", "steps", "--save_steps", str(config.max_steps // 4), "--save_only_model", "true"]
    return [(name, argv + save if name in noise_names else argv) for name, argv in sweep_runs(config.sweep)]


def _reference(config: StudyConfig) -> str:
    from ..sentiment.review_lm import review_lm_path

    return str(config.sweep.args.get("model_name_or_path") or review_lm_path())


def _checkpoints(config: StudyConfig, run: NoiseRun) -> list[tuple[int, str]]:
    """(step, model folder) of the noise run at a quarter, half and all of its steps."""
    from ..sentiment.experiment import run_name

    folder = config.sweep.output_dir / run_name(run.trainer, run.method, run.kl_coef, run.seed)
    quarter = config.max_steps // 4
    return [(quarter, str(folder / f"checkpoint-{quarter}")), (2 * quarter, str(folder / f"checkpoint-{2 * quarter}")),
            (config.max_steps, str(folder))]  # fmt: skip


NOISE_WARMUP = 4
"""Batches trained on (learning rate 0) before the gradient noise is recorded, by every method alike: the online fit
of RB's gamma starts at MC and learns from earlier batches, as it would have during the run (its state is not
checkpointed)."""


def measure_gradient_noise(argv: list[str], model: str, reference: str, batches: int) -> dict[str, Any]:
    """Per-batch gradients of one configuration's loss at ``model`` (learning rate 0, no clipping).

    ``argv`` is a run's rloo_sentiment.py command line (its seed fixes the prompt order and the sampling, so every
    method sees the same batches and completions). The first ``NOISE_WARMUP`` batches are run but not recorded.
    Returns the ``batches`` x P gradient matrix (float64 tensor, P = number of trainable parameters) under ``grads``
    and the logged training rewards under ``rewards``.
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from ..sentiment.experiment import parse_args, resolve_model, resolve_prompts, resolve_reward

    grads: list[torch.Tensor] = []
    rewards: list[float] = []

    class RecordGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    with tempfile.TemporaryDirectory(prefix="trl-rb-noise-") as tmp:
        overrides = ["--learning_rate", "0", "--max_steps", str(NOISE_WARMUP + batches), "--max_grad_norm", "0",
                     "--output_dir", tmp, "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip
        script_args, train_config, trainer_cls = parse_args([*argv, *overrides])
        _, tokenizer = resolve_model(script_args)
        torch.set_num_threads(script_args.torch_threads or 1)
        trainer = trainer_cls(
            model=model, ref_model=reference, reward_funcs=resolve_reward(script_args), args=train_config,
            train_dataset=Dataset.from_dict({"prompt": resolve_prompts(script_args)["train"]}),
            processing_class=tokenizer, callbacks=[RecordGradient()],
        )  # fmt: skip
        trainer.train()
    if len(grads) != NOISE_WARMUP + batches:
        raise RuntimeError(f"expected {NOISE_WARMUP + batches} optimizer steps, recorded {len(grads)}")
    return {"grads": torch.stack(grads[NOISE_WARMUP:]), "rewards": rewards[-batches:]}


def _resampled_variance(g: Any, counts: Any) -> Any:
    """Trace of the per-batch covariance of ``g`` [n, P] for each bootstrap resample, given as batch counts [B, n]:
    from the n x n Gram matrix, so a resample costs O(n^2), not O(n P). Returns [B] float64 (numpy)."""
    import numpy as np

    gram = (g @ g.T).cpu().numpy()
    n = g.shape[0]
    c = counts.astype(np.float64)
    # sum_i c_i |g_i - m|^2 with m = sum_i c_i g_i / n, divided by n - 1 (the unbiased per-coordinate variance, summed)
    quad = np.einsum("bi,ij,bj->b", c, gram, c)
    return (c @ np.diag(gram) - quad / n) / (n - 1)


def _noise_summary(grads: dict[str, Any], rewards: dict[str, list[float]], n_boot: int, seed: int) -> dict[str, Any]:
    """Per method: |mean gradient|, per-batch variance (trace of the covariance), noise / signal; per other
    method against RB: the variance ratio with a bootstrap 95% interval over batches, the cosine of the means and
    the largest difference of the logged batch rewards (0 when both saw the same completions)."""
    import numpy as np
    import torch

    out: dict[str, Any] = {"methods": {}, "vs_rb": {}}
    for method, g in grads.items():
        mean = g.mean(0)
        var = float(g.var(0).sum())
        out["methods"][method] = {"mean_grad_norm": float(mean.norm()), "variance_trace": var,
                                  "noise_to_signal": var / float(mean.norm() ** 2)}  # fmt: skip
    rng = np.random.default_rng(seed)
    for method in [m for m in grads if m != "RB"]:
        if "RB" not in grads:
            break
        n = grads["RB"].shape[0]
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one repeated batch has variance 0
            ratios = _resampled_variance(grads["RB"], counts) / _resampled_variance(grads[method], counts)
        ratios[~np.isfinite(ratios)] = np.nan  # such resamples carry no ratio: left out of the interval
        cosine = torch.nn.functional.cosine_similarity(grads["RB"].mean(0), grads[method].mean(0), dim=0)
        out["vs_rb"][method] = {
            "variance_ratio_rb_over": out["methods"]["RB"]["variance_trace"] / out["methods"][method]["variance_trace"],
            "variance_ratio_ci95": [float(np.nanpercentile(ratios, 2.5)), float(np.nanpercentile(ratios, 97.5))],
            "cosine_of_means": float(cosine),
            "max_batch_reward_difference": float(np.max(np.abs(np.subtract(rewards["RB"], rewards[method])))),
        }
    return out


def run_noise(config: StudyConfig, measure: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Measure (or read back) the gradient noise at every checkpoint of every noise run; with ``measure=False``
    only what was measured before."""
    from tqdm.auto import tqdm

    from ..sentiment.experiment import run_name

    runs = dict(study_runs(config))
    results: dict[str, list[dict[str, Any]]] = {}
    for trainer, run in config.noise.items():
        arm = next(a for a in config.sweep.arms if a.trainer == trainer)
        name = run_name(run.trainer, run.method, run.kl_coef, run.seed)
        argv = runs[name]
        results[trainer] = []
        for step, model in _checkpoints(config, run):
            path = config.sweep.output_dir / "noise" / f"{name}-step{step}.json"
            if not path.is_file() and not measure:
                continue
            if not path.is_file():
                grads, rewards = {}, {}
                for method in tqdm(arm.methods, desc=f"gradient noise {trainer} step {step}"):
                    method_argv = [*argv, "--method", method]
                    measured = measure_gradient_noise(method_argv, model, _reference(config), config.noise_batches)
                    grads[method], rewards[method] = measured["grads"], measured["rewards"]
                summary = {"trainer": trainer, "run": name, "step": step, "batches": config.noise_batches,
                           **_noise_summary(grads, rewards, config.bootstrap, run.seed)}  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(summary, indent=1))
                tmp.replace(path)  # the file appears only when the measurement is complete
            results[trainer].append(json.loads(path.read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    """``trl-rb study CONFIG``: 0 when every part finished, 1 when runs failed, 2 on a bad config."""
    parser = argparse.ArgumentParser(prog="trl-rb study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("config", metavar="CONFIG", help="study YAML (see configs/study_review_lm.yaml)")
    parser.add_argument("--output_dir", default=None, help="override the config's output_dir")
    parser.add_argument("--jobs", type=int, default=1, help="sweep runs at a time, each in its own process")
    parser.add_argument("--report_only", action="store_true", help="only write the report from what has finished")
    args = parser.parse_args(argv)
    try:
        config = load_study_config(args.config, args.output_dir)
    except SweepError as err:
        print(f"trl-rb study: error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    if not args.report_only:
        print(f"study: {config.sweep.n_runs} runs into {config.sweep.output_dir}", flush=True)
        outcome = run_sweep(config.sweep, jobs=args.jobs, runs=study_runs(config))
        if outcome["failed"]:
            print(f"study: failed runs: {', '.join(outcome['failed'])}; rerun to retry them", file=sys.stderr)
            return 1
        print(f"study: sweep done in {time.time() - started:.0f} s", flush=True)
    if not any(config.sweep.output_dir.glob("*/eval.json")):
        print(f"trl-rb study: error: no finished run in {config.sweep.output_dir}", file=sys.stderr)
        return 2
    noise = run_noise(config, measure=not args.report_only)
    from .study_report import write_report

    write_report(config, noise)
    print(f"study: report in {config.sweep.output_dir / 'study.md'} ({time.time() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
