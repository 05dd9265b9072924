"""``trl-rb distill-study``: on-policy distillation of the review LM, trl's pathwise gradient against the RB gradient.

Teacher: the review LM (2 layers, ``load_review_lm``). Student: the same model cut to its first block (1 layer, the
teacher's embeddings, block 0, final norm and head; the layer-dropping initialization of distilled students). Each
method (``METHODS``) trains the student with ``trl_rb.DistillationTrainer`` on the review prompts, same seeds, same
steps, same learning rate, ``batch_size`` completions per step: ``pathwise`` (trl's loss), ``rb`` (the RB surrogate,
one completion per prompt), ``rb-loo`` (the RB surrogate with ``GROUP`` completions per prompt and the leave-one-out
per-position baseline of its score term). Every ``eval_every`` steps the sequence-level KL(student || teacher) on
held-out test prompts is estimated with ``trl_rb.estimate_kl`` (the RB estimate, mean +- standard error over
completions; fixed sampling seed), and the training wall time so far (evaluation excluded) is recorded.

Every (learning rate, seed, method) combination is one run. Outputs in ``--out``:
``runs/<method>-lr<lr>-seed<s>.json`` (one per finished run: a rerun skips it, so an interrupted
study resumes), ``distillation_study.png`` (KL against step and against training time, mean +- SE over seeds),
``gradient_noise.json`` (per-batch gradient variance of each method at the initial student) and
``summary.json`` / ``summary.md`` / the printed table, per learning rate: the KL at equal steps (the last
evaluation) and at equal wall time (each method's curve interpolated at the shortest of the methods' mean
training times), mean +- SE over seeds, and each method's difference from ``pathwise`` paired by seed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..stats import mean_se

__all__ = ["BASELINE", "METHODS", "main", "run_one", "summarize"]

GROUP = 4
"""Completions per prompt of the ``rb-loo`` method (its batches hold batch_size / GROUP prompts)."""

METHODS: dict[str, dict[str, Any]] = {
    "pathwise": {"kl_gradient": "pathwise"},
    "rb": {"kl_gradient": "rb"},
    "rb-loo": {"kl_gradient": "rb", "num_generations": GROUP, "rb_loo_baseline": True},
}
"""The trained methods: DistillationConfig fields of each (every batch holds ``batch_size`` completions)."""

NOISE_ONLY: dict[str, dict[str, Any]] = {"rb-groups": {"kl_gradient": "rb", "num_generations": GROUP, "rb_loo_baseline": False}}
"""Measured in the gradient-noise part only: rb-loo's batches without its baseline (what the baseline itself does)."""

BASELINE = "pathwise"
"""The method every other one is compared with (trl's gradient)."""


def _student_from(teacher: Any, n_layer: int) -> Any:
    """A copy of the teacher keeping its first ``n_layer`` transformer blocks."""
    student = copy.deepcopy(teacher)
    student.transformer.h = student.transformer.h[:n_layer]
    student.config.n_layer = n_layer
    return student


def _kl_on_test(student: Any, teacher: Any, tokenizer: Any, prompts: list[str], opts: argparse.Namespace) -> dict:
    from trl_rb.estimate.api import estimate_kl

    result = estimate_kl(student, teacher, tokenizer, prompts, samples_per_prompt=opts.eval_samples,
                         max_new_tokens=opts.max_new_tokens, estimators=("rb",), seed=1234, progress=False)  # fmt: skip
    rb = result.values["rb"].ravel()
    return {"kl_rb": float(rb.mean()), "kl_rb_se": float(rb.std(ddof=1) / math.sqrt(rb.size)),
            "kl_k1": float(result.values["k1"].mean())}  # fmt: skip


