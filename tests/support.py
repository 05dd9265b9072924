"""Helpers shared by the test modules (plain functions and constants; the pytest fixtures are in ``conftest.py``).

``tests/conftest.py`` puts ``tests/`` on ``sys.path`` (pytest's default ``prepend`` import mode), so every test module,
in any tier folder, imports these as ``from support import ...``; no test module imports another.

- The enumerable tiny GPT-2 pair (``enumerable.tiny_gpt2_pair``: tokens <bos>, a, b, <eos>; float64) under a
  ``GRPOTrainer``: ``VOCAB``, ``PROMPT``, ``MODEL_KW``, ``tiny_tokenizer``, ``make_trainer``, ``score_batch``,
  ``materialized``, and the rewards ``zero_reward`` / ``length_reward``.
- A 2-layer word-level GPT-2 saved to disk (``build_lm``) under an ``RLOOTrainer``: ``WORDS``, ``target_reward``,
  ``low_words_reward``, ``prompts_dataset``, ``make_config``, ``scoring_trainer``, ``generation_batch``, ``grads``;
  the ``lm_paths`` fixture (conftest) builds three of them.
- Gradient studies against exact enumeration on the tiny pair (completions of at most ``MAX_LEN`` tokens, batches of
  ``BATCH`` in groups of ``GROUP``, ``BETA``): ``exact_mean_grad``, ``mixed_batch`` (``MIXED_PROMPTS``),
  ``stale_batch_grads`` (seeds from ``SEED0``), ``z_statistics`` (fitted scale), ``compare`` (a given scale),
  ``flat_grad``, and the RLOO trainer of those studies, ``make_rloo_trainer``.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from enumerable import tiny_gpt2_pair, word_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from trl_rb.exact import exact_kl_and_grad
from trl_rb.trainers.grpo import GRPOConfig, GRPOTrainer
from trl_rb.trainers.rloo import RLOOConfig, RLOOTrainer

# --------------------------------------------------------------------------------------------------------------------
# The enumerable tiny GPT-2 pair under GRPOTrainer
# --------------------------------------------------------------------------------------------------------------------

VOCAB = 4
PROMPT = "<bos>"
MODEL_KW = {"n_embd": 8, "n_layer": 1, "n_head": 2}


def tiny_tokenizer():
    """Word-level tokenizer over the fixtures' ids: <bos>=0, a=1, b=2, <eos>=3 (EOS also pads)."""
    return word_tokenizer(("<bos>", "a", "b", "<eos>"), eos="<eos>", bos="<bos>")


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def length_reward(completion_ids, **kwargs):
    """Reward long completions: the policy learns to postpone EOS."""
    return [float(len(ids)) for ids in completion_ids]


def make_trainer(
    estimator: str,
    tmp_path,
    *,
    batch: int = 64,
    group: int = 16,
    max_len: int = 4,
    beta: float = 0.1,
    loss_type: str = "dr_grpo",
    reward=zero_reward,
    seed: int = 0,
    use_ref_model: bool = True,
    model=None,
    peft_config=None,
    dtype: torch.dtype = torch.float64,
    **config,
):
    """A trainer on the tiny pair: policy = ``tiny_gpt2_pair(seed)[0]``, reference = ``[1]`` (via ``ref_model=``);
    ``rb`` is the plain RB gradient (``rb_gamma=0``) unless ``rb_gamma`` is given."""
    policy, reference = tiny_gpt2_pair(VOCAB, seed=seed, dtype=dtype, **MODEL_KW)
    config.setdefault("scale_rewards", "none")
    config.setdefault("rb_gamma", 0.0)  # rb: the plain RB gradient (trainers/test_gamma.py covers the control variate)
    # trl's default autocasts its log-prob head to bf16, even on CPU; the tests compare in float64
    config.setdefault("bf16", False)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        num_generations=group,
        max_completion_length=max_len,
        beta=beta,
        loss_type=loss_type,
        kl_estimator=estimator,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        **config,
    )
    trainer = GRPOTrainer(
        model=policy if model is None else model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 256}),
        processing_class=tiny_tokenizer(),
        ref_model=reference if use_ref_model else None,
        peft_config=peft_config,
    )
    return trainer, policy, reference


def score_batch(trainer, n: int, seed: int) -> dict:
    """One generation batch of ``n`` completions of the fixed prompt, scored by the trainer (trl's own code)."""
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([{"prompt": PROMPT}] * n)


