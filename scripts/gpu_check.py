"""GPU check of trl_rb's GRPO / RLOO trainers on a ~0.5B Qwen2-class model built locally (no hub access).

What it measures, for one configuration per run (``--trainer grpo|rloo``, ``--estimator rb|k1``,
``--engine single|fsdp2``, ``--vllm none|colocate``; bf16, beta 0.05, 8 completions x 128 tokens per step, 5 steps):

- ``step_s``: mean wall time of a training step (generation, scoring and update), the first step excluded;
- ``peak_gib``: ``torch.cuda.max_memory_allocated()`` over the process (peak RSS with ``--device cpu``);
- ``kl_rb`` / ``kl_k1``: the last logged ``kl/rb`` and ``kl/k1`` in ``trainer.state.log_history``.

The model (Qwen2Config: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied head) is
randomly initialized and saved with a word-level tokenizer to a folder, and the trainer loads it by path (vLLM needs
a path). The reward is the completion's length in characters / 100; the prompts are a small in-memory dataset.

Each run appends one JSON line to ``--results`` (errors too, with the tail of the traceback). Usage:

    bash scripts/gpu_check.sh                                  # venv, installs, every configuration, the table
    python scripts/gpu_check.py --prepare /tmp/m               # build and save the model + tokenizer once
    python scripts/gpu_check.py --model-dir /tmp/m --trainer grpo --estimator rb --results r.jsonl
    python scripts/gpu_check.py --device cpu --tiny --trainer rloo --estimator rb --results r.jsonl   # CPU dry run
    python scripts/gpu_check.py --report r.jsonl               # Markdown table of every recorded run

``--engine fsdp2`` re-executes this script under ``accelerate launch`` with an FSDP2 config it writes (distributed
type FSDP, ``fsdp_version: 2``, one process); the run checks that the trainer really is FSDP2 and fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata, util
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FULL_MODEL = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
}
TINY_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
SPECIALS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2
WORDS = (
    "the a movie film story plot actor scene music ending was is felt seemed very quite rather truly so too and but "
    "with without great good fine dull boring long short slow fast warm cold bright dark funny sad strange lovely"
).split()
BETA = 0.05
COMPLETIONS = 8
COMPLETION_TOKENS = 128
LAUNCHED_ENV = "GPU_CHECK_LAUNCHED"
VERSIONED = ("torch", "transformers", "trl", "accelerate", "vllm")
TABLE_COLUMNS = ("trainer", "estimator", "engine", "vllm", "step s", "peak GiB", "kl/rb", "kl/k1", "status")


# -------------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data, reward
# -------------------------------------------------------------------------------------------------------------------


def vocabulary(size: int) -> list[str]:
    """Special tokens, the real words, then filler words ``w<i>`` up to exactly ``size`` entries."""
    tokens = [*SPECIALS, *WORDS][:size]
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    return tokens


def word_tokenizer(tokens: list[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose ids follow ``tokens`` (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def model_config(tiny: bool) -> Any:
    """The Qwen2 config: 0.5B-class (Qwen2.5-0.5B's shapes), or a 2-layer toy for CPU dry runs."""
    from transformers import Qwen2Config

    sizes = TINY_MODEL if tiny else FULL_MODEL
    return Qwen2Config(
        **sizes,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )


def build_model_dir(path: Path, *, tiny: bool, device: str) -> Path:
    """Randomly initialize the model (seed 0) and save it with its tokenizer to ``path`` (bf16 unless tiny)."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = model_config(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.float32 if tiny else torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    word_tokenizer(vocabulary(config.vocab_size)).save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def prompt_dataset(n: int = 64) -> Any:
    """``n`` prompts of 3-6 random real words (fixed seed), as an in-memory ``datasets.Dataset``."""
    from datasets import Dataset

    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 6))) for _ in range(n)]
    return Dataset.from_dict({"prompt": prompts})


def length_reward(completions: list[str], **_: Any) -> list[float]:
    """The completion's length in characters / 100 (word-level tokens have different lengths, so it varies)."""
    return [len(c) / 100 for c in completions]


# -------------------------------------------------------------------------------------------------------------------
# Trainer
# -------------------------------------------------------------------------------------------------------------------


def config_kwargs(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """The trainer config: every mode shares it; GRPO adds ``dr_grpo``, vLLM adds colocated generation."""
    cpu = args.device == "cpu"
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "kl_estimator": args.estimator,
        "beta": BETA,
        "per_device_train_batch_size": COMPLETIONS,
        "num_generations": COMPLETIONS,
        "max_completion_length": COMPLETION_TOKENS,
        "max_steps": args.steps,
        "learning_rate": 1e-5,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "bf16": not cpu,
        "use_cpu": cpu,
    }
    if args.trainer == "grpo":
        kwargs["loss_type"] = "dr_grpo"  # the loss type under which rb's KL gradient is unbiased (README)
    if args.vllm == "colocate":
        kwargs.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_memory)
    return kwargs


