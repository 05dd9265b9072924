"""Step time and peak memory of trl.RLOOTrainer vs trl_rb.RLOOTrainer (kl_estimator k1 and rb), on the same config.

"trl" is trl's own trainer (its k1 penalty, fused LM head); "k1" is trl_rb's trainer with trl's penalty plus the
kl/k1 and kl/rb metrics (which cost the exact KL during scoring); "rb" is the Rao-Blackwellized penalty and the
analytic gradient term in the loss. The model, the measurements and the table are trainer_bench.py's.

Usage: python benchmarks/bench_rloo.py [--steps 6] [--warmup 2] [--repeats 2] [--n-embd 128] [--completion 32]
"""

from __future__ import annotations

import sys

import trainer_bench  # found because Python puts this script's folder first on sys.path


def main(argv: list[str] | None = None) -> int:
    """Run the RLOO benchmark (or, with ``--child MODE``, one measurement); returns the exit code."""
    return trainer_bench.main(
        argv, name="RLOO", script=__file__, description=__doc__.splitlines()[0],
        modes=("trl", "k1", trainer_bench.SEPARATE_RB, "rb"), make_trainer=trainer_bench.trainer_factory("RLOO"),
        ratios=(("k1", "trl"), ("rb", "trl"), ("rb", "k1"), ("rb", trainer_bench.SEPARATE_RB)),
    )


if __name__ == "__main__":
    sys.exit(main())
