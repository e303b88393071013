#!/usr/bin/env bash
# Entry points: smoke | record [SEED] | record-frontier [SEED] | preflight [record | record-frontier] | rehearse [SEED] |
# eval ARTIFACT | sweep ARTIFACT | data [N | ARGS] | gpu-setup | test | bench | package NAME RUN_ID...
set -euo pipefail
cd "$(dirname "$0")"

driver_cuda() {  # the newest CUDA the driver supports, from nvidia-smi's banner ("CUDA Version: 12.8"); empty: no GPU
  (nvidia-smi 2>/dev/null || true) | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

older() {  # version $1 < version $2 (major.minor)
  [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$1" ]
}

ensure_deps() {  # install what requirements.txt names, once; an installed torch >= 2.11 stays, a CUDA one never moves
  local pin=() driver probe tcuda tver
  driver=$(driver_cuda)
  # one interpreter start: "<torch's CUDA or cpu> <torch version>", then "deps" when the rest imports too
  probe=$(python -c "import torch; print(torch.version.cuda or 'cpu', torch.__version__)
import numpy, sentencepiece, pytest, huggingface_hub; print('deps')" 2>/dev/null || true)
  read -r tcuda tver <<<"${probe%%$'\n'*}" || true
  if [ -n "$tver" ]; then
    if [ -n "$driver" ] && [ "$tcuda" != cpu ] && older "$driver" "$tcuda"; then
      echo "error: torch $tver is built for CUDA $tcuda but this driver supports CUDA $driver at most, so torch" \
        "would see no GPU; fix: upgrade the driver, or install a torch built for CUDA <= $driver" \
        "(docs/gpu-box.md); run.sh never replaces an installed torch" >&2
      return 2
    fi
  else
    pin=(torch==2.13.0)  # the version CI tests (as .ci/run); on a GPU box, the CUDA build that its driver runs
    if [ -n "$driver" ]; then
      local cu
      for cu in 13.0 12.8 12.6; do older "$driver" "$cu" || break; done
      if older "$driver" "$cu"; then
        echo "error: the driver supports CUDA $driver, older than 12.6, the oldest CUDA of the torch wheels" \
          "run.sh installs; fix: upgrade the driver, or install a torch >= 2.11 for it yourself (docs/gpu-box.md)" >&2
        return 2
      fi
      echo "ensure_deps: torch 2.13.0 for CUDA $cu (the driver supports CUDA $driver)"
      python -m pip install -q --index-url "https://download.pytorch.org/whl/cu${cu/./}" "${pin[@]}"
    fi
  fi
  [[ "$probe" == *deps ]] || python -m pip install -q "${pin[@]}" -r requirements.txt
}

attention_kernel() {  # which attention kernel train_gpt.py will take, and what the fallback costs
  if python -c "import flash_attn_interface" 2>/dev/null; then
    echo "attention: flash-attn 3 (flash_attn_interface) will run"
  elif python -c "import flash_attn" 2>/dev/null; then
    echo "attention: flash-attn 2 will run (flash-attn 3 is faster on H100: bash run.sh gpu-setup)"
  else
    echo "attention: no flash-attn, PyTorch SDPA will run (estimated 15-20 % slower training, not measured here;" \
      "bash run.sh gpu-setup builds flash-attn 3)"
  fi
}

gpus() {  # torch's GPU count; refuses a GPU box whose GPUs torch cannot see, rather than train on its CPU for hours
  local n listed
  n=$(python -c "import torch; print(torch.cuda.device_count())")
  listed=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  if [ "$n" -eq 0 ] && [ "$listed" -gt 0 ]; then
    echo "error: nvidia-smi lists $listed GPU(s) but torch $(python -c 'import torch; print(torch.__version__)') sees" \
      "none (a CPU-only wheel, or a driver too old for the wheel's CUDA); fix: install a CUDA build of torch that the" \
      "driver supports (docs/gpu-box.md), then check python -c 'import torch; print(torch.cuda.is_available())'" >&2
    return 2
  fi
  echo "$n"
}

launch() {  # torchrun on every local GPU; plain python on a CPU-only machine; arguments prefix the command
  local n
  n=$(gpus)
  if [ "$n" -gt 0 ]; then
    "$@" torchrun --standalone --nproc_per_node="$n" train_gpt.py
  else
    "$@" python train_gpt.py
  fi
}

preflight() {  # every phase of the run before paying for it: toy size (PREFLIGHT=1) or full size (PREFLIGHT=full)
  local run=$1 dir=${LOG_DIR:-logs}/preflight mode=${PREFLIGHT:-1} frac=${PREFLIGHT_MEMORY_FRACTION:-0.95} gpu world
  local rc=0 why start=$SECONDS toy=() sched=() over
  case "$mode" in
    0) return 0 ;;
    1|full) ;;
    *) echo "error: PREFLIGHT=${PREFLIGHT} is not 0, 1 or full; fix: unset it (toy-size preflight), PREFLIGHT=full" \
         "(full size, memory per phase) or PREFLIGHT=0 to skip" >&2
       exit 2 ;;
  esac
  if ! awk -v f="$frac" 'BEGIN { exit !(f ~ /^[0-9.]+$/ && f > 0 && f <= 1) }'; then
    echo "error: PREFLIGHT_MEMORY_FRACTION=$frac is not a fraction in (0, 1]; fix: unset it (0.95) or set e.g. 0.9" >&2
    exit 2
  fi
  gpu=$(gpus)
  world=$((gpu > 0 ? gpu : 1))
  local out=$dir/${run}_preflight.out
  mkdir -p "$dir"
  rm -f "$dir/${run}_preflight".*
  # toy width: PREFLIGHT=1, and PREFLIGHT=full on a machine without GPUs (the same code path, at a size a CPU runs)
  if [ "$mode" = 1 ] || [ "$gpu" -eq 0 ]; then
    # a training-length schedule becomes three toy lengths: each still compiles in the warm-up and switches on
    toy=(MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=8 BIGRAM_DIM=32 VE_DIM=32 TRAIN_SEQ_LEN=128
      TRAIN_SEQ_SCHEDULE=${TRAIN_SEQ_SCHEDULE:+32@0.3,64@0.6,128@1}
      BIGRAM_VOCAB_SIZE=$(( ${BIGRAM_VOCAB_SIZE:-2048} > 0 ? 512 : 0 )) TTT_EVAL_SEQ_LEN=128 TTT_LORA_RANK=8
      TRAIN_BATCH_TOKENS=$((world * 1024)) GRAD_ACCUM_STEPS=1 EVAL_SEQ_LEN=128 EVAL_STRIDE=32)
  fi
  if [ "$mode" = 1 ]; then
    echo "preflight: every phase at toy size on $world process(es) before the real run; output in $out"
    # 8 steps with warm-down over all 8: late QAT switches on at the last one; the cap's stop flag runs each step.
    # Warm-up compiles every variant (length, loop, late QAT: up to 8); the loop is on from the first timed step.
    sched=(ENABLE_LOOPING_AT=0 ITERATIONS=8 WARMUP_STEPS=8 WARMDOWN_ITERS=8 WARMDOWN_FRAC=0 MAX_WALLCLOCK_SECONDS=120
      GPTQ_RESERVE_SECONDS=1 VAL_LOSS_EVERY=4 TRAIN_LOG_EVERY=4 SWA_EVERY=2 VAL_TOKENS=16384 SLOT_STEPS=2
      GPTQ_CALIB_BATCHES="$world")
  else
    echo "preflight: full size$([ "$gpu" -gt 0 ] || echo ' (toy width: no GPU)') on $world process(es): the real" \
      "model and batch for 2 steps after the warm-up's compiles, GPTQ on $((2 * world)) calibration sequences, every" \
      "eval on the ${TTT_BATCH_SIZE:-64} longest val documents; output in $out"
    # no size target or limit: 2 steps' weights do not compress like trained ones
    sched=(ITERATIONS=2 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=1
      VAL_LONGEST_DOCS="${TTT_BATCH_SIZE:-64}" GPTQ_CALIB_BATCHES=$((2 * world)) TARGET_BYTES=0
      SIZE_LIMIT_BYTES=4000000000)
  fi
  # data and every setting not named here are the real run's; the artifact and logs go to their own folder
  launch env LOG_DIR="$dir" RUN_ID="${run}_preflight" ARTIFACT= EVAL_ONLY=0 "${toy[@]}" "${sched[@]}" \
    timeout "${PREFLIGHT_TIMEOUT:-600}" >"$out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    # "memory: <phase> peak <p> GiB of <t> GiB (...)": a phase over the fraction would not fit the real run safely
    over=$(awk -v f="$frac" '/^memory: / && $4 > f * $7 { printf "%s peaked at %s of %s GiB; ", $2, $4, $7 }' "$out")
    if [ "$mode" = full ]; then
      grep -h '^memory: \|^train_done: ' "$out" | sed 's/^/preflight: /' || true
    fi
    if [ "$mode" = full ] && [ -n "$over" ]; then
      why="${over}over PREFLIGHT_MEMORY_FRACTION=$frac of the device; fix: training: raise GRAD_ACCUM_STEPS; export:"
      why="$why fewer GPTQ_CALIB_BATCHES; eval: a smaller EVAL_BATCH or SLOT_BATCH; TTT: a smaller TTT_BATCH_SIZE"
    else
      echo "preflight: passed in $((SECONDS - start))s (log $dir/${run}_preflight.txt)"
      return 0
    fi
  else
    why=$(grep -h '^error: ' "$out" | tail -n 1 | sed 's/^error: //' || true)
    if [ "$rc" -eq 124 ]; then
      why="it did not finish within ${PREFLIGHT_TIMEOUT:-600}s; fix: see where $out stops (compile, NCCL, data)"
    elif [ -z "$why" ]; then
      why="exit status $rc; fix: read the traceback in $out"
    fi
  fi
  echo "error: preflight failed, the real run was not started: $why (output: $out; PREFLIGHT=0 skips the check)" >&2
  exit 2
}

