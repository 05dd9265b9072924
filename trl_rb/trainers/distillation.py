"""On-policy distillation with the RB gradient: ``DistillationConfig`` / ``DistillationTrainer``, drop-ins for trl 1.16's.

trl's ``DistillationTrainer`` (``beta=1.0``) samples completions from the student and minimises sum_t D_t, the
full-vocabulary reverse KL of each next-token distribution, differentiated with the completions held fixed. That
is the pathwise half of the gradient of the sequence-level KL(student || teacher); the score-function half, how each
token changes the later tokens' divergences, is missing, so its mean gradient is not the gradient of its own objective
(measured: ``tests/trainers/test_distillation.py``). ``kl_gradient="rb"`` adds it: the loss becomes the RB surrogate of
``distillation_loss`` with a constant normalization, an unbiased gradient of the sequence-level reverse KL.

How the hook works (no trl code is copied): trl's ``_compute_loss`` computes both models' completion-aligned hidden
states (one forward each, the student's inside its engine wrapper) and hands them, with the heads, the mask and the
logit transforms, to the module function ``_chunked_divergence_loss``. For the duration of each loss call that
function is swapped for a closure over the batch that computes D_t, l_t and log q_t(y_t) with trl's kernels
(``distillation_loss.reverse_kl_terms``) and returns the chosen loss; nothing else of trl's step changes. The extra
work over trl's loss is one student head product forward (l_t; plus its backward for ``rb``) and one teacher head
product forward (log q_t(y_t), for ``kl/k1``), all on the completion positions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from datasets import IterableDataset
from trl.trainer import distillation_trainer as trl_distillation_trainer
from trl.trainer.utils import RepeatSampler

from .distillation_loss import (
    KL_GRADIENTS,
    REVERSE_KL,
    DistillationTerms,
    distillation_loss,
    prompt_groups,
    reverse_kl_terms,
)
from .heads import HeadParams
from .metrics import log_sequence_metrics
from .sampling import check_rb_sampling
from .token_kl import _check_fsdp_version

__all__ = ["KL_GRADIENTS", "DistillationConfig", "DistillationTrainer", "check_num_generations"]

NUM_SEQUENCES_KEY = "trl_rb_num_sequences"
"""Batch key: the number of completions in the generation batch over all processes (0-d tensor)."""

GROUP_KEY = "trl_rb_prompt_group"
"""Batch key: [B] int64, rows with the same prompt share a value (``prompt_groups``); rb's leave-one-out baseline."""


def _canonical_gradient(value: Any) -> str:
    name = str(value).lower()
    if name not in KL_GRADIENTS:
        raise ValueError(f"kl_gradient={value!r} is not one of {KL_GRADIENTS} ('rb': unbiased; 'pathwise': trl's).")
    return name


