"""The sentiment-control experiment: RL fine-tuning of a review LM toward positive reviews, MC vs RB KL.

``python rloo_sentiment.py`` and ``trl-rb sweep`` run ``main(argv)``. Offline by default: the policy and reference
are the review LM that ``trl_rb_experiments.sentiment.review_lm`` builds (and caches), the prompts are its held-out review openings, the
reward is VADER. With ``--filepath/--filename``, ``--model_name_or_path`` and ``--reward_model`` it runs the
research code's setup (``configs/sentiment_gpt2_imdb.yaml``).

A run writes its folder all at once: everything goes to ``{output_dir}.partial`` first, which is renamed to
``output_dir`` when the run is complete. The folder then holds:

    run_config.yaml   the resolved arguments (script arguments and every trainer config field)
    metrics.jsonl     one JSON object per logged step (trl's metrics, kl/k1 and kl/rb from trl_rb's trainers)
    training.png      reward and KL against the training step
    eval.json         final evaluation on the test prompts: mean reward and KL (k1 and rb) with standard errors
    model and tokenizer files (``from_pretrained(output_dir)``)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..stats import mean_se

__all__ = [
    "EXPERIMENT_DEFAULTS",
    "METHODS",
    "SentimentArguments",
    "UsageError",
    "evaluate_policy",
    "main",
    "plot_metrics",
    "resolve_model",
    "resolve_prompts",
    "resolve_reward",
    "run_name",
]

# --method -> the trainer config's kl_estimator.
METHODS = {"MC": "k1", "RB": "rb", "K3": "k3"}
TRAINERS = ("rloo", "grpo")

# Defaults of this experiment where they differ from trl's (a --config YAML or the command line overrides them).
# trl's RLOO keeps dropout on, which with a sequence-level importance ratio made a 0.8M-parameter review LM diverge
# at lr 3e-4; dropout off and lr 1e-4 are stable.
EXPERIMENT_DEFAULTS: dict[str, Any] = {
    "output_dir": "",  # empty: outputs/sentiment/{run_name}
    "learning_rate": 1e-4,
    "disable_dropout": True,
    "per_device_train_batch_size": 16,
    "num_generations": 4,
    "max_completion_length": 20,
    "max_steps": 150,
    "beta": 0.05,
    "seed": 0,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "lr_scheduler_type": "constant",
    "gradient_checkpointing": False,  # trl turns it on; for small models it only costs time
}


class UsageError(ValueError):
    """Bad command-line input; ``main`` prints the message and exits with code 2."""


@dataclass
class SentimentArguments:
    """Arguments of the sentiment experiment besides the trainer config (trl's ``RLOOConfig`` / ``GRPOConfig``).

    Parameters:
        method (`str`, defaults to `"RB"`): the KL estimator in the penalty: `MC` (k1, trl's RLOO), `RB`
            (Rao-Blackwellized) or `K3`. Case-insensitive.
        init_kl_coef (`float` or `None`): the research code's name for the KL coefficient; sets `beta`.
        trainer (`str`, defaults to `"rloo"`): `rloo` (trl_rb.RLOOTrainer) or `grpo` (trl_rb.GRPOTrainer).
        filepath, filename (`str`): prompts from `{filepath}/{filename}-train.*` and `-test.*` (JSON lines with a
            `prompt` field, .parquet, .csv, or datasets folders). Default: the review LM's prompts.
        model_name_or_path (`str` or `None`): policy and reference. Default: the offline review LM.
        reward_model (`str`, defaults to `"vader"`): `vader`, or a sequence-classification model (path or hub id)
            whose positive-class logit is the reward.
        positive_label (`str` or `None`): the classifier's positive class (name or index); default: the label
            named positive, else class 1.
        overwrite (`bool`): replace a finished run in `output_dir`.
        eval_prompts (`int`, defaults to 128): test prompts used by the final evaluation (0: all).
        eval_samples_per_prompt (`int`, defaults to 4): completions sampled per test prompt.
        eval_batch_size (`int`, defaults to 64): sequences per evaluation forward pass.
        eval_reference (`bool`, defaults to True): also report the reward of the reference's samples.
        torch_threads (`int` or `None`): ``torch.set_num_threads`` for the run. Default: 1 for the offline review LM
            (its matrix products are so small that a second thread only adds synchronization: 30x slower when
            the cores are busy), torch's default otherwise.
    """

    method: str = field(default="RB", metadata={"help": "KL estimator: MC (k1), RB or K3 (case-insensitive)."})
    init_kl_coef: float | None = field(default=None, metadata={"help": "KL coefficient (sets --beta)."})
    trainer: str = field(default="rloo", metadata={"help": "rloo or grpo."})
    filepath: str | None = field(default=None, metadata={"help": "Folder of the prompt files."})
    filename: str = field(default="imdb", metadata={"help": "Prompt file prefix: {filename}-train.jsonl, ..."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy and reference model (default: the offline review LM)."}
    )
    reward_model: str = field(default="vader", metadata={"help": "'vader' or a sequence-classification model."})
    positive_label: str | None = field(default=None, metadata={"help": "The classifier's positive class."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished run in output_dir."})
    eval_prompts: int = field(default=128, metadata={"help": "Test prompts in the final evaluation (0: all)."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Completions per test prompt."})
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per evaluation batch."})
    eval_reference: bool = field(default=True, metadata={"help": "Also evaluate the reference's reward."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: 1 for the review LM, whose ops are too small to split)."},
    )


def run_name(trainer: str, method: str, beta: float, seed: int) -> str:
    """The folder name of one run, e.g. ``rloo-RB-beta0.05-seed0``."""
    return f"{trainer}-{method.upper()}-beta{beta:g}-seed{seed}"


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------------------


def _trainer_classes(trainer: str) -> tuple[type, type]:
    """(config class, trainer class) for ``--trainer``."""
    try:
        if trainer == "rloo":
            from trl_rb.trainers.rloo import RLOOConfig, RLOOTrainer

            return RLOOConfig, RLOOTrainer
        from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    except ImportError as err:  # pragma: no cover - only while the trainers are being written
        raise UsageError(f"--trainer {trainer}: trl_rb's {trainer.upper()} trainer is not available ({err})") from err


def _pre_parse(argv: list[str]) -> dict[str, str | None]:
    """--trainer, --method and an explicit --kl_estimator, from the command line or else the --config YAML.

    They are needed before the full parse: the trainer picks the config class, the method sets kl_estimator.
    """
    pre = argparse.ArgumentParser(add_help=False)
    for name in ("--trainer", "--method", "--kl_estimator", "--config"):
        pre.add_argument(name, default=None)
    known, _ = pre.parse_known_args(argv)
    values = {"trainer": known.trainer, "method": known.method, "kl_estimator": known.kl_estimator}
    if known.config:
        import yaml

        try:
            with open(known.config) as handle:
                data = yaml.safe_load(handle) or {}
        except OSError as err:
            raise UsageError(f"--config {known.config}: cannot read it ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise UsageError(f"--config {known.config}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {known.config}: must be a YAML mapping of argument names to values")
        for key in values:
            if values[key] is None and data.get(key) is not None:
                values[key] = str(data[key])
    trainer = (values["trainer"] or "rloo").lower()
    if trainer not in TRAINERS:
        raise UsageError(f"--trainer {trainer!r} is not one of {', '.join(TRAINERS)}")
    method = (values["method"] or "RB").upper()
    if method not in METHODS:
        raise UsageError(f"--method {values['method']!r} is not one of {', '.join(METHODS)} (case-insensitive)")
    estimator = METHODS[method]
    if values["kl_estimator"] is not None:
        from trl_rb.kl import canonical_estimator

        try:
            explicit = canonical_estimator(values["kl_estimator"])
        except ValueError as err:
            raise UsageError(f"--kl_estimator: {err}") from None
        if explicit != estimator:
            raise UsageError(
                f"--kl_estimator {values['kl_estimator']} contradicts --method {method} ({estimator}); "
                "choose the estimator with --method MC|RB|K3"
            )
    return {"trainer": trainer, "method": method, "kl_estimator": estimator}


def parse_args(argv: list[str]) -> tuple[SentimentArguments, Any, type]:
    """Parse the command line (and --config YAML) into the script arguments and the trainer config.

    Precedence: command line > --config YAML > EXPERIMENT_DEFAULTS > trl's defaults. ``--method`` sets the
    config's ``kl_estimator`` (MC -> k1, RB -> rb, K3 -> k3) and ``--init_kl_coef`` its ``beta``. Returns
    ``(script_args, training_config, trainer_class)``; raises UsageError on bad values.
    """
    import torch
    from trl import TrlParser

    pre = _pre_parse(argv)
    config_cls, trainer_cls = _trainer_classes(pre["trainer"])
    parser = TrlParser((SentimentArguments, config_cls), prog="rloo_sentiment.py")
    defaults = dict(EXPERIMENT_DEFAULTS, kl_estimator=pre["kl_estimator"])
    if not torch.cuda.is_available():
        defaults["bf16"] = False  # trl's configs default to bf16, which a CPU-only machine rejects
    parser.set_defaults_with_config(**defaults)
    try:
        script_args, config = parser.parse_args_and_config(argv)
    except ValueError as err:  # a config field's own validation (e.g. a contradicting stepwise)
        raise UsageError(str(err)) from None
    script_args.trainer, script_args.method = pre["trainer"], pre["method"]
    if script_args.init_kl_coef is not None:
        if script_args.init_kl_coef < 0:
            raise UsageError(f"--init_kl_coef must be >= 0, got {script_args.init_kl_coef}")
        config.beta = script_args.init_kl_coef
    script_args.init_kl_coef = config.beta
    if not config.output_dir:
        config.output_dir = str(
            Path("outputs") / "sentiment" / run_name(pre["trainer"], pre["method"], config.beta, config.seed)
        )
    for name in ("eval_prompts", "eval_samples_per_prompt", "eval_batch_size"):
        if getattr(script_args, name) < (0 if name == "eval_prompts" else 1):
            raise UsageError(f"--{name} must be positive, got {getattr(script_args, name)}")
    return script_args, config, trainer_cls


# ---------------------------------------------------------------------------------------------------------------
# Output folder: refuse to clobber a finished run, build in {output_dir}.partial, rename at the end.
# ---------------------------------------------------------------------------------------------------------------


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            return  # an empty folder holds nothing to lose
        what = "a finished run" if (output_dir / "eval.json").is_file() else "files"
        raise UsageError(f"output_dir {output_dir} already holds {what}; pass --overwrite to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output_dir {output_dir} is a file, not a folder")


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``output_dir`` (replacing an old run only now, when all is done)."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def _write_run_config(path: Path, script_args: SentimentArguments, config: Any, output_dir: Path) -> None:
    import yaml

    training = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    training["output_dir"] = str(output_dir)
    data = {**dataclasses.asdict(script_args), **training}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(json.loads(json.dumps(data, default=str)), handle, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Training-time logging and plot
# ---------------------------------------------------------------------------------------------------------------


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Append every log event of the main process to ``metrics.jsonl`` (one JSON object per line)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
                with open(path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

    return MetricsJsonl()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Plot reward (top) and the KL metrics kl/k1, kl/rb, kl (bottom) against the training step, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "reward" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [r["step"] for r in rows]
    top.plot(steps, [r["reward"] for r in rows], color="tab:green", lw=1)
    top.set_ylabel("mean reward (training batch)")
    for key, color in (("kl/rb", "tab:blue"), ("kl/k1", "tab:orange"), ("kl", "tab:gray")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points and not (key == "kl" and any("kl/k1" in r for r in rows)):
            bottom.plot(*zip(*points, strict=True), color=color, lw=1, label=key)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("KL(policy || reference) per sequence")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=Path(png_path).parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


# ---------------------------------------------------------------------------------------------------------------
# Final evaluation
# ---------------------------------------------------------------------------------------------------------------


def _completion_mask(completion_ids, eos_token_id: int):
    """[B, T] long mask: 1 up to and including the first EOS, 0 after it (generate pads finished rows)."""
    is_eos = (completion_ids == eos_token_id).long()
    before_or_at_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first_eos.long()


def _completion_logits(model, input_ids, attention_mask, prompt_len: int):
    """[B, T_c, V] logits aligned with the completion tokens (the position before each one).

    Position ids count real tokens only, as ``generate`` does for left-padded prompts, so that the scored
    distributions are the ones the completions were sampled from.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, prompt_len - 1 : -1]


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: list[str],
    reward_fn,
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample completions from ``policy`` and report reward and KL(policy || reference) with standard errors.

    Each prompt gets ``samples_per_prompt`` completions (untruncated sampling at ``temperature``, at most
    ``max_new_tokens`` tokens, ending at EOS). Per sequence: the reward, and ``kl_estimate`` by ``k1`` (sum of
    sampled log ratios) and ``rb`` (sum of exact next-token KLs) from both models' logits at ``temperature``.
    Standard errors are over prompts (the mean over a prompt's samples is one observation).

    Returns:
        a dict with ``reward``, ``reward_se``, ``kl_k1``, ``kl_k1_se``, ``kl_rb``, ``kl_rb_se``, ``n_prompts``,
        ``samples_per_prompt``, ``mean_completion_length`` and a few ``examples``.
    """
    import torch
    from tqdm.auto import tqdm

    from trl_rb.kl import kl_estimate

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = policy.get_output_embeddings().weight.shape[0]
    # Keep a batch's [B, T, V] float32 logits (two models) near 256 MB whatever the vocabulary.
    per_row = 2 * 4 * vocab * (max_new_tokens + 64)
    rows = max(1, min(batch_size, (256 << 20) // per_row))
    prompts_per_batch = max(1, rows // samples_per_prompt)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    per_seq: dict[str, list[float]] = {"reward": [], "kl_k1": [], "kl_rb": []}
    lengths: list[int] = []
    examples: list[dict[str, Any]] = []
    policy.eval()
    reference.eval()
    bar = tqdm(total=len(prompts), desc="evaluating", disable=not progress)
    try:
        for start in range(0, len(prompts), prompts_per_batch):
            batch_prompts = [p for p in prompts[start : start + prompts_per_batch] for _ in range(samples_per_prompt)]
            enc = tokenizer(batch_prompts, return_tensors="pt", padding=True, padding_side="left").to(policy.device)
            prompt_len = enc["input_ids"].shape[1]
            with torch.no_grad():
                out = policy.generate(
                    **enc,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
                completion = out[:, prompt_len:]
                mask = _completion_mask(completion, eos)
                input_ids = torch.cat([enc["input_ids"], completion], dim=1)
                attention = torch.cat([enc["attention_mask"], mask], dim=1)
                logits_p = _completion_logits(policy, input_ids, attention, prompt_len)
                logits_q = _completion_logits(reference, input_ids.to(reference.device), attention, prompt_len)
                tokens = torch.where(mask.bool(), completion, torch.zeros_like(completion))
                for name in ("k1", "rb"):
                    values = kl_estimate(
                        logits_p, logits_q.to(logits_p.device), tokens, mask, name, temperature=temperature
                    )
                    per_seq[f"kl_{name}"] += values.tolist()
            texts = tokenizer.batch_decode(completion * mask + pad * (1 - mask), skip_special_tokens=True)
            per_seq["reward"] += [float(r) for r in reward_fn(completions=texts, prompts=batch_prompts)]
            lengths += mask.sum(dim=1).tolist()
            if len(examples) < 6:
                examples += [{"prompt": p, "completion": c} for p, c in zip(batch_prompts, texts, strict=True)][
                    : 6 - len(examples)
                ]
            bar.update(len(batch_prompts) // samples_per_prompt)
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
    result: dict[str, Any] = {}
    for key, values in per_seq.items():
        by_prompt = [
            sum(values[i : i + samples_per_prompt]) / samples_per_prompt
            for i in range(0, len(values), samples_per_prompt)
        ]
        result[key], result[f"{key}_se"] = mean_se(by_prompt)
    result.update(
        n_prompts=len(prompts),
        samples_per_prompt=samples_per_prompt,
        mean_completion_length=sum(lengths) / len(lengths),
        examples=examples,
    )
    return result


def _load_reference(name_or_path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def resolve_model(script_args: SentimentArguments) -> tuple[str, Any]:
    """(model path or id, tokenizer). The default builds/loads the cached review LM."""
    from transformers import AutoTokenizer

    if script_args.model_name_or_path is None:
        from .review_lm import load_review_lm, review_lm_path

        _, tokenizer = load_review_lm()
        return str(review_lm_path()), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    except OSError as err:
        raise UsageError(f"--model_name_or_path {script_args.model_name_or_path}: cannot load it ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return script_args.model_name_or_path, tokenizer


def resolve_prompts(script_args: SentimentArguments) -> dict[str, list[str]]:
    """{"train": prompts, "test": prompts}: the review LM's prompt splits by default, else ``--filepath``'s files."""
    from .data import DataError, load_prompts

    if script_args.filepath is None:
        from .review_lm import review_prompts

        return {"train": review_prompts("train"), "test": review_prompts("test")}
    try:
        return load_prompts(script_args.filepath, script_args.filename)
    except DataError as err:
        raise UsageError(str(err)) from None


def resolve_reward(script_args: SentimentArguments):
    """The reward function of ``--reward_model`` (VADER by default) and ``--positive_label``."""
    from .rewards import load_reward

    label: str | int | None = script_args.positive_label
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    try:
        return load_reward(script_args.reward_model, positive_label=label)
    except (OSError, ValueError) as err:
        raise UsageError(f"--reward_model {script_args.reward_model}: {err}") from None


def run(script_args: SentimentArguments, config: Any, trainer_cls: type) -> dict[str, Any]:
    """Train, evaluate and write the run folder; returns the eval dict. Inputs are validated before any write."""
    from accelerate import PartialState
    from datasets import Dataset

    output_dir = Path(config.output_dir)
    _check_output_dir(output_dir, script_args.overwrite)
    prompts = resolve_prompts(script_args)
    model_path, tokenizer = resolve_model(script_args)
    reward_fn = resolve_reward(script_args)

    threads = script_args.torch_threads or (1 if script_args.model_name_or_path is None else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    state = PartialState()
    staging = output_dir.with_name(output_dir.name + ".partial")
    if state.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)  # left by an interrupted run of this same output_dir
        staging.mkdir(parents=True)
    state.wait_for_everyone()
    config.output_dir = str(staging)
    started = time.time()
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=reward_fn,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts["train"]}),
        processing_class=tokenizer,
        callbacks=[_metrics_callback(staging / "metrics.jsonl")],
    )
    trainer.train()
    trainer.save_model(str(staging))
    train_seconds = time.time() - started
    config.output_dir = str(output_dir)

    result: dict[str, Any] = {}
    if state.is_main_process:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(staging)
        reference = _load_reference(model_path)
        test = prompts["test"][: script_args.eval_prompts or None]
        common = dict(
            samples_per_prompt=script_args.eval_samples_per_prompt,
            max_new_tokens=config.max_completion_length,
            temperature=config.temperature,
            batch_size=script_args.eval_batch_size,
            seed=config.seed,
        )
        result = evaluate_policy(policy, reference, tokenizer, test, reward_fn, **common)
        if script_args.eval_reference:
            ref_eval = evaluate_policy(reference, reference, tokenizer, test, reward_fn, **common)
            result["reference_reward"], result["reference_reward_se"] = ref_eval["reward"], ref_eval["reward_se"]
        result.update(
            method=script_args.method,
            trainer=script_args.trainer,
            kl_estimator=config.kl_estimator,
            beta=config.beta,
            seed=config.seed,
            max_steps=config.max_steps,
            model=model_path,
            reward_model=script_args.reward_model,
            train_seconds=round(train_seconds, 1),
        )
        _write_run_config(staging / "run_config.yaml", script_args, config, output_dir)
        if (staging / "metrics.jsonl").is_file():
            title = f"{script_args.trainer.upper()} {script_args.method.upper()}, beta {config.beta:g}, seed {config.seed}"
            plot_metrics(staging / "metrics.jsonl", staging / "training.png", title=title)
        _write_json(staging / "eval.json", result)  # last: its presence marks a finished run
        _publish(staging, output_dir)
    state.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python rloo_sentiment.py [flags]``: 0 on success, 2 on bad input (message on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        script_args, config, trainer_cls = parse_args(argv)
        result = run(script_args, config, trainer_cls)
    except UsageError as err:
        print(f"rloo_sentiment.py: error: {err}", file=sys.stderr)
        return 2
    if result:
        print(
            f"eval on {result['n_prompts']} test prompts x {result['samples_per_prompt']}: "
            f"reward {result['reward']:.3f} +- {result['reward_se']:.3f}"
            + (f" (reference {result['reference_reward']:.3f})" if "reference_reward" in result else "")
            + f", KL k1 {result['kl_k1']:.3f} +- {result['kl_k1_se']:.3f}, rb {result['kl_rb']:.3f} +- "
            f"{result['kl_rb_se']:.3f}; written to {config.output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
