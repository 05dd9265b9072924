"""trl_rb.trainers.sampling.check_rb_sampling on real trl GRPOConfig / RLOOConfig objects: deny-by-default."""

from __future__ import annotations

import pytest
import trl

from trl_rb.trainers.sampling import _EMPTY, GUIDED_KEYS, HARMLESS_KEYS, NEUTRAL_VALUES, check_rb_sampling

CONFIGS = {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}


@pytest.fixture(params=sorted(CONFIGS))
def make(request, tmp_path):
    """Build a real trl config of the parametrized class, CPU-only and without reporting."""

    def build(**kwargs):
        return CONFIGS[request.param](output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, **kwargs)

    return build


def raises_naming(args, *fragments: str, estimator: str = "rb") -> str:
    with pytest.raises(ValueError) as info:
        check_rb_sampling(args, estimator)
    message = str(info.value)
    for fragment in (*fragments, "kl_estimator='k1'"):
        assert fragment in message, (fragment, message)
    return message


# A distribution-changing value for every key with a neutral value.
NON_NEUTRAL = {
    "top_k": 50,
    "top_p": 0.9,
    "min_p": 0.05,
    "top_h": 0.4,
    "typical_p": 0.5,
    "epsilon_cutoff": 3e-4,
    "eta_cutoff": 1e-3,
    "repetition_penalty": 1.1,
    "encoder_repetition_penalty": 1.2,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.2,
    "no_repeat_ngram_size": 3,
    "encoder_no_repeat_ngram_size": 2,
    "length_penalty": 2.0,
    "exponential_decay_length_penalty": (10, 1.5),
    "sequence_bias": {(5,): -10.0},
    "logit_bias": {5: 2.0},
    "guidance_scale": 1.5,
    "watermarking_config": {"greenlist_ratio": 0.25},
    "bad_words_ids": [[7]],
    "bad_words": ["foo"],
    "suppress_tokens": [3],
    "begin_suppress_tokens": [4],
    "forced_bos_token_id": 1,
    "forced_eos_token_id": 2,
    "force_words_ids": [[8]],
    "constraints": ["c"],
    "allowed_token_ids": [1, 2, 3],
    "decoder_start_token_id": 0,
    "remove_invalid_values": True,
    "token_healing": True,
    "trace_decode_token_ids": [1, 2],
    "thinking_token_budget": 64,
    "truncate_prompt_tokens": 128,
    "min_length": 5,
    "min_new_tokens": 4,
    "min_tokens": 3,
    "do_sample": False,
    "num_beams": 4,
    "num_beam_groups": 2,
    "diversity_penalty": 0.5,
    "best_of": 4,
    "use_beam_search": True,
    "penalty_alpha": 0.6,
    "dola_layers": "high",
    "prompt_lookup_num_tokens": 10,
    "assistant_early_exit": 4,
    "assistant_ensemble_weight": 0.5,
    "speculation_type": "mtp",
    "use_mtp": True,
    "logits_processors": ["my.module:Processor"],
    "extra_args": {"plugin": 1},
    "vllm_xargs": {"plugin": 1},
}
NEUTRAL_CASES = [
    (key, [] if value is _EMPTY else value) for key, (values, _) in NEUTRAL_VALUES.items() for value in values
] + [("suppress_tokens", ()), ("logit_bias", {})]
HARMLESS_CASES = {
    "max_new_tokens": 16,
    "max_tokens": 16,
    "max_length": 64,
    "eos_token_id": [1, 2],
    "pad_token_id": 0,
    "bos_token_id": 1,
    "use_cache": False,
    "stop": ["\n\n"],
    "stop_strings": ["END"],
    "stop_token_ids": [5],
    "ignore_eos": True,
    "seed": 123,
    "n": 2,
    "cache_implementation": "static",
    "logprobs": 5,
    "skip_special_tokens": False,
    "output_scores": True,
    "output_logits": True,
    "return_dict_in_generate": True,
    "renormalize_logits": True,
}
# Config fields of both GRPOConfig and RLOOConfig that change the distribution, and a neutral value of each.
FIELD_CASES = [
    ("top_k", 50),
    ("top_k", None),  # None is not neutral: transformers falls back to its global top_k=50
    ("top_p", 0.9),
    ("min_p", 0.1),
    ("repetition_penalty", 1.1),
    ("vllm_structured_outputs_regex", "(yes|no)"),
]
FIELD_NEUTRAL = [
    ("top_k", 0),
    ("top_k", -1),
    ("top_p", 1.0),
    ("min_p", None),
    ("min_p", 0.0),
    ("repetition_penalty", 1.0),
    ("vllm_structured_outputs_regex", None),
]


def test_tables_are_disjoint_and_complete():
    assert not HARMLESS_KEYS & set(NEUTRAL_VALUES)
    assert not HARMLESS_KEYS & GUIDED_KEYS
    assert not GUIDED_KEYS & set(NEUTRAL_VALUES)
    assert "temperature" not in HARMLESS_KEYS | GUIDED_KEYS | set(NEUTRAL_VALUES)
    assert set(NON_NEUTRAL) == set(NEUTRAL_VALUES)


