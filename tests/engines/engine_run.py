"""A few training steps of a trl_rb trainer under one distributed engine; prints the per-step logs as JSON.

Run by ``tests/engines/test_engines.py`` as ``torchrun --nproc_per_node 2 tests/engines/engine_run.py --engine zero3
...`` (with ``DS_ACCELERATOR=cpu`` for DeepSpeed), so that the same steps under DDP and under DeepSpeed ZeRO-2/3 can be
compared number for number. The model is loaded from a local folder (``--model``), as a user's run would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from datasets import Dataset

ENGINES = ("ddp", "zero2", "zero3")


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }


def low_words_reward(completion_ids, **_):
    """Fraction of completion tokens among ids 3..22 (about a third at the start: dense enough to move the model)."""
    return [sum(3 <= t < 23 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def engine_settings(opts: argparse.Namespace) -> dict:
    """Config fields every trainer here shares: the schedule, CPU, determinism and the engine."""
    return dict(
        output_dir=opts.out,
        per_device_train_batch_size=4,
        max_completion_length=6,
        learning_rate=opts.lr,
        max_steps=opts.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_dropout=True,  # dropout masks would differ between engines
        seed=opts.seed,
        temperature=opts.temperature,
        deepspeed=None if opts.engine == "ddp" else deepspeed_config(int(opts.engine[-1])),
    )


def build_distiller(opts: argparse.Namespace):
    """Distil the teacher folder into the student (--model): --estimator is the kl_gradient, 'rb' or 'pathwise'."""
    import trl_rb

    args = trl_rb.DistillationConfig(**engine_settings(opts), kl_gradient=opts.estimator)
    prompts = Dataset.from_dict({"prompt": [f"w{i + 5} w{i + 6}" for i in range(32)]})
    return trl_rb.DistillationTrainer(opts.model, opts.teacher, args=args, train_dataset=prompts)


def build_trainer(opts: argparse.Namespace):
    import trl_rb

    if opts.trainer == "distill":
        return build_distiller(opts)
    common = dict(
        **engine_settings(opts),
        num_generations=4,
        beta=0.2,
        kl_estimator=opts.estimator,
        rb_gamma=opts.rb_gamma,
    )
    if opts.trainer == "grpo":
        config_cls, trainer_cls = trl_rb.GRPOConfig, trl_rb.GRPOTrainer
        common.update(loss_type="dr_grpo", scale_rewards="none")
    else:
        config_cls, trainer_cls = trl_rb.RLOOConfig, trl_rb.RLOOTrainer
    peft_config = None
    if opts.peft:
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    prompts = Dataset.from_dict({"prompt": [f"w{i + 5} w{i + 6}" for i in range(32)]})
    return trainer_cls(
        opts.model, low_words_reward, args=config_cls(**common), train_dataset=prompts, peft_config=peft_config
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trainer", choices=("grpo", "rloo", "distill"), required=True)
    parser.add_argument("--estimator", choices=("k1", "k3", "rb", "pathwise"), required=True)
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", help="the teacher folder (--trainer distill)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--peft", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rb-gamma", type=float, default=None, help="rb: a fixed gamma (default: the online fit)")
    parser.add_argument("--separate-kl", action="store_true", help="rb: K_n after trl's loss forward, no fused head")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    if opts.separate_kl:  # the schedule ZeRO-3 runs (its heads are partitioned): same kernels as there
        from trl_rb.trainers import grpo, rloo

        grpo.loss_head_for = rloo.loss_head_for = lambda *_args, **_kwargs: None
    trainer = build_trainer(opts)
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        print("LOGS " + json.dumps(logs), flush=True)
    exit_cleanly()


def exit_cleanly() -> None:
    """Leave without interpreter teardown once every rank is done.

    On CPU, gloo and DeepSpeed worker threads can still be joinable when Python destroys its C++ statics at exit,
    and the process then dies with SIGABRT ("terminate called without an active exception") after training has
    finished and the logs are out: about one run in twenty on a loaded 2-core machine. That abort says nothing
    about the numbers under test, so each rank waits for the others, closes the process group and ends at once.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
