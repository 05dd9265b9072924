"""Step time and peak memory of trl.RLOOTrainer vs trl_rb.RLOOTrainer (kl_estimator k1 and rb), on the same config.

"trl" is trl's own trainer (its k1 penalty, fused LM head); "k1" is trl_rb's trainer with trl's penalty plus the
kl/k1 and kl/rb metrics (which cost the exact KL during scoring); "rb" is the Rao-Blackwellized penalty and the
analytic gradient term in the loss.

A small GPT-2 (2 layers, n_embd 128 by default) with GPT-2's vocabulary size (50257) and a word-level tokenizer, built
in a temporary directory; CPU; one thread. Each (mode, repeat) runs in a fresh subprocess so that its peak resident
set size (Linux ``VmHWM``: the largest RSS the process ever had, i.e. all of its CPU memory: Python, torch, the
models, optimizer state and activations) belongs to that mode alone. The step time is the wall time of a whole
optimizer step (generation, scoring, loss forward and backward, optimizer), median over the steps after warm-up,
then median over repeats; the CPU time of the process over the same steps is less sensitive to other load on the
machine (one thread: CPU time ~ work done). "train peak" is the peak RSS minus the RSS just before ``train()`` (what training adds).

Usage: python benchmarks/bench_rloo.py [--steps 6] [--warmup 2] [--repeats 2] [--n-embd 128] [--completion 32]
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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def build_model(path: str, vocab: int, n_embd: int, n_layer: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]"] + [f"t{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from trl_rb import RLOOConfig, RLOOTrainer

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
    # "trl": trl.RLOOTrainer itself (the baseline); "k1" / "rb": trl_rb.RLOOTrainer (which also logs kl/k1, kl/rb)
    config_cls, trainer_cls = (trl.RLOOConfig, trl.RLOOTrainer) if opts.child == "trl" else (RLOOConfig, RLOOTrainer)
    extra = {} if opts.child == "trl" else {"kl_estimator": opts.child}
    args = config_cls(
        **extra, output_dir=os.path.join(opts.model, f"out_{opts.child}"), beta=0.05,
        per_device_train_batch_size=opts.batch, num_generations=4, max_completion_length=opts.completion,
        max_steps=opts.warmup + opts.steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, disable_dropout=True, disable_tqdm=True, seed=0,
        generation_kwargs={"min_new_tokens": opts.completion},  # fixed lengths: both modes do the same work
    )
    timer = StepTimer()
    trainer = trainer_cls(opts.model, reward, args=args, train_dataset=prompts, callbacks=[timer])
    rss_before = _rss_kib("VmRSS")
    trainer.train()
    kl = [h for h in trainer.state.log_history if "kl" in h]
    print(json.dumps({
        "step_s": statistics.median(timer.times[opts.warmup:]),
        "cpu_s": statistics.median(timer.cpu_times[opts.warmup:]),
        "peak_kib": _rss_kib("VmHWM"),
        "train_peak_kib": _rss_kib("VmHWM") - rss_before,
        "kl_rb": kl[-1].get("kl/rb", float("nan")),
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
    parser.add_argument("--child", choices=["trl", "k1", "rb"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts)
        return 0

    modes = ("trl", "k1", "rb")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench_rloo_") as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, opts.vocab, opts.n_embd, opts.n_layer)
        base = [sys.executable, os.path.abspath(__file__), "--model", model]
        for flag in ("steps", "warmup", "batch", "completion"):
            base += [f"--{flag}", str(getattr(opts, flag))]
        for r in range(opts.repeats):
            for mode in modes:
                print(f"[{r + 1}/{opts.repeats}] {mode} ...", file=sys.stderr, flush=True)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
                proc = subprocess.run([*base, "--child", mode], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in results[mode])

    print(f"\nRLOO step on CPU (1 thread): GPT-2 n_layer={opts.n_layer} n_embd={opts.n_embd} vocab={opts.vocab}, "
          f"{opts.batch} completions x {opts.completion} tokens per step, beta=0.05; median of {opts.steps} steps "
          f"after {opts.warmup} warm-up, median of {opts.repeats} processes per mode\n")
    rows = [
        ("step wall time (s)", "step_s", 1.0, "{:.3f}"),
        ("step CPU time (s)", "cpu_s", 1.0, "{:.3f}"),
        ("peak RSS (MiB)", "peak_kib", 1 / 1024, "{:.0f}"),
        ("train peak (MiB)", "train_peak_kib", 1 / 1024, "{:.0f}"),
    ]
    print(f"| {'metric':<18} | {'trl':>8} | {'k1':>8} | {'rb':>8} | {'k1 / trl':>8} | {'rb / trl':>8} | {'rb / k1':>8} |")
    print("|" + "|".join("-" * (w + 2) for w in (18, 8, 8, 8, 8, 8, 8)) + "|")
    for label, key, scale, fmt in rows:
        base, k1, rb = med("trl", key), med("k1", key), med("rb", key)
        cells = [fmt.format(v * scale) for v in (base, k1, rb)] + [f"{x:.3f}" for x in (k1 / base, rb / base, rb / k1)]
        print(f"| {label:<18} | " + " | ".join(f"{c:>8}" for c in cells) + " |")
    print(f"\nlast logged kl/rb: k1 run {results['k1'][-1]['kl_rb']:.4g}, rb run {results['rb'][-1]['kl_rb']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
