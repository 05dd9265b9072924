#!/usr/bin/env bash
# GPU check of trl_rb's trainers (scripts/gpu_check.py says what each run measures), for a GPU machine that reaches
# no package registry: what it lacks travels with the code as wheels.
#
#   bash scripts/gpu_check.sh prepare     # on a CPU machine with registry access: wheels into wheels/gpu_check/
#   bash scripts/gpu_check.sh run         # on the GPU machine: offline install (--no-index), every configuration
#   bash scripts/gpu_check.sh dry-run     # on a CPU machine: the same flow for the local python, --device cpu --tiny
#
# prepare: resolves trl 1.16.0, peft 0.21.2, datasets and pyarrow 26 for the target python (uv, with torch left
#   out), subtracts what the target machine already has (transformers 5.17.0 and accelerate 1.15.0 with their
#   dependencies, and torch), and downloads the rest as wheels (67 MB for cp312: pyarrow 55, pandas 12) into
#   $WHEELS/part1, part2, ... of at most 56 MiB each (ignored by git): one call to the GPU machine carries 64 MiB,
#   so a first call carries part1 (e.g. command `true`), the next carries part2 and runs `run` (ignored files stay
#   on the machine between calls while it is warm).
# run: python3 -m venv --system-site-packages (the machine's torch, transformers, accelerate stay visible); pip
#   install --no-index --find-links $WHEELS; trl_rb from this checkout (PYTHONPATH, nothing to build); vLLM is not
#   installable offline (a CUDA build does not fit the transfer), so the colocate runs report "skipped"; builds the
#   ~0.5B model once; runs gpu_check.py once per configuration, each under `timeout`; prints the table (also saved
#   as $OUT/report.md).
# dry-run: prepare for the local python against a base of torch 2.13 (CPU), transformers 5.17.0 and accelerate
#   1.15.0, a venv holding only that base, then `run` with --device cpu --tiny: the install step uses no network.
#
# Environment (all optional):
#   WHEELS          wheel folder                                       default: wheels/gpu_check (in the checkout)
#   TARGET_PYTHON   prepare: python version of the target              default: 3.12 (the GPU machine's)
#   BASE_PINS       prepare: what the target already has               default: "transformers==5.17.0 accelerate==1.15.0"
#   GPU_CHECK_OUT   results folder (results.jsonl, logs/, report.md)   default: a new temp folder
#   GPU_CHECK_VENV  venv folder                                        default: ${TMPDIR:-/tmp}/gpu_check_venv
#   PYTHON          interpreter for the venv                           default: python3
#   CONFIGS         space-separated trainer:estimator:engine:vllm list (default below, in priority order)
#   RUN_TIMEOUT     seconds per run (default 150); BUDGET_S: whole script, installs included (default 480)
#   EXTRA_ARGS      extra gpu_check.py arguments (dry-run sets "--device cpu --tiny")
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT="$REPO/scripts/gpu_check.py"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
OUT=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/gpu_check_venv}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/wheels/gpu_check}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
BASE_PINS=${BASE_PINS:-"transformers==5.17.0 accelerate==1.15.0 jinja2"}  # jinja2: torch's, there with it
NEEDED="trl==1.16.0 peft==0.21.2 datasets pyarrow==26.*"
EXTRA_ARGS=${EXTRA_ARGS:-}
CONFIGS=${CONFIGS:-"grpo:rb:single:none grpo:rb:single:colocate rloo:rb:single:none grpo:rb:fsdp2:none \
grpo:k1:single:none rloo:k1:single:none rloo:rb:single:colocate grpo:k1:fsdp2:none"}

log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

