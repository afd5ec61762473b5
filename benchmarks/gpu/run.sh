#!/usr/bin/env bash
# The whole GPU check in one command: bash benchmarks/gpu/run.sh [--dry-run]
#
# From the repository root, on a bare GPU machine without network (benchmarks/README.md says how to carry .whl/).
# Writes under $OUT when set, else benchmarks/gpu/out/: run.log, 0-env.json, 1-tests.json, 2-train.json,
# 3-eval.json, 4-profile.json, summary.md (7 files, no folders). Each step runs under `timeout` and writes its
# JSON as it goes, before the next starts; a failing step does not stop the others.
#
# Time budget (PHI3V_GPU_BUDGET_S, default 450 s, inside the device tool's 8-minute slot): installing the wheels
# about 15 s; env (versions, bf16 matmul ceiling) up to 60 s; pytest -m gpu up to 150 s; training throughput gets
# what is left minus 130 s; evaluation throughput up to 60 s; the profile the rest (at least 70 s). Each step gets
# min(its cap, time left - what the later steps need) under `timeout`, and its own deadline 15 s earlier: suite.py
# starts no measurement whose estimated cost no longer fits, and lists it as skipped. Full-size models are built
# directly on the GPU (random init there takes seconds; on a CPU it would take minutes).
#
# --dry-run: the same steps on the tiny model on the CPU (no wheels installed; PYTHON picks the interpreter).
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1

DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash benchmarks/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT_DIR="${OUT:-benchmarks/gpu/out}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/run.log"
: >"$LOG"
PY="${PYTHON:-python3}"
if [[ $DRY == 1 ]]; then BUDGET="${PHI3V_GPU_BUDGET_S:-300}"; else BUDGET="${PHI3V_GPU_BUDGET_S:-450}"; fi
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

log() { echo "[run.sh $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

log "start: dry_run=$DRY budget=${BUDGET}s out=$OUT_DIR commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

SITE=""
if [[ $DRY == 0 ]]; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]})); then
    SITE="$(mktemp -d /tmp/phi3v-site.XXXXXX)"
    log "installing ${#wheels[@]} carried wheels into $SITE"
    if ! timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "${wheels[@]}" >>"$LOG" 2>&1; then
      log "wheel install FAILED (see above); going on with the machine's packages"
      SITE=""
    fi
  else
    log "no .whl/*.whl: using the machine's packages (phi3v needs transformers>=5.23; see benchmarks/README.md)"
  fi
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME FILE CAP RESERVE [suite.py arguments]: run under a limit of min(CAP, time left - RESERVE) seconds
step() {
  local name=$1 file=$2 cap=$3 reserve=$4
  shift 4
  local limit=$(($(left) - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 20)); then
    log "$name: SKIPPED, ${limit}s left for it"
    printf '{"step": "%s", "finished": false, "skipped_step": "only %ss left"}\n' "$name" "$limit" >"$OUT_DIR/$file"
    return
  fi
  local inner=$((limit - 15))  # the step's own deadline: imports before, writing after
  ((DRY == 1)) && inner=$limit
  log "$name: up to ${limit}s"
  local flags=(--out "$OUT_DIR/$file" --budget-s "$inner")
  ((DRY == 1)) && flags+=(--dry-run)
  timeout -k 10 "$limit" "$PY" benchmarks/gpu/suite.py "$name" "${flags[@]}" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "$name: exit $rc"
  if [[ ! -s "$OUT_DIR/$file" ]]; then
    printf '{"step": "%s", "finished": false, "exit_code": %s, "note": "no output, see run.log"}\n' "$name" "$rc" \
      >"$OUT_DIR/$file"
  fi
  return 0
}

# PHI3V_GPU_STEPS picks steps for a second run (e.g. "env,train" with PHI3V_GPU_ONLY naming the skipped rows)
STEPS=",${PHI3V_GPU_STEPS:-env,tests,train,eval,profile},"
want() { [[ $STEPS == *",$1,"* ]]; }
if [[ $DRY == 1 ]]; then
  want env && step env 0-env.json 60 0
  want tests && step tests 1-tests.json 120 0
  want train && step train 2-train.json 120 0
  want eval && step eval 3-eval.json 60 0
  want profile && step profile 4-profile.json 60 0
else
  want env && step env 0-env.json 60 360 --site "$SITE"
  want tests && step tests 1-tests.json 150 250
  want train && step train 2-train.json 400 130
  want eval && step eval 3-eval.json 60 70
  want profile && step profile 4-profile.json 120 0
fi

"$PY" benchmarks/gpu/suite.py summary --out "$OUT_DIR/summary.md" 2>&1 | tee -a "$LOG"
log "done in $((SECONDS - START))s"
