"""Deny-by-default check that trl samples completions from the distribution the Rao-Blackwellized KL is computed for.

Pure logic on a ``GRPOConfig`` / ``RLOOConfig`` (or any object with the same attributes) and on the checkpoint's
generation config as a dict: nothing here imports trl, transformers or vLLM.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

_EMPTY = object()
"""Matches an empty list, tuple, set or dict."""

# Keys that cannot change the next-token distribution: lengths and stopping rules that look only at the sampled prefix,
# token ids used for padding/stopping, cache and compile settings, what is returned, seeds and scheduling.
HARMLESS_KEYS: frozenset[str] = frozenset(
    {
        # lengths, stopping (transformers GenerationConfig and vLLM SamplingParams)
        "max_length",
        "max_new_tokens",
        "max_tokens",
        "max_time",
        "early_stopping",
        "stop",
        "stop_strings",
        "stop_token_ids",
        "ignore_eos",
        "include_stop_str_in_output",
        "repetition_detection",
        # special token ids
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        # number of samples, randomness
        "n",
        "num_return_sequences",
        "seed",
        # cache, compile, batching
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "low_memory",
        # what is returned
        "logprobs",
        "prompt_logprobs",
        "prompt_logprob_token_ids",
        "prompt_logprob_start",
        "logprob_token_ids",
        "flat_logprobs",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "output_kind",
        "stream_interval",
        "output_text_buffer_length",
        # vLLM: whether a request gets the *engine's* watermark; trl's colocate engine configures none (an external
        # `trl vllm-serve` server's settings are not visible here, see check_rb_sampling)
        "watermarking",
        # engine bookkeeping
        "skip_clone",
        "skip_reading_prefix_cache",
        "routed_experts_prompt_start",
        "priority",
        "request_id",
        "user",
        "cache_salt",
        "transformers_version",
        "_from_model_config",
        # knobs of transformers' assisted decoding, inert unless an assistant is switched on (refused below)
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "max_matching_ngram_size",
        "assistant_lookbehind",
        "target_lookbehind",
        "is_assistant",
        # a final renormalisation of already-normalised scores
        "renormalize_logits",
    }
)

# Keys that change the distribution unless they hold one of their neutral values: key -> (neutral values, fix).
# A key trl itself sets (temperature, top_k, top_p, min_p, repetition_penalty, do_sample) accepts None only where None
# is trl's own default: None in generation_kwargs overrides trl's value and transformers then falls back to the
# checkpoint's generation_config or its global default (top_k=50, do_sample=False). For the keys trl leaves unset,
# None is the same as leaving the key out.
NEUTRAL_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    # truncation of the vocabulary
    "top_k": ((0, -1), "0"),
    "top_p": ((1.0,), "1.0"),
    "min_p": ((None, 0.0), "None"),
    "top_h": ((None,), "None"),
    "typical_p": ((None, 1.0), "1.0"),
    "epsilon_cutoff": ((None, 0.0), "0.0"),
    "eta_cutoff": ((None, 0.0), "0.0"),
    # penalties and biases
    "repetition_penalty": ((1.0,), "1.0"),
    "encoder_repetition_penalty": ((None, 1.0), "1.0"),
    "presence_penalty": ((None, 0.0), "0.0"),
    "frequency_penalty": ((None, 0.0), "0.0"),
    "no_repeat_ngram_size": ((None, 0), "0"),
    "encoder_no_repeat_ngram_size": ((None, 0), "0"),
    "length_penalty": ((None, 1.0), "1.0"),
    "exponential_decay_length_penalty": ((None,), "None"),
    "sequence_bias": ((None, _EMPTY), "None"),
    "logit_bias": ((None, _EMPTY), "None"),
    "guidance_scale": ((None, 1.0), "None"),
    "watermarking_config": ((None,), "None"),
    # banned, forced or allowed tokens
    "bad_words_ids": ((None,), "None"),
    "bad_words": ((None, _EMPTY), "None"),
    "suppress_tokens": ((None, _EMPTY), "None"),
    "begin_suppress_tokens": ((None, _EMPTY), "None"),
    "forced_bos_token_id": ((None,), "None"),
    "forced_eos_token_id": ((None,), "None"),
    "force_words_ids": ((None,), "None"),
    "constraints": ((None,), "None"),
    "allowed_token_ids": ((None,), "None"),
    "decoder_start_token_id": ((None,), "None"),
    "remove_invalid_values": ((None, False), "False"),
    "token_healing": ((None, False), "False"),
    "trace_decode_token_ids": ((None,), "None"),
    "thinking_token_budget": ((None, -1), "None"),
    "truncate_prompt_tokens": ((None,), "None"),
    # minimum lengths (they mask EOS and the stop tokens)
    "min_length": ((None, 0), "0"),
    "min_new_tokens": ((None, 0), "None"),
    "min_tokens": ((None, 0), "0"),
    # decoding strategy: ancestral sampling, no beams, no contrastive search, no DoLa, no speculative ensembles
    "do_sample": ((True,), "True"),
    "num_beams": ((None, 1), "1"),
    "num_beam_groups": ((None, 1), "1"),
    "diversity_penalty": ((None, 0.0), "0.0"),
    "best_of": ((None,), "None"),
    "use_beam_search": ((None, False), "False"),
    "penalty_alpha": ((None,), "None"),
    "dola_layers": ((None,), "None"),
    "prompt_lookup_num_tokens": ((None,), "None"),
    "assistant_early_exit": ((None,), "None"),
    "assistant_ensemble_weight": ((None,), "None"),
    "speculation_type": ((None,), "None"),
    "use_mtp": ((None, False), "None"),
    # custom logits processors and plugin arguments
    "logits_processors": ((None, _EMPTY), "None"),
    "extra_args": ((None, _EMPTY), "None"),
    "vllm_xargs": ((None, _EMPTY), "None"),
}

# Guided / structured decoding (vLLM): a grammar masks the logits, so refused whenever set (not None).
GUIDED_KEYS: frozenset[str] = frozenset(
    {
        "structured_outputs",
        "structural_tag",
        "response_format",
        "guided_decoding",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_json_object",
        "guided_whitespace_pattern",
        "guided_decoding_backend",
    }
)

# Config fields that trl passes to the sampler itself (generation_kwargs, merged last, override them).
CONFIG_SAMPLING_FIELDS: tuple[str, ...] = ("top_k", "top_p", "min_p", "repetition_penalty")
# Config fields that switch on vLLM structured outputs (trl 1.16 name first, the older name second).
CONFIG_GUIDED_FIELDS: tuple[str, ...] = ("vllm_structured_outputs_regex", "vllm_guided_decoding_regex")


def check_rb_sampling(
    args: Any, estimator: str, *, setting: str = "kl_estimator='rb'", fallback: str = "kl_estimator='k1'"
) -> None:
    """Refuse any sampling setting under which trl does not draw completions from softmax(logits / temperature).

    The rule: ``kl_estimator='rb'`` computes, at every completion position, the exact KL between the full next-token
    distributions softmax(logits / ``args.temperature``) of the policy and the reference, so every completion token
    must be drawn from exactly that distribution of the policy, over the whole vocabulary, one token after the other.
    Stopping rules that look only at the prefix sampled so far (EOS, stop tokens or strings, a maximum length) are
    harmless. The check is deny-by-default: a ``generation_kwargs`` key it does not know is refused.

    Allowed:

    - the config fields at their neutral values: ``temperature`` > 0, ``top_k`` 0 (or -1), ``top_p`` 1.0, ``min_p``
      None or 0.0, ``repetition_penalty`` 1.0, ``vllm_structured_outputs_regex`` None; every other field (lengths,
      batch sizes, ``cache_implementation``, ``use_vllm`` and the ``vllm_*`` engine settings,
      ``use_transformers_continuous_batching``, ``chat_template_kwargs``, ...) does not change the distribution;
    - in ``generation_kwargs`` (the transformers ``GenerationConfig`` or vLLM ``SamplingParams`` keys, merged last by
      trl): any key of :data:`HARMLESS_KEYS` (``max_new_tokens``/``max_tokens``, eos/pad/bos token ids, ``stop``,
      ``stop_token_ids``, ``seed``, ``n``, ``use_cache``, ``cache_implementation``, ``logprobs``, ``output_*``, ...);
      ``temperature`` equal to ``args.temperature``; a key of :data:`NEUTRAL_VALUES` at one of its neutral values
      (``top_k`` 0, ``top_p`` 1.0, ``min_p`` None/0, ``repetition_penalty`` 1.0, ``typical_p`` 1.0,
      ``epsilon_cutoff``/``eta_cutoff`` 0, ``no_repeat_ngram_size`` 0, ``presence_penalty``/``frequency_penalty`` 0,
      ``suppress_tokens``/``begin_suppress_tokens``/``logit_bias``/``sequence_bias``/``bad_words`` None or empty,
      ``bad_words_ids``/``allowed_token_ids``/``forced_bos_token_id``/``forced_eos_token_id`` None, ``min_length``/
      ``min_new_tokens``/``min_tokens`` 0, ``do_sample`` True, ``num_beams`` 1, ``guidance_scale`` None/1, ...);
      a key of :data:`GUIDED_KEYS` (vLLM structured/guided decoding) only when None.

    Not visible from ``args``, hence not checked here: the ``suppress_tokens=[image_token_id]`` trl adds for
    vision-language processors, a ``generation_config.json`` of the checkpoint (checked by
    :func:`check_rb_checkpoint_generation_config` once the trainer has loaded the model), and the sampling defaults of
    an external ``trl vllm-serve`` server.

    ``kl_estimator`` ``'k1'`` and ``'k3'`` score the sampled tokens with trl's own log-probabilities and stay valid
    under any sampler: for any estimator other than ``'rb'`` this returns at once.

    ``setting`` and ``fallback`` name, in the message, the option that asked for the RB KL and the one that does not
    need it (the distillation trainer passes its ``kl_gradient`` values).

    Raises:
        ValueError: naming every offending setting with its value and the fix, in one message.
    """
    if estimator != "rb":
        return
    problems: list[str] = []
    generation_kwargs = _generation_kwargs(args, problems)

    temperature = getattr(args, "temperature", 1.0)
    if not _is_real(temperature) or temperature <= 0:
        problems.append(f"temperature={temperature!r} (use a positive value)")
    for name in CONFIG_SAMPLING_FIELDS:
        if name in generation_kwargs or not hasattr(args, name):
            continue  # generation_kwargs override the named settings (trl merges them last)
        value = getattr(args, name)
        neutral, fix = NEUTRAL_VALUES[name]
        if not _is_neutral(value, neutral):
            problems.append(f"{name}={value!r} (use {fix})")
    for name in CONFIG_GUIDED_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            problems.append(f"{name}={value!r} (guided decoding masks the vocabulary: use None)")

    for key, value in generation_kwargs.items():
        problem = _key_problem(key, value, temperature, "remove the key")
        if problem:  # `entry`, not `setting`: that names the option in the message
            problems.append(f"generation_kwargs[{key!r}]={value!r} ({problem})")

    if problems:
        raise ValueError(
            f"{setting} computes the exact KL of the full next-token distributions softmax(logits / "
            "temperature), so the completions must be sampled from exactly those distributions, but "
            f"{'; '.join(problems)}. Change those settings, or use {fallback}."
        )


def check_rb_checkpoint_generation_config(
    saved: Mapping[str, Any],
    trl_kwargs: Mapping[str, Any],
    temperature: float,
    *,
    source: str,
    transformers_major: int,
    setting: str = "kl_estimator='rb'",
    fallback: str = "kl_estimator='k1'",
) -> None:
    """Refuse a checkpoint ``generation_config.json`` whose sampling settings reach ``generate()`` past trl's own.

    trl 1.16 passes ``generate()`` a GenerationConfig of its own keys (``trl_kwargs``: temperature, top_p, top_k,
    min_p, repetition_penalty, ..., merged with ``generation_kwargs``), and transformers fills the rest from the
    model's ``generation_config`` (measured on transformers 5.24 with a checkpoint setting top_k 20, top_p 0.8,
    repetition_penalty 1.1, min_p 0.05, typical_p 0.9, no_repeat_ngram_size 3: generate() built
    NoRepeatNGram, MinP and Typical processors; trl's top_k, top_p and repetition_penalty won). Which of trl's keys
    win depends on the transformers major version:

    - 5.x: a key trl passes with a value that is not None (transformers#42702 merges the model's config into the
      None fields only). trl's ``min_p=None`` therefore lets a checkpoint's ``min_p`` through.
    - 4.x: every key trl passes, None included (trl's ``_override_model_generation_config`` copies its keys onto the
      model's config during generation, the workaround for transformers#42762).

    Every other key of ``saved`` (the checkpoint's non-default settings, ``to_diff_dict()``) is checked like a
    ``generation_kwargs`` key: harmless keys pass, distribution-changing ones must be neutral, unknown ones are
    refused.

    Raises:
        ValueError: naming ``source`` (the file), every offending key, and the fix (a neutral value in
            ``generation_kwargs``, which then wins, or the key removed from the file).
    """
    if transformers_major >= 5:
        trl_wins = {key for key, value in trl_kwargs.items() if value is not None}
    else:
        trl_wins = set(trl_kwargs)
    problems = []
    for key, value in saved.items():
        if key in trl_wins:
            continue
        problem = _key_problem(key, value, temperature, "remove the key from the file")
        if problem:
            problems.append(f"{key}={value!r} ({problem})")
    if problems:
        raise ValueError(
            f"{setting} computes the exact KL of softmax(logits / temperature), but the model's generation config "
            f"({source}) sets {'; '.join(problems)}, and transformers applies it when trl generates. Override each key "
            "with its neutral value in generation_kwargs (e.g. generation_kwargs={'min_p': 0.0}), remove it from "
            f"the file, or use {fallback}."
        )


def _key_problem(key: Any, value: Any, temperature: Any, removal: str) -> str | None:
    """Why ``key=value`` of a generation config changes softmax(logits / temperature), as the fix to apply, or None.
    ``removal`` is how to drop the key where that is the fix."""
    if key == "temperature":
        if _is_real(value) and value == temperature:
            return None
        return f"use {temperature!r}, the config's temperature, or {removal}"
    if key in HARMLESS_KEYS:
        return None
    if key in NEUTRAL_VALUES:
        neutral, fix = NEUTRAL_VALUES[key]
        return None if _is_neutral(value, neutral) else f"use {fix}"
    if key in GUIDED_KEYS:
        return None if value is None else f"guided decoding masks the vocabulary: {removal}"
    return "a key unknown to trl_rb, which may change the sampling distribution: remove it"


def _generation_kwargs(args: Any, problems: list[str]) -> dict[Any, Any]:
    """``args.generation_kwargs`` as a dict (trl parses a JSON string, but a hand-built args object may not)."""
    raw = getattr(args, "generation_kwargs", None)
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            problems.append(f"generation_kwargs={raw!r} (not a JSON object: use a dict)")
            return {}
    if not isinstance(raw, Mapping):
        problems.append(f"generation_kwargs={raw!r} (use a dict)")
        return {}
    return dict(raw)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    for allowed in neutral:
        if allowed is None:
            if value is None:
                return True
        elif allowed is _EMPTY:
            if isinstance(value, (list, tuple, set, frozenset, Mapping)) and len(value) == 0:
                return True
        elif isinstance(allowed, bool):
            if isinstance(value, bool) and value is allowed:
                return True
        elif _is_real(value) and value == allowed:
            return True
    return False


def check_rb_generation_config_of(trainer: Any, estimator: str) -> None:
    """``check_rb_checkpoint_generation_config`` for a built trl trainer: its policy's ``generation_config`` against
    the generation kwargs trl stored (``trainer.generation_kwargs``).

    With vLLM (``use_vllm``) trl builds vLLM ``SamplingParams`` from its own arguments, which the checkpoint's
    generation config does not enter: nothing to check here.
    """
    if estimator != "rb" or getattr(trainer.args, "use_vllm", False):
        return
    from importlib.metadata import version

    from .heads import unwrap_causal_lm

    lm = unwrap_causal_lm(trainer.model)
    generation_config = getattr(lm, "generation_config", None)
    trl_kwargs = getattr(trainer, "generation_kwargs", None)
    if generation_config is None or trl_kwargs is None:
        return
    name = getattr(lm.config, "_name_or_path", "") or type(lm).__name__
    check_rb_checkpoint_generation_config(
        generation_config.to_diff_dict(),
        trl_kwargs,
        trainer.args.temperature,
        source=f"{name}/generation_config.json",
        transformers_major=int(version("transformers").split(".")[0]),
    )