record_run() {  # the install check, preflight, then the real run: SEED and RUN_ID from the arguments
  ensure_deps
  [ -z "$(driver_cuda)" ] || attention_kernel
  preflight "$2"
  SEED=$1 RUN_ID=$2 launch
}

frontier_defaults() {  # record_frontier.env (#1855 plus the audited parts to #2135, SPEC 10-11); a variable set wins
  local caseops=./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved k v
  lacks=()
  if [ -z "${DATA_PATH:-}" ]; then
    if [ -f "$caseops/fineweb_val_000000.bin" ]; then
      export DATA_PATH=$caseops \
        TOKENIZER_PATH=${TOKENIZER_PATH:-./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model} \
        VOCAB_SIZE=${VOCAB_SIZE:-8192}
    else
      lacks+=("vocabulary: sp8192 CaseOps data not found at $caseops, so the sp1024 data runs; fix: bash run.sh data --variant sp8192_lossless_caps_caseops_v1_reserved")
    fi
  fi
  while IFS='=' read -r k v; do
    case "$k" in ''|'#'*) continue ;; esac
    [ -n "${!k+set}" ] || export "$k=$v"
  done < record_frontier.env
  python -c "import zpaq" 2>/dev/null || lacks+=("compression: the context-mixing coder (python package zpaq) is not installed, so the smallest of rANS, Brotli, zstd and LZMA runs; fix: pip install zpaq")
  lacks+=("GPTQ calibration time: the record read its training batches after the 600 s cap (not allowed); here 32 are read inside it, GPTQ_RESERVE_SECONDS=${GPTQ_RESERVE_SECONDS:-8} kept for them (the gptq_calib line checks the sum)")
  lacks+=("LQER groups: the #2060 retune quantises the factor B asymmetrically in groups of 32; here symmetric int4 groups of 64 (the rank 2 and top 4 are its)")
  lacks+=("SmearGate without its BOS fix: #2135 and its base ran the input gate across document starts (a fault); here it never mixes across a BOS")
  lacks+=("evaluation time: the record left its TTT warm-up and second decompression off its clock; here every second from the artifact read counts, and TTT stops adapting at EVAL_BUDGET_SECONDS=${EVAL_BUDGET_SECONDS:-600} (docs/ttt.md)")
  for k in "${lacks[@]}"; do echo "record-frontier: lacks $k"; done
}