@dataclass
class DistillationConfig(trl.DistillationConfig):
    r"""
    Configuration class for [`trl_rb.DistillationTrainer`]: every field of [`trl.DistillationConfig`], plus the choice
    of gradient.

    Parameters:
        kl_gradient (`str`, *optional*, defaults to `"pathwise"`):
            Which gradient of the sequence-level reverse KL(student || teacher) trains the student
            (case-insensitive). With D_t the exact KL of the two next-token distributions at `temperature` and
            l_t the student's log-prob of its sampled token:

            - `"pathwise"` (the default): trl's loss, unchanged: sum_t D_t over the batch's completion tokens divided by their
              count (trl's `num_items_in_batch`), differentiated with the completions held fixed. Its mean gradient
              is not a multiple of grad KL (the score-function half is missing), and the token-count normalization
              weights the batch by a random denominator. Any `beta` (trl's JSD family) is allowed.
            - `"rb"`: the RB surrogate sum_t [D_t + (l_t - sg l_t) * sg(sum_{m>t} D_m)], divided by
              the constant (number of completions in the generation batch) * `max_completion_length` (or by the
              number of completions when `max_completion_length` is None). Its mean gradient is exactly
              grad KL(student || teacher) / `max_completion_length`, unbiased, and the loss value stays on trl's
              per-token scale (equal to it when every completion reaches the maximum length), so learning rates
              carry over. Dividing by the token count instead would estimate grad KL / E[length] only as a ratio
              estimator (biased for a finite batch), and a per-sequence mean of token means weights sequences by
              1 / length (no multiple of grad KL): neither is offered. Requires `beta=1.0` (reverse KL) and
              sampling from softmax(logits / `temperature`) over the full vocabulary (`top_k=0`, `top_p=1.0`,
              `min_p=None`, `repetition_penalty=1.0`, no guided decoding, `generation_kwargs` that keep the
              distribution): the surrogate is unbiased only for that sampler. Anything else raises a `ValueError`.

            The default is `"pathwise"`, trl's behaviour: in our distillation study (README, `trl-rb
            distill-study`) the unbiased `"rb"` gradient was about 3x noisier per batch and reached a higher true KL
            at equal steps and equal wall time, and diverged at a learning rate where `"pathwise"` trains well; with
            4 completions per prompt and the leave-one-out baseline (`num_generations=4`) it was 2.2x noisier, no
            longer diverged, and still ended at a higher KL. Switching a tuned trl run to it silently would make it
            worse. Choose `"rb"` where the gradient must be the gradient of the sequence-level KL, with
            `num_generations > 1`. Both log `kl/rb` (sum_t D_t per completion, mean) and `kl/k1`
            (sum_t log p_t(y_t) / q_t(y_t), mean) when `beta=1.0`.
        num_generations (`int`, *optional*, defaults to `1`):
            Completions sampled per prompt (trl's distillation samples one). Each generation batch then holds
            `per_device_train_batch_size * gradient_accumulation_steps / num_generations` prompts per process, every
            prompt's completions on one process and, after trl's shuffle, in one micro-batch (whole groups are
            shuffled), so `per_device_train_batch_size` must be a multiple of it. Needs a map-style train dataset.
        rb_loo_baseline (`bool`, *optional*, defaults to `True`):
            With `kl_gradient="rb"`: subtract from the score term's future divergence G_t = sum_{m>t} D_m of each
            completion the mean G_t of the *other* completions of the same prompt in its micro-batch that reach
            position t (leave-one-out per position). The baseline is built from independent samples only, so the
            gradient stays unbiased; it needs several completions per prompt (`num_generations > 1`, or repeated
            prompts) to do anything. `False`: no baseline.
    """

    kl_gradient: str = field(
        default="pathwise",
        metadata={
            "help": "Gradient of the sequence-level reverse KL: 'pathwise' (default): trl's loss with the completions "
            "held fixed; 'rb': the RB surrogate, unbiased, needs beta=1.0 and untruncated sampling."
        },
    )

    num_generations: int = field(
        default=1,
        metadata={"help": "Completions sampled per prompt (trl: 1); per_device_train_batch_size must be a multiple."},
    )
    rb_loo_baseline: bool = field(
        default=True,
        metadata={
            "help": "kl_gradient='rb': a leave-one-out per-position baseline of the score term over the other "
            "completions of the same prompt (unbiased)."
        },
    )

    def __post_init__(self):
        self.kl_gradient = _canonical_gradient(self.kl_gradient)
        super().__post_init__()
        check_num_generations(self.num_generations, self.per_device_train_batch_size)
        if self.kl_gradient == "rb":  # here too (not only in the trainer), so trl's CLI parser reports it
            check_rb_distillation(self)


def check_rb_distillation(args: Any) -> None:
    """Refuse settings under which the RB surrogate would not be an unbiased gradient of KL(student || teacher)."""
    if args.beta != REVERSE_KL:
        raise ValueError(
            f"kl_gradient='rb' is the gradient of the reverse KL(student || teacher), but beta={args.beta!r} selects "
            "a different divergence (0.0: forward KL, in between: a JSD). Set beta=1.0, or use kl_gradient='pathwise'."
        )
    check_rb_sampling(args, "rb", setting="kl_gradient='rb'", fallback="kl_gradient='pathwise'")


