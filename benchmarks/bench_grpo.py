"""Step time and peak memory of GRPO: trl.GRPOTrainer (k3, the baseline) vs trl_rb.GRPOTrainer k3 and rb, one config.

The model, tokenizer, prompts and measurements are bench_rloo.py's (imported, not copied): a small GPT-2 with GPT-2's
vocabulary size (50257), CPU, one thread, every (mode, repeat) in a fresh subprocess so its peak RSS (``VmHWM``) is its
own. Completions have a fixed length so every mode does the same work. ``trl`` is trl's own GRPOTrainer with its
defaults for the KL (k3, use_bias_correction_kl=True); ``k3`` is trl_rb's trainer in k3 mode (trl's loss plus the
kl/k1 and kl/rb metrics); ``rb`` adds the RB surrogate to the loss. Goal: rb step time <= 1.15x trl, peak <= 1.25x.

Usage: python benchmarks/bench_grpo.py [--steps 6] [--warmup 2] [--repeats 2] [--n-embd 128] [--completion 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rloo import _rss_kib, build_model  # noqa: E402

MODES = ("trl", "k3", "rb")


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from trl_rb import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self._t0 = self._c0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

    def reward(completion_ids, **_):
        return [sum(t % 7 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    prompts = Dataset.from_dict({"prompt": [" ".join(f"t{(i * 31 + j) % 5000}" for j in range(8)) for i in range(64)]})
    common = dict(
        output_dir=os.path.join(opts.model, f"out_{opts.child}"), beta=0.05, loss_type="dr_grpo",
        per_device_train_batch_size=opts.batch, num_generations=4, max_completion_length=opts.completion,
        max_steps=opts.warmup + opts.steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, disable_dropout=True, disable_tqdm=True, seed=0,
        generation_kwargs={"min_new_tokens": opts.completion},
    )
    timer = StepTimer()
    if opts.child == "trl":
        trainer = trl.GRPOTrainer(opts.model, reward, args=trl.GRPOConfig(**common), train_dataset=prompts,
                                  callbacks=[timer])
    else:
        args = GRPOConfig(kl_estimator=opts.child, **common)
        trainer = GRPOTrainer(opts.model, reward, args=args, train_dataset=prompts, callbacks=[timer])
    rss_before = _rss_kib("VmRSS")
    trainer.train()
    print(json.dumps({
        "step_s": statistics.median(timer.times[opts.warmup:]),
        "cpu_s": statistics.median(timer.cpu_times[opts.warmup:]),
        "peak_kib": _rss_kib("VmHWM"),
        "train_peak_kib": _rss_kib("VmHWM") - rss_before,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per mode (modes alternate)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per step)")
    parser.add_argument("--completion", type=int, default=32, help="completion length (tokens, fixed)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts)
        return 0

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, opts.vocab, opts.n_embd, opts.n_layer)
        base = [sys.executable, os.path.abspath(__file__), "--model", model]
        for flag in ("steps", "warmup", "batch", "completion"):
            base += [f"--{flag}", str(getattr(opts, flag))]
        for r in range(opts.repeats):
            for mode in MODES:
                print(f"[{r + 1}/{opts.repeats}] {mode} ...", file=sys.stderr, flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run([*base, "--child", mode], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    print(f"\nGRPO step on CPU (1 thread): GPT-2 n_layer={opts.n_layer} n_embd={opts.n_embd} vocab={opts.vocab}, "
          f"{opts.batch} completions x {opts.completion} tokens per step, beta=0.05, dr_grpo; median of {opts.steps} "
          f"steps after {opts.warmup} warm-up, median of {opts.repeats} processes per mode\n")
    rows = [
        ("step wall time (s)", "step_s", 1.0, "{:.3f}"),
        ("step CPU time (s)", "cpu_s", 1.0, "{:.3f}"),
        ("peak RSS (MiB)", "peak_kib", 1 / 1024, "{:.0f}"),
        ("train peak (MiB)", "train_peak_kib", 1 / 1024, "{:.0f}"),
    ]
    print(f"| {'metric':<18} | {'trl (k3)':>9} | {'k3':>9} | {'rb':>9} | {'k3 / trl':>8} | {'rb / trl':>8} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for label, key, scale, fmt in rows:
        t, k3, rb = (med(m, key) for m in MODES)
        print(f"| {label:<18} | {fmt.format(t * scale):>9} | {fmt.format(k3 * scale):>9} | {fmt.format(rb * scale):>9} "
              f"| {k3 / t:>8.3f} | {rb / t:>8.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