def materialized(trainer, reference, inputs):
    """Policy / reference logits [N, C, V] of the batch's completions, completion-aligned (plain HF forwards)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    c = inputs["completion_ids"].shape[1]
    lp = trainer.model(input_ids=ids, attention_mask=att).logits[:, -c - 1 : -1]
    with torch.no_grad():
        lq = reference(input_ids=ids, attention_mask=att).logits[:, -c - 1 : -1]
    return lp, lq


# --------------------------------------------------------------------------------------------------------------------
# A word-level GPT-2 on disk under RLOOTrainer
# --------------------------------------------------------------------------------------------------------------------

N_WORDS = 60
TARGET_ID = 3  # the token "w0": the reward is its frequency in the completion
WORDS = ["[PAD]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(N_WORDS)]


def build_lm(path, *, seed: int, words: list[str] = WORDS, tied: bool = True, **config_overrides) -> str:
    """Save a 2-layer GPT-2 (n_embd 32; ``config_overrides`` change its GPT2Config) and its word-level tokenizer
    (pad 0, eos 1) to ``path``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, tie_word_embeddings=tied,
    )
    for key, value in config_overrides.items():
        setattr(config, key, value)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def target_reward(completion_ids, **_):
    """Fraction of completion tokens that are the target token."""
    return [sum(t == TARGET_ID for t in ids) / max(len(ids), 1) for ids in completion_ids]


def low_words_reward(completion_ids, **_):
    """Fraction of completion tokens among w0..w19 (dense: about a third at the start)."""
    return [sum(3 <= t < 23 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def prompts_dataset(n: int = 16) -> Dataset:
    return Dataset.from_dict({"prompt": [f"w{i + 5} w{i + 6}" for i in range(n)]})


def make_config(tmp_path, estimator: str, **overrides) -> RLOOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / f"out_{estimator}"),
        kl_estimator=estimator,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        beta=0.05,
        seed=0,
        save_strategy="no",
        bf16=False,
        disable_dropout=True,
        disable_tqdm=True,
        rb_gamma=0.0,  # rb: the plain RB gradient (trainers/test_gamma.py covers the control variate)
    )
    kwargs.update(overrides)
    return RLOOConfig(**kwargs)


def scoring_trainer(lm_paths, args, **kwargs) -> RLOOTrainer:
    trainer = RLOOTrainer(lm_paths["policy"], target_reward, args=args, train_dataset=prompts_dataset(), **kwargs)
    trainer.model.train()  # as inside Trainer.train(): metrics go to the "train" bucket
    return trainer


def generation_batch(n_prompts: int, num_generations: int) -> list[dict]:
    # trl's RepeatSampler puts the num_generations copies of a prompt next to each other
    return [{"prompt": f"w{i + 5} w{i + 6}"} for i in range(n_prompts) for _ in range(num_generations)]


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Gradient studies against exact enumeration
# --------------------------------------------------------------------------------------------------------------------

SEED0 = 10_000
BATCH, GROUP, MAX_LEN, BETA = 64, 16, 4, 0.1

# Two prompts of different lengths (token ids 0 and 0 1 2): left padding, and a KL averaged over prompts.
MIXED_PROMPTS = {"<bos>": [0], "<bos> a b": [0, 1, 2]}


def exact_mean_grad(policy, reference, named, prompts: dict[str, list[int]], temperature: float) -> torch.Tensor:
    """The exact grad of the prompt-averaged KL(p || q) at ``temperature``, flattened like ``named``."""
    total = None
    for ids in prompts.values():
        _, grads = exact_kl_and_grad(policy, reference, ids, max_new_tokens=MAX_LEN, eos_token_id=VOCAB - 1,
                                     temperature=temperature, params=dict(named))  # fmt: skip
        flat = torch.cat([grads[n].flatten() for n, _ in named])
        total = flat if total is None else total + flat
    return total / len(prompts)