def test_defaults_pass(make):
    args = make()
    assert args.top_k == 0 and args.top_p == 1.0 and args.min_p is None and args.repetition_penalty == 1.0
    check_rb_sampling(args, "rb")
    check_rb_sampling(make(generation_kwargs={}), "rb")


@pytest.mark.parametrize(("field", "value"), FIELD_CASES)
def test_config_field_refused(make, field, value):
    raises_naming(make(**{field: value}), f"{field}={value!r}")


@pytest.mark.parametrize(("field", "value"), FIELD_NEUTRAL)
def test_config_field_neutral(make, field, value):
    check_rb_sampling(make(**{field: value}), "rb")


@pytest.mark.parametrize(("key", "value"), sorted(NON_NEUTRAL.items()))
def test_generation_kwargs_non_neutral_refused(make, key, value):
    message = raises_naming(make(generation_kwargs={key: value}), f"generation_kwargs[{key!r}]={value!r}")
    assert f"use {NEUTRAL_VALUES[key][1]}" in message
    assert message.startswith("kl_estimator='rb' computes the exact KL")  # the option asking for it, not the key


@pytest.mark.parametrize(("key", "value"), NEUTRAL_CASES)
def test_generation_kwargs_neutral_pass(make, key, value):
    check_rb_sampling(make(generation_kwargs={key: value}), "rb")


@pytest.mark.parametrize(
    ("key", "value"),
    [("top_k", None), ("top_p", None), ("repetition_penalty", None), ("do_sample", None), ("temperature", None)],
)
def test_generation_kwargs_none_overriding_trl_refused(make, key, value):
    """None in generation_kwargs replaces trl's explicit value; transformers then uses the checkpoint's or its own."""
    raises_naming(make(generation_kwargs={key: value}), f"generation_kwargs[{key!r}]=None")


@pytest.mark.parametrize(("key", "value"), sorted(HARMLESS_CASES.items()))
def test_generation_kwargs_harmless_pass(make, key, value):
    assert key in HARMLESS_KEYS
    check_rb_sampling(make(generation_kwargs={key: value}), "rb")


@pytest.mark.parametrize("key", sorted(GUIDED_KEYS))
def test_guided_decoding_refused(make, key):
    value = {"regex": "[ab]+"} if key == "structured_outputs" else "[ab]+"
    message = raises_naming(make(generation_kwargs={key: value}), f"generation_kwargs[{key!r}]={value!r}")
    assert "guided decoding" in message
    check_rb_sampling(make(generation_kwargs={key: None}), "rb")


@pytest.mark.parametrize("key", ["my_sampler", "top_a", "mirostat_tau", "logits_processor"])
def test_unknown_key_refused(make, key):
    message = raises_naming(make(generation_kwargs={key: 1}), f"generation_kwargs[{key!r}]=1", "unknown to trl_rb")
    assert "remove it" in message


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_other_estimators_never_raise(make, estimator):
    args = make(
        top_k=5,
        top_p=0.5,
        min_p=0.2,
        repetition_penalty=1.3,
        vllm_structured_outputs_regex="x",
        generation_kwargs={"num_beams": 4, "unknown": 1, "temperature": 0.1, **NON_NEUTRAL},
    )
    check_rb_sampling(args, estimator)
    raises_naming(args, "generation_kwargs['unknown']=1", "vllm_structured_outputs_regex='x'")


@pytest.mark.parametrize(
    ("temperature", "given", "ok"),
    [(1.0, 1.0, True), (1.0, 1, True), (0.7, 0.7, True), (1.0, 0.7, False), (0.7, 1.0, False), (0.7, 0.0, False)],
)
def test_temperature_in_generation_kwargs(make, temperature, given, ok):
    args = make(temperature=temperature, generation_kwargs={"temperature": given})
    if ok:
        check_rb_sampling(args, "rb")
    else:
        message = raises_naming(args, f"generation_kwargs['temperature']={given!r}")
        assert f"use {temperature!r}" in message


def test_generation_kwargs_override_config_fields(make):
    """trl merges generation_kwargs last: the value that reaches the sampler is the one checked."""
    check_rb_sampling(make(top_p=0.9, top_k=20, generation_kwargs={"top_p": 1.0, "top_k": 0}), "rb")
    message = raises_naming(make(generation_kwargs={"top_p": 0.8}), "generation_kwargs['top_p']=0.8")
    assert "top_p=1.0" not in message


def test_generation_kwargs_json_string(make):
    args = make(generation_kwargs='{"top_p": 0.5, "max_new_tokens": 8}')  # as the CLI passes it
    raises_naming(args, "generation_kwargs['top_p']=0.5")


def test_all_problems_in_one_message(make):
    args = make(
        top_k=40,
        min_p=0.1,
        vllm_structured_outputs_regex="a+",
        generation_kwargs={"typical_p": 0.9, "mystery": "x", "max_new_tokens": 8, "temperature": 0.5},
    )
    message = raises_naming(
        args,
        "top_k=40 (use 0)",
        "min_p=0.1 (use None)",
        "vllm_structured_outputs_regex='a+'",
        "generation_kwargs['typical_p']=0.9 (use 1.0)",
        "generation_kwargs['mystery']='x'",
        "generation_kwargs['temperature']=0.5",
    )
    assert "max_new_tokens" not in message
    assert message.count("kl_estimator='k1'") == 1
