#!/usr/bin/env bash
# One-command GPU check of trl_rb's trainers (see scripts/gpu_check.py for what each run measures).
#
#   bash scripts/gpu_check.sh                     # fresh venv, installs, every configuration, Markdown table
#
# Steps: python3 -m venv; pip install torch (default CUDA build from pip, or $TORCH_SPEC); pip install -e .;
# pip install vllm (may fail: recorded, the colocate runs are then "skipped"); build the ~0.5B model once; run
# gpu_check.py once per configuration, each under `timeout` (a run that dies without a record gets a failure line
# with the tail of its log); print the table (also saved as $OUT/report.md). No hub access is needed.
#
# Environment (all optional):
#   GPU_CHECK_OUT   results folder (results.jsonl, logs/, report.md)   default: a new temp folder
#   GPU_CHECK_VENV  venv folder                                        default: ${TMPDIR:-/tmp}/gpu_check_venv
#   SKIP_INSTALL=1  use GPU_CHECK_VENV as it is (no venv creation, no pip: for machines without network)
#   PYTHON          interpreter for the venv                           default: python3
#   TORCH_SPEC      pip arguments for torch, e.g. "torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
#   VLLM_SPEC       pip arguments for vLLM (default: vllm); VLLM_INSTALL_TIMEOUT seconds (default 300)
#   CONFIGS         space-separated trainer:estimator:engine:vllm list (default below, in priority order)
#   RUN_TIMEOUT     seconds per run (default 150); BUDGET_S: whole script, installs included (default 480)
#   EXTRA_ARGS      extra gpu_check.py arguments, e.g. "--device cpu --tiny" for a CPU dry run
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT="$REPO/scripts/gpu_check.py"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
OUT=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/gpu_check_venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch}
VLLM_SPEC=${VLLM_SPEC:-vllm}
VLLM_INSTALL_TIMEOUT=${VLLM_INSTALL_TIMEOUT:-300}
EXTRA_ARGS=${EXTRA_ARGS:-}
CONFIGS=${CONFIGS:-"grpo:rb:single:none grpo:rb:single:colocate rloo:rb:single:none grpo:rb:fsdp2:none \
grpo:k1:single:none rloo:k1:single:none rloo:rb:single:colocate grpo:k1:fsdp2:none"}

RESULTS="$OUT/results.jsonl"
mkdir -p "$OUT/logs"
read -r -a EXTRA <<<"$EXTRA_ARGS"
MODEL_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_model.XXXXXX")
trap 'rm -rf "$MODEL_DIR"' EXIT

log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

install() {
    local torch_args vllm_args
    read -r -a torch_args <<<"$TORCH_SPEC"
    read -r -a vllm_args <<<"$VLLM_SPEC"
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    log "pip install ${torch_args[*]}"
    "$VENV/bin/python" -m pip install -q "${torch_args[@]}"
    log "pip install -e $REPO"
    "$VENV/bin/python" -m pip install -q -e "$REPO"
    log "pip install ${vllm_args[*]} (timeout ${VLLM_INSTALL_TIMEOUT}s, allowed to fail)"
    local rc=0
    timeout "$VLLM_INSTALL_TIMEOUT" "$VENV/bin/python" -m pip install -q "${vllm_args[@]}" \
        >"$OUT/logs/vllm_install.log" 2>&1 || rc=$?
    echo "$rc" >"$OUT/vllm_install_rc"
    log "vllm install exit status $rc (log: $OUT/logs/vllm_install.log)"
}

if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
    log "SKIP_INSTALL=1: using $VENV as it is"
else
    install
fi
PY="$VENV/bin/python"
if "$PY" -c "import vllm" >/dev/null 2>&1; then VLLM_STATUS=importable; else VLLM_STATUS="not importable"; fi
log "vllm: $VLLM_STATUS; $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"

log "building the model in $MODEL_DIR"
timeout "$RUN_TIMEOUT" "$PY" "$SCRIPT" --prepare "$MODEL_DIR" ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/logs/prepare.log" 2>&1 || {
    log "model build failed:"; tail -n 20 "$OUT/logs/prepare.log"; exit 1; }

for config in $CONFIGS; do
    IFS=: read -r trainer estimator engine vllm <<<"$config"
    id="$trainer-$estimator-$engine-$vllm"
    flags=(--trainer "$trainer" --estimator "$estimator" --engine "$engine" --vllm "$vllm"
           --results "$RESULTS" --run-id "$id" --model-dir "$MODEL_DIR" ${EXTRA[@]+"${EXTRA[@]}"})
    left=$(($(remaining) - 10))
    limit=$((left < RUN_TIMEOUT ? left : RUN_TIMEOUT))
    if ((limit < 30)); then
        log "$id: skipped (time budget of ${BUDGET_S}s spent)"
        echo "out of the ${BUDGET_S}s time budget (BUDGET_S)" >"$OUT/logs/$id.log"
        "$PY" "$SCRIPT" --record-failure --skipped --log "$OUT/logs/$id.log" "${flags[@]}"
        continue
    fi
    log "$id (timeout ${limit}s)"
    rc=0
    timeout --kill-after=15 "$limit" "$PY" "$SCRIPT" "${flags[@]}" >"$OUT/logs/$id.log" 2>&1 || rc=$?
    "$PY" "$SCRIPT" --record-failure --rc "$rc" --log "$OUT/logs/$id.log" "${flags[@]}"
    log "$id: exit status $rc"
done

log "done; vllm $VLLM_STATUS; results in $OUT"
"$PY" "$SCRIPT" --report "$RESULTS" | tee "$OUT/report.md"
