#!/usr/bin/env bash
# The GPU bench table in one go (<= --budget_s, default 540 s, on one GPU), in stages run in
# the order --stages gives (default ours,attention,startup,peer,tune):
#   ours: the train step (bench/train_step.py --attention_impl=pallas): 150m mlm 64x1024 and
#     8x8192, 1b mlm 32x1024, 150m clm 64x1024, each config in one process; each record has
#     the allocator's measured peak memory;
#   attention (bench/attention.py): --check (kernels vs XLA), then pallas and cudnn, then (its
#     own process) mosaic and mosaic-triton-bwd, at 1024 and 8192, global and local layers;
#   startup (bench/startup.py): main.py to its first step, 150m 64x1024, cold then warm cache
#     (full mode: then new_program, the warm cache without its compiled programs, cold
#     without XLA's autotuning and cold without its fusion autotuner; 8x8192 cold then warm;
#     64x1024 cold then warm with the layer groups scanned);
#   peer: transformers' ModernBERT (bf16 autocast, fused AdamW, torch.compile; its own
#     process), the shapes of `ours`;
#   tune, with at least 120 s left: one process timing the 150m mlm step at 64x1024, baseline
#     (pallas, threefry, loss chunks 4096/8192, 64 rows) first and then profiled (top ops per
#     XLA operation -> $LOG/profile_150m_mlm.txt), then each knob alone: XLA's autotuning off,
#     its fusion autotuner off, prng_impl rbg / unsafe_rbg, loss_vocab_chunk 16384,
#     loss_row_chunk 32768, micro batch 32 / 128 rows, scan_layers true, Triton GEMMs off,
#     q/k and v as two matmuls (qkv_projection qk_v), the scanned layers with remat dots and
#     dots_attention, attention_impl mosaic
#     (bench/variants.py; -> $LOG/tune.jsonl);
#   memory (not by default; where listed it starts in the background and stops at startup or
#     the end): bench/memory.py's largest micro batch per size at 1024 and 8192, remat
#     none/full/dots/dots_attention, 80 GB, compile-only.
# Each command has its own timeout, cut to the budget left; what the budget does not reach is
# listed as skipped. On an H200 (2026-11-30) one cold compile of a train step took 1-2.5
# minutes, so the whole default list needs more than 15 minutes: pick stages to fit a lease
# (one 15-minute lease: `--stages=ours` or `--stages=attention,startup --quick`, each within the
# default budget; the timeouts allow ~150 s per compile).
# The section (card, date, jax version, commit, this command, every sub-command) is appended
# to bench/RESULTS.md and written to $LOG/results_section.md (/tmp/gpubench); with $OUT set
# (the device machine), that section and a .tar.gz of every log are copied to $OUT after every
# stage and on a kill, which the device tool brings back: append results_section.md to the
# local bench/RESULTS.md by hand (the device's copy of the tree does not come back).
#
#   bash bench/gpu.sh [--quick] [--stages=ours,startup] [--skip_peer] [--budget_s=540]
#   bash bench/gpu.sh --tune [--budget_s=540]    # = --stages=tune (profile + variants)
#   bash bench/gpu.sh --stages=tune,ours --tune_s=200   # the profile first, capped, then ours
#   bash bench/gpu.sh --dry_run      # print every command, run nothing
#   bash bench/gpu.sh --help         # this text
#   bash bench/gpu.sh --cpu_smoke    # every command on CPU, tiny config and shapes
#   bash bench/gpu.sh --fetch_wheels # on a networked machine: grain, ml-collections, clu,
#                                    # array-record, portpicker, datasketch (the demo corpus's
#                                    # dedup) for Python 3.12 into .whl/
# --quick: 150m 64x1024 only (ours, peer), attention at 8192, memory at 1024 for 150m and 1b;
# its default stages leave out tune. --skip_peer: the stages without peer.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0 SKIP_PEER=0 DRY=0 SMOKE=0 BUDGET=540 STAGES="" TUNE_S=600
ARGS="$*"
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --skip_peer) SKIP_PEER=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    --dry_run) DRY=1 ;;
    --cpu_smoke) SMOKE=1 ;;
    --tune) STAGES=tune ;;
    --stages=*) STAGES=${arg#*=} ;;
    --budget_s=*) BUDGET=${arg#*=} ;;
    --tune_s=*) TUNE_S=${arg#*=} ;;   # the tune stage's own limit (default 600; 120 at least)
    --fetch_wheels)
      exec pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl grain==0.2.18 \
        ml-collections==1.1.0 clu==0.0.12 array-record==0.8.6 portpicker datasketch==2.0.0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (bench/gpu.sh --help lists them)" >&2; exit 2 ;;
  esac
