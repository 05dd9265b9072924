"""trl_rb.DistillationConfig / DistillationTrainer: refusals, the loss against full logits, trl parity, metrics,
exact-enumeration unbiasedness, and a training run whose exact KL(student || teacher) goes down.

Models: the enumerable tiny GPT-2 pair of ``tests/enumerable.py`` (vocabulary a, b, EOS plus a BOS prompt token;
float64), student = ``tiny_gpt2_pair(seed)[0]``, teacher = ``[1]``. Completions have at most MAX_LEN tokens, so the
sequence-level reverse KL and its gradient are exact sums over every completion (``trl_rb.exact``).

Unbiasedness: the trainer's gradient at learning rate 0 is averaged over NB independent generation batches of BATCH
completions (trl's own sampling and loss), a scale c is fitted (mean ~ c * exact grad KL) and every coordinate is
z-tested against c * exact with the batch-to-batch standard errors (``support.z_statistics``). With
about 950 coordinates, |z| > 4.5 anywhere has probability < 0.7% under the null (Bonferroni); seeds are fixed.
"""

from __future__ import annotations

import pytest
import torch
import trl
from datasets import Dataset
from enumerable import tiny_gpt2_pair
from support import MODEL_KW, PROMPT, VOCAB, materialized, tiny_tokenizer, z_statistics

from trl_rb.exact import exact_kl, exact_kl_and_grad
from trl_rb.kl import future_sum, token_kl, token_logprobs
from trl_rb.trainers.distillation import NUM_SEQUENCES_KEY, DistillationConfig, DistillationTrainer

MAX_LEN, BATCH, NB, SEED0 = 3, 64, 200, 20_000
EOS = VOCAB - 1


def make_distiller(kl_gradient: str, tmp_path, *, batch: int = BATCH, seed: int = 0, trainer_cls=None, **config):
    student, teacher = tiny_gpt2_pair(VOCAB, seed=seed, **MODEL_KW)
    config.setdefault("bf16", False)  # trl's default autocasts the heads to bf16, even on CPU
    config.setdefault("learning_rate", 0.0)
    config_cls = DistillationConfig if trainer_cls is None else trl.DistillationConfig
    extra = {"kl_gradient": kl_gradient} if trainer_cls is None else {}
    args = config_cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        max_completion_length=MAX_LEN,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        **extra,
        **config,
    )
    trainer = (trainer_cls or DistillationTrainer)(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 512}),
        processing_class=tiny_tokenizer(),
    )
    return trainer, student, teacher


def generation_batch(trainer, n: int, seed: int) -> dict:
    torch.manual_seed(seed)
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": PROMPT}] * n)


def flat_grads(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> torch.Tensor:
    parts = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(parts, params, strict=True)])


def full_logit_terms(trainer, teacher, inputs, temperature: float):
    """D_t, l_t, log q_t(y_t) [B, C] from materialized logits (the independent implementation), and the mask."""
    lp, lq = materialized(trainer, teacher, inputs)
    ids, mask = inputs["completion_ids"], inputs["completion_mask"].bool()
    d = token_kl(lp, lq, temperature=temperature)
    lt = token_logprobs(lp, ids, temperature=temperature)
    lqt = token_logprobs(lq, ids, temperature=temperature)
    zero = torch.zeros((), dtype=d.dtype)
    return torch.where(mask, d, zero), torch.where(mask, lt, zero), torch.where(mask, lqt, zero), mask


# ----------------------------------------------------------------------------------------------------------------
# Config and refusals
# ----------------------------------------------------------------------------------------------------------------


