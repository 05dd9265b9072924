"""Step time and peak memory of GRPO: trl.GRPOTrainer (k3, the baseline) vs trl_rb.GRPOTrainer k3 and rb, one config.

The model, prompts, measurements and table are trainer_bench.py's: a small GPT-2 with GPT-2's vocabulary size (50257),
CPU, one thread, every (mode, repeat) in a fresh subprocess so its peak RSS (``VmHWM``) is its own. Completions have a
fixed length so every mode does the same work. ``trl`` is trl's own GRPOTrainer with its defaults for the KL (k3,
use_bias_correction_kl=True); ``k3`` is trl_rb's trainer in k3 mode (trl's loss plus the kl/k1 and kl/rb metrics);
``rb`` adds the RB surrogate to the loss. All use loss_type="dr_grpo". Goal: rb step time <= 1.15x trl, peak <= 1.25x.

Usage: python benchmarks/bench_grpo.py [--steps 6] [--warmup 2] [--repeats 2] [--n-embd 128] [--completion 32]
"""

from __future__ import annotations

import sys

import trainer_bench  # found because Python puts this script's folder first on sys.path


def main(argv: list[str] | None = None) -> int:
    """Run the GRPO benchmark (or, with ``--child MODE``, one measurement); returns the exit code."""
    return trainer_bench.main(
        argv, name="GRPO", script=__file__, description=__doc__.splitlines()[0],
        modes=("trl", "k3", trainer_bench.SEPARATE_RB, "rb"), make_trainer=trainer_bench.trainer_factory("GRPO", loss_type="dr_grpo"),
        ratios=(("k3", "trl"), ("rb", "trl"), ("rb", trainer_bench.SEPARATE_RB)), labels={"trl": "trl (k3)"}, setting="dr_grpo",
    )


if __name__ == "__main__":
    sys.exit(main())
