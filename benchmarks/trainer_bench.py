"""Shared machinery of the trainer benchmarks (bench_rloo.py, bench_grpo.py): trl's trainer vs trl_rb's, one config.

A small GPT-2 (2 layers, n_embd 128 by default) with GPT-2's vocabulary size (50257) and a word-level tokenizer, built
in a temporary directory; CPU; one thread. Each (mode, repeat) runs in a fresh subprocess so that its peak resident
set size (Linux ``VmHWM``: the largest RSS the process ever had, i.e. all of its CPU memory: Python, torch, the
models, optimizer state and activations) belongs to that mode alone. The step time is the wall time of a whole
optimizer step (generation, scoring, loss forward and backward, optimizer), median over the steps after warm-up,
then median over repeats; the CPU time of the process over the same steps is less sensitive to other load on the
machine (one thread: CPU time ~ work done). "train peak" is the peak RSS minus the RSS just before ``train()`` (what
training adds). Completions run to ``--completion`` tokens: with a random model EOS has probability ~1/V per token
(``min_new_tokens`` would force the length, but it changes the sampling distribution, which rb refuses); the table
gives the mean completion length of each mode, so that it shows when a mode did less work.

A benchmark script names its modes and a ``make_trainer`` (see :func:`trainer_factory`) and calls :func:`main`, which
runs the script itself once per (mode, repeat) with ``--child MODE``; the child measures and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

BETA = 0.05
# (label, key in the child's JSON, scale to the printed unit, format); the README quotes these rows.
ROWS = (
    ("step wall time (s)", "step_s", 1.0, "{:.3f}"),
    ("step CPU time (s)", "cpu_s", 1.0, "{:.3f}"),
    ("peak RSS (MiB)", "peak_kib", 1 / 1024, "{:.0f}"),
    ("train peak (MiB)", "train_peak_kib", 1 / 1024, "{:.0f}"),
    ("completion tokens", "mean_length", 1.0, "{:.1f}"),
)
# The flags the driver forwards to each child (the model flags only shape build_model, which the driver runs).
_CHILD_FLAGS = ("steps", "warmup", "batch", "completion")

MakeTrainer = Callable[..., Any]
# The rb mode without the fused loss head (see trainer_factory).
SEPARATE_RB = "rb_separate"


def _rss_kib(field: str) -> int:
    """``field`` (e.g. ``"VmRSS"``, ``"VmHWM"``) of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where it cannot be read)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_worker(script: str, args: list[str], threads: int) -> dict:
    """Run ``script --worker ARGS --threads T`` in a fresh process; its last stdout line as JSON, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", *args, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_model(path: str, vocab: int, n_embd: int, n_layer: int) -> None:
    """Save a randomly initialised GPT-2 and a word-level tokenizer (tokens ``t0``, ``t1``, ...) to ``path``."""
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


def _step_timer() -> Any:
    """A TrainerCallback recording every optimizer step's wall time (``times``) and process CPU time (``cpu_times``).

    The class is defined here rather than at module level so that the driver and ``--help`` need not import
    transformers.
    """
    from transformers import TrainerCallback

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

    return StepTimer()


def reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """Fraction of completion tokens whose id is a multiple of 7: cheap, so the step time is the trainer's."""
    return [sum(t % 7 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def prompt_dataset() -> Any:
    """64 prompts of 8 words of the build_model vocabulary, as a ``datasets.Dataset`` with a "prompt" column."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [" ".join(f"t{(i * 31 + j) % 5000}" for j in range(8)) for i in range(64)]})


def common_args(opts: argparse.Namespace) -> dict[str, Any]:
    """Config fields every mode shares (trl's and trl_rb's configs take the same names)."""
    return dict(
        output_dir=os.path.join(opts.model, f"out_{opts.child}"), beta=BETA,
        per_device_train_batch_size=opts.batch, num_generations=4, max_completion_length=opts.completion,
        max_steps=opts.warmup + opts.steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, disable_dropout=True, disable_tqdm=True, seed=0,
    )


def trainer_factory(kind: str, **extra_args: Any) -> MakeTrainer:
    """``make_trainer(mode, args, **trainer_kwargs)`` for trl's ``{kind}Trainer`` and trl_rb's drop-in of that name.

    Mode "trl" is trl's own trainer and config (the baseline); ``SEPARATE_RB`` is trl_rb's rb with K_n computed after
    trl's loss forward from the recorded hidden states instead of in the fused loss head (the schedule before the
    fused head, kept to measure it); any other mode is trl_rb's with ``kl_estimator=mode``. ``extra_args`` are config
    fields added in every mode (e.g. ``loss_type``).
    """

    def make_trainer(mode: str, args: dict[str, Any], **trainer_kwargs: Any) -> Any:
        # Imported here, in the child, after measure() has limited torch to one thread.
        import importlib

        import trl

        import trl_rb

        if mode == SEPARATE_RB:
            module = importlib.import_module(f"trl_rb.trainers.{kind.lower()}")
            module.loss_head_for = lambda *_args, **_kwargs: None  # this child process only
        estimator = "rb" if mode == SEPARATE_RB else mode
        lib, estimator = (trl, {}) if mode == "trl" else (trl_rb, {"kl_estimator": estimator})
        config = getattr(lib, f"{kind}Config")(**args, **extra_args, **estimator)
        return getattr(lib, f"{kind}Trainer")(args=config, **trainer_kwargs)

    return make_trainer


def measure(opts: argparse.Namespace, make_trainer: MakeTrainer) -> dict[str, float]:
    """Train mode ``opts.child`` in this process; step times (median after warm-up) and memory, as in the docstring."""
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    timer = _step_timer()
    trainer = make_trainer(opts.child, common_args(opts), model=opts.model, reward_funcs=reward,
                           train_dataset=prompt_dataset(), callbacks=[timer])
    rss_before = _rss_kib("VmRSS")
    trainer.train()
    peak = _rss_kib("VmHWM")
    # trl's own trainer does not log kl/rb: NaN there.
    kl_rb = next((h["kl/rb"] for h in reversed(trainer.state.log_history) if "kl/rb" in h), float("nan"))
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "step_s": statistics.median(timer.times[opts.warmup:]),
        "cpu_s": statistics.median(timer.cpu_times[opts.warmup:]),
        "peak_kib": peak,
        "train_peak_kib": peak - rss_before,
        "kl_rb": kl_rb,
        "mean_length": statistics.mean(lengths) if lengths else float("nan"),
    }


def _parser(description: str, modes: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per mode (modes alternate)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per step)")
    parser.add_argument("--completion", type=int, default=32, help="completion length (tokens, fixed)")
    parser.add_argument("--child", choices=modes, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def run_modes(opts: argparse.Namespace, script: str, modes: Sequence[str], name: str) -> dict[str, list[dict]] | None:
    """The child JSON of every (repeat, mode), modes alternating; None (stderr tail printed) if a child fails."""
    results: dict[str, list[dict]] = {m: [] for m in modes}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix=f"bench_{name.lower()}_") as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, opts.vocab, opts.n_embd, opts.n_layer)
        base = [sys.executable, os.path.abspath(script), "--model", model]
        for flag in _CHILD_FLAGS:
            base += [f"--{flag}", str(getattr(opts, flag))]
        for r in range(opts.repeats):
            for mode in modes:
                print(f"[{r + 1}/{opts.repeats}] {mode} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([*base, "--child", mode], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return None
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def print_table(results: Mapping[str, list[dict]], labels: Mapping[str, str],
                ratios: Sequence[tuple[str, str]]) -> None:
    """Markdown table: one column per mode (median over repeats), then one per ``(a, b)`` ratio ``a / b``."""
    med = {m: {key: statistics.median(r[key] for r in runs) for _, key, _, _ in ROWS} for m, runs in results.items()}
    # Value columns are 8 wide, or one wider than the longest label ("trl (k3)"), as in the README's tables.
    width = max(8, 1 + max(len(labels.get(m, m)) for m in results))
    ratio_heads = [f"{a} / {b}" for a, b in ratios]
    heads = [(labels.get(m, m), width) for m in results] + [(h, max(8, len(h))) for h in ratio_heads]
    print(f"| {'metric':<18} | " + " | ".join(f"{h:>{w}}" for h, w in heads) + " |")
    print("|" + "|".join("-" * (w + 2) for w in (18, *(w for _, w in heads))) + "|")
    for label, key, scale, fmt in ROWS:
        cells = [fmt.format(med[m][key] * scale) for m in results]
        cells += [f"{med[a][key] / med[b][key]:.3f}" for a, b in ratios]
        widths = [w for _, w in heads]
        print(f"| {label:<18} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)) + " |")


def _print_kl(results: Mapping[str, list[dict]]) -> None:
    """The last repeat's last logged kl/rb of each mode that logs it: a sanity check that the modes agree."""
    logged = {m: runs[-1]["kl_rb"] for m, runs in results.items() if not math.isnan(runs[-1]["kl_rb"])}
    if logged:
        print("\nlast logged kl/rb: " + ", ".join(f"{m} run {v:.4g}" for m, v in logged.items()))


def main(argv: list[str] | None, *, name: str, script: str, description: str, modes: Sequence[str],
         make_trainer: MakeTrainer, ratios: Sequence[tuple[str, str]], labels: Mapping[str, str] | None = None,
         setting: str = "") -> int:
    """Run benchmark ``name`` ("RLOO") of ``modes`` (``--child MODE``: measure one mode and print its JSON line).

    ``script`` is the benchmark file (re-run for every child), ``labels`` the column header of a mode if not the
    mode itself, ``setting`` words appended to the header's configuration (e.g. "dr_grpo"). Returns the exit code.
    """
    opts = _parser(description, modes).parse_args(argv)
    if opts.child:
        print(json.dumps(measure(opts, make_trainer)))
        return 0
    results = run_modes(opts, script, modes, name)
    if results is None:
        return 1
    print(f"\n{name} step on CPU (1 thread): GPT-2 n_layer={opts.n_layer} n_embd={opts.n_embd} vocab={opts.vocab}, "
          f"{opts.batch} completions x {opts.completion} tokens per step, beta={BETA}{setting and ', ' + setting}; "
          f"median of {opts.steps} steps after {opts.warmup} warm-up, median of {opts.repeats} processes per mode\n")
    print_table(results, labels or {}, ratios)
    _print_kl(results)
    return 0