def make_trainer(args: argparse.Namespace, model_dir: Path, output_dir: str) -> Any:
    """A ``trl_rb`` GRPO or RLOO trainer on the saved model, passed by path.

    The tokenizer is loaded explicitly as a plain ``PreTrainedTokenizerFast``: transformers 5's ``AutoTokenizer``
    (what trl would call) maps model type ``qwen2`` to ``Qwen2Tokenizer`` whatever tokenizer_config.json says, and
    that class rebuilds a byte-level BPE pipeline that turns the word-level prompts into 0 or 1 tokens.
    """
    from transformers import PreTrainedTokenizerFast

    import trl_rb

    config_cls, trainer_cls = {
        "grpo": (trl_rb.GRPOConfig, trl_rb.GRPOTrainer),
        "rloo": (trl_rb.RLOOConfig, trl_rb.RLOOTrainer),
    }[args.trainer]
    return trainer_cls(
        model=str(model_dir),
        reward_funcs=length_reward,
        args=config_cls(**config_kwargs(args, output_dir)),
        train_dataset=prompt_dataset(),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
    )


def step_timer(cuda: bool) -> Any:
    """A ``TrainerCallback`` recording each optimizer step's wall time (CUDA synchronized at both ends)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self._start = self._now()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.times.append(self._now() - self._start)

    return StepTimer()


def fsdp_state(trainer: Any) -> str | None:
    """``"fsdp2"`` / ``"fsdp1"`` when accelerate shards the model, else None."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not getattr(trainer, "is_fsdp_enabled", False) or plugin is None:
        return None
    return f"fsdp{getattr(plugin, 'fsdp_version', 1)}"


def last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    """The last value of ``key`` in ``trainer.state.log_history`` (None if never logged)."""
    values = [entry[key] for entry in history if key in entry]
    return float(values[-1]) if values else None


def peak_memory_gib(cuda: bool) -> float:
    """Peak CUDA memory allocated by torch, or the process's peak RSS on CPU, in GiB."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def train_once(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build (or reuse) the model, train ``args.steps`` steps, and return the measurements."""
    cuda = args.device == "cuda"
    model_dir = Path(args.model_dir) if args.model_dir else build_model_dir(work / "model", tiny=args.tiny, device=args.device)
    trainer = make_trainer(args, model_dir, str(work / "out"))
    fsdp = fsdp_state(trainer)
    if args.engine == "fsdp2" and fsdp != "fsdp2":
        raise RuntimeError(f"--engine fsdp2 asked, but the trainer's accelerator runs {fsdp or 'without FSDP'}")
    timer = step_timer(cuda)
    trainer.add_callback(timer)
    trainer.train()
    times = timer.times[1:] or timer.times
    history = trainer.state.log_history
    return {
        "status": "ok",
        "steps": len(timer.times),
        "step_s": statistics.mean(times) if times else None,
        "peak_gib": peak_memory_gib(cuda),
        "kl_rb": last_logged(history, "kl/rb"),
        "kl_k1": last_logged(history, "kl/k1"),
        "fsdp": fsdp,
    }


# -------------------------------------------------------------------------------------------------------------------
# Records
# -------------------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter here (None when missing)."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[f"{name}_version"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"{name}_version"] = None
    return out


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (unavailable)"


