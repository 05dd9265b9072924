"""The ``rb`` sampling check against vLLM's own parameters: every ``SamplingParams`` field is classified, the
``SamplingParams`` trl builds for an accepted config samples softmax(logits / T), and distribution-changing settings
(``generation_kwargs`` forwarded to vLLM, guided decoding, trl's own fields) are refused before the engine starts,
on both trainers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from vllm_cpu import build_qwen2, keep_plain_cpu_linear

pytest.importorskip("vllm", reason="the vLLM tier runs in its own environment: bash scripts/vllm_tier.sh")

from vllm import SamplingParams  # noqa: E402

from trl_rb import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl_rb.trainers.sampling import GUIDED_KEYS, HARMLESS_KEYS, NEUTRAL_VALUES, check_rb_sampling  # noqa: E402

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


def public_fields() -> list[str]:
    fields = getattr(SamplingParams, "__struct_fields__", None) or SamplingParams.__dataclass_fields__
    return [f for f in fields if not f.startswith("_")]  # underscored fields are derived by vLLM, not settable


def test_every_sampling_params_field_is_classified():
    """A field the check does not know would be refused (deny by default); this names it when vLLM adds one."""
    known = HARMLESS_KEYS | set(NEUTRAL_VALUES) | GUIDED_KEYS | {"temperature"}
    assert [f for f in public_fields() if f not in known] == []
    defaults = SamplingParams()
    for name in public_fields():
        if name in NEUTRAL_VALUES and name != "bad_words":  # vLLM's default [] is the empty value, accepted
            assert getattr(defaults, name) in NEUTRAL_VALUES[name][0], (name, getattr(defaults, name))


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    keep_plain_cpu_linear()
    return build_qwen2(tmp_path_factory.mktemp("vllm_sampling") / "policy", seed=0)


def make(name: str, tmp_path, policy_path, **overrides):
    config_cls, trainer_cls = TRAINERS[name]
    config = config_cls(
        output_dir=str(tmp_path / name), use_vllm=True, vllm_mode="colocate", use_cpu=True,
        vllm_gpu_memory_utilization=0.3, vllm_max_model_length=64, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=4, beta=0.1, temperature=0.7, report_to="none", save_strategy="no", bf16=False,
        kl_estimator="rb", **overrides,
    )  # fmt: skip
    return trainer_cls(policy_path, lambda completion_ids, **_: [0.0] * len(completion_ids), args=config,
                       processing_class=PreTrainedTokenizerFast.from_pretrained(policy_path),
                       train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 4}))  # fmt: skip


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trl_builds_plain_sampling_params_for_an_accepted_config(tmp_path, policy_path, name):
    """What reaches vLLM, recorded at the engine: only harmless fields differ from vLLM's defaults, and the temperature
    is the config's."""
    trainer = make(name, tmp_path, policy_path, generation_kwargs={"seed": 5, "stop_token_ids": [2], "top_p": 1.0})
    seen = []
    engine_generate = trainer.vllm_generation.llm.generate

    def recording(prompts, sampling_params=None, **kwargs):
        seen.append(sampling_params)
        return engine_generate(prompts, sampling_params=sampling_params, **kwargs)

    trainer.vllm_generation.llm.generate = recording
    trainer.model.train()
    trainer._generate_and_score_completions([{"prompt": "w1 w2"}] * 4)
    assert len(seen) == 1
    defaults = SamplingParams()
    changed = {f: getattr(seen[0], f) for f in public_fields() if getattr(seen[0], f) != getattr(defaults, f)}
    print(name, "SamplingParams fields trl changed from vLLM's defaults:", changed)
    assert abs(changed.pop("temperature") - 0.7) < 1e-6
    assert set(changed) <= HARMLESS_KEYS, changed
    check_rb_sampling(SimpleNamespace(temperature=0.7, generation_kwargs=changed), "rb")  # accepted as sent


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"generation_kwargs": {"presence_penalty": 0.5}}, "presence_penalty"),
        ({"generation_kwargs": {"structured_outputs": {"regex": "w1"}}}, "structured_outputs"),
        ({"generation_kwargs": {"frequency_penalty": 0.2}}, "frequency_penalty"),
        ({"generation_kwargs": {"logit_bias": {3: 2.0}}}, "logit_bias"),
        ({"generation_kwargs": {"new_vllm_knob": 1}}, "new_vllm_knob"),
        ({"vllm_structured_outputs_regex": "w1 w2"}, "vllm_structured_outputs_regex"),
        ({"top_k": 5}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
    ],
)
def test_distribution_changing_settings_are_refused_before_the_engine_starts(tmp_path, policy_path, name, overrides,
                                                                             named):  # fmt: skip
    with pytest.raises(ValueError, match=named) as refused:
        make(name, tmp_path, policy_path, **overrides)
    assert "kl_estimator='k1'" in str(refused.value)  # the message names the fix