def test_default_is_pathwise_and_names_are_checked(tmp_path):
    assert DistillationConfig(output_dir=str(tmp_path), use_cpu=True).kl_gradient == "pathwise"
    assert DistillationConfig(output_dir=str(tmp_path), use_cpu=True, kl_gradient="RB").kl_gradient == "rb"
    with pytest.raises(ValueError, match="kl_gradient='sampled' is not one of"):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, kl_gradient="sampled")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"beta": 0.5}, r"beta=0.5 selects a different divergence.*beta=1.0, or use kl_gradient='pathwise'"),
        ({"beta": 0.0}, r"beta=0.0 selects a different divergence"),
        ({"top_k": 2}, r"kl_gradient='rb' computes the exact KL.*top_k=2.*use kl_gradient='pathwise'"),
        ({"top_p": 0.9}, r"top_p=0.9"),
        ({"repetition_penalty": 1.2}, r"repetition_penalty=1.2"),
        ({"generation_kwargs": {"typical_p": 0.5}}, r"generation_kwargs\['typical_p'\]=0.5"),
        ({"generation_kwargs": {"temperature": 0.5}}, r"generation_kwargs\['temperature'\]=0.5 \(use 1.0"),
    ],
)
def test_rb_refuses_what_its_math_does_not_cover(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        make_distiller("rb", tmp_path, **config)


def test_pathwise_allows_trl_settings(tmp_path):
    trainer, _, _ = make_distiller("pathwise", tmp_path, beta=0.5, top_k=2)
    assert trainer.kl_gradient == "pathwise" and not trainer._replaces_loss


def test_plain_trl_config_gets_trls_gradient_and_the_metrics(tmp_path):
    student, teacher = tiny_gpt2_pair(VOCAB, seed=0, **MODEL_KW)
    args = trl.DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                                  max_completion_length=MAX_LEN, per_device_train_batch_size=4)  # fmt: skip
    trainer = DistillationTrainer(student, teacher, args=args, processing_class=tiny_tokenizer(),
                                  train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 8}))  # fmt: skip
    assert trainer.kl_gradient == "pathwise" and trainer._replaces_loss  # kl/rb and kl/k1 are logged


# ----------------------------------------------------------------------------------------------------------------
# The loss on a fixed batch against full logits, and trl parity
# ----------------------------------------------------------------------------------------------------------------