toy_defaults() {  # the record architecture at toy size on the embedded corpus; any of these can be overridden
  python data/build_corpus.py
  : "${DATA_PATH:=./data/datasets/embedded_sp1024}" "${TOKENIZER_PATH:=./data/tokenizers/embedded_1024_bpe.model}"
  : "${MODEL_DIM:=64}" "${NUM_HEADS:=4}" "${NUM_KV_HEADS:=2}" "${ROPE_DIMS:=8}" "${BIGRAM_VOCAB_SIZE:=512}"
  : "${BIGRAM_DIM:=32}" "${VE_DIM:=32}" "${TRAIN_SEQ_LEN:=128}" "${TRAIN_BATCH_TOKENS:=8192}" "${GRAD_ACCUM_STEPS:=1}"
  : "${ITERATIONS:=120}" "${WARMUP_STEPS:=2}" "${WARMDOWN_ITERS:=40}" "${MAX_WALLCLOCK_SECONDS:=0}"
  : "${MUON_MOMENTUM_WARMUP_STEPS:=30}" "${EMA_DECAY:=0.95}" "${VAL_LOSS_EVERY:=60}" "${TRAIN_LOG_EVERY:=20}"
  : "${EVAL_SEQ_LEN:=128}" "${EVAL_STRIDE:=32}" "${VAL_TOKENS:=16384}" "${SLOT_STEPS:=8}" "${GPTQ_CALIB_BATCHES:=8}"
  export DATA_PATH TOKENIZER_PATH MODEL_DIM NUM_HEADS NUM_KV_HEADS ROPE_DIMS BIGRAM_VOCAB_SIZE BIGRAM_DIM VE_DIM \
    TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS GRAD_ACCUM_STEPS ITERATIONS WARMUP_STEPS WARMDOWN_ITERS MAX_WALLCLOCK_SECONDS \
    MUON_MOMENTUM_WARMUP_STEPS EMA_DECAY VAL_LOSS_EVERY TRAIN_LOG_EVERY EVAL_SEQ_LEN EVAL_STRIDE VAL_TOKENS SLOT_STEPS \
    GPTQ_CALIB_BATCHES
}