def mixed_batch(trainer, prompts: dict[str, list[int]], seed: int) -> dict:
    """A generation batch with BATCH // len(prompts) completions of each prompt, in trl's order (groups adjacent)."""
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(BATCH // len(prompts))])


def z_statistics(grads: torch.Tensor, exact: torch.Tensor, expected_c: float | None = None) -> dict[str, float]:
    """Per-batch gradients [NB, D] against the exact gradient [D]: fitted scale c (mean ~ c * exact), its standard
    error, per-coordinate z-scores of mean - c * exact (c = ``expected_c`` when given, else the fitted one), the
    cosine to the exact gradient and the per-batch gradient variance summed over coordinates."""
    nb = grads.shape[0]
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(nb)
    # Coordinates the KL does not depend on: position embeddings past the last step (exactly 0) and the attention key
    # biases (softmax is shift-invariant: rounding-level values ~1e-19 in both). Their z would compare rounding errors.
    keep = se > 1e-8 * se.max()
    assert int(keep.sum()) > 500
    assert exact[~keep].abs().max() < 1e-12
    m, s, e = mean[keep], se[keep], exact[keep]
    # c_hat = weights . mean, ordinary least squares: weights from 1/SE^2 would correlate with the means and bias c_hat.
    weights = e / (e @ e)
    c = float(weights @ m)
    c_se = float((grads[:, keep] @ weights).std() / math.sqrt(nb))  # from the per-batch c, so correlations count
    z = (m - (c if expected_c is None else expected_c) * e) / s
    return {
        "c": c,
        "c_se": c_se,
        "max_abs_z": float(z.abs().max()),
        "frac_over_4se": float((z.abs() > 4).double().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(m, e, dim=0)),
        "variance": float(grads.var(0).sum()),
        "coordinates": int(keep.sum()),
    }


def stale_batch_grads(trainer, drop_keys: tuple[str, ...], nb: int, shift: float = 0.15):
    """A second iteration: batches sampled by p_old, the loss gradient at a moved policy p. Shared with the RLOO test.

    Every batch is scored at the sampling parameters theta_old (trl records the sampler's log-probs when batches are
    reused); the parameters are then moved to theta = theta_old + shift * noise (fixed) and the loss gradient taken
    there. ``drop_keys`` are removed from each batch first (dropping the sampler's scores treats the stale batch as
    on-policy). Returns the per-batch gradients [nb, D] and the exact grad KL(p_theta || q) [D].
    """
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    theta_old = torch.nn.utils.parameters_to_vector(params).detach().clone()
    noise = torch.randn(theta_old.shape, generator=torch.Generator().manual_seed(7), dtype=theta_old.dtype)
    theta = theta_old + shift * noise
    torch.nn.utils.vector_to_parameters(theta, params)
    reference = trainer.ref_model
    exact = exact_mean_grad(trainer.model, reference, named, {PROMPT: [0]}, trainer.temperature)
    grads = []
    for b in range(nb):
        torch.nn.utils.vector_to_parameters(theta_old, params)
        inputs = score_batch(trainer, BATCH, seed=SEED0 + b)
        inputs = {k: v for k, v in inputs.items() if k not in drop_keys}
        torch.nn.utils.vector_to_parameters(theta, params)
        parts = torch.autograd.grad(trainer.compute_loss(trainer.model, inputs), params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(parts, params, strict=True)]))
    return torch.stack(grads), exact


def make_rloo_trainer(estimator: str, root, temperature: float = 1.0, reward=zero_reward, **config) -> RLOOTrainer:
    """An RLOO trainer on the tiny float64 pair: policy = ``tiny_gpt2_pair(0)[0]``, reference = ``[1]``. ``rb`` is the
    plain RB gradient (``rb_gamma=0``) unless ``rb_gamma`` is given.

    The models go through disk: trl's RLOO constructor builds its own reference copy from the policy's path before
    ``ref_model=`` replaces it, so an in-memory policy without a path cannot be used.
    """
    beta = config.pop("beta", BETA)
    paths = []
    for name, model in zip(("policy", "reference"), tiny_gpt2_pair(VOCAB, seed=0, **MODEL_KW), strict=True):
        path = root / name
        if not path.exists():
            model.save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
        paths.append(str(path))
    args = RLOOConfig(
        output_dir=str(root / f"out_{estimator}_{temperature}_{len(config)}"),
        per_device_train_batch_size=BATCH,
        num_generations=GROUP,
        max_completion_length=MAX_LEN,
        beta=beta,
        kl_estimator=estimator,
        temperature=temperature,
        bf16=False,  # the comparison is in float64
        disable_dropout=True,
        model_init_kwargs={"dtype": torch.float64},
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        **{"rb_gamma": 0.0, **config},
    )
    return RLOOTrainer(
        model=paths[0],
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 256}),
        processing_class=tiny_tokenizer(),
        ref_model=paths[1],
    )


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d params, concatenated [D] (zeros for parameters the loss does not reach)."""
    parts = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(parts, params, strict=True)])


def compare(grads: torch.Tensor, exact: torch.Tensor, expected_c: float) -> dict[str, float]:
    """Per-batch gradients [NB, D] against expected_c * exact [D] (``z_statistics`` with c fixed)."""
    return z_statistics(grads, exact, expected_c)