def loo_baseline_by_loops(later: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b[i, t] = mean of later[j, t] over the rows j != i with mask[j, t] (one prompt: one group); 0 if none."""
    b = torch.zeros_like(later)
    for i in range(later.shape[0]):
        for t in range(later.shape[1]):
            others = [float(later[j, t]) for j in range(later.shape[0]) if j != i and mask[j, t]]
            b[i, t] = sum(others) / len(others) if others else 0.0
    return b


@pytest.mark.parametrize(("temperature", "loo"), [(1.0, True), (0.7, True), (1.0, False)])
def test_rb_loss_and_gradient_match_full_logit_surrogate(tmp_path, temperature, loo):
    """The trainer's loss and gradient on one batch against the surrogate built from full logits; every completion
    shares the prompt, so with the leave-one-out baseline each row's baseline is the mean of the 31 others."""
    trainer, _, teacher = make_distiller("rb", tmp_path, batch=32, temperature=temperature, rb_loo_baseline=loo)
    inputs = generation_batch(trainer, 32, seed=1)
    assert int(inputs["completion_mask"].sum()) < 32 * MAX_LEN  # some completions end early: masks matter
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    got = flat_grads(loss, params)
    # trl's kernels keep their softmax statistics in float32, even for these float64 models: float32 tolerances

    d, lt, lqt, mask = full_logit_terms(trainer, teacher, inputs, temperature)
    later = future_sum(d.detach())
    if loo:
        later = later - loo_baseline_by_loops(later, mask)
    surrogate = d + (lt - lt.detach()) * later
    expected_loss = torch.where(mask, surrogate, torch.zeros(())).sum() / (32 * MAX_LEN)
    expected = flat_grads(expected_loss, params, retain_graph=True)
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # and the score term matters here: the pathwise part alone is a different vector
    pathwise = flat_grads(d.sum() / (32 * MAX_LEN), params)
    assert (got - pathwise).norm() > 0.05 * got.norm()

    metrics = trainer._metrics["train"]
    assert metrics["kl/rb"][-1] == pytest.approx(float(d.detach().sum(-1).mean()), rel=1e-6)
    assert metrics["kl/k1"][-1] == pytest.approx(float((lt - lqt).detach().sum(-1).mean()), rel=1e-6, abs=1e-6)


def test_pathwise_is_trls_loss(tmp_path):
    """kl_gradient='pathwise' gives trl's DistillationTrainer's loss and gradient on the same batch."""
    ours, _, _ = make_distiller("pathwise", tmp_path / "ours", batch=32)
    stock, _, _ = make_distiller("pathwise", tmp_path / "trl", batch=32, trainer_cls=trl.DistillationTrainer)
    inputs = generation_batch(ours, 32, seed=2)
    inputs_trl = {k: v for k, v in inputs.items() if k != NUM_SEQUENCES_KEY}
    stock.model.train()
    for (name, a), b in zip(ours.model.named_parameters(), stock.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    params_ours = [p for p in ours.model.parameters() if p.requires_grad]
    params_trl = [p for p in stock.model.parameters() if p.requires_grad]
    num = inputs["num_items_in_batch"]
    loss_ours = ours.compute_loss(ours.model, inputs, num_items_in_batch=num)
    loss_trl = stock.compute_loss(stock.model, inputs_trl, num_items_in_batch=num)
    assert float(loss_ours.detach()) == pytest.approx(float(loss_trl.detach()), rel=1e-10)
    torch.testing.assert_close(
        flat_grads(loss_ours, params_ours), flat_grads(loss_trl, params_trl), rtol=1e-8, atol=1e-12
    )
    assert "kl/rb" in ours._metrics["train"] and "kl/rb" not in stock._metrics["train"]


# ----------------------------------------------------------------------------------------------------------------
# Unbiasedness by exact enumeration
# ----------------------------------------------------------------------------------------------------------------


def distillation_gradient_study(
    kl_gradient: str, tmp_path, nb: int = NB, temperature: float = 1.0, **config
) -> dict[str, float]:
    trainer, student, teacher = make_distiller(kl_gradient, tmp_path, temperature=temperature, **config)
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    _, grads = exact_kl_and_grad(student, teacher, [0], max_new_tokens=MAX_LEN, eos_token_id=EOS,
                                 temperature=temperature, params=dict(named))  # fmt: skip
    exact = torch.cat([grads[n].flatten() for n, _ in named])
    params = [p for _, p in named]
    batches = []
    for b in range(nb):
        inputs = generation_batch(trainer, BATCH, seed=SEED0 + b)
        loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=inputs["num_items_in_batch"])
        batches.append(flat_grads(loss, params))
    return z_statistics(torch.stack(batches), exact)


@pytest.mark.statistics
@pytest.mark.parametrize(("temperature", "loo"), [(1.0, True), (0.7, True), (1.0, False)])
def test_rb_mean_gradient_is_grad_kl_over_max_length(tmp_path, temperature, loo):
    """Unbiased with and without the leave-one-out baseline (all 64 completions share the prompt: 63 others)."""
    study = distillation_gradient_study("rb", tmp_path, temperature=temperature, rb_loo_baseline=loo)
    print("rb", temperature, loo, study)
    assert study["max_abs_z"] < 4.5, study
    assert abs(study["c"] - 1 / MAX_LEN) < 4.5 * study["c_se"], study


@pytest.mark.statistics
def test_trl_pathwise_gradient_is_biased(tmp_path):
    """trl's loss: its mean gradient is not parallel to grad KL (the finding the README reports)."""
    study = distillation_gradient_study("pathwise", tmp_path, nb=NB // 2)
    print("pathwise", study)
    assert study["frac_over_4se"] > 0.2, study
    assert study["max_abs_z"] > 10, study


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_gradient", ["rb", "pathwise"])
def test_training_lowers_the_exact_kl(tmp_path, kl_gradient):
    trainer, student, teacher = make_distiller(kl_gradient, tmp_path, batch=32, learning_rate=0.05, max_steps=12)
    before = exact_kl(student, teacher, [0], max_new_tokens=MAX_LEN, eos_token_id=EOS)
    trainer.train()
    after = exact_kl(student, teacher, [0], max_new_tokens=MAX_LEN, eos_token_id=EOS)
    logged = [h for h in trainer.state.log_history if "kl/rb" in h]
    assert len(logged) == 12 and all(h["kl/rb"] >= 0 for h in logged)
    print(kl_gradient, before, after)
    assert after < 0.6 * before, (before, after)


def test_rb_gradient_accumulation_splits_the_generation_batch_exactly(tmp_path):
    """trl generates once per accumulation cycle and splits the batch; rb divides every micro-batch by the whole
    generation batch's size (and trl does not rescale for accumulation), so the micro-batch gradients add up to the
    full batch's."""
    from trl.trainer.utils import split_tensor_dict

    trainer, _, _ = make_distiller("rb", tmp_path, batch=16, rb_loo_baseline=False)  # halves of one group: see below
    inputs = generation_batch(trainer, 32, seed=3)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    whole = flat_grads(trainer.compute_loss(trainer.model, inputs), params)
    halves = split_tensor_dict(inputs, 2)
    assert all(int(h[NUM_SEQUENCES_KEY]) == 32 and h["completion_ids"].shape[0] == 16 for h in halves)
    summed = sum(flat_grads(trainer.compute_loss(trainer.model, h), params) for h in halves)
    # float32 statistics in trl's kernels (see above): summation order moves elements by ~1e-6 relative, so the
    # tolerance is float32's at the gradient's scale; a wrong normalization would be off by a factor of 2
    scale = float(whole.abs().max())
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-5 * scale)


PROMPTS = ["<bos>", "<bos> a", "<bos> b", "<bos> a b"]


def test_num_generations_keeps_each_prompts_completions_in_one_micro_batch(tmp_path):
    """num_generations=4, micro-batches of 8, 2 accumulation steps: the sampler draws every prompt 4 times in a row,
    trl's shuffle-and-split (with trl-rb's whole-group shuffle) leaves each group whole in one micro-batch, so the
    micro-batch gradients, leave-one-out baselines included, add up to the whole generation batch's gradient."""
    from trl.trainer.utils import split_tensor_dict

    from trl_rb.trainers.distillation import GROUP_KEY

    trainer, _, _ = make_distiller("rb", tmp_path, batch=8, num_generations=4, gradient_accumulation_steps=2)
    trainer.train_dataset = Dataset.from_dict({"prompt": PROMPTS * 16})
    first = next(iter(trainer.get_train_dataloader()))
    prompts = [row["prompt"] for row in first]
    assert len(prompts) == 16 and all(len(set(prompts[i : i + 4])) == 1 for i in range(0, 16, 4))

    trainer.model.train()
    torch.manual_seed(5)
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._prepare_inputs(first)
    micro = trainer._buffered_inputs
    assert [m["completion_ids"].shape[0] for m in micro] == [8, 8]
    for m in micro:  # groups of 4 rows with one prompt each, none split between micro-batches
        counts = torch.bincount(m[GROUP_KEY])
        assert sorted(counts[counts > 0].tolist()) == [4, 4]
        for g in m[GROUP_KEY].unique():
            rows = m["prompt_ids"][m[GROUP_KEY] == g]
            assert bool((rows == rows[0]).all())
    whole = {k: (micro[0][k] if v.ndim == 0 else torch.cat([m[k] for m in micro])) for k, v in micro[0].items()}
    whole[GROUP_KEY] = torch.cat([micro[0][GROUP_KEY], micro[1][GROUP_KEY] + 100])  # keep the groups apart
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    summed = sum(flat_grads(trainer.compute_loss(trainer.model, m), params) for m in split_tensor_dict(whole, 2))
    full = flat_grads(trainer.compute_loss(trainer.model, whole), params)
    scale = float(full.abs().max())
    torch.testing.assert_close(summed, full, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"num_generations": 3}, "does not divide per_device_train_batch_size=8"),
        ({"num_generations": 0}, "num_generations=0: use a positive integer"),
    ],
)
def test_num_generations_refusals(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        make_distiller("rb", tmp_path, batch=8, **config)


def test_num_generations_refuses_an_iterable_dataset(tmp_path):
    student, teacher = tiny_gpt2_pair(VOCAB, seed=0, **MODEL_KW)
    args = DistillationConfig(output_dir=str(tmp_path), kl_gradient="rb", per_device_train_batch_size=8,
                              num_generations=4, max_completion_length=MAX_LEN, use_cpu=True, bf16=False,
                              report_to=[], max_steps=1)  # fmt: skip
    stream = Dataset.from_dict({"prompt": PROMPTS * 4}).to_iterable_dataset()
    with pytest.raises(ValueError, match="num_generations=4 needs a map-style train_dataset"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=stream,
                            processing_class=tiny_tokenizer())  # fmt: skip
