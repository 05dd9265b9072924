"""The vLLM tier runs in its own environment (``scripts/vllm_tier.sh`` builds it and runs these tests); elsewhere each
module skips, saying so."""

import os

# trl's colocate engine runs in this process (vLLM's ``external_launcher``), so the vLLM-CPU workaround
# (vllm_cpu.keep_plain_cpu_linear) applies to it; a small fixed KV cache instead of probing the memory.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