def base_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "run_id": args.run_id or f"{args.trainer}-{args.estimator}-{args.engine}-{args.vllm}",
        "trainer": args.trainer,
        "estimator": args.estimator,
        "engine": args.engine,
        "vllm": args.vllm,
        "model": "tiny" if args.tiny else "qwen2-0.5b-class",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def append_record(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tail(text: str, lines: int = 12, chars: int = 2000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_mode(args: argparse.Namespace) -> int:
    """Train one configuration and append its record (an error record, exit 1, when it fails)."""
    record = {**base_record(args), "device": device_name(args.device), **versions()}
    start = time.perf_counter()
    rc = 0
    try:
        if args.vllm == "colocate" and util.find_spec("vllm") is None:
            record.update(status="skipped", error="vllm is not installed (not installable offline)")
        else:
            with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
                record.update(train_once(args, Path(work)))
    except Exception as err:  # recorded, then reported as a failed run
        record.update(status="error", error=tail(traceback.format_exc()) or repr(err))
        rc = 1
    record["wall_s"] = time.perf_counter() - start
    if is_main_process():
        append_record(args.results, record)
        print(json.dumps(record), flush=True)
    return rc


def record_failure_mode(args: argparse.Namespace) -> int:
    """Append a failure record for a run that died without writing one (timeout, crash, OOM kill)."""
    record = base_record(args)
    if any(r.get("run_id") == record["run_id"] for r in read_records(args.results)):
        return 0  # the run recorded its own outcome
    log = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).exists() else ""
    status = "skipped" if args.skipped else "timeout" if args.rc in (124, 137) else "error"
    record.update(status=status, rc=args.rc, error=tail(log) or f"exit status {args.rc}, no output")
    append_record(args.results, record)
    return 0


# -------------------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status_cell(record: dict[str, Any]) -> str:
    status = record.get("status", "?")
    if status == "ok":
        return "ok"
    last = (record.get("error") or "").strip().splitlines()
    reason = last[-1] if last else ""
    if status == "timeout":
        reason = f"killed by `timeout` (rc {record.get('rc')}); log tail below"
    return f"{status.upper()}: {reason[:100]}".replace("|", "\\|")


def table_row(record: dict[str, Any]) -> str:
    cells = [
        record.get("trainer", "?"),
        record.get("estimator", "?"),
        record.get("engine", "?"),
        record.get("vllm", "?"),
        fmt(record.get("step_s"), ".3f"),
        fmt(record.get("peak_gib"), ".2f"),
        fmt(record.get("kl_rb"), ".4g"),
        fmt(record.get("kl_k1"), ".4g"),
        status_cell(record),
    ]
    return "| " + " | ".join(cells) + " |"


def environment_lines(records: list[dict[str, Any]]) -> list[str]:
    seen = []
    for r in records:
        packages = ", ".join(f"{name} {r.get(name + '_version')}" for name in VERSIONED)
        env = f"{r.get('device', '?')}, model {r.get('model')}: {packages}"
        if r.get("torch_version") and env not in seen:
            seen.append(env)
    return [f"- {env}" for env in seen]


def report_mode(path: str) -> int:
    """Print the Markdown table of every record in ``path``, then the error tails of the failed runs."""
    records = read_records(path)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += [table_row(r) for r in records]
    lines += ["", f"step s: mean step time without the first step; peak GiB: max CUDA memory allocated (peak RSS on "
              f"CPU); kl: last logged value. {len(records)} runs.", *environment_lines(records)]
    for r in records:
        if r.get("status") not in ("ok", "skipped"):
            lines += ["", f"**{r.get('run_id')}** ({r.get('status')}):", "```", r.get("error", ""), "```"]
    print("\n".join(lines))
    return 0


# -------------------------------------------------------------------------------------------------------------------
# FSDP2 launch and CLI
# -------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_fsdp2_config(bf16: bool) -> str:
    """An accelerate config file for FSDP2 with one process (trl's fsdp2.yaml, adapted); returns its path."""
    text = f"""compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
machine_rank: 0
main_process_port: {free_port()}
mixed_precision: '{"bf16" if bf16 else "no"}'
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
use_cpu: false
"""
    fd, path = tempfile.mkstemp(prefix="gpu_check_fsdp2_", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def relaunch_under_accelerate(args: argparse.Namespace, argv: list[str]) -> None:
    """Replace this process by ``accelerate launch --config_file <FSDP2 config> gpu_check.py <same arguments>``."""
    config = write_fsdp2_config(bf16=args.device == "cuda")
    os.environ[LAUNCHED_ENV] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, __file__, *argv]
    print("relaunching:", " ".join(command), flush=True)
    os.execv(sys.executable, command)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=("grpo", "rloo"), default="grpo")
    p.add_argument("--estimator", choices=("rb", "k1"), default="rb")
    p.add_argument("--engine", choices=("single", "fsdp2"), default="single")
    p.add_argument("--vllm", choices=("none", "colocate"), default="none")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer, hidden 64, vocab 512 model (CPU dry runs)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 5; 2 with --tiny)")
    p.add_argument("--model-dir", help="a folder made by --prepare (default: build one in a temp folder)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="vllm_gpu_memory_utilization for colocate")
    p.add_argument("--results", default="gpu_check_results.jsonl", help="JSON-lines file the record is appended to")
    p.add_argument("--run-id", help="name of the record (default: trainer-estimator-engine-vllm)")
    p.add_argument("--prepare", metavar="DIR", help="only build and save the model and tokenizer to DIR")
    p.add_argument("--report", metavar="RESULTS", help="only print the Markdown table of RESULTS")
    p.add_argument("--record-failure", action="store_true", help="record a run that died without a record")
    p.add_argument("--rc", type=int, default=1, help="with --record-failure: the run's exit status")
    p.add_argument("--skipped", action="store_true", help="with --record-failure: the run was not started")
    p.add_argument("--log", help="with --record-failure: the run's log (its tail becomes the error)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.tiny else 5
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        return report_mode(args.report)
    if args.record_failure:
        return record_failure_mode(args)
    if args.prepare:
        build_model_dir(Path(args.prepare), tiny=args.tiny, device=args.device)
        return 0
    if args.engine == "fsdp2" and not os.environ.get(LAUNCHED_ENV):
        relaunch_under_accelerate(args, argv)
    return run_mode(args)


if __name__ == "__main__":
    sys.exit(main())