done
if [ -z "$STAGES" ]; then
  STAGES=ours,attention,startup,peer,tune
  [ "$QUICK" = 1 ] && STAGES=ours,attention,startup,peer
fi
[ "$SKIP_PEER" = 1 ] && STAGES=$(echo ",$STAGES," | sed 's/,peer,/,/g; s/^,//; s/,$//')
case $TUNE_S in
  ''|*[!0-9]*) echo "bench/gpu.sh: --tune_s=$TUNE_S: expected whole seconds" >&2; exit 2 ;;
esac
[ "$TUNE_S" -lt 120 ] && { echo "bench/gpu.sh: --tune_s=$TUNE_S: the tune stage needs 120 s at least (a compile, steps, the profile)" >&2; exit 2; }
for stage in ${STAGES//,/ }; do
  case $stage in
    ours|attention|startup|peer|tune|memory) ;;
    *) echo "bench/gpu.sh: --stages=$STAGES: unknown stage '$stage' (expected ours, attention," \
            "startup, peer, tune, memory)" >&2; exit 2 ;;
  esac
done
LOG=${GPUBENCH_LOG:-/tmp/gpubench}      # GPUBENCH_LOG: another log directory
[ "$SMOKE" = 1 ] && LOG=${GPUBENCH_LOG:-/tmp/gpubench-smoke}
# REC: where this script's own records go (cache.txt, commands.tsv, skipped.txt). A dry run
# prints the real commands (their logs in $LOG) but keeps its records elsewhere unless
# GPUBENCH_LOG names the directory: the default one holds the last real run's logs.
REC=$LOG
if [ "$DRY" = 1 ] && [ -z "${GPUBENCH_LOG:-}" ]; then
  REC=$(mktemp -d -t gpubench-dry.XXXXXX)
  trap 'rm -rf "$REC"' EXIT
else
  mkdir -p "$LOG"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# One compilation cache for the stages, empty at the start of each run (GPUBENCH_CACHE names
# another dir, kept as it is; "" = off): a program compiled twice (the tune baseline and ours'
# 150m 64x1024) compiles once, and one that changed reuses XLA's autotuning results and GPU
# kernels (XLA's caches "all", main.py's default), so more of the table fits a lease. A first
# step after the first compile is therefore not a cold one; the start-up stage's runs keep
# caches of their own, so its cold starts stay cold.
CACHE=${GPUBENCH_CACHE-$LOG/xla_cache}
if [ -n "$CACHE" ]; then
  [ "$DRY" = 0 ] && [ -z "${GPUBENCH_CACHE+set}" ] && rm -rf "$CACHE"
  export JAX_COMPILATION_CACHE_DIR=$CACHE JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  export JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=${JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES-all}
fi
echo "compilation cache shared by the stages: ${CACHE:-off}${CACHE:+ (XLA caches: ${JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES:-none})}" \
  | tee "$REC/cache.txt"
