"""The fused rb loss head inside the trainers' losses: with it, the RLOO and GRPO loss and gradient on one batch equal
those of the separate K_n pass after trl's forward. (The head's own numerics, with no trainer:
``tests/kernels/test_fused_head.py``.)"""

from __future__ import annotations

import pytest
import torch
from support import generation_batch, grads, make_config, make_trainer, score_batch, scoring_trainer

from trl_rb.trainers import fused_head, grpo, rloo
from trl_rb.trainers.capture import REF_HIDDEN_KEY


def _loss_and_grads(trainer, batch, monkeypatch, module, fused: bool):
    used = []
    original = fused_head.loss_head_for

    def recording(*a, **k):
        head = original(*a, **k) if fused else None
        used.append(head)
        return head

    monkeypatch.setattr(module, "loss_head_for", recording)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    monkeypatch.undo()
    head = used[0]
    assert (head is not None and head.token_kl is not None and head.calls == 1) == fused
    return float(loss.detach()), grads(trainer.model)


def _assert_same(fused, unfused):
    assert fused[0] == pytest.approx(unfused[0], rel=1e-6)
    assert fused[1].keys() == unfused[1].keys()
    for name, g in unfused[1].items():
        # float32 either way (trl's head keeps float32 statistics even for float64 models): the two sum differently
        torch.testing.assert_close(fused[1][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_rloo_fused_loss_equals_the_separate_k_pass(lm_paths, tmp_path, monkeypatch):
    trainer = scoring_trainer(lm_paths, make_config(tmp_path, "rb", beta=0.5), ref_model=lm_paths["other"])
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions(generation_batch(4, 4))
    assert REF_HIDDEN_KEY in batch
    fused = _loss_and_grads(trainer, batch, monkeypatch, rloo, True)
    unfused = _loss_and_grads(trainer, batch, monkeypatch, rloo, False)
    _assert_same(fused, unfused)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo"])
def test_grpo_fused_loss_equals_the_separate_k_pass(tmp_path, monkeypatch, loss_type):
    trainer, _, _ = make_trainer("rb", tmp_path, batch=16, group=4, beta=0.3, loss_type=loss_type, max_len=6)
    batch = score_batch(trainer, 16, seed=2)
    fused = _loss_and_grads(trainer, batch, monkeypatch, grpo, True)
    unfused = _loss_and_grads(trainer, batch, monkeypatch, grpo, False)
    _assert_same(fused, unfused)