prepare() {  # needs registry access; uses a throwaway venv for uv
    local tools work
    tools=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_uv.XXXXXX")
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_prep.XXXXXX")
    "$PYTHON" -m venv "$tools" && "$tools/bin/python" -m pip install -q uv
    # torch is on the target already: an override drops it (and its CUDA dependencies) from the resolution
    echo 'torch ; sys_platform == "never"' >"$work/no_torch.txt"
    tr ' ' '\n' <<<"$NEEDED $BASE_PINS" >"$work/needed.in"
    tr ' ' '\n' <<<"$BASE_PINS" >"$work/base.in"
    for set in needed base; do
        "$tools/bin/uv" pip compile -q "$work/$set.in" --override "$work/no_torch.txt" --python-version "$TARGET_PYTHON" \
            --python-platform x86_64-manylinux_2_28 --only-binary :all: --no-header --no-annotate -o "$work/$set.txt"
    done
    grep -vxF -f "$work/base.txt" "$work/needed.txt" >"$work/missing.txt" || true
    log "wheels for python $TARGET_PYTHON: $(tr '\n' ' ' <"$work/missing.txt")"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    local abi="cp${TARGET_PYTHON/./}"
    "$tools/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" --python-version "$TARGET_PYTHON" \
        --implementation cp --abi "$abi" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -r "$work/missing.txt"
    cp "$work/missing.txt" "$WHEELS/requirements.txt"
    # one transfer to the GPU machine carries at most 64 MiB (code included): parts of at most PART_MB each, carried
    # by successive calls (the machine keeps ignored files between calls)
    "$tools/bin/python" - "$WHEELS" "${PART_MB:-56}" <<'PY'
import pathlib, sys
root, limit = pathlib.Path(sys.argv[1]), float(sys.argv[2]) * 2**20
parts: list[float] = []
for wheel in sorted(root.glob("*.whl"), key=lambda w: -w.stat().st_size):
    size = wheel.stat().st_size
    index = next((i for i, used in enumerate(parts) if used + size <= limit), None)
    if index is None:
        parts.append(0.0)
        index = len(parts) - 1
    parts[index] += size
    (root / f"part{index + 1}").mkdir(exist_ok=True)
    wheel.rename(root / f"part{index + 1}" / wheel.name)
print(" ".join(f"part{i + 1}: {used / 2**20:.1f} MiB" for i, used in enumerate(parts)))
PY
    log "prepared $(ls "$WHEELS"/part*/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS/part*"
    rm -rf "$tools" "$work"
}

offline_install() {  # no network: --no-index, only $WHEELS; torch, transformers and accelerate are the machine's
    if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        # $PYTHON is a venv already (a venv of a venv would see the base interpreter's packages, not this one's)
        VENV=$("$PYTHON" -c 'import sys; print(sys.prefix)')
        log "offline install into $VENV from $WHEELS"
    else
        log "creating $VENV (system site-packages visible); offline install from $WHEELS"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    local links=() part
    for part in "$WHEELS"/part*/; do links+=(--find-links "$part"); done
    "$VENV/bin/python" -m pip install -q --no-index "${links[@]}" -r "$WHEELS/requirements.txt"
}

case "${1:-run}" in
    prepare) prepare; exit 0 ;;
    run) offline_install ;;
    dry-run)
        # the "GPU machine" of the dry run: a python holding only torch (CPU), transformers 5.17.0, accelerate 1.15.0
        BASE_VENV=${BASE_VENV:-${TMPDIR:-/tmp}/gpu_check_base}
        TARGET_PYTHON=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        WHEELS=${WHEELS%/}_dry_run
        prepare
        log "building the base $BASE_VENV (registry allowed: it stands in for the GPU machine's own packages)"
        "$PYTHON" -m venv "$BASE_VENV"
        "$BASE_VENV/bin/python" -m pip install -q torch==2.13.0 && "$BASE_VENV/bin/python" -m pip install -q $BASE_PINS
        PYTHON="$BASE_VENV/bin/python"
        START=$(date +%s)  # the budget, as on the GPU machine, starts with the offline install
        offline_install
        EXTRA_ARGS="--device cpu --tiny $EXTRA_ARGS" ;;
    *) echo "usage: bash scripts/gpu_check.sh [prepare|run|dry-run]"; exit 2 ;;
esac
RESULTS="$OUT/results.jsonl"
mkdir -p "$OUT/logs"
read -r -a EXTRA <<<"$EXTRA_ARGS"
MODEL_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_model.XXXXXX")
trap 'rm -rf "$MODEL_DIR"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # trl_rb from this checkout: nothing to build offline

PY="$VENV/bin/python"
if "$PY" -c "import vllm" >/dev/null 2>&1; then VLLM_STATUS=importable; else VLLM_STATUS="not installable offline"; fi
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