START=$(date +%s)
SKIPPED=()
# The report reads every *.jsonl here: results of an earlier run must not mix into this one's.
[ "$DRY" = 0 ] && rm -f "$LOG"/*.jsonl "$LOG"/*.log "$LOG/attention.md"
: > "$REC/commands.tsv"

# Sizes and shapes; --cpu_smoke swaps in the tiny config and tiny shapes, same flags.
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  C150=configs/ettin_tiny.py C1B=configs/ettin_tiny.py SIZES="tiny"
  S64x1K=4x128 S8x8K=2x256 S32x1K=2x128 SEQS=128 ATT_BATCH="--batch 1 --allow_cpu"
  # Mosaic GPU's interpreter hangs with one CPU device on a 2-core machine, and takes 40-75 s
  # per fwd+bwd call at seq 128 (kernels/mosaic_attention.py; 71-75 s on a slow day, when 240 s
  # ran out before the local layer): one global and one local layer.
  ATT_ENV=(env XLA_FLAGS=--xla_force_host_platform_device_count=4)
  ATT_LAYERS=enc-global,dec-local ATT_LIMIT=480
  MEM_SEQS=64,128 MEM_EXTRA="--budget_gb=0.05 --max_rows=64" START_SHAPE="--rows=4 --seq_len=64"
  START_LONG="--rows=2 --seq_len=128"
  STEPS="--steps=2 --warmup=1" PEER_STEPS="--steps=2 --warmup=1"
  # torch.compile takes minutes per model on a small CPU: the first peer command compiles.
  PEER_COMPILE_REST=no
  # The tiny vocabulary (512) and 4-row batch: chunks and rows that still split the loss;
  # one remat of the two (each is a compile of the scanned model).
  TUNE_VOCAB_CHUNK=96 TUNE_ROW_CHUNK=64 TUNE_BATCHES=2,8 TUNE_REMATS=dots_attention
else
  C150=configs/ettin_150m.py C1B=configs/ettin_1b.py SIZES="17m 32m 68m 150m 400m 1b"
  S64x1K=64x1024 S8x8K=8x8192 S32x1K=32x1024 SEQS=1024,8192 ATT_BATCH="" ATT_ENV=()
  ATT_LAYERS=enc-global,enc-local,dec-global,dec-local ATT_LIMIT=240
  MEM_SEQS=1024,8192 MEM_EXTRA="" START_SHAPE="--rows=64 --seq_len=1024"
  START_LONG="--rows=8 --seq_len=8192"
  STEPS="--steps=10 --warmup=2" PEER_STEPS="--steps=10 --warmup=3" PEER_COMPILE_REST=yes
  # At 64x1024 MLM the loss runs on 64 x 312 = 19,968 slots: row chunk 8192 pads them to
  # 24,576, 32768 does not.
  TUNE_VOCAB_CHUNK=16384 TUNE_ROW_CHUNK=32768 TUNE_BATCHES=32,128 TUNE_REMATS=dots,dots_attention
fi
# The tune stage's knobs, in order of priority (a variant the budget does not reach is
# recorded as skipped). Autotuning off first: its step time is what autotuning buys
# (ettin_jax/xla_options.py); autotuning's share of a cold compile is the start-up stage's
# cold_no_autotune. Then XLA's fusion autotuner alone off (it tunes every non-GEMM fusion; on
# jax 0.11 it costs 6 s of a 25 s compile even without a GPU, bench/RESULTS.md). The Mosaic
# kernels last: every variant runs in one process, and they have never run on a GPU.
TUNE_VARIANTS="xla_options=xla_gpu_autotune_level=0"
TUNE_VARIANTS+=";xla_options=xla_gpu_experimental_enable_fusion_autotuner=false"
TUNE_VARIANTS+=";prng_impl=rbg,unsafe_rbg;loss_vocab_chunk=$TUNE_VOCAB_CHUNK"
TUNE_VARIANTS+=";loss_row_chunk=$TUNE_ROW_CHUNK;batch=$TUNE_BATCHES;scan_layers=true"
TUNE_VARIANTS+=";xla_options=xla_gpu_enable_triton_gemm=false;qkv_projection=qk_v"
TUNE_VARIANTS+=";remat=$TUNE_REMATS;attention_impl=mosaic"
if [ "$QUICK" = 1 ]; then
  SEQS=${SEQS#*,} MEM_SEQS=${MEM_SEQS%,*}
  [ "$SMOKE" = 1 ] || SIZES="150m 1b"
fi

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
# budget_cut LIMIT: LIMIT cut to the budget left (what `run` gives a command).
budget_cut() { local left; left=$(remaining); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }

# quoted CMD...: the command as one line a shell reads back (words with ; * ' etc. quoted).
quoted() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./=:,+@%-]*$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# run NAME TIMEOUT CMD...: runs CMD with its own timeout (cut to the budget left), output to
# $LOG/NAME.log; records the command, exit code and seconds in $LOG/commands.tsv.
run() {
  local name=$1 limit=$2; shift 2
  local left; left=$(remaining)
  [ "$left" -lt "$limit" ] && limit=$left
  local shown; shown=$(quoted "$@")
  echo "+ [$name, timeout ${limit}s] $shown"
  if [ "$DRY" = 1 ]; then printf '%s\t-\t-\t%s\n' "$name" "$shown" >> "$REC/commands.tsv"; return 0; fi
  if [ "$limit" -lt 20 ]; then
    SKIPPED+=("$name: budget spent (${left}s left)"); return 0
  fi
  local t0 rc; t0=$(date +%s)
  # In the background and waited for: bash runs a trap (save_out on SIGTERM) only between
  # commands, and `wait` is one it interrupts.
  timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1 &
  wait $!; rc=$?
  local took=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$shown" >> "$LOG/commands.tsv"
  case $rc in
    0) echo "  ok in ${took}s" ;;
    124|137) echo "  TIMEOUT after ${took}s (log: $LOG/$name.log)"; SKIPPED+=("$name: timed out after ${took}s") ;;
    *) echo "  FAILED rc=$rc in ${took}s; last lines:"; tail -5 "$LOG/$name.log" | sed 's/^/    /'
       SKIPPED+=("$name: failed rc=$rc") ;;
  esac
}
skip() { echo "SKIP $1"; SKIPPED+=("$1"); }

# --- environment: wheel-travelled packages (shared/jax_notes.md §10) ---
HAVE_DEPS=1
if ! python -c "import grain, ml_collections, clu, array_record, portpicker, datasketch" 2>/dev/null; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    echo "+ pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site"
    if [ "$DRY" = 0 ]; then
      pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl > "$LOG/pip.log" 2>&1 \
        || { echo "pip install failed: $LOG/pip.log"; HAVE_DEPS=0; }
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if [ "$DRY" = 0 ] && [ "$HAVE_DEPS" = 1 ] && ! python -c \
        "import grain, ml_collections, clu, array_record, portpicker, datasketch" 2>> "$LOG/pip.log"; then
      echo "the wheels in .whl/ leave a package missing (bash bench/gpu.sh --fetch_wheels fetches" \
           "all six): $LOG/pip.log"
      HAVE_DEPS=0
    fi
  else
    echo "grain/ml-collections/clu/array-record/portpicker/datasketch missing and no .whl/: run" \
         "'bash bench/gpu.sh --fetch_wheels' on a networked machine and carry .whl"
    HAVE_DEPS=0
  fi
fi
if [ "$DRY" = 0 ] && [ "$SMOKE" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$LOG/gpu.txt" 2>&1 || echo "nvidia-smi failed: $(cat "$LOG/gpu.txt")"
fi

# --- the stages, each a function; --stages picks them and their order ---
stage_tune() {
  if [ "$HAVE_DEPS" = 0 ]; then skip "tune: needs ml-collections and grain"; return; fi
  if [ "$DRY" = 0 ] && [ "$(remaining)" -lt 120 ]; then
    skip "tune: budget spent ($(remaining)s left, needs 120s)"; return
  fi
  # One process: the baseline is timed, then profiled (its compiled step, no second compile),
  # then each variant. The sweep stops starting variants 40 s before its timeout (start-up,
  # the last steps), so what it measured is in tune.jsonl and the rest is listed as skipped.
  local limit; limit=$(budget_cut "$TUNE_S")
  run tune_150m_mlm "$limit" python bench/train_step.py --attention_impl=pallas --transformers=no \
    $STEPS --config=$C150:mlm --shapes=$S64x1K --variants="$TUNE_VARIANTS" \
    --variants_budget_s=$(( limit > 60 ? limit - 40 : 20 )) --json_out="$LOG/tune.jsonl" \
    --profile_out="$LOG/profile_150m_mlm.txt" --top=30
}

# Compile-only, in the background (no autotuning: nothing runs on the device), until the
# start-up stage or the end. Off by default: the same plans come from any machine with
# `bench/memory.py --target=h100`, and the six searches slowed every compile beside them on
# an H200 (2026-11-30); the train step records the allocator's measured peak instead.
MEM_PIDS=()
stage_memory() {
  if [ "$HAVE_DEPS" = 0 ]; then skip "memory: needs ml-collections"; return; fi
  local size objective cmd
  for size in $SIZES; do
    for objective in mlm; do
      cmd=(python bench/memory.py --config=configs/ettin_$size.py:$objective --seq_lens=$MEM_SEQS
           --remat=none,full,dots,dots_attention
           --config.train.xla_options=xla_gpu_autotune_level=0
           $MEM_EXTRA --json_out="$LOG/memory.jsonl")
      echo "+ [memory_$size, background] ${cmd[*]}"
      printf '%s\t%s\t%s\t%s\n' "memory_$size" bg - "${cmd[*]}" >> "$LOG/commands.tsv"
      if [ "$DRY" = 0 ]; then
        timeout --kill-after=10 $(( BUDGET - 30 )) "${cmd[@]}" > "$LOG/memory_$size.log" 2>&1 &
        MEM_PIDS+=($!)
      fi
    done
  done
}
# Stops the background searches (each finished search is already in memory.jsonl).
stop_memory() {
  [ "$DRY" = 0 ] && [ ${#MEM_PIDS[@]} -gt 0 ] || return 0
  local pid
  for pid in "${MEM_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; SKIPPED+=("memory: stopped (pid $pid)"); fi
  done
  wait "${MEM_PIDS[@]}" 2>/dev/null
  MEM_PIDS=()
}

# Train step, ours: each config in one process.
OURS="python bench/train_step.py --attention_impl=pallas --transformers=no $STEPS --json_out=$LOG/train_step.jsonl"
stage_ours() {
  if [ "$HAVE_DEPS" = 0 ]; then skip "ours: needs ml-collections and grain"; return; fi
  if [ "$QUICK" = 1 ]; then
    run ours_150m_mlm 200 $OURS --config=$C150:mlm --shapes=$S64x1K
    return
  fi
  # ~150 s a compile on an H200 (2026-11-30: 200 s cut the 8x8192 one, 120 s the clm one)
  run ours_150m_mlm 330 $OURS --config=$C150:mlm --shapes=$S64x1K,$S8x8K
  run ours_1b_mlm 200 $OURS --config=$C1B:mlm --shapes=$S32x1K
  run ours_150m_clm 200 $OURS --config=$C150:clm --shapes=$S64x1K
}

# Train step, transformers' peer: its own process (JAX would keep its memory).
PEER="python bench/train_step.py --transformers=only --peer_autocast=yes $PEER_STEPS --json_out=$LOG/train_step.jsonl"
stage_peer() {
  if [ "$HAVE_DEPS" = 0 ]; then skip "peer: needs ml-collections and grain"; return; fi
  if [ "$QUICK" = 1 ]; then
    run peer_150m_mlm 150 $PEER --peer_compile=yes --config=$C150:mlm --shapes=$S64x1K
    return
  fi
  run peer_150m_mlm 220 $PEER --peer_compile=yes --config=$C150:mlm --shapes=$S64x1K,$S8x8K
  run peer_1b_mlm 150 $PEER --peer_compile=$PEER_COMPILE_REST --config=$C1B:mlm --shapes=$S32x1K
  run peer_150m_clm 150 $PEER --peer_compile=$PEER_COMPILE_REST --config=$C150:clm --shapes=$S64x1K
}

# Start-up: background compiles would slow it, so the memory searches stop first.
stage_startup() {
  stop_memory
  if [ "$HAVE_DEPS" = 0 ]; then skip "start-up: main.py needs grain, clu, ml-collections"; return; fi
  # Full mode adds a cold start without autotuning: XLA's GPU compile of the 150m step takes
  # ~22 s on 2 CPU cores for an H100 with nothing autotuned (bench/compile_time.py --target),
  # against 54 s inside a cold start measured on an H200.
  # new_program: what a changed program (config edit, other objective, next phase) pays with
  # XLA's kernel and autotuning caches warm, and whether those cached pieces compute the same
  # loss at step 1 as the cold run (bench/gpu_report.py's start-up table compares them).
  local runs=cold,warm limit=300
  [ "$QUICK" = 0 ] && runs=cold,warm,new_program,cold_no_autotune,cold_no_fusion_autotuner \
    && limit=680
  run startup $limit python bench/startup.py --config=$C150:mlm $START_SHAPE --timeout=140 \
    --runs=$runs --run_logs="$LOG/startup" --json_out="$LOG/startup.jsonl"
  # Full mode: the long rows too (the issue's start-up goal is for 1024 and 8192), then, last
  # (what the budget cuts first), 1024 with the layer groups scanned: does compiling one group
  # instead of 22 layers shorten a cold or a warm start on a GPU? (Its step is two micro
  # batches of 32 rows: schedules.max_micro_rows halves the loop's limit for the scan.)
  if [ "$QUICK" = 0 ]; then
    run startup_long 300 python bench/startup.py --config=$C150:mlm $START_LONG --timeout=140 \
      --runs=cold,warm --run_logs="$LOG/startup_long" --json_out="$LOG/startup.jsonl"
    run startup_scanned 300 python bench/startup.py --config=$C150:mlm $START_SHAPE \
      --timeout=140 --runs=cold_scanned,warm_scanned --run_logs="$LOG/startup_scanned" \
      --json_out="$LOG/startup.jsonl"
  fi
}

# Attention kernels (an implementation this build of bench/attention.py lacks is left out).
stage_attention() {
  # Correctness first: the Mosaic kernels' GPU path (register operands, layouts) has never run.
  if [ "$SMOKE" = 1 ]; then
    skip "attention_check: interpreted kernels at seq 1000 take minutes on a CPU (tests/test_mosaic_attention.py checks them)"
  else
    run attention_check 180 python bench/attention.py --check --check_dtypes bfloat16 --check_head_dims 64
  fi
  # The Mosaic kernels in a process of their own, after: a fault of theirs on the GPU (never
  # run there yet) cannot take the Triton and cuDNN figures down with it.
  run attention $ATT_LIMIT "${ATT_ENV[@]}" python bench/attention.py \
    --impls pallas,cudnn --seqs $SEQS $ATT_BATCH --layers $ATT_LAYERS \
    --results --results_file "$LOG/attention.md" --note "bench/gpu.sh"
  run attention_mosaic $ATT_LIMIT "${ATT_ENV[@]}" python bench/attention.py \
    --impls mosaic,mosaic-triton-bwd --seqs $SEQS $ATT_BATCH --layers $ATT_LAYERS \
    --results --results_file "$LOG/attention.md" --note "bench/gpu.sh, Mosaic GPU kernels"
}

# What the device tool brings back, refreshed after every stage and on a kill (a lease that
# ends mid-stage keeps the stages before it): the logs (the report can be made from them
# anywhere: bench/gpu_report.py --bench_logs) and, at the end, the results section.
save_out() {
  [ -n "${OUT:-}" ] && [ "$DRY" = 0 ] || return 0
  cp "$LOG/results_section.md" "$OUT/" 2>/dev/null
  tar czf "$OUT/$(basename "$LOG")_logs.tar.gz" --exclude=xla_cache -C "$(dirname "$LOG")" \
    "$(basename "$LOG")"
}
trap 'save_out; exit 143' TERM
trap 'save_out; exit 130' INT

for stage in ${STAGES//,/ }; do
  "stage_$stage"
  save_out
done
stop_memory

# --- report ---
for item in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do echo "skipped or incomplete: $item"; done
printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}" > "$REC/skipped.txt"
if [ "$DRY" = 1 ]; then echo "dry run: nothing ran"; exit 0; fi
TARGET=bench/RESULTS.md
[ "$SMOKE" = 1 ] && TARGET=$LOG/RESULTS.smoke.md
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown: no .git")
python bench/gpu_report.py --bench_logs="$LOG" --mode="$([ "$SMOKE" = 1 ] && echo cpu_smoke || echo gpu)$([ "$QUICK" = 1 ] && echo ,quick), stages $STAGES, budget ${BUDGET}s, commit $COMMIT; bash bench/gpu.sh $ARGS" \
  --append_to="$TARGET" && echo "appended to $TARGET and $LOG/results_section.md"
# The device tool brings back at most 8 files from $OUT: the section and one archive of the logs.
save_out && [ -n "${OUT:-}" ] && echo "copied results_section.md and $(basename "$LOG")_logs.tar.gz to $OUT"
echo "bench/gpu.sh done in $(( $(date +%s) - START ))s"