cmd=${1:-help}
shift || true
case "$cmd" in
  smoke)  # train + export + round trip + sliding + SLOT (scored); then, eval-only on that artifact, the legal evals:
    # sliding, causal SLOT and score-first TTT (toy TTT settings: rank 8 at the record's alpha/rank 1.8, lr 0.01,
    # windows of 128, 40 prefix docs)
    ensure_deps
    toy_defaults
    run=${RUN_ID:-smoke}
    rm -f "${LOG_DIR:-logs}/$run".{txt,int6.pgz,prequant.pgz,submission.json} \
      "${LOG_DIR:-logs}/${run}_legal".{txt,submission.json}  # reuse on purpose: a run never replaces another's files
    RUN_ID=$run python train_gpt.py
    RUN_ID=${run}_legal EVAL_ONLY=1 ARTIFACT=${LOG_DIR:-logs}/$run.int6.pgz SLOT_MODE=causal TTT_ENABLED=1 \
      TTT_LR=${TTT_LR:-0.01} TTT_LORA_RANK=${TTT_LORA_RANK:-8} TTT_LORA_ALPHA=${TTT_LORA_ALPHA:-14.4} \
      TTT_EVAL_SEQ_LEN=${TTT_EVAL_SEQ_LEN:-128} \
      PHASED_TTT_PREFIX_DOCS=${PHASED_TTT_PREFIX_DOCS:-40} python train_gpt.py
    ;;
  record)  # the record configuration on all local GPUs, after a preflight (PREFLIGHT=0 skips it)
    seed=${1:-${SEED:-1337}}
    record_run "$seed" "${RUN_ID:-record_seed$seed}"
    ;;
  preflight)  # the preflight alone (PREFLIGHT=1 toy size, PREFLIGHT=full full size) of record, or of record-frontier
    ensure_deps
    [ "${1:-record}" != record-frontier ] || frontier_defaults
    preflight "${RUN_ID:-${1:-record}}"
    ;;
  record-frontier)  # the best merged record's configuration (SPEC section 10), after the same preflight as record
    frontier_defaults
    seed=${1:-${SEED:-1337}}
    record_run "$seed" "${RUN_ID:-frontier_seed$seed}"
    ;;
  rehearse)  # the record configuration on the GPUs present, capped to end within 10 minutes on one H100 (docs/rehearsal.md)
    if [ -z "${DATA_PATH:-}" ] && [ ! -f data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ]; then
      python data/build_corpus.py --site-packages  # offline: every installed package's docstrings and prose
      DATA_PATH=./data/datasets/sitepkg_sp1024 TOKENIZER_PATH=./data/tokenizers/sitepkg_1024_bpe.model
    fi
    n=$(gpus)
    # 210 s of training, 1M val tokens: the budget of docs/rehearsal.md. GPTQ self-generates 8 sequences per GPU, as on 8 GPUs.
    : "${MAX_WALLCLOCK_SECONDS:=210}" "${WARMDOWN_FRAC:=0.67}" "${VAL_TOKENS:=1000000}" "${TRAIN_LOG_EVERY:=25}"
    : "${GPTQ_CALIB_BATCHES:=$((8 * (n > 0 ? n : 1)))}"
    export DATA_PATH TOKENIZER_PATH MAX_WALLCLOCK_SECONDS WARMDOWN_FRAC VAL_TOKENS TRAIN_LOG_EVERY GPTQ_CALIB_BATCHES
    seed=${1:-${SEED:-1337}}
    record_run "$seed" "${RUN_ID:-rehearse_seed$seed}"
    ;;
  eval)  # eval-only from a saved artifact (DATA_PATH/TOKENIZER_PATH as for training)
    [ $# -ge 1 ] || { echo "error: usage: run.sh eval ARTIFACT; fix: pass the .pgz path a run logged" >&2; exit 2; }
    EVAL_ONLY=1 ARTIFACT=$1 launch
    ;;
  sweep)  # SLOT grid on a saved artifact; the grid comes from SWEEP_* env vars (default: steps x lr)
    [ $# -ge 1 ] || { echo "error: usage: run.sh sweep ARTIFACT; fix: pass the .pgz path a run logged" >&2; exit 2; }
    if ! env | grep -q '^SWEEP_'; then export SWEEP_SLOT_STEPS=8,16,24 SWEEP_SLOT_LR=0.008,0.012; fi
    EVAL_ONLY=1 ARTIFACT=$1 SLIDING_ENABLED=${SLIDING_ENABLED:-0} launch
    ;;
  package)  # records/NAME/ for a record PR from finished runs' files under LOG_DIR (docs/packaging.md)
    [ $# -ge 2 ] || { echo "error: usage: run.sh package NAME RUN_ID...; fix: name the record folder and its runs" \
      >&2; exit 2; }
    python tools/package.py "$@"
    ;;
  data)  # published shards + tokenizer: data [N] (sp1024, N train shards, default 80) or data --variant NAME [--repo
    # OWNER/NAME] [--train-shards N] [--out DIR]; re-tokenised from the documents: data --vocab-size N [--caseops] ...
    python -c "import huggingface_hub, sentencepiece, numpy" 2>/dev/null || python -m pip install -q huggingface_hub \
      sentencepiece numpy  # the data scripts need no torch
    case "${1:-}" in
      "" | [0-9]*) set -- --train-shards "${1:-80}" "${@:2}" ;;
    esac
    script=data/download_fineweb.py
    for arg in "$@"; do case "$arg" in --vocab-size*) script=data/retokenize.py ;; esac; done
    python "$script" "$@"
    ;;
  gpu-setup)  # flash-attn 3 built for what train_gpt.py calls: SM90, bf16, head dim 64, forward + backward, varlen
    ensure_deps
    [ -n "$(driver_cuda)" ] || { echo "error: gpu-setup needs an NVIDIA GPU (nvidia-smi found none)" >&2; exit 2; }
    if ! python -c "import flash_attn_interface" 2>/dev/null; then
      python -m pip install -q ninja packaging
      src=${FA_SRC:-/tmp/flash-attention}
      [ -d "$src" ] || git clone --depth 1 https://github.com/Dao-AILab/flash-attention "$src"
      # every variant this script never calls is left out (a full build compiles hundreds of kernels)
      (cd "$src/hopper" && export FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_DISABLE_SM80=TRUE \
        FLASH_ATTENTION_DISABLE_FP16=TRUE FLASH_ATTENTION_DISABLE_FP8=TRUE FLASH_ATTENTION_DISABLE_HDIM96=TRUE \
        FLASH_ATTENTION_DISABLE_HDIM128=TRUE FLASH_ATTENTION_DISABLE_HDIM192=TRUE FLASH_ATTENTION_DISABLE_HDIM256=TRUE \
        FLASH_ATTENTION_DISABLE_PAGEDKV=TRUE FLASH_ATTENTION_DISABLE_APPENDKV=TRUE FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE \
        FLASH_ATTENTION_DISABLE_LOCAL=TRUE FLASH_ATTENTION_DISABLE_SPLIT=TRUE FLASH_ATTENTION_DISABLE_PACKGQA=TRUE \
        MAX_JOBS=${MAX_JOBS:-16} && python setup.py install)
    fi
    attention_kernel
    ;;
  test)
    ensure_deps
    python -m pytest -q tests
    ;;
  bench)  # speed table on whatever device is present (toy size on CPU); pass-through: --ablate all | NAME,...
    ensure_deps
    python bench/bench.py "$@"
    ;;
  *)
    echo "usage: bash run.sh smoke | record [SEED] | record-frontier [SEED] | preflight [record | record-frontier] |" \
      "rehearse [SEED] | eval ARTIFACT |" \
      "sweep ARTIFACT | data [N | ARGS] | gpu-setup | test | bench [--ablate ...] | package NAME RUN_ID..." >&2
    exit 2
    ;;
esac
