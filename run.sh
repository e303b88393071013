#!/usr/bin/env bash
# Entry points: smoke | record [SEED] | eval ARTIFACT | sweep ARTIFACT | data [N] | test | bench [--ablate ...]
set -euo pipefail
cd "$(dirname "$0")"

ensure_deps() {  # a fresh machine: install what requirements.txt names, once
  python -c "import torch, numpy, sentencepiece, pytest" 2>/dev/null || python -m pip install -q -r requirements.txt
}

launch() {  # torchrun on every local GPU; plain python on a CPU-only machine
  local n
  n=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$n" -gt 0 ]; then
    torchrun --standalone --nproc_per_node="$n" train_gpt.py
  else
    python train_gpt.py
  fi
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
  smoke)  # train + export + round trip + sliding + SLOT (scored), then an eval-only run of causal SLOT
    ensure_deps
    toy_defaults
    run=${RUN_ID:-smoke}
    rm -f "${LOG_DIR:-logs}/$run".{txt,int6.pgz,prequant.pgz,submission.json} \
      "${LOG_DIR:-logs}/${run}_causal".{txt,submission.json}  # reuse on purpose: a run never replaces another's files
    RUN_ID=$run python train_gpt.py
    RUN_ID=${run}_causal EVAL_ONLY=1 ARTIFACT=${LOG_DIR:-logs}/$run.int6.pgz SLOT_MODE=causal SLIDING_ENABLED=0 \
      python train_gpt.py
    ;;
  record)  # the record configuration on all local GPUs
    SEED=${1:-${SEED:-1337}} RUN_ID=${RUN_ID:-record_seed${1:-${SEED:-1337}}} launch
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
  data)  # official FineWeb sp1024 shards + tokenizer (N train shards, default 80)
    python data/download_fineweb.py --train-shards "${1:-80}"
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
    echo "usage: bash run.sh smoke | record [SEED] | eval ARTIFACT | sweep ARTIFACT | data [N] | test" \
      "| bench [--ablate ...]" >&2
    exit 2
    ;;
esac
