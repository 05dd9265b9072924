"""The trainers' RB KL term on an FSDP2-sharded policy (``fully_shard`` over gloo), against the unsharded model.

Run by ``tests/engines/test_fsdp2.py`` as ``torchrun --nproc_per_node 2 tests/engines/fsdp2_run.py OUT``. Each rank
scores its own batch: the policy's last hidden states are captured from its forward as the trainers capture them, and
the weighted KL sum (``weighted_kl_sum_from_hidden``, whose heads go through ``gathered_heads``) is backpropagated.
FSDP2 averages the gradients over the ranks; rank 0 writes the per-rank values and the full (gathered) gradients, and
the same quantities computed by one process on unsharded copies of the same model, to OUT as a torch file. Three terms
(the RL trainers' weighted KL sum; the distillation trainer's rb loss on trl's kernels; trl's own distillation loss,
for the record), each in two cases: a tied head in the root group (unsharded right after the forward), and an untied
head in a group of its own (still DTensor shards, made whole by ``full_tensor()``, whose backward must return the
gradients to the shards).
"""

from __future__ import annotations

import copy
import itertools
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from trl_rb.trainers.distillation_loss import distillation_loss, reverse_kl_terms
from trl_rb.trainers.heads import capture_last_hidden, completion_hidden, head_params
from trl_rb.trainers.token_kl import weighted_kl_sum_from_hidden

VOCAB, PROMPT, COMPLETION, BATCH = 11, 3, 5, 4


def tiny_lm(seed: int, *, tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, tie_word_embeddings=tied)  # fmt: skip
    return GPT2LMHeadModel(config).float()


def batch_of(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT + COMPLETION), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, -2:] = 0  # a completion that ended early
    return ids, mask


def hidden_pair(policy, reference, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' completion-aligned last hidden states, captured from their forwards as the trainers do."""
    with capture_last_hidden(policy) as captured:
        policy(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), capture_last_hidden(reference) as ref_captured:
        reference(input_ids=ids, attention_mask=mask)
    return completion_hidden(captured[0], COMPLETION), completion_hidden(ref_captured[0], COMPLETION)


def kl_term(policy, reference, ids, mask) -> torch.Tensor:
    """The RL trainers' rb term (``weighted_kl_sum_from_hidden``)."""
    hp, hq = hidden_pair(policy, reference, ids, mask)
    weights = mask[:, -COMPLETION:].float() / BATCH
    return weighted_kl_sum_from_hidden(hp, head_params(policy), hq, head_params(reference), weights, temperature=0.7)


def distillation_term(policy, reference, ids, mask) -> torch.Tensor:
    """The distillation trainer's rb loss (trl's kernels on heads made whole by ``gathered_heads``)."""
    hp, hq = hidden_pair(policy, reference, ids, mask)
    terms = reverse_kl_terms(hp, head_params(policy), hq, head_params(reference), ids[:, -COMPLETION:],
                             mask[:, -COMPLETION:], temperature=0.7, logprob_grad=True)  # fmt: skip
    return distillation_loss(terms, "rb", BATCH * COMPLETION)


def trl_distillation_term(policy, reference, ids, mask) -> torch.Tensor:
    """trl 1.16's own distillation loss (``_chunked_divergence_loss``, beta=1): it calls plain ``full_tensor()``."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hp, hq = hidden_pair(policy, reference, ids, mask)
    sp, rp = head_params(policy), head_params(reference)
    loss, _, _ = _chunked_divergence_loss(hp, hq, sp.weight, rp.weight, mask[:, -COMPLETION:], 1.0,
                                          num_items_in_batch=BATCH * COMPLETION, student_lm_head_bias=sp.bias,
                                          teacher_lm_head_bias=rp.bias, temperature=0.7)  # fmt: skip
    return loss


TERMS = {"rl": kl_term, "distillation": distillation_term, "trl distillation": trl_distillation_term}


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def sharded(model, *, head_group: bool):
    for block in model.transformer.h:
        fully_shard(block)
    if head_group:  # the head in a group of its own: its forward never runs (fused heads), so it stays DTensor shards
        fully_shard(model.lm_head)
    return fully_shard(model)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    reference = tiny_lm(1).eval()
    results = {}
    for (term_name, term), tied in itertools.product(TERMS.items(), (True, False)):
        policy = tiny_lm(0, tied=tied)
        unsharded = copy.deepcopy(policy)
        sharded(policy, head_group=not tied)
        value = term(policy, reference, *batch_of(rank))
        if not tied:
            assert isinstance(policy.lm_head.weight, DTensor)
        value.backward()
        values = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(values, value.detach())
        case = {"values": torch.stack(values), "grads": full_grads(policy)}  # collective: every rank gathers
        if rank == 0:
            case["expected_values"], case["expected_grads"] = unsharded_reference(term, unsharded, reference, world)
        results[f"{term_name}: " + ("tied head in the root group" if tied else "untied head in its own group")] = case
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def unsharded_reference(term, policy, reference, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each rank's value, and the rank-averaged gradient (FSDP2 averages), from one process on the full model."""
    values, grads = [], {}
    for r in range(world):
        policy.zero_grad(set_to_none=True)
        v = term(policy, reference, *batch_of(r))
        v.backward()
        values.append(v.detach())
        for name, p in policy.named_parameters():
            grads[name] = grads.get(name, 0) + p.grad / world
    return torch.stack(values), grads


if __name__ == "__main__":
    main(sys.argv[1])