def check_num_generations(num_generations: Any, per_device_train_batch_size: int) -> None:
    """Refuse a group size that cannot keep every prompt's completions in one micro-batch."""
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r}: use a positive integer (1: trl's one completion per prompt).")
    if per_device_train_batch_size % num_generations:
        raise ValueError(
            f"num_generations={num_generations} does not divide per_device_train_batch_size="
            f"{per_device_train_batch_size}: a prompt's completions must share a micro-batch. Make "
            "per_device_train_batch_size a multiple of num_generations."
        )


def _shuffle_whole_groups(batch: dict[str, Any]) -> dict[str, Any]:
    """trl's ``shuffle_sequence_dict`` with the rows of each ``GROUP_KEY`` value kept together and in order, so that
    trl's split into micro-batches of a multiple of the group size keeps every group whole."""
    groups = batch[GROUP_KEY]
    rank = torch.randperm(int(groups.max()) + 1)[groups.cpu()]
    order = torch.sort(rank, stable=True).indices

    def take(value: Any) -> Any:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[order.to(value.device)]
        return [value[i] for i in order.tolist()]

    return {key: take(value) for key, value in batch.items()}


TRL_HOOKS = ("_chunked_divergence_loss", "shuffle_sequence_dict")
"""Module-level functions of trl.trainer.distillation_trainer that trl's step calls by name and trl-rb replaces for
the duration of one call: the loss (``compute_loss``) and the generation batch's shuffle (``_prepare_inputs``)."""


@contextmanager
def _trl_function_replaced(name: str, replacement: Any) -> Iterator[None]:
    """Within the block, trl's distillation trainer's call of its module function ``name`` reaches ``replacement``."""
    original = getattr(trl_distillation_trainer, name)
    setattr(trl_distillation_trainer, name, replacement)
    try:
        yield
    finally:
        setattr(trl_distillation_trainer, name, original)


class DistillationTrainer(trl.DistillationTrainer):
    """trl's ``DistillationTrainer`` with ``kl_gradient`` (see [`DistillationConfig`]) and ``kl/rb``, ``kl/k1`` metrics.

    Constructor arguments are trl's. ``args`` may be a plain ``trl.DistillationConfig`` (``kl_gradient`` then
    defaults to ``"pathwise"``, trl's behaviour).
    """

    def __init__(
        self,
        model: Any,
        teacher_model: Any = None,
        args: trl.DistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
    ):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DistillationConfig(f"{name.split('/')[-1]}-Distillation")
        self.kl_gradient = _canonical_gradient(getattr(args, "kl_gradient", "pathwise"))
        if self.kl_gradient == "rb":
            check_rb_distillation(args)
        missing = [name for name in TRL_HOOKS if not hasattr(trl_distillation_trainer, name)]
        if missing:
            raise ValueError(
                f"trl {trl.__version__} has no trl.trainer.distillation_trainer.{missing[0]}, a function "
                "trl_rb.DistillationTrainer replaces; trl-rb supports trl 1.16."
            )
        num_generations = getattr(args, "num_generations", 1)
        check_num_generations(num_generations, args.per_device_train_batch_size)
        if num_generations > 1 and isinstance(train_dataset, IterableDataset):
            raise ValueError(
                f"num_generations={num_generations} needs a map-style train_dataset (trl streams an iterable one with "
                "one completion per prompt). Load it without streaming, or set num_generations=1."
            )
        self.num_generations = num_generations
        self.loo_baseline = self.kl_gradient == "rb" and getattr(args, "rb_loo_baseline", True)
        super().__init__(
            model, teacher_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
            quantization_config, peft_config, tools,
        )  # fmt: skip
        if self._replaces_loss:
            _check_fsdp_version(self)

    @property
    def _replaces_loss(self) -> bool:
        """Whether trl-rb computes the loss (and the kl/rb, kl/k1 metrics): for the reverse KL, beta=1.0."""
        return self.beta == REVERSE_KL

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        """trl's sampler with each prompt drawn ``num_generations`` times in a row (trl's: once)."""
        sampler = super()._get_train_sampler(dataset)
        if self.num_generations == 1:
            return sampler
        return RepeatSampler(
            data_source=sampler.data_source,
            mini_repeat_count=self.num_generations,
            batch_size=sampler.batch_size // self.num_generations,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        if not (self.loo_baseline and self.num_generations > 1):  # trl's shuffle (one completion per prompt)
            return super()._prepare_inputs(generation_batch)
        with _trl_function_replaced("shuffle_sequence_dict", _shuffle_whole_groups):
            return super()._prepare_inputs(generation_batch)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        local = torch.tensor(output["completion_ids"].shape[0], device=self.accelerator.device)
        output[NUM_SEQUENCES_KEY] = self.accelerator.gather(local).sum()  # 0-d: kept whole when the batch is split
        if self.loo_baseline:
            output[GROUP_KEY] = prompt_groups(output["prompt_ids"], output["prompt_mask"])
        return output

    def _normalizer(
        self, inputs: dict[str, Any], terms: DistillationTerms, num_items_in_batch: Any
    ) -> torch.Tensor | float:
        """What the summed per-token loss is divided by (the loss of each process; DDP then averages processes)."""
        if self.kl_gradient == "pathwise":  # trl's reduction
            if num_items_in_batch is None:
                return terms.mask.sum().clamp(min=1)
            return num_items_in_batch
        length = self.args.max_completion_length or 1
        if self.model.training:  # the generation batch spans the accumulation steps and the processes
            return float(inputs[NUM_SEQUENCES_KEY]) * length / self.accelerator.num_processes
        return terms.mask.shape[0] * length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._replaces_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        recorded: list[DistillationTerms] = []

        def loss_fn(
            student_hidden_states: torch.Tensor,
            teacher_hidden_states: torch.Tensor,
            student_lm_head_weight: torch.Tensor,
            teacher_lm_head_weight: torch.Tensor,
            completion_mask: torch.Tensor,
            beta: float,
            num_items_in_batch: Any = None,
            student_lm_head_bias: torch.Tensor | None = None,
            teacher_lm_head_bias: torch.Tensor | None = None,
            student_logit_scale: float = 1.0,
            teacher_logit_scale: float = 1.0,
            student_final_logit_softcapping: float | None = None,
            teacher_final_logit_softcapping: float | None = None,
            temperature: float = 1.0,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            terms = reverse_kl_terms(
                student_hidden_states,
                HeadParams(student_lm_head_weight, student_lm_head_bias, student_logit_scale, student_final_logit_softcapping),
                teacher_hidden_states,
                HeadParams(teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale, teacher_final_logit_softcapping),
                inputs["completion_ids"].to(completion_mask.device),
                completion_mask,
                temperature=temperature,
                logprob_grad=self.kl_gradient == "rb",
            )  # fmt: skip
            recorded.append(terms)
            loss = distillation_loss(terms, self.kl_gradient, self._normalizer(inputs, terms, num_items_in_batch),
                                     groups=inputs.get(GROUP_KEY))  # fmt: skip
            return loss, terms.entropy.sum(), terms.mask.sum()

        with _trl_function_replaced("_chunked_divergence_loss", loss_fn):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # after trl's forward redirection returns: the gather is collective (trl logs its entropy the same way)
        (terms,) = recorded
        mode = "train" if self.model.training else "eval"
        log_sequence_metrics(self, mode, {"kl/rb": terms.sequence_kl(), "kl/k1": terms.sequence_log_ratio()})
        return out