def _distiller(method: str, name: str, opts: argparse.Namespace, callbacks: list | None = None, **config: Any):
    """A DistillationTrainer of a fresh student from the review LM on the training prompts, with the study's
    settings (``config``: the fields that differ between uses). Returns (trainer, teacher, tokenizer)."""
    import torch
    from datasets import Dataset

    from trl_rb.trainers.distillation import DistillationConfig, DistillationTrainer

    from ..sentiment.review_lm import load_review_lm, review_prompts

    torch.set_num_threads(opts.torch_threads)
    teacher, tokenizer = load_review_lm(opts.cache_dir)
    args = DistillationConfig(
        output_dir=str(Path(opts.out) / "trainer" / name), **{**METHODS, **NOISE_ONLY}[method],
        per_device_train_batch_size=opts.batch_size, max_completion_length=opts.max_new_tokens, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, **config,
    )  # fmt: skip
    trainer = DistillationTrainer(_student_from(teacher, opts.student_layers), teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": review_prompts("train")}),
                                  processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
    return trainer, teacher, tokenizer


def run_one(method: str, lr: float, seed: int, opts: argparse.Namespace) -> dict:
    """Train one student; returns its record (settings and the evaluation curve)."""
    from transformers import TrainerCallback

    from ..sentiment.review_lm import review_prompts

    test_prompts = review_prompts("test")[: opts.eval_prompts]
    curve: list[dict] = []

    class Evaluate(TrainerCallback):
        """KL on the test prompts at step 0 and every eval_every steps; evaluation time is kept out of the clock."""

        def __init__(self) -> None:
            self.excluded, self.start = 0.0, time.perf_counter()

        def record(self, step: int) -> None:
            t0 = time.perf_counter()
            point = {"step": step, "train_seconds": t0 - self.start - self.excluded}
            point.update(_kl_on_test(trainer.model, teacher, tokenizer, test_prompts, opts))
            curve.append(point)
            self.excluded += time.perf_counter() - t0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.record(0)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % opts.eval_every == 0:
                self.record(state.global_step)

    trainer, teacher, tokenizer = _distiller(
        method, _run_name(method, lr, seed), opts, [Evaluate()], seed=seed, max_steps=opts.steps, learning_rate=lr,
        logging_steps=opts.eval_every, disable_tqdm=not opts.progress, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer.train()
    settings = ("steps", "batch_size", "max_new_tokens", "student_layers", "eval_prompts", "eval_samples")
    return {"gradient": method, "lr": lr, "seed": seed, "curve": curve,
            "settings": {k: v for k, v in vars(opts).items() if k in settings}}  # fmt: skip


def _run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def gradient_noise(opts: argparse.Namespace, batches: int, methods: list[str]) -> dict:
    """Per-batch gradient statistics of each method at the initial student (learning rate 0).

    Every method sees ``batches`` batches of ``batch_size`` completions drawn from the same prompts (a method with
    ``num_generations`` k takes the first batch_size / k of a batch's prompts, each k times). Per method: the norm of
    the mean gradient, the trace of the per-batch covariance (total variance), the noise-to-signal ratio
    trace / |mean|^2 (how many batches it takes for the mean to stand out of the noise), and the cosine between its
    mean gradient and the baseline method's.
    """
    import random

    import torch

    from ..sentiment.review_lm import review_prompts

    rng = random.Random(0)
    batch_prompts = [rng.sample(review_prompts("train"), opts.batch_size) for _ in range(batches)]
    out: dict[str, Any] = {"batches": batches, "batch_size": opts.batch_size}
    means = {}
    for method in methods:
        k = {**METHODS, **NOISE_ONLY}[method].get("num_generations", 1)
        trainer, _, _ = _distiller(method, f"noise-{method}", opts, learning_rate=0.0)
        trainer.model.train()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        grads = []
        for b, prompts in enumerate(batch_prompts):
            torch.manual_seed(b)
            rows = [{"prompt": p} for p in prompts[: opts.batch_size // k] for _ in range(k)]
            inputs = trainer._generate_and_score_completions(rows)
            loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=inputs["num_items_in_batch"])
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double())
        g = torch.stack(grads)
        means[method] = g.mean(0)
        signal, noise = float(means[method].norm() ** 2), float(g.var(0).sum())
        out[method] = {"mean_grad_norm": signal**0.5, "per_batch_variance_trace": noise, "noise_to_signal": noise / signal}
    for method in methods:
        if BASELINE in means:
            cosine = torch.nn.functional.cosine_similarity(means[method], means[BASELINE], dim=0)
            out[method]["cosine_to_" + BASELINE] = float(cosine)
    return out



def summarize(records: list[dict]) -> dict:
    """Per learning rate: KL at equal steps and at equal wall time per method (mean +- SE over seeds), and each
    method's difference from the baseline method paired by seed ("<method>_minus_pathwise_equal_steps" / "_time")."""
    return {f"{lr:g}": _summarize_lr([r for r in records if r["lr"] == lr]) for lr in sorted({r["lr"] for r in records})}


def _summarize_lr(records: list[dict]) -> dict:
    methods = [m for m in METHODS if any(r["gradient"] == m for r in records)]
    by = {g: {r["seed"]: r for r in records if r["gradient"] == g} for g in methods}
    final_time = {g: float(np.mean([r["curve"][-1]["train_seconds"] for r in by[g].values()])) for g in methods}
    budget = min(final_time.values())

    def at_time(record: dict) -> float:
        c = record["curve"]
        return float(np.interp(budget, [p["train_seconds"] for p in c], [p["kl_rb"] for p in c]))

    def final(record: dict) -> float:
        return record["curve"][-1]["kl_rb"]

    out: dict[str, Any] = {"equal_wall_time_seconds": budget, "mean_train_seconds": final_time, "methods": {}}
    for g in methods:
        runs = list(by[g].values())
        out["methods"][g] = {
            "seeds": sorted(by[g]),
            "initial_kl": mean_se([r["curve"][0]["kl_rb"] for r in runs]),
            "kl_equal_steps": mean_se([final(r) for r in runs]),
            "kl_equal_time": mean_se([at_time(r) for r in runs]),
        }
    base = by.get(BASELINE, {})
    for g in methods:
        if g == BASELINE:
            continue
        paired = sorted(set(by[g]) & set(base))
        out[f"{g}_minus_{BASELINE}_equal_steps"] = mean_se([final(by[g][s]) - final(base[s]) for s in paired])
        out[f"{g}_minus_{BASELINE}_equal_time"] = mean_se([at_time(by[g][s]) - at_time(base[s]) for s in paired])
    return out


def _table(summary: dict) -> str:
    def fmt(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.3f} +- {pair[1]:.3f}"

    rows = ["| lr | method | seeds | KL at step 0 | KL at equal steps | KL at equal wall time | train s (mean) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    notes = []
    for lr, part in summary.items():
        if lr == "gradient_noise":
            continue
        for g, m in part["methods"].items():
            rows.append(f"| {lr} | {g} | {len(m['seeds'])} | {fmt(m['initial_kl'])} | {fmt(m['kl_equal_steps'])} | "
                        f"{fmt(m['kl_equal_time'])} | {part['mean_train_seconds'][g]:.0f} |")  # fmt: skip
        for g in part["methods"]:
            if g != BASELINE:
                notes.append(f"lr {lr}: {g} - {BASELINE} (paired by seed): equal steps "
                             f"{fmt(part[f'{g}_minus_{BASELINE}_equal_steps'])}, equal wall time "
                             f"({part['equal_wall_time_seconds']:.0f} s) {fmt(part[f'{g}_minus_{BASELINE}_equal_time'])}")  # fmt: skip
    noise = summary.get("gradient_noise")
    if noise:
        notes.append(f"\ngradient noise at the initial student ({noise['batches']} batches of {noise['batch_size']}):")
        for g, n in noise.items():
            if isinstance(n, dict):
                notes.append(f"  {g}: |mean grad| {n['mean_grad_norm']:.4g}, per-batch variance (trace) "
                             f"{n['per_batch_variance_trace']:.4g}, noise / signal {n['noise_to_signal']:.3g}, "
                             f"cosine to {BASELINE}'s mean {n.get('cosine_to_' + BASELINE, float('nan')):.3f}")  # fmt: skip
    return "\n".join(rows + [""] + notes)


def plot(records: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    styles = ("-", "--", ":", "-.")
    colors = dict(zip(METHODS, ("tab:orange", "tab:blue", "tab:green"), strict=True))
    for (g, color), (i, lr) in itertools.product(colors.items(), enumerate(sorted({r["lr"] for r in records}))):
        runs = [r for r in records if r["gradient"] == g and r["lr"] == lr]
        if not runs:
            continue
        kl = np.array([[p["kl_rb"] for p in r["curve"]] for r in runs])
        mean = kl.mean(0)
        se = kl.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        for ax, x in ((axes[0], [p["step"] for p in runs[0]["curve"]]),
                      (axes[1], np.array([[p["train_seconds"] for p in r["curve"]] for r in runs]).mean(0))):  # fmt: skip
            ax.plot(x, mean, color=color, linestyle=styles[i % len(styles)], label=f"{g}, lr {lr:g} ({len(runs)} seeds)")
            ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time, s (evaluation excluded)")
    axes[0].set_ylabel("KL(student || teacher), test prompts (RB estimate)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trl-rb distill-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="outputs/distillation-study", help="output folder (resumes runs found there)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help=f"pathwise: trl's gradient; rb: the RB surrogate; rb-loo: rb with {GROUP} completions per "
                   "prompt and the leave-one-out baseline")  # fmt: skip
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="learning rates (each with every gradient)")
    p.add_argument("--batch_size", type=int, default=16,
                   help=f"completions per step (one per prompt; rb-loo: {GROUP} per prompt)")  # fmt: skip
    p.add_argument("--max_new_tokens", type=int, default=24, help="completion length limit, training and evaluation")
    p.add_argument("--student_layers", type=int, default=1)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--eval_prompts", type=int, default=64)
    p.add_argument("--eval_samples", type=int, default=4, help="completions per test prompt")
    p.add_argument("--torch_threads", type=int, default=1)
    p.add_argument("--cache_dir", default=None, help="review LM cache folder (default: ~/.cache/trl-rb)")
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.add_argument("--noise_batches", type=int, default=32,
                   help="batches for the gradient-noise measurement at the initial student (0: skip it)")  # fmt: skip
    opts = p.parse_args(argv)
    if opts.steps % opts.eval_every:
        p.error(f"--steps {opts.steps} must be a multiple of --eval_every {opts.eval_every} (equal-steps comparison).")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    runs_dir = Path(opts.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for lr, seed, method in itertools.product(opts.lrs, opts.seeds, opts.methods):
        path = runs_dir / f"{_run_name(method, lr, seed)}.json"
        if not path.exists():
            print(f"[distill-study] {method} lr {lr:g} seed {seed}", file=sys.stderr, flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run_one(method, lr, seed, opts), indent=1))
            tmp.replace(path)  # a run's file appears only once it is complete
        records.append(json.loads(path.read_text()))
    title = f"Review LM (2 layers) -> {opts.student_layers}-layer student, on-policy distillation"
    plot(records, Path(opts.out) / "distillation_study.png", title)
    if BASELINE in opts.methods and len(opts.methods) > 1:
        summary = summarize(records)
        (Path(opts.out) / "summary.json").write_text(json.dumps(summary, indent=1))
        if opts.noise_batches:
            noise_path = Path(opts.out) / "gradient_noise.json"
            noise_methods = [*opts.methods, *(NOISE_ONLY if "rb-loo" in opts.methods else ())]
            noise = json.loads(noise_path.read_text()) if noise_path.exists() else {}
            if noise.get("batches") != opts.noise_batches or any(m not in noise for m in noise_methods):
                noise = gradient_noise(opts, opts.noise_batches, noise_methods)
                noise_path.write_text(json.dumps(noise, indent=1))
            summary["gradient_noise"] = noise
            (Path(opts.out) / "summary.json").write_text(json.dumps(summary, indent=1))
        table = _table(summary)
        (Path(opts.out) / "summary.md").write_text(table + "\n")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
