"""Parameter Golf record script: train the 11-layer GQA model in 600 s, export it as a
size-fitted int6 GPTQ artifact, and score it (round trip, sliding window, SLOT) in bits per byte.
Every setting is an environment variable; see README.md. Order: settings -> data -> model ->
optimizer -> training -> export -> evaluation -> main."""
from __future__ import annotations

import contextlib, copy, difflib, glob, hashlib, importlib, json, lzma, math, os, re, signal, struct, subprocess, sys
import time, base64, bz2, itertools, resource, traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- settings

# (env name, default, kind, meaning). Defaults are the record configuration.
SETTINGS = [
    ("DATA_PATH", "./data/datasets/fineweb10B_sp1024", "str", "folder of fineweb_{train,val}_*.bin shards"),
    ("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", "str", "SentencePiece model used for byte counting"),
    ("VOCAB_SIZE", 1024, "int", "vocabulary size; must equal the tokenizer's"),
    ("SEED", 1337, "int", "random seed"),
    ("RUN_ID", "", "str", "run name for logs/<RUN_ID>.txt (default: UTC time stamp)"),
    ("LOG_DIR", "logs", "str", "folder for the log, weights, artifact and submission.json"),
    ("ITERATIONS", 20000, "int", "maximum training steps"),
    ("WARMUP_STEPS", 20, "int", "compile warm-up steps; weights and optimizer state are restored after"),
    ("WARMDOWN_ITERS", 3500, "int", "warm-down length in steps (time-based when MAX_WALLCLOCK_SECONDS > 0)"),
    ("WARMDOWN_FRAC", 0.0, "float", "warm-down as a fraction of the time cap, or of ITERATIONS without one (0: off)"),
    ("MIN_LR", 0.0, "float", "floor of the warm-down's lr multiplier, as a fraction of the peak lr"),
    ("TRAIN_BATCH_TOKENS", 786432, "int", "tokens per optimizer step, all ranks together"),
    ("TRAIN_SEQ_LEN", 2048, "int", "training sequence length"),
    ("TRAIN_SEQ_SCHEDULE", [], "strs", "LEN@F,...: length LEN until train fraction F, the last F 1 (empty: off)"),
    ("SEQ_CHANGE_WARMUP_STEPS", 0, "int", "after each length change the lr ramps linearly from 1/N to 1 over N steps"),
    ("GRAD_ACCUM_STEPS", 0, "int", "micro-steps per optimizer step (0: 8 // world size)"),
    ("MAX_WALLCLOCK_SECONDS", 600.0, "float", "training time cap in seconds, warm-up excluded (0: no cap)"),
    ("VAL_LOSS_EVERY", 4000, "int", "validate every N steps during training (0: only at the end)"),
    ("TRAIN_LOG_EVERY", 200, "int", "log train loss every N steps"),
    ("VAL_TOKENS", 0, "int", "use only the first N validation tokens (0: the whole split)"),
    ("VAL_LONGEST_DOCS", 0, "int", "score only the N longest of those documents, in stream order (0: all); "
                                   "PREFLIGHT=full's worst case for eval memory"),
    ("NUM_LAYERS", 11, "int", "transformer blocks"),
    ("MODEL_DIM", 512, "int", "model width"),
    ("NUM_HEADS", 8, "int", "query heads"),
    ("NUM_KV_HEADS", 4, "int", "key/value heads (GQA)"),
    ("MLP_MULT", 3, "int", "MLP hidden width = MLP_MULT x MODEL_DIM"),
    ("MLP_LEAKY_SLOPE", 0.5, "float", "negative slope of the LeakyReLU before squaring"),
    ("ROPE_DIMS", 16, "int", "head dims rotated by RoPE (partial RoPE)"),
    ("ROPE_BASE", 10000.0, "float", "RoPE base"),
    ("ROPE_REF_LEN", 1024, "int", "RoPE reference length: above it the base is scaled by (TRAIN_SEQ_LEN/ROPE_REF_LEN)"
     "^(d/(d-2)), d = ROPE_DIMS, as the seeds do (0: off)"),
    ("QK_GAIN_INIT", 4.0, "float", "initial per-head query gain"),
    ("LOGIT_SOFTCAP", 30.0, "float", "logit soft cap c in c*tanh(z/c)"),
    ("LOGIT_SOFTCAP_ASYM", False, "bool", "learnable caps sp, sn (from LOGIT_SOFTCAP): sp*tanh(z/sp) for z > 0, "
     "sn*tanh(z/sn) otherwise; global TTT trains them too"),
    ("XSA_LAST_N", 11, "int", "exclusive self-attention on the last N layers"),
    ("LN_SCALE", True, "bool", "scale block inputs by 1/sqrt(layer+1)"),
    ("BIGRAM_VOCAB_SIZE", 2048, "int", "BigramHash rows (0: off)"),
    ("BIGRAM_DIM", 128, "int", "BigramHash embedding width"),
    ("SMEAR_ENABLED", True, "bool", "SmearGate on the embedding output"),
    ("SMEAR_MODE", "channel", "str", "channel (per-channel gate, after the norm, as the seeds) or input "
     "(x_t += lambda sigmoid(w x_t[:GATE_WINDOW]) x_{t-1}, not at BOS, before the norm, as the record)"),
    ("GATE_WINDOW", 12, "int", "residual channels read by the input-dependent gates (SmearGate input, ATTN_OUT_GATE)"),
    ("ATTN_OUT_GATE", False, "bool", "per-head attention-output gate sigmoid(ATTN_GATE_SCALE W n[:GATE_WINDOW]) after XSA"),
    ("ATTN_GATE_SCALE", 0.5, "float", "scale inside the attention-output gate's sigmoid"),
    ("DOC_MASK", False, "bool", "attention (and BigramHash) never cross a document boundary (a BOS starts one), in "
     "training and every eval; training packs each document's segments of <= TRAIN_SEQ_LEN tokens (cu_seqlens)"),
    ("NUM_LOOPS", 0, "int", "extra passes of layers LOOP_START..LOOP_END (depth recurrence; 0: off)"),
    ("LOOP_START", 3, "int", "first physical layer of the loop"),
    ("LOOP_END", 5, "int", "last physical layer of the loop (inclusive)"),
    ("ENABLE_LOOPING_AT", 0.35, "float", "training-time fraction at which the loop switches on (always on in evals)"),
    ("PARALLEL_START_LAYER", 0, "int", "layers from this one on run attention and MLP as two parallel lanes (0: off)"),
    ("VE_ENABLED", True, "bool", "shared value embedding"),
    ("VE_DIM", 128, "int", "value-embedding width"),
    ("VE_LAYERS", [9, 10], "ints", "layers that add the value embedding to v"),
    ("UNET_SKIPS", True, "bool", "U-Net skip connections"),
    ("SKIP_GATED", False, "bool", "sigmoid-gated skip blend (seed 000) instead of additive skips (seed 001)"),
    ("TIE_EMBEDDINGS", True, "bool", "tie input embedding and output head"),
    ("TIED_EMBED_INIT_STD", 0.005, "float", "token embedding init std"),
    ("TIED_EMBED_LR", 0.035, "float", "AdamW lr of the embedding tables (token, bigram, value)"),
    ("HEAD_LR", 0.008, "float", "AdamW lr of the untied head (TIE_EMBEDDINGS=0)"),
    ("MATRIX_LR", 0.025, "float", "Muon lr"),
    ("SCALAR_LR", 0.025, "float", "AdamW lr of vectors and scalars"),
    ("MUON_MOMENTUM", 0.99, "float", "Muon Nesterov momentum"),
    ("MUON_MOMENTUM_WARMUP_START", 0.92, "float", "Muon momentum at step 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 1500, "int", "steps to warm the momentum up"),
    ("MUON_BACKEND_STEPS", 5, "int", "Newton-Schulz iterations"),
    ("MUON_NS", "quintic", "str", "Newton-Schulz coefficients: quintic (one fixed triple) or polar (Polar-Express, one "
     "triple per step; the last repeats past 5)"),
    ("MUON_ROW_NORM", False, "bool", "MuonEq-R: each row of the update divided by its L2 norm before Newton-Schulz"),
    ("MUON_WD", 0.04, "float", "Muon decoupled weight decay"),
    ("ADAM_WD", 0.04, "float", "AdamW weight decay"),
    ("EMBED_WD", -1.0, "float", "AdamW weight decay of the embedding tables (-1: ADAM_WD)"),
    ("SCALAR_WD", -1.0, "float", "AdamW weight decay of vectors and scalars (-1: ADAM_WD)"),
    ("BETA1", 0.9, "float", "AdamW beta1"),
    ("BETA2", 0.95, "float", "AdamW beta2"),
    ("ADAM_EPS", 1e-8, "float", "AdamW eps"),
    ("GRAD_CLIP_NORM", 0.3, "float", "gradient clipping norm (0: off)"),
    ("EMA_ENABLED", True, "bool", "keep an EMA of the weights"),
    ("EMA_DECAY", 0.997, "float", "EMA decay per step"),
    ("SWA_ENABLED", False, "bool", "average snapshots late in training and apply the average instead of the EMA"),
    ("SWA_EVERY", 50, "int", "SWA snapshot interval in steps"),
    ("SWA_LR_THRESHOLD", 0.2, "float", "take SWA snapshots once the lr multiplier is below this"),
    ("LATE_QAT_THRESHOLD", 0.15, "float", "int6 fake-quantised training once the lr multiplier is below this (0: off)"),
    ("COMPILE", True, "bool", "torch.compile the model on CUDA"),
    ("GPTQ_CALIB", "selfgen", "str", "GPTQ calibration data: selfgen (model-generated) or train (inside the time cap)"),
    ("GPTQ_CALIB_BATCHES", 64, "int", "calibration sequences of TRAIN_SEQ_LEN tokens, all ranks together"),
    ("GPTQ_TEMPERATURE", 0.8, "float", "sampling temperature of GPTQ_CALIB=selfgen"),
    ("GPTQ_RESERVE_SECONDS", 20.0, "float", "time-cap seconds kept for reading calibration data (GPTQ_CALIB=train)"),
    ("GPTQ_BLOCK", 128, "int", "GPTQ column block size"),
    ("GPTQ_DAMP", 0.01, "float", "GPTQ damping as a fraction of the mean Hessian diagonal"),
    ("ATTN_BITS", 6, "int", "bits of the attention matrices (GPTQ), 5-8"),
    ("MLP_BITS", 6, "int", "bits of the MLP matrices (GPTQ), 5-8"),
    ("EMBED_BITS", 8, "int", "bits of the tied embedding: 8 int8 rows, 6-7 GPTQ with the head inputs' Hessian"),
    ("ATTN_CLIP_SIGMAS", 0.0, "float", "GPTQ row scale k*std(row)/qmax of attention matrices (0: clip percentiles)"),
    ("MLP_CLIP_SIGMAS", 0.0, "float", "the same for MLP matrices (record 11.5; 0: clip percentiles)"),
    ("EMBED_CLIP_SIGMAS", 0.0, "float", "the same for the GPTQ'd embedding (record 14; 0: clip percentiles)"),
    ("LQER_RANK", 0, "int", "rank of the stored correction of the worst-quantised tensors' error (0: off)"),
    ("LQER_TOP_K", 3, "int", "LQER corrects the tensors with the largest ||W - W_q||_F, this many"),
    ("AWQ_TOP_K", 0, "int", "AWQ-lite: the K column groups of largest rms(x_j) mean_i|W_ij| get AWQ_BITS (0: off)"),
    ("AWQ_GROUP_SIZE", 64, "int", "AWQ-lite: input columns per group, saliency summed over the group"),
    ("AWQ_BITS", 8, "int", "AWQ-lite: bits of the salient groups' columns (own row scale, inside the GPTQ solve)"),
    ("CODECS", [], "strs", "codecs the export may choose, smallest exact wins (empty: every available one; zpaq-5 "
     "decodes in ~80 s at the record size on a CPU core, inside the eval's time)"),
    ("TARGET_BYTES", 16000000, "int", "prune +-1 values until code + model fit in this many bytes (0: no pruning)"),
    ("SIZE_LIMIT_BYTES", 16000000, "int", "hard limit on code + model bytes; the run fails above it"),
    ("ARTIFACT", "", "str", "artifact path (default LOG_DIR/<RUN_ID>.<bits>.pgz, e.g. .int6.pgz); read by EVAL_ONLY=1"),
    ("EVAL_ONLY", False, "bool", "skip training: load ARTIFACT and run the evaluations"),
    ("EVAL_SEQ_LEN", 2048, "int", "evaluation window length"),
    ("EVAL_STRIDE", 64, "int", "sliding-window stride"),
    ("EVAL_BATCH", 32, "int", "windows per batch in plain and sliding evaluation"),
    ("SLIDING_ENABLED", True, "bool", "run the sliding-window evaluation"),
    ("SLOT_ENABLED", True, "bool", "run the SLOT evaluation"),
    ("SLOT_MODE", "scored", "str", "scored (fit on the targets it scores, as the seeds) or causal (on scored ones)"),
    ("SLOT_DELTA", "window", "str", "window (delta and logit bias per window) or batch (one per batch)"),
    ("SLOT_STEPS", 16, "int", "SLOT AdamW steps per batch"),
    ("SLOT_LR", 0.008, "float", "SLOT lr at the first step (cosine schedule)"),
    ("SLOT_LR_MIN", 0.0008, "float", "SLOT lr at the end of the schedule"),
    ("SLOT_BATCH", 32, "int", "windows per batch of the sliding + SLOT pass"),
    ("SLOT_EPS", 1e-8, "float", "SLOT AdamW eps (seeds 000/001: 1e-8, PyTorch's default; seed 002: 1e-5)"),
    ("SLOT_WD", 0.01, "float", "SLOT AdamW weight decay (seeds 000/001: 0.01, PyTorch's default; seed 002: 1e-8)"),
    ("SWEEP_SLOT_MODE", [], "strs", "sweep grid: SLOT modes (any SWEEP_* set replaces the SLOT eval by a sweep)"),
    ("SWEEP_SLOT_STEPS", [], "ints", "sweep grid: SLOT steps"),
    ("SWEEP_SLOT_LR", [], "floats", "sweep grid: SLOT lr"),
    ("SWEEP_SLOT_LR_MIN", [], "floats", "sweep grid: SLOT final lr"),
    ("SWEEP_EVAL_STRIDE", [], "ints", "sweep grid: strides (hidden states are recomputed per stride)"),
    ("NGRAM_TILT_ORDER", 0, "int", "n-gram tilt of every score: its context length in tokens (0: off; record: 16)"),
    ("NGRAM_TILT_THRESHOLD", 0.8, "float", "the tilt hints a context's most frequent next token from this share on"),
    ("NGRAM_TILT_BETA", 2.625, "float", "the tilt multiplies the hinted token's probability by e^beta, renormalised"),
    ("EVAL_BUDGET_SECONDS", 600.0, "float", "the evaluation's hard deadline, from the first read of the val data and "
     "the artifact: TTT stops adapting in time to score the rest unadapted; a run past it ends with an error"),
    ("TTT_ENABLED", False, "bool", "run the score-first TTT evaluation (per-document LoRA + phased global SGD)"),
    ("TTT_LORA_RANK", 80, "int", "rank of the per-document LoRA adapters"),
    ("TTT_LORA_ALPHA", 144.0, "float", "LoRA scale numerator: the adapters add alpha/rank x A B"),
    ("TTT_LORA_TARGETS", ["q", "k", "v", "o", "mlp", "head"], "strs", "LoRA targets, any of q,k,v,o,mlp,head (o and "
     "mlp: side paths from the attention / MLP input)"),
    ("TTT_WARM_A", True, "bool", "keep each batch slot's trained A for the slot's next document (0: one fixed A)"),
    ("TTT_LR", 0.0001, "float", "AdamW lr of the LoRA adapters (betas 0, TTT_BETA2)"),
    ("TTT_LOCAL_LR_MULT", 1.0, "float", "the LoRA adapters' lr is TTT_LR x this (GLOBAL_TTT_LR unaffected)"),
    ("TTT_BETA2", 0.99, "float", "AdamW beta2 of the LoRA adapters"),
    ("TTT_EPS", 1e-10, "float", "AdamW eps of the LoRA adapters"),
    ("TTT_WEIGHT_DECAY", 0.5, "float", "AdamW decoupled weight decay of the LoRA adapters"),
    ("TTT_CHUNK_SIZE", 48, "int", "tokens of a document scored before its adapters train on them"),
    ("TTT_SHORT_CHUNKS", [], "strs", "LENGTH:CHUNK pairs, lengths increasing: a TTT batch whose longest document is "
     "under a LENGTH (the first) takes its CHUNK in place of TTT_CHUNK_SIZE (e.g. 256:8,2000:24; empty: off)"),
    ("TTT_GRAD_STEPS", 1, "int", "adapter steps per scored chunk (0: score per document without adapting)"),
    ("TTT_BATCH_SIZE", 64, "int", "documents adapted side by side, each with its own adapters"),
    ("TTT_EVAL_SEQ_LEN", 2048, "int", "longest context window inside a document (and global TTT sequence length)"),
    ("PHASED_TTT_NUM_PHASES", 3, "int", "global TTT boundaries, spread over PHASED_TTT_PREFIX_DOCS (0: off)"),
    ("PHASED_TTT_PREFIX_DOCS", 2500, "int", "documents (scoring order: longest first) over which the global TTT "
     "boundaries are spread"),
    ("GLOBAL_TTT_LR", 0.001, "float", "SGD lr of the base weights at each boundary, cosine-decayed to 0 over it"),
    ("GLOBAL_TTT_MOMENTUM", 0.9, "float", "SGD momentum of global TTT"),
    ("GLOBAL_TTT_EPOCHS", 1, "int", "passes over the scored documents at each boundary"),
    ("GLOBAL_TTT_CHUNK", 32768, "int", "tokens per global SGD step, all ranks together"),
    ("GLOBAL_TTT_GRAD_CLIP", 1.0, "float", "gradient norm clip of global TTT (0: off)"),
    ("SWEEP_TTT_LR", [], "floats", "sweep grid: TTT_LR (any SWEEP_TTT_* set replaces the TTT eval by a sweep)"),
    ("SWEEP_TTT_LORA_RANK", [], "ints", "sweep grid: TTT_LORA_RANK"),
    ("SWEEP_TTT_CHUNK_SIZE", [], "ints", "sweep grid: TTT_CHUNK_SIZE"),
    ("SWEEP_TTT_PREFIX_DOCS", [], "ints", "sweep grid: PHASED_TTT_PREFIX_DOCS"),
    ("AUTHOR", "Parameter Golf team", "str", "submission.json author"),
    ("GITHUB_ID", "", "str", "submission.json github_id"),
]
ARCH_KEYS = ["VOCAB_SIZE", "TRAIN_SEQ_LEN", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT",
             "MLP_LEAKY_SLOPE", "ROPE_DIMS", "ROPE_BASE", "ROPE_REF_LEN", "QK_GAIN_INIT", "LOGIT_SOFTCAP", "XSA_LAST_N",
             "LN_SCALE", "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "SMEAR_ENABLED", "VE_ENABLED", "VE_DIM", "VE_LAYERS",
             "UNET_SKIPS", "SKIP_GATED", "TIE_EMBEDDINGS", "TIED_EMBED_INIT_STD", "SMEAR_MODE", "GATE_WINDOW",
             "ATTN_OUT_GATE", "ATTN_GATE_SCALE", "DOC_MASK", "NUM_LOOPS", "LOOP_START", "LOOP_END",
             "LOGIT_SOFTCAP_ASYM", "PARALLEL_START_LAYER",
             "ATTN_BITS", "MLP_BITS", "EMBED_BITS"]  # bit widths: the tensor kinds follow
KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "0 or 1", "ints": "comma-separated integers",
             "floats": "comma-separated numbers", "strs": "comma-separated words", "str": "a string"}
MAX_PARAMS = 1 << 30  # 4 GiB of fp32 weights: far above the record model (27M), far below a memory bomb
TORCHRUN = (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"))  # checked as ints

LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")
CODEC_NAMES = ("lzma-9", "rans", "zstd-22", "brotli-11", "zpaq-5")  # the export's candidates (codecs())

class ConfigError(Exception):
    """A bad setting or input file; main() prints it as one line and exits 2."""

def esc(s):  # an untrusted string printed on one line: control characters (newline, ESC) become escapes
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))

def _parse(name, raw, default, kind):
    items = [x.strip() for x in raw.split(",") if x.strip()]
    parse = {"int": lambda: int(raw), "float": lambda: float(raw), "str": lambda: raw, "strs": lambda: items,
             "bool": lambda: {"0": False, "1": True}[raw.strip()], "ints": lambda: [int(x) for x in items],
             "floats": lambda: [float(x) for x in items]}[kind]
    try:
        return parse()
    except (ValueError, KeyError):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        shown = int(shown) if kind == "bool" else shown
        raise ConfigError(f"{name}={raw!r} is not {KIND_TEXT[kind]}; fix: set {name} to {KIND_TEXT[kind]} "
                          f"(default {shown})") from None

class Settings:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.explicit = {n for n, *_ in SETTINGS if n in env}
        for name, default, kind, _ in SETTINGS:
            value = _parse(name, env[name], default, kind) if name in env else default
            setattr(self, name.lower(), list(value) if isinstance(value, list) else value)
        for name, default in TORCHRUN:  # set by torchrun; checked here so that setup_distributed() can trust them
            setattr(self, name.lower(), _parse(name, env.get(name, default), default, "int"))
        if self.grad_accum_steps == 0:
            self.grad_accum_steps = max(1, 8 // max(self.world_size, 1))
        self.validate()

    def arch(self):
        return {k: getattr(self, k.lower()) for k in ARCH_KEYS}

    @classmethod
    def from_arch(cls, config):
        """Settings of a model config (an artifact's), parsed and checked as if it came from the environment."""
        config = {"LOGIT_SOFTCAP_ASYM": False, **config}  # an artifact from before the asymmetric cap: symmetric
        if sorted(config) != sorted(ARCH_KEYS):
            raise ConfigError(f"config keys missing or unknown: {sorted(set(config) ^ set(ARCH_KEYS))} (an artifact of "
                              "another version of train_gpt.py: re-export it with this one)")
        env = {k: ",".join(map(str, v)) if isinstance(v, list) else str(int(v) if isinstance(v, bool) else v)
               for k, v in config.items()}
        return cls({**env, "TRAIN_BATCH_TOKENS": env["TRAIN_SEQ_LEN"], "GRAD_ACCUM_STEPS": "1"})  # a batch that fits

    def sweep_grid(self):
        if not any([self.sweep_slot_mode, self.sweep_slot_steps, self.sweep_slot_lr, self.sweep_slot_lr_min,
                    self.sweep_eval_stride]):
            return []
        return [self.slot_point(mode=m, steps=n, lr=lr, lr_min=lo, stride=s)
                for s in self.sweep_eval_stride or [self.eval_stride]
                for m in self.sweep_slot_mode or [self.slot_mode]
                for n in self.sweep_slot_steps or [self.slot_steps]
                for lr in self.sweep_slot_lr or [self.slot_lr]
                for lo in self.sweep_slot_lr_min or [self.slot_lr_min]]

    def slot_point(self, **kw):
        return dict(dict(mode=self.slot_mode, delta=self.slot_delta, steps=self.slot_steps, lr=self.slot_lr,
                         lr_min=self.slot_lr_min, eps=self.slot_eps, wd=self.slot_wd, stride=self.eval_stride), **kw)

    def ttt_point(self, **kw):
        return dict(dict(rank=self.ttt_lora_rank, alpha=self.ttt_lora_alpha, targets=self.ttt_lora_targets,
                         warm_a=self.ttt_warm_a, lr=self.ttt_lr, beta2=self.ttt_beta2, eps=self.ttt_eps,
                         wd=self.ttt_weight_decay, chunk=self.ttt_chunk_size, steps=self.ttt_grad_steps,
                         local_lr_mult=self.ttt_local_lr_mult, short_chunks=self.ttt_short_chunks,
                         batch=self.ttt_batch_size, seq_len=self.ttt_eval_seq_len, phases=self.phased_ttt_num_phases,
                         prefix_docs=self.phased_ttt_prefix_docs, global_lr=self.global_ttt_lr,
                         global_momentum=self.global_ttt_momentum, global_epochs=self.global_ttt_epochs,
                         global_chunk=self.global_ttt_chunk, global_clip=self.global_ttt_grad_clip), **kw)

    def quant_label(self):
        """The artifact's label, file-name part and log-line name: its bit widths as configured (int6: the seeds')."""
        bits = f"int{self.attn_bits}" if self.attn_bits == self.mlp_bits else f"attn{self.attn_bits}_mlp{self.mlp_bits}"
        return bits + (f"_embed{self.embed_bits}" if self.embed_bits < 8 else "")

    def ttt_grid(self):
        if not any([self.sweep_ttt_lr, self.sweep_ttt_lora_rank, self.sweep_ttt_chunk_size,
                    self.sweep_ttt_prefix_docs]):
            return []
        return [self.ttt_point(lr=lr, rank=r, chunk=c, prefix_docs=n) for lr in self.sweep_ttt_lr or [self.ttt_lr]
                for r in self.sweep_ttt_lora_rank or [self.ttt_lora_rank]
                for c in self.sweep_ttt_chunk_size or [self.ttt_chunk_size]
                for n in self.sweep_ttt_prefix_docs or [self.phased_ttt_prefix_docs]]

    def validate(self):
        def need(ok, name, why, fix):
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name.lower())!r}: {why}; fix: {fix}")
        for name, _, kind, _ in SETTINGS:  # NaN fails every comparison, so the bound also rejects nan and inf
            x, lim = getattr(self, name.lower()), 2**32 - 1 if kind in ("int", "ints") else 1e9
            need(kind in ("str", "strs", "bool") or all(abs(v) <= lim for v in (x if isinstance(x, list) else [x])),
                 name, f"must be finite and at most {lim:.10g} in size", f"set {name} within +-{lim:.10g}")
            need(kind != "str" or esc(x) == x, name, "holds control characters (they forge log lines)", "drop them")
        need(re.fullmatch(r"[A-Za-z0-9_.-]{0,100}", self.run_id), "RUN_ID", "may hold only letters, digits, "
             "'_', '.', '-' (at most 100)", "pick a plain file name such as RUN_ID=run_1")
        rules = {"> 0": (lambda v: v > 0, "VOCAB_SIZE ITERATIONS TRAIN_BATCH_TOKENS TRAIN_SEQ_LEN GRAD_ACCUM_STEPS "
                         "WORLD_SIZE LOCAL_WORLD_SIZE NUM_LAYERS MODEL_DIM NUM_HEADS NUM_KV_HEADS MLP_MULT "
                         "TRAIN_LOG_EVERY EVAL_SEQ_LEN EVAL_STRIDE EVAL_BATCH SLOT_BATCH SLOT_EPS MUON_BACKEND_STEPS "
                         "SWA_EVERY GPTQ_BLOCK ADAM_EPS GPTQ_CALIB_BATCHES SIZE_LIMIT_BYTES BIGRAM_DIM VE_DIM "
                         "ROPE_BASE LOGIT_SOFTCAP GPTQ_TEMPERATURE GPTQ_DAMP TTT_LORA_RANK TTT_CHUNK_SIZE "
                         "TTT_BATCH_SIZE TTT_EVAL_SEQ_LEN GLOBAL_TTT_CHUNK TTT_LORA_ALPHA TTT_EPS GATE_WINDOW "
                         "EVAL_BUDGET_SECONDS TTT_LOCAL_LR_MULT AWQ_GROUP_SIZE"),
                 ">= 0": (lambda v: v >= 0, "WARMUP_STEPS WARMDOWN_ITERS MAX_WALLCLOCK_SECONDS VAL_LOSS_EVERY "
                          "VAL_TOKENS ROPE_DIMS XSA_LAST_N BIGRAM_VOCAB_SIZE TIED_EMBED_LR HEAD_LR MATRIX_LR "
                          "SCALAR_LR MUON_WD MUON_MOMENTUM_WARMUP_STEPS ADAM_WD GRAD_CLIP_NORM GPTQ_RESERVE_SECONDS "
                          "TARGET_BYTES SLOT_STEPS SLOT_LR SLOT_LR_MIN SLOT_WD ROPE_REF_LEN TIED_EMBED_INIT_STD "
                          "MLP_LEAKY_SLOPE SEED RANK LOCAL_RANK TTT_LR TTT_WEIGHT_DECAY TTT_GRAD_STEPS "
                          "PHASED_TTT_NUM_PHASES PHASED_TTT_PREFIX_DOCS GLOBAL_TTT_LR GLOBAL_TTT_EPOCHS "
                          "GLOBAL_TTT_GRAD_CLIP NUM_LOOPS LOOP_START PARALLEL_START_LAYER ATTN_GATE_SCALE "
                          "ATTN_CLIP_SIGMAS MLP_CLIP_SIGMAS EMBED_CLIP_SIGMAS LQER_RANK LQER_TOP_K VAL_LONGEST_DOCS "
                          "AWQ_TOP_K SEQ_CHANGE_WARMUP_STEPS"),
                 "in [5, 8]": (lambda v: 5 <= v <= 8, "ATTN_BITS MLP_BITS AWQ_BITS"),
                 "in [6, 8]": (lambda v: 6 <= v <= 8, "EMBED_BITS"),
                 "in [0, 1)": (lambda v: 0 <= v < 1, "MUON_MOMENTUM MUON_MOMENTUM_WARMUP_START BETA1 BETA2 EMA_DECAY "
                               "GLOBAL_TTT_MOMENTUM TTT_BETA2"),
                 "in [0, 1]": (lambda v: 0 <= v <= 1, "SWA_LR_THRESHOLD LATE_QAT_THRESHOLD WARMDOWN_FRAC MIN_LR "
                               "ENABLE_LOOPING_AT"),
                 "<= 1024": (lambda v: v <= 1024, "NUM_LAYERS NUM_HEADS MLP_MULT MUON_BACKEND_STEPS NUM_LOOPS"),
                 ">= 0 or -1 (ADAM_WD)": (lambda v: v >= 0 or v == -1, "EMBED_WD SCALAR_WD"),
                 "<= 65536": (lambda v: v <= 65536, "VOCAB_SIZE MODEL_DIM BIGRAM_DIM VE_DIM TRAIN_SEQ_LEN EVAL_SEQ_LEN "
                              "EVAL_BATCH SLOT_BATCH GPTQ_BLOCK GPTQ_CALIB_BATCHES WORLD_SIZE TTT_LORA_RANK "
                              "TTT_CHUNK_SIZE TTT_BATCH_SIZE TTT_EVAL_SEQ_LEN"),
                 "in [0.001, 1000]": (lambda v: 1e-3 <= v <= 1e3, "GPTQ_TEMPERATURE"),
                 "in [0, 1024]": (lambda v: 0 <= v <= 1024, "NGRAM_TILT_ORDER"),
                 "in (0, 1]": (lambda v: 0 < v <= 1, "NGRAM_TILT_THRESHOLD"),
                 "in (0, 30]": (lambda v: 0 < v <= 30, "NGRAM_TILT_BETA")}
        for rule, (ok, names) in rules.items():
            for n in names.split():
                need(ok(getattr(self, n.lower())), n, f"must be {rule}", f"set {n} to a value {rule}")
        hd, L, choices = self.model_dim // self.num_heads, self.num_layers, dict(
            SLOT_MODE=("scored", "causal"), SWEEP_SLOT_MODE=("scored", "causal"), SLOT_DELTA=("window", "batch"),
            GPTQ_CALIB=("selfgen", "train"), SMEAR_MODE=("channel", "input"), MUON_NS=("quintic", "polar"))
        need(self.model_dim % self.num_heads == 0, "MODEL_DIM", f"not divisible by NUM_HEADS={self.num_heads}",
             "use a multiple of NUM_HEADS")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", f"must divide NUM_HEADS={self.num_heads}",
             "use a divisor of NUM_HEADS")
        need(hd % 2 == 0, "MODEL_DIM", f"head dim {hd} is odd", "make MODEL_DIM / NUM_HEADS even")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= hd, "ROPE_DIMS", f"must be even and <= head dim {hd}",
             f"set ROPE_DIMS to an even number <= {hd}")
        need(self.rope_dims > 2 or not rope_scaled(self.arch()), "ROPE_DIMS", "the RoPE base scaling exponent "
             "d/(d-2) needs more than 2 rotated dims", "set ROPE_DIMS >= 4, or ROPE_REF_LEN=0 (no scaling)")
        need(self.xsa_last_n <= L, "XSA_LAST_N", f"exceeds NUM_LAYERS={L}", f"set XSA_LAST_N <= {L}")
        need(not self.num_loops or self.loop_start <= self.loop_end < L, "LOOP_END", f"the loop {self.loop_start}.."
             f"{self.loop_end} must be layers within 0..{L - 1}, LOOP_START <= LOOP_END", "fix LOOP_START/LOOP_END")
        need(self.parallel_start_layer < L, "PARALLEL_START_LAYER", f"must be below NUM_LAYERS={L}",
             f"set it below {L}, or 0 (off)")
        P, a, b = self.parallel_start_layer, self.loop_start, self.loop_end
        need(not (self.num_loops and P and a < P <= b), "PARALLEL_START_LAYER", f"layer {P} starts the parallel lanes "
             f"inside the loop {a}..{b}", "start the lanes after the loop, or loop inside the lanes")
        need(self.gate_window <= self.model_dim, "GATE_WINDOW", f"exceeds MODEL_DIM={self.model_dim}",
             "set GATE_WINDOW <= MODEL_DIM")
        need(self.bigram_vocab_size != 1, "BIGRAM_VOCAB_SIZE", "needs at least 2 rows", "set 0 (off) or >= 2")
        need(not self.ve_enabled or (self.ve_layers and len(set(self.ve_layers)) == len(self.ve_layers)
                                     and all(0 <= i < L for i in self.ve_layers)), "VE_LAYERS",
             f"needs distinct layer indices in [0, NUM_LAYERS={L})", f"e.g. VE_LAYERS={L - 2},{L - 1} or VE_ENABLED=0")
        self.seq_schedule = [(int(m[1]), float(m[2])) if (m := re.fullmatch(r"(\d+)@(\d*\.?\d+)", v)) else (0, 0.0)
                             for v in self.train_seq_schedule]  # (length, until this train fraction); 0: malformed
        self.seq_lens = sorted({n for n, _ in self.seq_schedule} or {self.train_seq_len})  # each compiled in warm-up
        need((fr := [f for _, f in self.seq_schedule]) == sorted(set(fr) - {0}) and fr[-1:] in ([], [1]) and 0 <
             self.seq_lens[0] and self.seq_lens[-1] <= self.train_seq_len, "TRAIN_SEQ_SCHEDULE", "needs LEN@F entries, "
             f"0 < LEN <= TRAIN_SEQ_LEN={self.train_seq_len}, F rising to 1", "e.g. 1024@0.1,2048@0.7,3072@1")
        per_step = self.world_size * self.grad_accum_steps * math.lcm(*self.seq_lens)
        need(self.train_batch_tokens % per_step == 0, "TRAIN_BATCH_TOKENS", f"not divisible by world {self.world_size}"
             f" x GRAD_ACCUM_STEPS {self.grad_accum_steps} x TRAIN_SEQ_LEN (or the schedule lengths' lcm) = {per_step}",
             f"use a multiple of {per_step}")
        variants = len(self.seq_lens) * (1 + (self.num_loops > 0)) * (1 + (self.late_qat_threshold > 0))  # warm-up's
        need(not (self.compile and torch.cuda.is_available()) or self.warmup_steps >= variants, "WARMUP_STEPS",
             f"{self.warmup_steps} is below {variants} compile variants (len x loop x QAT): one would compile in the "
             "timed run", f"set WARMUP_STEPS >= {variants}")
        need(self.val_tokens != 1, "VAL_TOKENS", "one token has no target to score", "use 0 (all) or >= 2")
        tilt_set = " and ".join(sorted({"NGRAM_TILT_THRESHOLD", "NGRAM_TILT_BETA"} & self.explicit))
        need(self.ngram_tilt_order or not tilt_set, "NGRAM_TILT_ORDER", f"is 0 (off), yet {tilt_set} set",
             "set NGRAM_TILT_ORDER (the record: 16), or unset them")
        need(self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", f"exceeds EVAL_SEQ_LEN={self.eval_seq_len}",
             "use a stride <= EVAL_SEQ_LEN")
        need(self.slot_lr_min <= self.slot_lr, "SLOT_LR_MIN", f"exceeds SLOT_LR={self.slot_lr}",
             "set SLOT_LR_MIN <= SLOT_LR")
        lo, hi = max(self.sweep_slot_lr_min or [self.slot_lr_min]), min(self.sweep_slot_lr or [self.slot_lr])
        need(lo <= hi, "SWEEP_SLOT_LR_MIN", f"{lo} exceeds the grid's lr {hi}", "keep it <= SWEEP_SLOT_LR (or SLOT_LR)")
        need(max(self.rank, self.local_rank) < self.world_size, "RANK", f"RANK and LOCAL_RANK={self.local_rank} must be"
             f" below WORLD_SIZE={self.world_size}", "launch with torchrun, or unset them for one process")
        for name, ok in choices.items():
            value = getattr(self, name.lower())
            need(all(v in ok for v in (value if isinstance(value, list) else [value])), name,
                 f"must be one of {', '.join(ok)}", f"set {name}={ok[0]} or {name}={ok[1]}")
        need(self.slot_delta == "window" or "causal" not in [self.slot_mode] + self.sweep_slot_mode, "SLOT_DELTA",
             "one delta per batch is fitted on windows whose context reaches past other windows' scored tokens, so "
             "SLOT_MODE=causal would leak", "use SLOT_DELTA=window with SLOT_MODE=causal")
        need(all(0 < v <= self.eval_seq_len for v in self.sweep_eval_stride), "SWEEP_EVAL_STRIDE",
             "strides must be in [1, EVAL_SEQ_LEN]", "list strides between 1 and EVAL_SEQ_LEN")
        for n in ["SWEEP_SLOT_STEPS", "SWEEP_SLOT_LR", "SWEEP_SLOT_LR_MIN", "SWEEP_TTT_LR", "SWEEP_TTT_PREFIX_DOCS"]:
            need(all(v >= 0 for v in getattr(self, n.lower())), n, "values must be >= 0", f"list values >= 0 in {n}")
        need(all(v > 0 for v in self.sweep_ttt_lora_rank), "SWEEP_TTT_LORA_RANK", "ranks must be > 0",
             "list ranks >= 1")
        for n in ["TTT_CHUNK_SIZE", "SWEEP_TTT_CHUNK_SIZE"]:
            v = getattr(self, n.lower())
            need(all(0 < c <= self.ttt_eval_seq_len for c in (v if isinstance(v, list) else [v])), n,
                 f"chunks must be in [1, TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len}]", "use chunks <= TTT_EVAL_SEQ_LEN")
        need(set(self.codecs) <= set(CODEC_NAMES), "CODECS", f"must be a subset of {','.join(CODEC_NAMES)}",
             "list some of them, e.g. CODECS=rans,brotli-11 (or leave it empty: all)")
        sc = [tuple(map(int, x.split(":"))) if re.fullmatch(r"\d+:\d+", x) else (0, 0) for x in self.ttt_short_chunks]
        need(all(0 < c <= self.ttt_eval_seq_len and a < b for (a, _), (b, c) in zip([(0, 0)] + sc, sc)),
             "TTT_SHORT_CHUNKS", "needs LENGTH:CHUNK pairs, lengths positive and increasing, chunks in [1, "
             f"TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len}]", "set e.g. TTT_SHORT_CHUNKS=256:8,2000:24, or leave it empty")
        need(set(self.ttt_lora_targets) <= set(LORA_TARGETS), "TTT_LORA_TARGETS",
             f"must be a subset of {','.join(LORA_TARGETS)}", "list some of q,k,v,o,mlp,head (e.g. k,o,mlp,head)")
        need(self.embed_bits == 8 or self.tie_embeddings, "EMBED_BITS", "GPTQ of the embedding takes its Hessian from "
             "the tied head's inputs", "set TIE_EMBEDDINGS=1, or EMBED_BITS=8")
        need(self.gptq_calib != "train" or self.eval_only or not self.max_wallclock_seconds
             or self.gptq_reserve_seconds < self.max_wallclock_seconds, "GPTQ_RESERVE_SECONDS",
             "leaves no training time", "keep it well below MAX_WALLCLOCK_SECONDS")
        need(not self.eval_only or (self.artifact and Path(self.artifact).is_file()), "ARTIFACT",
             "EVAL_ONLY=1 needs an existing artifact file", "set ARTIFACT=<path of a .pgz written by a run>")
        n = param_count(self.arch())
        need(n <= MAX_PARAMS, "MODEL_DIM", f"with NUM_LAYERS={L} and the rest the model has {n:,} parameters, over "
             f"the {MAX_PARAMS:,} cap", "shrink MODEL_DIM, NUM_LAYERS, MLP_MULT or the vocabularies")

def param_count(c):
    """Parameters of GPT(c) by formula (a test checks it), to cap the size before anything is built."""
    V, d, L, h, bv, bd, vd = (c[k] for k in ("VOCAB_SIZE", "MODEL_DIM", "NUM_LAYERS", "NUM_HEADS", "BIGRAM_VOCAB_SIZE",
                                             "BIGRAM_DIM", "VE_DIM"))
    S, w, P = len(slot_layers(c, True)), c["GATE_WINDOW"], c["PARALLEL_START_LAYER"]
    kv, enc = c["NUM_KV_HEADS"] * (d // h), S // 2 if c["UNET_SKIPS"] else 0
    return (V * d * (2 - c["TIE_EMBEDDINGS"]) + L * (2 * d * d + 2 * d * kv + h + 2 * c["MLP_MULT"] * d * d + 4 * d)
            + min(enc, S - enc) * d * (1 + c["SKIP_GATED"]) + (bv * bd + bd * d + 1) * (bv > 0)
            + c["SMEAR_ENABLED"] * (d if c["SMEAR_MODE"] == "channel" else w + 1) + L * h * w * c["ATTN_OUT_GATE"]
            + 6 * (L - P) * (P > 0) + (V * vd + vd * kv + 1 + len(c["VE_LAYERS"])) * c["VE_ENABLED"]
            + 2 * c["LOGIT_SOFTCAP_ASYM"])

def slot_layers(c, looping):
    """The physical layer of each slot of the forward: with the loop on, LOOP_START..LOOP_END run NUM_LOOPS extra
    times (the record: 0,1,2,3,4,5,3,4,5,3,4,5,6,...,10: 17 slots over 11 layers)."""
    L, a, b = c["NUM_LAYERS"], c["LOOP_START"], c["LOOP_END"] + 1
    loops = c["NUM_LOOPS"] if looping else 0
    return list(range(b)) + list(range(a, b)) * loops + list(range(b, L)) if loops else list(range(L))

def warn_env_typos(env=None):
    """A warning for each env var that nearly matches a setting without being one (SLOT_STPES), naming the closest."""
    known = [n for n, *_ in SETTINGS]
    close = {k: difflib.get_close_matches(k, known, n=1, cutoff=0.8)
             for k in sorted(os.environ if env is None else env) if k.isupper() and k not in known}
    return [f"warning: env var {k} is not a setting of train_gpt.py; did you mean {m[0]}?"
            for k, m in close.items() if m]


# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1

def shard_token_count(path):
    """Checks a shard's header against its size; returns its token count."""
    if not os.path.isfile(path):  # checked first: opening a FIFO would block
        raise ConfigError(f"shard {path} is not a regular file (folder, FIFO, dangling link...); fix: remove it")
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        got = f"magic {header[0]} version {header[1]}" if header.size >= 2 else f"only {size} bytes"
        raise ConfigError(f"shard {path}: bad header ({got}; expected magic {SHARD_MAGIC} version {SHARD_VERSION}); "
                          "fix: re-download it with `bash run.sh data`")
    expected = HEADER_INTS * 4 + 2 * int(header[2])
    if size != expected or header[2] == 0:
        raise ConfigError(f"shard {path}: header declares {int(header[2])} tokens ({expected} bytes) and the file has "
                          f"{size} bytes (truncated, corrupt or empty); fix: re-download it with `bash run.sh data`")
    return int(header[2])

def load_shard(path, vocab_size):
    tokens = np.fromfile(path, dtype="<u2", offset=HEADER_INTS * 4)
    if tokens.max(initial=0) >= vocab_size:
        raise ConfigError(f"shard {path} holds token id {tokens.max()} >= VOCAB_SIZE={vocab_size}; fix: use "
                          "shards made with the TOKENIZER_PATH tokenizer, or the matching VOCAB_SIZE")
    return tokens

def find_shards(data_path, split):
    if not Path(data_path).is_dir():
        raise ConfigError(f"DATA_PATH={data_path!r} is not a folder; fix: download the data with `bash run.sh data` "
                          "or point DATA_PATH at a folder of fineweb_*.bin shards")
    files = sorted(glob.glob(os.path.join(glob.escape(data_path), f"fineweb_{split}_[0-9]*.bin")))  # not val_bytes_
    if not files:
        raise ConfigError(f"DATA_PATH={data_path!r} holds no fineweb_{split}_*.bin shards; fix: `bash run.sh data` "
                          "or point DATA_PATH at the shard folder")
    for f in files:
        shard_token_count(f)
    return files

SHARD_READER = ThreadPoolExecutor(1)  # the next train shard is read while the GPU trains (~1 % of the time)

class TrainLoader:
    """Reads the train shards in order; each call takes one global micro-batch and keeps this rank's slice."""

    def __init__(self, files, rank, world, device, vocab_size):
        self.files, self.rank, self.world, self.device, self.vocab = files, rank, world, device, vocab_size
        self.file_idx, self.pos, self.tokens = 0, 0, load_shard(files[0], vocab_size)
        self.in_doc = 0  # tokens of the current document already taken (segments count from its start)
        self.next = SHARD_READER.submit(load_shard, files[1 % len(files)], vocab_size)

    def _take(self, n):
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.pos, self.tokens = 0, self.next.result()
                self.next = SHARD_READER.submit(load_shard, self.files[(self.file_idx + 1) % len(self.files)],
                                                self.vocab)
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

    def next_batch(self, local_tokens, seq_len, segments=False):
        """(inputs, targets, cu): rows of seq_len tokens cut from the stream and cu None; with segments (DOC_MASK)
        one row of local_tokens and cu (padded_cu) cutting each document into segments of at most seq_len tokens
        counted from the document's own start, as the record trains."""
        span = local_tokens + 1
        stream = self._take(span * self.world)
        idx = np.arange(len(stream))
        last_bos = np.maximum.accumulate(np.where(stream == BOS_ID, idx, -self.in_doc))
        self.in_doc = len(stream) - last_bos[-1]
        local = stream[self.rank * span:(self.rank + 1) * span]
        t = torch.from_numpy(local.astype(np.int64))
        cu = None
        if segments:
            at = (idx - last_bos)[self.rank * span:(self.rank + 1) * span - 1]
            cu = torch.from_numpy(padded_cu(np.flatnonzero((at % seq_len == 0) | (idx[:local_tokens] == 0)),
                                            local_tokens))
        if self.device.type == "cuda":  # overlaps the copies with queued compute
            t, cu = (u if u is None else u.pin_memory().to(self.device, non_blocking=True) for u in (t, cu))
        rows = (1, -1) if segments else (-1, seq_len)
        return t[:-1].view(rows), t[1:].view(rows), cu

def load_tokenizer(path, vocab_size):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise ConfigError(f"TOKENIZER_PATH={path!r} is not an existing file; fix: `bash run.sh data` or point "
                          "TOKENIZER_PATH at the .model file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"TOKENIZER_PATH={path!r} is not a SentencePiece model ({e}); fix: use its .model") from None
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={path!r} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; "
                          "fix: set VOCAB_SIZE to the tokenizer's size or use the matching tokenizer")
    return sp

CASE_OPS = "\ue001\ue002\ue003\ue004"  # CaseOps operators (SPEC section 10, data/caseops.py); the last escapes

def byte_tables(sp, vocab_size):
    """Per-id UTF-8 length without the leading '▁', has-leading-'▁', and boundary flags (SPEC section 3), and the
    ids of the CaseOps operators in CASE_OPS order when the tokenizer has all four as pieces (else none)."""
    base = np.zeros(vocab_size, dtype=np.int16)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    ops = np.array([sp.piece_to_id(c) for c in CASE_OPS])
    is_caseops = all(sp.id_to_piece(int(i)) == c for i, c in zip(ops, CASE_OPS))
    return base, space, boundary, ops if is_caseops else ops[:0]

def target_bytes(tokens, tables):
    """Byte count of each target tokens[1:] given its previous token. A CaseOps operator stands for no byte of the
    original text and counts 0, unless an odd run of escape pieces precedes it (then it is a literal character):
    the count is the rule's count of the original-cased normalised text, as for any other tokenizer."""
    base, space, boundary, ops = tables
    prev, tgt = tokens[:-1].astype(np.int64), tokens[1:].astype(np.int64)
    n = base[tgt] + (space[tgt] & ~boundary[prev])
    if len(ops):
        i = np.arange(len(prev), dtype=np.int32)
        run = i - np.maximum.accumulate(np.where(prev == ops[3], -1, i))  # escape pieces ending at the previous token
        n[np.isin(tgt, ops) & (run % 2 == 0)] = 0
    return n

def sidecar_ratio(val_files, val, log):
    """Rule bytes / sidecar bytes over the scored targets when val byte sidecars sit beside the val shards (else
    None): fineweb_val_bytes_NNNNNN.bin, the CaseOps dataset's per-token raw bytes (shard header, uint16 per token).
    Every eval scores every target once, so any figure's bpb on the sidecar's bytes is its bpb times this ratio."""
    folder = os.path.dirname(val_files[0])
    found = set(glob.glob(os.path.join(glob.escape(folder), "fineweb_val_bytes_*.bin")))
    if not found:
        return None
    side = [os.path.join(folder, "fineweb_val_bytes_" + os.path.basename(f)[len("fineweb_val_"):]) for f in val_files]
    fix = "fix: re-download the variant's val files, or delete the fineweb_val_bytes_*.bin files (not needed to train)"
    for s in sorted(found ^ set(side)):
        raise ConfigError(f"val byte sidecar {s} {'has no val shard' if s in found else 'is missing'}; a sidecar "
                          f"must sit beside each val shard; {fix}")
    for f, s in zip(val_files, side):
        if (m := shard_token_count(s)) != (n := shard_token_count(f)):
            raise ConfigError(f"val byte sidecar {s} has {m} entries for the {n} tokens of {f}, not one per token; {fix}")
    total, rule = int(np.concatenate([load_shard(s, 1 << 16) for s in side])[1:len(val[0])].sum()), int(val[1].sum())
    if total == 0:
        raise ConfigError(f"val byte sidecars {side[0]}...: zero bytes over the scored tokens; {fix}")
    log(f"val_bytes_sidecar: files:{len(side)} bytes:{total} rule_bytes:{rule} ratio:{rule / total:.6f} (on the "
        f"sidecar's bytes every val_bpb is val_bpb x ratio; the headline stays on the rule's bytes)")
    return rule / total


# ----------------------------------------------------------------------------- model

def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))

def softcap_logits(h, weight, cap, bias=None):
    """cap * tanh(z / cap) of z = h W^T (+ bias, added before the cap)."""
    z = F.linear(h, weight)
    if bias is not None:
        z = z + bias
    if isinstance(cap, tuple):  # LOGIT_SOFTCAP_ASYM's 0-d (sp, sn): sp where z > 0, sn elsewhere; z keeps its dtype
        return torch.where(z > 0, cap[0] * torch.tanh(z / cap[0]), cap[1] * torch.tanh(z / cap[1]))
    return cap * torch.tanh(z / cap)

def fake_quant_int6(w):
    """Per-row int6 round trip (scale = row max / 31) with a straight-through gradient."""
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 31.0
    q = torch.clamp(torch.round(w.detach() / scale), -31, 31) * scale
    return w + (q - w).detach()

QAT = False  # late QAT; a global, which torch.compile guards (torch 2.11 missed a flipped nn.Module class attribute)
LOOPING = True  # depth recurrence on (evals always; training switches it on at ENABLE_LOOPING_AT), a global as QAT

def lora_delta(x, lora):
    """TTT's batched low-rank delta: row b of x [B, T, in] gets s (x_b A_b^T) B_b^T, A [B, r, in], B [B, out, r]."""
    A, B, s = lora
    return (x @ A.mT.to(x.dtype)) @ B.mT.to(x.dtype) * s

def plus_lora(y, x, lora):
    return y if lora is None else y + lora_delta(x, lora)

class CastedLinear(nn.Linear):
    """fp32 master weight cast to the activation dtype; block matrices train through int6 once late QAT starts."""

    def __init__(self, n_in, n_out, quantized=False):
        super().__init__(n_in, n_out, bias=False)
        self.quantized = quantized

    def forward(self, x, lora=None):
        w = fake_quant_int6(self.weight) if (self.quantized and QAT) else self.weight
        return plus_lora(F.linear(x, w.to(x.dtype)), x, lora)

def _attention_kernel():
    for module, name in (("flash_attn_interface", "flash-attn-3"), ("flash_attn", "flash-attn-2")):
        with contextlib.suppress(ImportError):
            m = importlib.import_module(module)
            return name, m.flash_attn_func, m.flash_attn_varlen_func
    return "sdpa", None, None

ATTN_NAME, ATTN_FN, ATTN_VARLEN_FN = _attention_kernel()

def flash_out(out):
    return out[0] if isinstance(out, tuple) else out

def padded_cu(starts, n):
    """Segment start offsets and the end n, padded with repeated n to a power of two (at least 64): one static
    shape per bucket, so a new segment count does not compile anew."""
    return np.pad(starts, (0, max(64, 1 << len(starts).bit_length()) - len(starts)), constant_values=n).astype(
        np.int32)

@torch.compiler.disable
def window_cu(starts):  # an eval window's segments for flash-attn: one host sync per forward
    return torch.from_numpy(padded_cu(starts.nonzero()[:, 0].cpu().numpy(), starts.numel())).to(starts.device)

def doc_segments(ids, cu, max_len):
    """Document masking's one representation, over the B*T positions flattened: (cu, seg, pos, max_len). cu: the
    segment starts padded by padded_cu (the loader's, built on the host; else the window's BOS positions and row
    starts, needed only by flash-attn); seg: each position's segment number; pos: its offset in its segment (RoPE);
    max_len: the longest a segment can be."""
    B, T = ids.shape
    idx = torch.arange(B * T, device=ids.device)
    if cu is None:
        starts = ((ids == BOS_ID) | (idx.view(B, T) % T == 0)).flatten()
        cu = window_cu(starts) if ATTN_VARLEN_FN is not None and ids.is_cuda else None
    else:
        starts = torch.zeros(B * T + 1, dtype=torch.bool, device=ids.device).index_fill(0, cu.long(), True)[:-1]
    pos = idx - torch.cummax(torch.where(starts, idx, 0), 0).values
    return cu, torch.cumsum(starts, 0), pos, max_len

def causal_attention(q, k, v, docs=None):
    """q [B,T,H,D], k/v [B,T,KV,D]; GQA without repeating K/V. With docs (doc_segments) a position attends only to
    its own segment: flash-attn's variable-length kernel on CUDA where installed, else SDPA over blocks of max_len
    queries, each seeing its block and the one before (a segment spans at most max_len): never a T x T mask."""
    B, T, H, D = q.shape
    if ATTN_FN is not None and q.is_cuda and docs is None:
        return flash_out(ATTN_FN(q, k, v, causal=True))
    if docs is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=H != k.size(2)).transpose(1, 2)
    cu, seg, _, W = docs
    if ATTN_VARLEN_FN is not None and q.is_cuda:
        return flash_out(ATTN_VARLEN_FN(*(t.flatten(0, 1) for t in (q, k, v)), cu, cu, W, W, causal=True)).view_as(q)
    n, p = B * T, -B * T % W
    nb = (n + p) // W
    qb = F.pad(q.flatten(0, 1), (0, 0, 0, 0, 0, p)).view(nb, W, H, D)
    s = F.pad(seg, (W, p), value=-1)

    def pair(t):  # each block's W keys after the W of the block before (a W-long pad before the first)
        return torch.cat([t[:-W].unflatten(0, (nb, W)), t[W:].unflatten(0, (nb, W))], 1)
    kb, vb = (pair(F.pad(t.flatten(0, 1), (0, 0, 0, 0, W, p))) for t in (k, v))
    i = torch.arange(W, device=q.device)
    mask = (s[W:].view(nb, W, 1) == pair(s)[:, None]) & (torch.arange(2 * W, device=q.device) <= i[:, None] + W)
    y = F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
                                       attn_mask=mask[:, None], enable_gqa=H != k.size(2))
    return y.transpose(1, 2).flatten(0, 1)[:n].view_as(q)

def apply_rope(x, cos, sin, dims):
    """Rotates the first `dims` channels of each head (half-split pairs); the rest pass through."""
    if dims == 0:
        return x
    a, b, rest = x[..., :dims // 2], x[..., dims // 2:dims], x[..., dims:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)

def xsa(y, v):
    """Exclusive self-attention: drop from each head's output its component along its own
    (normalised) value vector at the same position; heads of one GQA group share that v."""
    B, T, H, D = y.shape
    kv = v.size(2)
    yg = y.view(B, T, kv, H // kv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)

class Attention(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d, self.h, self.kv = c["MODEL_DIM"], c["NUM_HEADS"], c["NUM_KV_HEADS"]
        self.hd, self.rope_dims = d // self.h, c["ROPE_DIMS"]
        self.q = CastedLinear(d, d, quantized=True)
        self.k = CastedLinear(d, self.kv * self.hd, quantized=True)
        self.v = CastedLinear(d, self.kv * self.hd, quantized=True)
        self.proj = CastedLinear(d, d, quantized=True)
        self.q_gain = nn.Parameter(torch.full((self.h,), float(c["QK_GAIN_INIT"])))
        self.use_xsa = layer >= c["NUM_LAYERS"] - c["XSA_LAST_N"]
        self.gate_w = nn.Parameter(torch.zeros(self.h, c["GATE_WINDOW"])) if c["ATTN_OUT_GATE"] else None
        self.gate_scale = c["ATTN_GATE_SCALE"]

    def forward(self, x, cos, sin, ve, docs=None, lora=None):
        """lora: TTT's adapters by target; q, k, v on their inputs, o as a side path from the block input x."""
        B, T, _ = x.shape
        lora = lora or {}
        v = self.v(x, lora.get("v"))
        if ve is not None:
            v = v + ve.to(v.dtype)
        q = rms_norm(self.q(x, lora.get("q")).view(B, T, self.h, self.hd))
        k = rms_norm(self.k(x, lora.get("k")).view(B, T, self.kv, self.hd))
        q = apply_rope(q, cos, sin, self.rope_dims) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(k, cos, sin, self.rope_dims)
        v = v.view(B, T, self.kv, self.hd)
        y = causal_attention(q.to(v.dtype), k.to(v.dtype), v, docs)
        if self.use_xsa:
            y = xsa(y, v)
        if self.gate_w is not None:  # per head: sigmoid(scale W n[:window]) of the normalised input n = x
            g = x[..., :self.gate_w.size(1)] @ self.gate_w.T.to(x.dtype)
            y = y * torch.sigmoid(self.gate_scale * g).to(y.dtype)[..., None]
        return plus_lora(self.proj(y.reshape(B, T, self.h * self.hd)), x, lora.get("o"))

class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["MODEL_DIM"]
        self.fc = CastedLinear(d, c["MLP_MULT"] * d, quantized=True)
        self.proj = CastedLinear(c["MLP_MULT"] * d, d, quantized=True)
        self.slope = c["MLP_LEAKY_SLOPE"]

    def forward(self, x, lora=None):  # lora: TTT's side path from the MLP input
        return plus_lora(self.proj(F.leaky_relu(self.fc(x), self.slope).square()), x, lora)

class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d = c["MODEL_DIM"]
        self.attn, self.mlp = Attention(c, layer), MLP(c)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.in_scale = 1.0 / math.sqrt(layer + 1) if c["LN_SCALE"] else 1.0
        self.parallel = 0 < c["PARALLEL_START_LAYER"] <= layer
        if self.parallel:  # lane l <- r_l lane_l + P[attention, l] a + P[MLP, l] m
            self.lane_r = nn.Parameter(torch.full((2,), 1.1))
            self.lane_p = nn.Parameter(torch.ones(2, 2))

    def forward(self, x, x0, cos, sin, ve, docs=None, lora=None):
        """x: the residual stream, or in a parallel layer the two lanes (a tensor: both start as it), returned so."""
        mix, s, lora = self.resid_mix.to(x0.dtype), self.in_scale, lora or {}
        if not self.parallel:
            x = mix[0] * x + mix[1] * x0
            x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * s, cos, sin, ve, docs, lora)
            return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * s, lora.get("mlp"))
        l0, l1 = x if isinstance(x, tuple) else (x, x)
        a = self.attn_scale.to(x0.dtype) * self.attn(rms_norm(mix[0] * l0 + mix[1] * x0) * s, cos, sin, ve, docs, lora)
        m = self.mlp_scale.to(x0.dtype) * self.mlp(rms_norm(l1) * s, lora.get("mlp"))
        r, P = self.lane_r.to(x0.dtype), self.lane_p.to(x0.dtype)
        return r[0] * l0 + P[0, 0] * a + P[1, 0] * m, r[1] * l1 + P[0, 1] * a + P[1, 1] * m

def bigram_rows(ids, rows, doc_mask=False):
    """Hash of (previous, current) token; position 0 has no previous token and uses the last row, as does a BOS
    under doc_mask (its previous token is another document's)."""
    h = torch.bitwise_xor(36313 * ids[:, 1:], 27191 * ids[:, :-1]) % (rows - 1)
    if doc_mask:
        h = torch.where(ids[:, 1:] == BOS_ID, rows - 1, h)
    return torch.cat([torch.full_like(ids[:, :1], rows - 1), h], dim=1)

class BigramHash(nn.Module):
    def __init__(self, rows, dim, d):
        super().__init__()
        self.rows = rows
        self.embed = nn.Embedding(rows, dim)
        self.proj = CastedLinear(dim, d)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids, doc_mask=False):
        return self.proj(self.embed(bigram_rows(ids, self.rows, doc_mask))) * self.scale

class SmearGate(nn.Module):
    """channel (the seeds, after the norm): x_t <- (1 - s) x_t + s x_{t-1}, s = sigmoid(gate) per channel.
    input (the record, before the norm): x_t <- x_t + lambda sigmoid(w . x_t[:window]) x_{t-1}, not at a BOS, so
    one document's last token never leaks into the next; w and lambda start at zero."""

    def __init__(self, d, mode, window):
        super().__init__()
        self.mode = mode
        if mode == "channel":
            self.gate = nn.Parameter(torch.zeros(d))
        else:
            self.gate_w, self.lam = nn.Parameter(torch.zeros(window)), nn.Parameter(torch.zeros(()))

    def forward(self, x, ids):
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.mode == "channel":
            s = torch.sigmoid(self.gate).to(x.dtype)
            return (1 - s) * x + s * prev
        g = torch.sigmoid(x[..., :self.gate_w.numel()] @ self.gate_w.to(x.dtype)) * (ids != BOS_ID)
        return x + self.lam.to(x.dtype) * g.to(x.dtype)[..., None] * prev

class ValueEmbedding(nn.Module):
    def __init__(self, vocab, dim, kv_dim, n_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = CastedLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.Parameter(torch.ones(n_layers))

    def forward(self, ids):
        return self.proj(self.embed(ids)) * self.scale

def rope_scaled(c):
    return c["ROPE_REF_LEN"] > 0 and c["TRAIN_SEQ_LEN"] > c["ROPE_REF_LEN"]

def rope_base(c):
    """The seeds' base: above the reference length, ROPE_BASE * (T / ROPE_REF_LEN)^(d / (d - 2)). They apply it at
    each forward's length T; we fix T = TRAIN_SEQ_LEN, the same at the record config (train and eval windows of
    2048: base 22,082) and one set of frequencies for shorter forwards too (TTT chunks, calibration sampling)."""
    d = c["ROPE_DIMS"]
    return c["ROPE_BASE"] * (c["TRAIN_SEQ_LEN"] / c["ROPE_REF_LEN"]) ** (d / (d - 2)) if rope_scaled(c) else \
        c["ROPE_BASE"]

class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        V, d, L = c["VOCAB_SIZE"], c["MODEL_DIM"], c["NUM_LAYERS"]
        self.softcap, self.rope_dims = c["LOGIT_SOFTCAP"], c["ROPE_DIMS"]
        if c["LOGIT_SOFTCAP_ASYM"]:  # (sp, sn): AdamW's scalar group, fp32 in the artifact, trained by global TTT
            self.cap_pos, self.cap_neg = self.softcap = tuple(nn.Parameter(torch.tensor(self.softcap)) for _ in "pn")
        self.tok_emb = nn.Embedding(V, d)
        self.bigram = BigramHash(c["BIGRAM_VOCAB_SIZE"], c["BIGRAM_DIM"], d) if c["BIGRAM_VOCAB_SIZE"] else None
        self.smear = SmearGate(d, c["SMEAR_MODE"], c["GATE_WINDOW"]) if c["SMEAR_ENABLED"] else None
        self.blocks = nn.ModuleList(Block(c, i) for i in range(L))
        self.slots_off, self.slots_on, self.doc_mask = slot_layers(c, False), slot_layers(c, True), c["DOC_MASK"]
        self.seq_len = c["TRAIN_SEQ_LEN"]
        # U-Net over slots: the first half push their outputs, the next ones pop them in reverse order; weights for
        # the looped sequence's pairs (the plain one uses the first of them)
        S = len(self.slots_on)
        n_skip = min(S // 2, S - S // 2) if c["UNET_SKIPS"] else 0
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d)) if n_skip else None
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if n_skip and c["SKIP_GATED"] else None
        kv_dim = c["NUM_KV_HEADS"] * (d // c["NUM_HEADS"])
        self.ve_layers = list(c["VE_LAYERS"]) if c["VE_ENABLED"] else []
        self.ve = ValueEmbedding(V, c["VE_DIM"], kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.lm_head = None if c["TIE_EMBEDDINGS"] else CastedLinear(d, V)
        half = self.rope_dims // 2
        self.register_buffer("inv_freq", 1.0 / rope_base(c) ** (torch.arange(half) / max(half, 1)), persistent=False)
        self._init_weights(c["TIED_EMBED_INIT_STD"])

    @torch.no_grad()
    def _init_weights(self, emb_std):
        nn.init.normal_(self.tok_emb.weight, std=emb_std)
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if name.endswith(("attn.proj", "mlp.proj")) or name == "lm_head":
                nn.init.zeros_(m.weight)  # output projections start at zero: each block begins as identity
            elif min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)
        # bigram and value-embedding projections as in the seeds, whose declared zero-init the general init
        # overwrites: orthogonal, scaled 1/sqrt(2L) (a zero bigram table with a zero projection would never learn)
        for m in (self.bigram, self.ve):
            if m is not None:
                m.proj.weight.mul_(1.0 / math.sqrt(2 * len(self.blocks)))
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
        if self.ve is not None:
            nn.init.normal_(self.ve.embed.weight, std=0.01)

    @property
    def slots(self):
        """The physical layer of each slot of this forward: looped once LOOPING is on (always in the evals)."""
        return self.slots_on if LOOPING else self.slots_off

    def head_weight(self):
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward_hidden(self, ids, lora=None, doc_mask=None, cu=None):
        """Final hidden states (after the final norm), [B, T, d]. lora: TTT's adapters (TTTAdapters) or None.
        doc_mask (default DOC_MASK): positions attend only to their own document (a BOS starts one) and RoPE counts
        from its start; cu: the training loader's segments of the flattened ids (TrainLoader.next_batch)."""
        doc_mask = self.doc_mask if doc_mask is None else doc_mask
        docs = doc_segments(ids, cu, self.seq_len if cu is not None else ids.size(1)) if doc_mask else None
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, doc_mask).to(x.dtype)
        smear = self.smear.mode if self.smear is not None else None
        x = rms_norm(self.smear(x, ids) if smear == "input" else x)
        x = self.smear(x, ids) if smear == "channel" else x
        x0 = x
        t = torch.arange(ids.size(1), device=ids.device) if docs is None else docs[2].view_as(ids)
        freqs = (t.float()[..., None] * self.inv_freq)[..., None, :]
        cos, sin = freqs.cos(), freqs.sin()
        ve = self.ve(ids) if self.ve is not None else None
        slots, skips, lanes = self.slots, [], None
        n_enc = len(slots) // 2 if self.skip_weights is not None else 0
        for i, layer in enumerate(slots):
            k = i - n_enc
            if 0 <= k < min(n_enc, len(slots) - n_enc):  # a skip joins the stream (lane 0 in the parallel layers)
                s = self.skip_weights[k].to(x0.dtype) * skips.pop()
                gate = None if self.skip_gates is None else torch.sigmoid(self.skip_gates[k]).to(x0.dtype)
                joined = lanes[0] if lanes else x
                joined = joined + s if gate is None else torch.lerp(joined, s, gate)
                if lanes or self.blocks[layer].parallel:  # lane 1 starts as the stream before the skip
                    lanes = (joined, lanes[1] if lanes else x)
                else:
                    x = joined
            ve_i = (ve * self.ve.layer_scales[self.ve_layers.index(layer)].to(ve.dtype) if layer in self.ve_layers
                    else None)
            out = self.blocks[layer](lanes or x, x0, cos, sin, ve_i, docs, lora and lora.slot(i))
            x, lanes = (out, None) if isinstance(out, torch.Tensor) else (x, out)
            if i < n_enc:
                skips.append(lanes[0] if lanes else x)
        return rms_norm((lanes[0] + lanes[1]) / 2 if lanes else x)

    def logits(self, h, bias=None, lora=None):
        if lora is not None:
            bias = lora_delta(h, lora) if bias is None else bias + lora_delta(h, lora)
        return softcap_logits(h, self.head_weight().to(h.dtype), self.softcap, bias)

    def forward(self, ids, targets, cu=None):
        z = self.logits(self.forward_hidden(ids, cu=cu)).float()
        return F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1))

def build_model(config, device, train=True):
    """The model in its training dtypes: embedding tables bf16 on CUDA (as the seeds), everything else fp32. The
    eval model (train=False) keeps fp32 tables: global TTT's SGD steps (~1e-5) are below half a bf16 step at the
    tables' scale, and the dequantised int8 rows are not rounded again; autocast still runs the matmuls in bf16."""
    model = GPT(config).to(device)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and train:
            m.to(table_dtype(device))
    return model

def table_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- optimizer

NS_COEFFS = {"quintic": [(3.4445, -4.7750, 2.0315)],
             "polar": [(8.156554524902461, -22.48329292557795, 15.878769915207462),  # Polar-Express, one per step
                       (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                       (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                       (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                       (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]}

def newton_schulz(g, steps, kind="quintic"):
    """Newton-Schulz iteration X <- aX + (bA + cA^2)X, A = XX^T, in bf16: pushes every singular value of each matrix
    in g [..., r, c] towards 1, i.e. approximately orthogonalises it. quintic: one (a, b, c); polar: Polar-Express's
    per-step triples (the last one repeats past 5 steps)."""
    coeffs = NS_COEFFS[kind]
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x

class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz. Matrices of one shape form a bank orthogonalised as one batch;
    each rank takes its share of every bank and one all-gather of the shares hands the updates to all ranks."""

    def __init__(self, params, lr, momentum, backend_steps, weight_decay, rank=0, world=1, ns="quintic",
                 row_norm=False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                            weight_decay=weight_decay))
        self.rank, self.world, self.ns, self.row_norm = rank, world, ns, row_norm

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            banks = {}
            for p in group["params"]:
                banks.setdefault(tuple(p.shape), []).append(p)
            shares = []
            for ps in banks.values():
                share = -(-len(ps) // self.world)  # a bank padded to share * world matrices
                mine = ps[self.rank * share:(self.rank + 1) * share]
                u = torch.zeros((share,) + ps[0].shape, dtype=torch.bfloat16 if ps[0].is_cuda else torch.float32,
                                device=ps[0].device)
                if mine:
                    g = torch.stack([self._nesterov(p, group["momentum"]) for p in mine])
                    if self.row_norm:  # MuonEq-R: every row of the update at unit norm before Newton-Schulz
                        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                    rows, cols = g.shape[-2:]
                    u[:len(mine)] = newton_schulz(g, group["backend_steps"], self.ns) * max(1.0, rows / cols) ** 0.5
                shares.append(u)
            flat = torch.cat([u.view(-1) for u in shares])
            if self.world > 1:
                full = flat.new_empty(self.world * flat.numel())
                dist.all_gather_into_tensor(full, flat)
                flat = full
            per_rank, updates, at = flat.view(self.world, -1), [], 0
            for ps, u in zip(banks.values(), shares):  # rank r's share holds matrices r*share ... of the bank
                updates.append(per_rank[:, at:at + u.numel()].reshape((-1,) + u.shape[1:])[:len(ps)])
                at += u.numel()
            lr, wd = group["lr"], group["weight_decay"]
            for ps, u in zip(banks.values(), updates):
                for p, upd in zip(ps, u):
                    p.mul_(1 - lr * wd)
                    p.add_(upd.to(p.dtype), alpha=-lr)

    def _nesterov(self, p, momentum):
        state = self.state[p]
        if "buf" not in state:
            state["buf"] = torch.zeros_like(p.grad)
        buf = state["buf"].mul_(momentum).add_(p.grad)
        return p.grad.add(buf, alpha=momentum)

def build_optimizers(model, a, rank, world):
    """Muon: the 2-D block matrices plus the bigram and value-embedding projections. AdamW: embedding tables,
    the untied head, and every vector and scalar (gains, scales, mixes, skip weights, gates)."""
    matrices = {id(m.weight) for n, m in model.named_modules() if isinstance(m, CastedLinear) and n != "lm_head"}
    tables = {id(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    groups = {"matrix": [], "table": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        kind = ("head" if name == "lm_head.weight" else "matrix" if id(p) in matrices
                else "table" if id(p) in tables else "scalar")
        groups[kind].append(p)
    wd = lambda v: a.adam_wd if v == -1 else v
    adam_groups = [dict(params=groups["table"], lr=a.tied_embed_lr, weight_decay=wd(a.embed_wd)),
                   dict(params=groups["scalar"], lr=a.scalar_lr, weight_decay=wd(a.scalar_wd)),
                   dict(params=groups["head"], lr=a.head_lr)]
    adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=(a.beta1, a.beta2), eps=a.adam_eps,
                             weight_decay=a.adam_wd, fused=next(model.parameters()).is_cuda)
    muon = Muon(groups["matrix"], a.matrix_lr, a.muon_momentum, a.muon_backend_steps, a.muon_wd, rank, world,
                a.muon_ns, a.muon_row_norm)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return adam, muon

def train_fraction(step, elapsed_ms, a, budget_ms):
    """How far training is: of the time budget, or of ITERATIONS without a cap."""
    return elapsed_ms / budget_ms if budget_ms > 0 else step / a.iterations

def lr_multiplier(step, elapsed_ms, a, budget_ms):
    """1 until the warm-down, then linear to 0, floored at MIN_LR. WARMDOWN_FRAC > 0: over that fraction of the run
    (train_fraction), as the later records do. Else over the last WARMDOWN_ITERS steps before ITERATIONS or, with a
    time cap, over the last WARMDOWN_ITERS mean step times before the cap, whichever comes first."""
    if a.warmdown_frac > 0:
        left = 1 - train_fraction(step, elapsed_ms, a, budget_ms)
        return max(a.min_lr, min(1.0, max(left, 0.0) / a.warmdown_frac))
    if a.warmdown_iters == 0:
        return 1.0
    by_steps = min(1.0, max(a.iterations - step, 0) / a.warmdown_iters)
    if budget_ms > 0:
        warmdown_ms = a.warmdown_iters * elapsed_ms / max(step, 1)
        by_steps = min(by_steps, max(budget_ms - elapsed_ms, 0.0) / warmdown_ms if warmdown_ms else 1.0)
    return max(a.min_lr, by_steps)

class WeightAverage:
    """fp32 EMA (decay d) or SWA (running mean of the snapshots) of the parameters, updated with foreach ops."""

    def __init__(self, params, decay=None):
        self.params, self.decay, self.count = list(params), decay, 0
        self.avg = [p.detach().float().clone() for p in self.params]  # decay None: SWA

    @torch.no_grad()
    def update(self):
        self.count += 1  # SWA: lerp by 1/count keeps the plain mean; the first snapshot replaces the initial copy
        torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params],
                             1.0 - self.decay if self.decay is not None else 1.0 / self.count)

    @torch.no_grad()
    def apply(self):
        for p, v in zip(self.params, self.avg):
            p.copy_(v)


# ----------------------------------------------------------------------------- training

class Ctx:
    """Process-group facts plus the run log (rank 0 writes logs/<RUN_ID>.txt as lines happen)."""

    def __init__(self, rank, world, local_rank, device):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        # bf16 autocast and torch.compile on CUDA (COMPILE=1); tests turn them on for the CPU
        self.main, self.bf16, self.compile = rank == 0, device.type == "cuda", device.type == "cuda"
        self.log_file, self.graphs, self.warned = None, 0, {}  # log: opened by open_run() on rank 0
        self.bytes_ratio = None  # rule bytes / val byte-sidecar bytes, set by run() when the data has sidecars
        # the evaluation's budget (EVAL_BUDGET_SECONDS, set by run()), the clock its deadline is read on, and what
        # the adaptive evals report for submission.json
        self.budget, self.deadline, self.clock, self.notes = EVAL_BUDGET_SECONDS, None, time.perf_counter, {}

    def log(self, msg):
        if self.main:
            print(msg, flush=True)
            if self.log_file:
                print(msg, file=self.log_file, flush=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name):
        """Logs the phase's peak memory against the device's; running out of it is one error line naming the phase
        and its fix. CUDA: allocated bytes, peak reset at the start; CPU: the process's high-water RSS so far."""
        cuda = self.device.type == "cuda"
        if cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        peak = lambda: (torch.cuda.max_memory_allocated(self.device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
        total = (torch.cuda.get_device_properties(self.device).total_memory if cuda
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2 ** 30
        try:
            yield
        except torch.OutOfMemoryError:
            raise ConfigError(f"{name} ran out of device memory (peak {peak():.1f} of {total:.1f} GiB); fix: "
                              f"{MEMORY_FIX[name]}") from None
        self.log(f"memory: {name} peak {peak():.2f} GiB of {total:.1f} GiB ({'allocated' if cuda else 'RSS'})")

    def all_reduce(self, t, op=None):
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def compiles(self, phase):
        """Logs the graphs torch.compile built since the last call (dynamo's counters): a recompile storm shows."""
        from torch._dynamo.utils import counters, guard_failures
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        n = counters["stats"]["unique_graphs"]
        self.log(f"compile: {phase} graphs:{n - self.graphs} total:{n}")
        self.graphs = n
        for code, (name, need) in COMPILED.items():  # one line per function past its variants, once per new graph
            k, limit = len(_debug_get_cache_entry_list(code)), torch._dynamo.config.recompile_limit
            if k > max(need, self.warned.get(code, 0)):
                self.warned[code], why = k, (guard_failures.get(code) or ["unknown"])[-1]
                self.log(f"warning: compile: {name} holds {k} graphs, more than the {need} its variants need; last "
                         f"recompile: {esc(why)}" + (f"; at the recompile limit {limit}: other shapes run eager"
                                                     if k >= limit else ""))

    def mark(self):
        """A point in the device's work, for seconds() without waiting on it now: a CUDA event, else the clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, spans):
        """Total seconds of [(start mark, end mark)]; waits for the device once."""
        if self.device.type != "cuda":
            return sum(b - a for a, b in spans)
        self.sync()
        return sum(a.elapsed_time(b) for a, b in spans) / 1000

COMPILED = {}  # code object -> (name, the graphs its declared variants need): Ctx.compiles warns past them
MEMORY_FIX = {"training": "raise GRAD_ACCUM_STEPS (same tokens per step, fewer at once), or COMPILE=1",
              "export": "fewer GPTQ_CALIB_BATCHES", "eval": "a smaller EVAL_BATCH or SLOT_BATCH",
              "TTT": "a smaller TTT_BATCH_SIZE or TTT_EVAL_SEQ_LEN"}

def compile_fn(fn, name, variants, **kw):
    """torch.compile(fn, **kw) declared to need `variants` graphs (more, for a function compiled again): the
    recompile limit stays above them, so a recompile past them is logged by Ctx.compiles before one runs eager."""
    code = (fn.forward if isinstance(fn, nn.Module) else fn).__code__
    COMPILED[code] = (name, COMPILED.get(code, (name, 0))[1] + variants)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * COMPILED[code][1])
    return torch.compile(fn, **kw)

def train(a, ctx, model, train_files, val):
    """Runs the training loop; returns (steps, train_ms, loader). Leaves the final weights (SWA, EMA or raw) in
    model; the loader is positioned after the last training batch, for GPTQ_CALIB=train."""
    global QAT, LOOPING
    LOOPING = False  # the loop (NUM_LOOPS) switches on at ENABLE_LOOPING_AT
    loader = TrainLoader(train_files, ctx.rank, ctx.world, ctx.device, a.vocab_size)
    # flash-attn kernels may not trace whole, so fullgraph is demanded only of the SDPA path
    variants = [(q, lp, n) for n in a.seq_lens for lp in [False, True][:1 + (a.num_loops > 0)]  # (QAT, LOOPING, len)
                for q in [False, True][:1 + (a.late_qat_threshold > 0)]]
    compiled = compile_fn(model, "GPT.forward (training)", len(variants), dynamic=False, fullgraph=ATTN_FN is None) \
        if ctx.compile and a.compile else model
    net = compiled
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(compiled, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                  broadcast_buffers=False, gradient_as_bucket_view=True)
    adam, muon = build_optimizers(model, a, ctx.rank, ctx.world)
    local_tokens = a.train_batch_tokens // (ctx.world * a.grad_accum_steps)
    params = list(model.parameters())

    def step_fn(step, mul):
        for opt in (adam, muon):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mul
        frac = min(step / a.muon_momentum_warmup_steps, 1.0) if a.muon_momentum_warmup_steps else 1.0
        muon.param_groups[0]["momentum"] = (1 - frac) * a.muon_momentum_warmup_start + frac * a.muon_momentum
        total = torch.zeros((), device=ctx.device)
        for micro in range(a.grad_accum_steps):
            x, y, cu = loader.next_batch(local_tokens, seq, a.doc_mask)
            no_sync = ctx.world > 1 and micro < a.grad_accum_steps - 1
            with (net.no_sync() if no_sync else contextlib.nullcontext()), ctx.autocast():
                loss = net(x, y, cu)
            (loss / a.grad_accum_steps).backward()
            total += loss.detach()
        if a.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip_norm, foreach=True)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        return total / a.grad_accum_steps

    if a.warmup_steps:
        t = time.perf_counter()
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        saved_opt = [copy.deepcopy(opt.state_dict()) for opt in (adam, muon)]
        # the last steps compile every variant the run can switch to (loop on, late QAT on, both): no compile later
        for i in range(a.warmup_steps):
            QAT, LOOPING, seq = variants[max(0, i + len(variants) - a.warmup_steps)]
            step_fn(0, 1.0)
        QAT = LOOPING = False
        model.load_state_dict(saved)
        for opt, st in zip((adam, muon), saved_opt):
            opt.load_state_dict(st)
        loader = TrainLoader(train_files, ctx.rank, ctx.world, ctx.device, a.vocab_size)
        ctx.sync()
        ctx.log(f"warmup: {a.warmup_steps} steps in {time.perf_counter() - t:.1f}s; weights and optimizer restored")

    reserve = a.gptq_reserve_seconds if a.gptq_calib == "train" else 0.0
    budget_ms = 1000.0 * (a.max_wallclock_seconds - reserve) if a.max_wallclock_seconds > 0 else 0.0
    ctx.log(f"train_budget: {budget_ms / 1000:.1f}s of MAX_WALLCLOCK_SECONDS={a.max_wallclock_seconds:g} "
            f"(GPTQ calibration reserve {reserve:g}s)")
    ema = WeightAverage(params, a.ema_decay) if a.ema_enabled else None
    swa = WeightAverage(params) if a.swa_enabled else None
    # The host queues steps without waiting on the GPU except at "clock" steps (log steps, and with a time cap
    # checkpoints at half the estimated remaining steps), where the ranks agree on the elapsed time. Between
    # clocks, time is extrapolated from the last one, so every rank takes the same lr, QAT and stop decisions.
    step, train_ms, next_clock, clock = 0, 0.0, 1, (0, 0.0, 0.0)  # clock: step, elapsed ms, mean ms/step
    seq, changed = (a.seq_schedule or [(a.train_seq_len,)])[0][0], -a.seq_change_warmup_steps  # length, step it began
    ctx.sync()
    t0 = time.perf_counter()
    while step < a.iterations:
        if a.val_loss_every and step and step % a.val_loss_every == 0:
            ctx.sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            vl, vb, _ = evaluate(ctx, model, val, a.eval_seq_len, a.eval_seq_len, a.eval_batch)[0]
            ctx.log(f"step:{step}/{a.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{train_ms:.0f}ms "
                    f"step_avg:{train_ms / step:.2f}ms")
            t0 = time.perf_counter()
        now = clock[1] + (step - clock[0]) * clock[2]
        mul = lr_multiplier(step, now, a, budget_ms)
        if (n := next((n for n, f in a.seq_schedule if train_fraction(step, now, a, budget_ms) < f), seq)) != seq:
            seq, changed = n, step  # step_fn reads seq; the lr ramps up anew (late QAT and SWA do not see the ramp)
            ctx.log(f"seq_len: {n} from step {step} (lr warm-up over {a.seq_change_warmup_steps} steps)")
        if a.num_loops and not LOOPING and train_fraction(step, now, a, budget_ms) >= a.enable_looping_at:
            LOOPING = True
            ctx.log(f"looping: layers {a.loop_start}..{a.loop_end} run {a.num_loops} more times from step {step} "
                    f"({len(model.slots)} slots)")
        if a.late_qat_threshold > 0 and not QAT and mul < a.late_qat_threshold:
            QAT = True
            ctx.log(f"late_qat: int6 fake quantisation on at step {step} (lr multiplier {mul:.3f})")
        loss = step_fn(step, mul * min(1.0, (step - changed + 1) / max(a.seq_change_warmup_steps, 1)))
        step += 1
        if ema:
            ema.update()
        if swa and mul < a.swa_lr_threshold and step % a.swa_every == 0:
            swa.update()
        logging = step % a.train_log_every == 0 or step <= 5
        if not (logging or (budget_ms and step >= next_clock)):
            continue
        ctx.sync()
        elapsed = torch.tensor(train_ms + 1000 * (time.perf_counter() - t0), dtype=torch.float64, device=ctx.device)
        elapsed = ctx.all_reduce(elapsed, dist.ReduceOp.MAX).item()
        recent = (elapsed - clock[1]) / (step - clock[0])  # steps since the last clock: late-QAT steps are slower
        clock = (step, elapsed, elapsed / step)
        if logging:
            loss = (ctx.all_reduce(loss.clone()) / ctx.world).item()
            if not math.isfinite(loss):
                raise ConfigError(f"training loss is {loss} at step {step}; fix: lower MATRIX_LR / SCALAR_LR / "
                                  "TIED_EMBED_LR, keep GRAD_CLIP_NORM > 0, or check the train shards")
            ctx.log(f"step:{step}/{a.iterations} train_loss:{loss:.4f} train_time:{clock[1]:.0f}ms "
                    f"step_avg:{clock[2]:.2f}ms")
        if budget_ms and elapsed + recent > budget_ms:
            break  # another step as long as the recent ones would end past the cap
        next_clock = step + max(1, int((budget_ms - elapsed) / recent / 2)) if budget_ms else a.iterations
    ctx.sync()
    train_ms += 1000 * (time.perf_counter() - t0)
    QAT, LOOPING = False, True  # the exported model loops
    tokens = step * a.train_batch_tokens
    ctx.log(f"train_done: steps:{step} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms "
            f"tokens_per_s:{tokens / max(train_ms, 1e-9) * 1000:.0f} per_rank:"
            f"{tokens / ctx.world / max(train_ms, 1e-9) * 1000:.0f}" + (f" cap:{budget_ms:.0f}ms" if budget_ms else ""))
    ctx.compiles("train (warm-up and timed steps)")
    if ctx.device.type == "cuda":
        ctx.log(f"peak_memory: allocated:{torch.cuda.max_memory_allocated() / 2**30:.2f}GiB "
                f"reserved:{torch.cuda.max_memory_reserved() / 2**30:.2f}GiB")
    if swa and swa.count:
        swa.apply()
        ctx.log(f"final_weights: swa (mean of {swa.count} snapshots every {a.swa_every} steps; EMA not applied)")
    elif ema:
        ema.apply()
        why = " (SWA_ENABLED=1 but no snapshot was taken)" if swa else ""
        ctx.log(f"final_weights: ema (decay {a.ema_decay}){why}")
    else:
        ctx.log("final_weights: raw (EMA_ENABLED=0, SWA_ENABLED=0)")
    return step, train_ms, loader


# ----------------------------------------------------------------------------- export: GPTQ

CLIP_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
LQER_GROUP = 64  # columns of B per int4 scale

def quant_kind(name, t, c):
    """GPTQ at ATTN_BITS / MLP_BITS for block matrices, and at EMBED_BITS < 8 for the tied embedding; int8 rows for
    gates (any size) and other large tables; fp16 for small matrices, fp32 for control vectors and scalars."""
    if t.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight"):
        return f"int{c['MLP_BITS'] if '.mlp.' in name else c['ATTN_BITS']}"
    if t.ndim == 2 and name == "tok_emb.weight" and c["EMBED_BITS"] < 8:
        return f"int{c['EMBED_BITS']}"
    if t.ndim == 2 and (name.endswith(("gate_w", "skip_gates")) or name.endswith(".weight") and t.numel() > 65536):
        return "int8"
    return "fp16" if t.ndim == 2 and name.endswith(".weight") else "fp32"

def quantize_rows(w, qmax, amax=None):
    """Round-to-nearest per-row quantisation: int8 values in [-qmax, qmax] and fp16 scales (row max / qmax)."""
    amax = w.abs().amax(dim=1) if amax is None else amax
    scale = (amax.float() / qmax).clamp_min(1e-7).half()
    q = torch.clamp(torch.round(w.float() / scale.float()[:, None]), -qmax, qmax)
    return q.to(torch.int8), scale

def _gptq_columns(w, U, s, block, qmax):
    """GPTQ sweep over columns: quantise one column, spread its error over the later ones via the inverse
    Hessian's Cholesky factor U (lazy block updates). Rows are independent, so row-stacked variants share U."""
    w, q, n = w.clone(), torch.zeros_like(w), w.size(1)
    for i in range(0, n, block):
        j2 = min(i + block, n)
        wb, Ub = w[:, i:j2].clone(), U[i:j2, i:j2]
        err = torch.zeros_like(wb)
        for j in range(j2 - i):
            qc = torch.clamp(torch.round(wb[:, j] / s[:, i + j]), -qmax[i + j], qmax[i + j])  # per column: AWQ-lite
            q[:, i + j] = qc
            e = (wb[:, j] - qc * s[:, i + j]) / Ub[j, j]
            wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            err[:, j] = e
        w[:, j2:] -= err @ U[i:j2, j2:]
    return q

def gptq_quantize(w, H, block=128, damp=0.01, qmax=31, sigmas=0.0, awq=None, awq_qmax=127):
    """Full-Hessian GPTQ of w [out, in] with H = X^T X of its inputs. Columns go in order of decreasing H
    diagonal; each row keeps the clip percentile whose result has the least output error (dW H dW^T), or with
    sigmas > 0 has the scale sigmas * std(row) / qmax (SPEC 10)."""
    w, H = w.float().clone(), H.float().clone()
    n = w.size(1)
    dead = H.diag() == 0
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    H += damp * H.diag().mean() * torch.eye(n, device=H.device)
    perm = torch.argsort(H.diag(), descending=True)
    wp, Hp = w[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    a = wp.abs()
    clips = [sigmas * wp.std(dim=1)] if sigmas else [a.amax(1) if p >= 1 else torch.quantile(a, p, dim=1)
                                                     for p in CLIP_PERCENTILES]
    scales = torch.stack([quantize_rows(wp, qmax, m)[1] for m in clips])  # [P, out]
    keep = torch.zeros(n, dtype=torch.bool, device=w.device) if awq is None else awq.to(w.device)[perm]
    sa, Q = quantize_rows(wp, awq_qmax, (a * keep).amax(1))[1], [awq_qmax if k else qmax for k in keep.tolist()]
    S = torch.where(keep, sa.float()[:, None], scales.float()[..., None])  # [P, out, n]: AWQ columns, own row scale
    q = _gptq_columns(wp.repeat(len(clips), 1), U, S.flatten(0, 1), block, Q).view(len(clips), *wp.shape)
    d = wp[None] - q * S
    best = ((d @ Hp) * d).sum(-1).argmin(0)  # [out]
    rows = torch.arange(w.size(0), device=w.device)
    return (q[best, rows][:, torch.argsort(perm)].to(torch.int8), scales[best, rows], sa)[:2 + (awq is not None)]

@torch.no_grad()
def collect_hessians(ctx, model, batches):
    """H = X^T X of the inputs of every GPTQ matrix over the calibration batches, summed over ranks; for a tied
    embedding (the head) its inputs are the final-norm outputs."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, CastedLinear) and m.quantized}
    H = {n: torch.zeros(m.in_features, m.in_features, device=ctx.device) for n, m in mods.items()}
    tied = model.lm_head is None
    if tied:
        H["tok_emb"] = torch.zeros(model.tok_emb.embedding_dim, model.tok_emb.embedding_dim, device=ctx.device)

    def add(name, x):
        x = x.detach().reshape(-1, x.size(-1)).float()
        H[name].addmm_(x.T, x)

    handles = [m.register_forward_hook(lambda m, inp, out, n=n: add(n, inp[0])) for n, m in mods.items()]
    for x in batches:
        with ctx.autocast():
            h = model.forward_hidden(x)
        if tied:
            add("tok_emb", h)
    for h in handles:
        h.remove()
    return {n + ".weight": ctx.all_reduce(t) for n, t in H.items()}

@torch.no_grad()
def self_generate(ctx, model, n_seqs, seq_len, temperature, seed):
    """Calibration text sampled from the trained model itself: no training data is read after the cap."""
    gen = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
    seq = torch.full((n_seqs, 1), BOS_ID, dtype=torch.long, device=ctx.device)
    for _ in range(seq_len - 1):
        with ctx.autocast():
            h = model.forward_hidden(seq)[:, -1]
        p = torch.softmax(model.logits(h).float() / temperature, dim=-1)
        seq = torch.cat([seq, torch.multinomial(p, 1, generator=gen)], dim=1)
    return seq

def quantize_state(state, hessians, a, log=lambda msg: None):
    """Returns [(key, kind, np.ndarray)] for the artifact and, per GPTQ'd tensor, its H diagonal (pruning cost).
    With LQER_RANK, the LQER_TOP_K GPTQ'd matrices of largest ||W - W_q||_F are candidates for the low-rank factors
    of their error E; a factor is kept only where it lowers the activation-weighted error on the calibration
    inputs, ||X (E - AB)^T||^2 = tr((E - AB) H (E - AB)^T) < tr(E H E^T), H = X^T X (each logged)."""
    c, tensors, hdiag, err, G = a.arch(), [], {}, {}, a.awq_group_size
    uses = lambda n: slot_layers(c, True).count(int(n.split(".")[1])) if n.startswith("blocks.") else 1  # H sums all
    sal = {n: torch.bincount(torch.arange(len(H)) // G, ((H.diag() / uses(n)).sqrt() * state[n].abs().mean(0)).cpu())
           for n, H in hessians.items() if a.awq_top_k and (n != "tok_emb.weight" or c["EMBED_BITS"] < 8)}
    top = sorted(((v, n, g) for n, s in sal.items() for g, v in enumerate(s.tolist())), reverse=True)[:a.awq_top_k]
    awq = {n: torch.isin(torch.arange(len(hessians[n])) // G, torch.tensor([g for _, m, g in top if m == n]))
           for _, n, _ in top}  # AWQ-lite (SPEC 11): top groups of rms(x_j) mean_i |W_ij|, a column mask per matrix
    if top:
        log("awq: " + " ".join(f"{n}[{g * G}:{g * G + G}] (saliency {v:.4g})" for v, n, g in top))
    for name, t in state.items():
        kind = quant_kind(name, t, c)
        if kind in INT_KINDS:
            qmax = 2 ** (int(kind[3:]) - 1) - 1
            if name in hessians and (name != "tok_emb.weight" or kind != "int8"):  # EMBED_BITS=8: int8 rows
                group = "embed" if name == "tok_emb.weight" else "mlp" if ".mlp." in name else "attn"
                q, s, *sa = gptq_quantize(t, hessians[name], a.gptq_block, a.gptq_damp, qmax,
                                          getattr(a, f"{group}_clip_sigmas"), awq.get(name), 2 ** (a.awq_bits - 1) - 1)
                hdiag[name] = hessians[name].diag().float().cpu()
            else:
                q, s = quantize_rows(t, qmax)
            if name in hdiag:  # LQER ranks GPTQ'd matrices only (not int8 tables or gates)
                sc = torch.where(awq[name].to(s.device), sa[0][:, None], s[:, None]) if name in awq else s[:, None]
                err[name] = (t.float() - q.float() * sc.float()).norm().item()
            tensors += [(name + "#q", kind, q.cpu().numpy()), (name + "#scale", "fp16", s.cpu().numpy())]
            tensors += [(name + "#awqm", "int8", awq[name].numpy().astype(np.int8)),  # AWQ-lite: columns, row scale
                        (name + "#awqs", "fp16", sa[0].cpu().numpy())] if name in awq else []
        else:
            tensors.append((name, kind, t.detach().float().cpu().numpy().astype(np.float16 if kind == "fp16"
                                                                                else np.float32)))
    arrays = {k: x for k, _, x in tensors}
    for name in sorted(err, key=err.get, reverse=True)[:a.lqer_top_k] if a.lqer_rank else []:
        E = state[name].float().cpu() - torch.from_numpy(dequantize_one(arrays, name))
        factors = lqer_factors(name, E, a.lqer_rank)
        R = E - torch.from_numpy(dequantize_one({**arrays, **{k: x for k, _, x in factors}}, name) -
                                 dequantize_one(arrays, name))
        H = hessians[name].double().cpu()
        before, after = ((M.double() @ H * M.double()).sum().item() for M in (E, R))
        keep = after < before
        log(f"lqer: {name} {'kept' if keep else 'dropped'} activation-weighted error {before:.4g} -> {after:.4g}")
        tensors += factors if keep else []
    return tensors, hdiag

def lqer_factors(name, E, rank):
    """The rank-r SVD of the quantisation error E = U S V^T as A = U S, int2 in [-2, 1] with one scale |A|max / 1.5,
    and B = V^T, int4 in [-8, 7] with a scale absmax / 7.5 per 64 columns (SPEC 10); dequantize adds A B."""
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :rank] * S[:rank], F.pad(Vh[:rank], (0, -E.size(1) % LQER_GROUP)).unflatten(1, (-1, LQER_GROUP))
    sa = (A.abs().amax() / 1.5).clamp_min(1e-7).half().view(1)
    sb = (B.abs().amax(-1) / 7.5).clamp_min(1e-7).half()
    qa = torch.clamp(torch.round(A / sa.float()), -2, 1).to(torch.int8)
    qb = torch.clamp(torch.round(B / sb.float()[..., None]), -8, 7).to(torch.int8).flatten(1)[:, :E.size(1)]
    return [(name + "#lqa", "int2", qa.numpy()), (name + "#lqb", "int4", qb.numpy()),
            (name + "#lqas", "fp16", sa.numpy()), (name + "#lqbs", "fp16", sb.numpy())]

def dequantize_one(arrays, name):
    """float32 W_q (+ A B where LQER factors are stored) of one quantised tensor."""
    w = arrays[name + "#q"].astype(np.float32) * arrays[name + "#scale"].astype(np.float32)[:, None]
    if (m := arrays.get(name + "#awqm")) is not None:  # AWQ-lite: the masked columns have their own row scale
        w[:, m != 0] = arrays[name + "#q"][:, m != 0] * arrays[name + "#awqs"].astype(np.float32)[:, None]
    if name + "#lqa" in arrays:
        qb, sb = arrays[name + "#lqb"].astype(np.float32), arrays[name + "#lqbs"].astype(np.float32)
        b = np.pad(qb, ((0, 0), (0, -qb.shape[1] % LQER_GROUP))).reshape(*sb.shape, LQER_GROUP) * sb[..., None]
        w += arrays[name + "#lqa"].astype(np.float32) * arrays[name + "#lqas"].astype(np.float32) @ \
            b.reshape(len(qb), -1)[:, :qb.shape[1]]
    return w

def dequantize(arrays):
    """Artifact arrays -> float32 state dict."""
    return {k[:-2] if k.endswith("#q") else k: torch.from_numpy(dequantize_one(arrays, k[:-2]) if k.endswith("#q")
                                                                else a.astype(np.float32))
            for k, a in arrays.items() if "#" not in k or k.endswith("#q")}

def prune_ones(tensors, hdiag, estimate, confirm, target, log, tries=4):
    """Zeroes the +-1 GPTQ values of least reconstruction cost (scale^2 * H_jj) until confirm(tensors) <= target.
    The binary search sizes candidates with the cheap `estimate` (the fastest codec) plus its last measured gap to
    `confirm` (the chosen codec), so the slow codec runs at most `tries` + 1 times: the export stays bounded."""
    arrays = {k: a for k, _, a in tensors}
    names, flat_idx, costs = [], [], []
    for name, h in hdiag.items():
        q, s = arrays[name + "#q"], arrays[name + "#scale"].astype(np.float64)
        rows, cols = np.nonzero(np.abs(q) == 1)
        names.append(np.full(len(rows), len(names)))
        flat_idx.append(rows * q.shape[1] + cols)
        costs.append(s[rows] ** 2 * h.numpy()[cols])
    tensor_of, flat_idx = np.concatenate(names), np.concatenate(flat_idx)
    order = np.argsort(np.concatenate(costs), kind="stable")
    keys = [n + "#q" for n in hdiag]

    def pruned(k):
        out = {key: arrays[key].copy() for key in keys}
        for i, key in enumerate(keys):
            sel = order[:k][tensor_of[order[:k]] == i]
            out[key].reshape(-1)[flat_idx[sel]] = 0
        return [(key, kind, out.get(key, a)) for key, kind, a in tensors]

    lo, fit, gap, tol = 0, len(order), 0, max(1, len(order) // 2000)  # 0.05% tolerance: half the codec calls
    if confirm(pruned(fit)) > target:
        raise ConfigError(f"TARGET_BYTES={target}: the artifact does not fit even with all {fit} +-1 values pruned; "
                          "fix: raise TARGET_BYTES or shrink the model")
    for _ in range(tries):  # fit: the fewest pruned known to fit; lo: known not to fit below it
        a, b = lo, fit
        while b - a > tol:
            mid = (a + b) // 2
            a, b = (a, mid) if estimate(pruned(mid)) + gap <= target else (mid + 1, b)
        if b == fit:
            break
        size = confirm(pruned(b))
        gap = size - estimate(pruned(b))
        lo, fit = (lo, b) if size <= target else (b + 1, fit)
    log(f"prune: zeroed {fit} of {len(order)} +-1 GPTQ values (least scale^2*H_jj first) to fit {target} bytes")
    return pruned(fit)


# ----------------------------------------------------------------------------- export: entropy coder

RANS_PROB_BITS, RANS_L = 15, 1 << 16
RANS_M = 1 << RANS_PROB_BITS
# One renormalisation per symbol per lane suffices both ways: encoding keeps x in [2^16, 2^32) and emits a 16-bit
# word iff x >= f << 17, after which x >> 16 < 2^16 <= f << 17; decoding restores the pre-encode state, which is
# below 2^16 exactly when the encoder emitted, so one 16-bit read brings it back into range.

def _rans_freqs(counts):
    """Counts -> integer frequencies summing to RANS_M, >= 1 for every present symbol, minimising the coded size
    sum(c * -log2(f / M)) by greedy unit moves (optimal: the cost is separable and convex in each f)."""
    c, live = counts.astype(np.float64), counts > 0
    f = np.where(live, np.maximum(1, np.round(c * RANS_M / c.sum())), 0).astype(np.int64)
    while True:
        ff = np.maximum(f, 1).astype(np.float64)
        gain = np.where(live, c * np.log2((ff + 1) / ff), -np.inf)
        cost = np.where(f > 1, c * np.log2(ff / np.maximum(ff - 1, 1)), np.inf)
        d = int(f.sum()) - RANS_M
        if d < 0:
            f[np.argmax(gain)] += 1
        elif d > 0:
            f[np.argmin(cost)] -= 1
        elif gain.max() > cost.min() + 1e-9:
            f[np.argmax(gain)] += 1
            f[np.argmin(cost)] -= 1
        else:
            return f

def rans_encode(sym, seg_lens):
    """Interleaved static rANS of an int8 stream; every segment (tensor) has its own order-0 table. Position i
    belongs to lane i % L of step i // L, so each step is one vectorised numpy operation over the lanes.
    Layout: "rAN1" u32 lanes u64 n_words | i8 (lo, hi) per segment | u16 freqs | u32 lane states | u16 words."""
    n = len(sym)
    lanes = min(8192, max(1, n // 8192))  # >= 8192 symbols per lane keeps the 4-byte states near 0.07%
    bounds = np.cumsum([0] + list(seg_lens))
    lohi, freqs = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cnt = np.bincount(sym[a:b].astype(np.int64) + 128, minlength=256)
        nz = np.flatnonzero(cnt)
        lo, hi = (nz[0], nz[-1]) if len(nz) else (128, 127)
        lohi += [lo - 128, hi - 128]
        freqs.append(_rans_freqs(cnt[lo:hi + 1]) if len(nz) else np.zeros(0, np.int64))
    widths = np.array([len(f) for f in freqs], np.int64)
    table = np.repeat((np.cumsum(widths) - widths - np.array(lohi[0::2])).astype(np.int32), seg_lens) + sym
    allf = np.concatenate([np.zeros(0, np.int64)] + freqs)
    F = allf.astype(np.uint32)[table]
    C = np.concatenate([np.zeros(0, np.int64)] + [np.cumsum(f) - f for f in freqs]).astype(np.uint32)[table]
    x = np.full(lanes, RANS_L, np.uint64)
    chunks = []
    for s in range(-(-n // lanes) - 1, -1, -1):  # rANS encodes backwards
        a, b = s * lanes, min(s * lanes + lanes, n)
        xs, f = x[:b - a], F[a:b]
        m = (xs >> (32 - RANS_PROB_BITS)) >= f
        chunks.append((xs[m] & 0xFFFF).astype(np.uint16))
        xs = np.where(m, xs >> 16, xs)
        q = xs // f
        x[:b - a] = (q << RANS_PROB_BITS) + (xs - q * f) + C[a:b]
    words = np.concatenate(chunks[::-1] + [np.zeros(0, np.uint16)])  # the decoder reads step 0 first
    return b"".join([struct.pack("<4sIQ", b"rAN1", lanes, len(words)), np.array(lohi, np.int8).tobytes(),
                     allf.astype("<u2").tobytes(), x.astype("<u4").tobytes(), words.astype("<u2").tobytes()])

def rans_decode(blob, seg_lens):
    n, n_seg, pos = sum(seg_lens), len(seg_lens), 0

    def take(dtype, count, what):
        nonlocal pos
        size = np.dtype(dtype).itemsize * count
        if count < 0 or pos + size > len(blob):
            raise ValueError(f"rANS stream truncated in the {what}")
        pos += size
        return np.frombuffer(blob, dtype, count, pos - size)

    magic, lanes, n_words = struct.unpack("<4sIQ", take(np.uint8, 16, "header").tobytes())
    if magic != b"rAN1" or lanes != min(8192, max(1, n // 8192)) or n_words > n:  # as rans_encode: the time is n/lanes
        raise ValueError(f"not a rANS stream of {n} symbols (lanes {lanes}, {n_words} words)")
    lohi = take(np.int8, 2 * n_seg, "value ranges").astype(np.int64)
    lo, widths = lohi[0::2], lohi[1::2] - lohi[0::2] + 1
    freqs = take("<u2", int(widths.sum()), "frequency tables").astype(np.int64)
    x = take("<u4", lanes, "lane states").astype(np.uint64)
    words = take("<u2", n_words, "word stream").astype(np.uint64)
    dsym, dfreq, drest = np.zeros(n_seg * RANS_M, np.int8), np.zeros(n_seg * RANS_M, np.uint32), \
        np.zeros(n_seg * RANS_M, np.uint32)
    offs = np.cumsum(widths) - widths
    for g in range(n_seg):
        f = freqs[offs[g]:offs[g] + widths[g]]
        if seg_lens[g] == 0:
            continue
        if f.sum() != RANS_M:
            raise ValueError(f"rANS table {g} is corrupt")
        r = slice(g * RANS_M, (g + 1) * RANS_M)
        dsym[r], dfreq[r] = np.repeat(lo[g] + np.arange(len(f)), f), np.repeat(f, f)
        drest[r] = np.arange(RANS_M) - np.repeat(np.cumsum(f) - f, f)
    row = np.repeat(np.arange(n_seg, dtype=np.uint32) * RANS_M, seg_lens)
    out, p = np.empty(n, np.int8), 0
    for s in range(-(-n // lanes)):
        a, b = s * lanes, min(s * lanes + lanes, n)
        xs = x[:b - a]
        i = row[a:b] + (xs & (RANS_M - 1))
        out[a:b] = dsym[i]
        xs = dfreq[i] * (xs >> RANS_PROB_BITS) + drest[i]
        low = np.flatnonzero(xs < RANS_L)
        if p + len(low) > n_words:
            raise ValueError("rANS word stream exhausted")
        xs[low] = (xs[low] << 16) | words[p:p + len(low)]
        p += len(low)
        x[:b - a] = xs
    if p != n_words or (x != RANS_L).any():  # every lane started at RANS_L
        raise ValueError("rANS stream does not end in its initial state")
    return out

def entropy_bound_bytes(sym, seg_lens):
    """Order-0 bound: sum over segments of count x empirical entropy, in bytes."""
    bounds, bits = np.cumsum([0] + list(seg_lens)), 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = np.bincount(sym[a:b].astype(np.int64) + 128, minlength=256)
        c = c[c > 0].astype(np.float64)
        bits += float(-(c * np.log2(c / (b - a))).sum())
    return bits / 8


# ----------------------------------------------------------------------------- export: artifact

ART_MAGIC, ART_VERSION = b"PGOLFART", 2
ART_PREFIX = struct.Struct("<8sII32s")  # magic, format version, header length, sha256 of the header
INT_KINDS = ("int2", "int4", "int5", "int6", "int7", "int8")  # all stored as int8; the name says the value range
NP_DTYPE = {**{k: np.int8 for k in INT_KINDS}, "fp16": np.float16, "fp32": np.float32, "u16": np.uint16}
ROLES = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.proj": "o", "mlp.fc": "up", "mlp.proj": "down",
         "tok_emb": "embed"}
ROLE_ORDER, REORDERED = list(ROLES.values()), ("embed", "q", "up")  # the largest groups get their rows reordered

def role(key, kind):
    """The group of an int tensor stored together with its role's other layers (SPEC 10); None: stored alone."""
    m = re.fullmatch(r"blocks\.\d+\.(attn\.[qkv]|attn\.proj|mlp\.fc|mlp\.proj)\.weight#q|(tok_emb)\.weight#q", key)
    return ROLES[m[1] or m[2]] if m and kind in INT_KINDS else None

def store_order(key, kind):  # int tensors first, each role's side by side (read_artifact checks the order)
    r = role(key, kind)
    return kind not in INT_KINDS, ROLE_ORDER.index(r) if r else len(ROLE_ORDER)

def role_groups(entries):
    out = {}
    for e in entries:
        if role(e["key"], e["kind"]):
            out.setdefault(role(e["key"], e["kind"]), []).append(e)
    return out

@torch.no_grad()
def row_order(rows, device):
    """Greedy nearest-neighbour walk (L1 distance) through the rows from row 0: similar rows end up side by side."""
    x = torch.from_numpy(rows).to(device).float()
    left, order = torch.ones(len(x), dtype=torch.bool, device=device), torch.zeros(len(x), dtype=torch.long,
                                                                                   device=device)
    for i in range(1, len(x)):  # the index stays on the device: no host sync per step
        left[order[i - 1]] = False
        order[i] = (x - x[order[i - 1]]).abs().sum(1).masked_fill(~left, float("inf")).argmin()
    return order.cpu().numpy()

def row_orders(tensors, device):
    """A `ROLE#perm` tensor (uint16) for each reordered role group that fits uint16: its rows' stored order."""
    groups = {}
    for key, kind, a in tensors:
        groups.setdefault(role(key, kind), []).append(a)
    return [(r + "#perm", "u16", row_order(np.concatenate(g), device).astype(np.uint16)) for r, g in groups.items()
            if r in REORDERED and sum(map(len, g)) <= 65536]

def pack_raw(tensors):
    """Concatenates the arrays, integer symbols first (the rANS codec codes that prefix). The int tensors of one role
    make one matrix, their rows stacked in the order of the role's `#perm` tensor (if any) and stored transposed,
    so that similar values sit side by side; fp16 bytes are split into low and high planes. Both compress better."""
    tensors = sorted(tensors, key=lambda t: store_order(*t[:2]))
    arrays, entries, parts, off = {k: a for k, _, a in tensors}, [], [], 0
    for key, kind, a in tensors:
        b = np.ascontiguousarray(a, NP_DTYPE[kind]).view(np.uint8)
        b = b.reshape(-1, 2).T.tobytes() if kind == "fp16" else b.tobytes()
        entries.append(dict(key=key, kind=kind, shape=list(a.shape), offset=off, nbytes=len(b)))
        parts.append(b)
        off += len(b)
    raw = bytearray(b"".join(parts))
    for r, es in role_groups(entries).items():
        m = np.concatenate([np.asarray(arrays[e["key"]], np.int8) for e in es])
        m = m[arrays[r + "#perm"].astype(np.int64)] if r + "#perm" in arrays else m
        raw[es[0]["offset"]:es[0]["offset"] + m.size] = m.T.tobytes()
    return entries, bytes(raw)

def unpack_raw(entries, raw):
    out = {}
    for e in entries:
        b = np.frombuffer(raw, np.uint8, e["nbytes"], e["offset"])
        if e["kind"] == "fp16":
            b = np.ascontiguousarray(b.reshape(2, -1).T)
        out[e["key"]] = b.view(NP_DTYPE[e["kind"]]).reshape(e["shape"]).copy()
    for r, es in role_groups(entries).items():
        n, cols = sum(e["shape"][0] for e in es if e["shape"]), es[0]["shape"][1:]
        if any(e["shape"][1:] != cols or len(cols) != 1 for e in es):
            raise ValueError(f"the {r} group's tensors are not matrices of one width")
        m, p = np.frombuffer(raw, np.int8, n * cols[0], es[0]["offset"]).reshape(cols[0], n).T, out.get(r + "#perm")
        if p is not None and (p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n))):
            raise ValueError(f"{r}#perm is not an order of the group's {n} rows")
        m = m if p is None else m[np.argsort(p)]
        for e, rows in zip(es, np.split(m, np.cumsum([e["shape"][0] for e in es])[:-1])):
            out[e["key"]] = np.ascontiguousarray(rows)
    return out

def int_lens(entries):
    """rANS segments (one frequency table each): one per role group, one per other int tensor."""
    lens, prev = [], None
    for e in entries:
        r = role(e["key"], e["kind"])
        if e["kind"] in INT_KINDS:
            lens[-1:] = [lens[-1] + e["nbytes"]] if r and r == prev else lens[-1:] + [e["nbytes"]]
        prev = r
    return lens

def raw_len(entries):  # the declared decoded size: every decoder stops one byte past it, so a bomb costs no more
    return sum(e["nbytes"] for e in entries)

def _unlzma(blob, n):
    return lzma.LZMADecompressor(memlimit=1 << 27).decompress(blob, max_length=n + 1)  # preset 9 needs 65 MB

def _rans_pack(raw, entries):
    lens = int_lens(entries)
    coded = rans_encode(np.frombuffer(raw[:sum(lens)], np.int8), lens)
    return struct.pack("<Q", len(coded)) + coded + lzma.compress(raw[sum(lens):], preset=9)

def _rans_unpack(blob, entries):
    (n,) = struct.unpack_from("<Q", blob)
    return rans_decode(blob[8:8 + n], int_lens(entries)).tobytes() + _unlzma(blob[8 + n:], raw_len(entries))

ZPAQ_THREADS = 8  # blocks coded side by side: fixed, so that the bytes do not depend on the machine
ZPAQ_TAG = bytes.fromhex("376b5374a03183d38cb228b0d3")  # the locator tag that starts every block the coder writes
UNZPAQ = f"""import re, resource, sys
n, blob, out = int(sys.argv[1]), sys.stdin.buffer.read(), []
resource.setrlimit(resource.RLIMIT_AS, (2**31 + 8 * n,) * 2)
import zpaq
from concurrent.futures import ThreadPoolExecutor
cuts = sorted({{0, len(blob)}} | {{m.start() for m in re.finditer(re.escape({ZPAQ_TAG!r}), blob)}})
blocks = [blob[a:b] for a, b in zip(cuts, cuts[1:])]
with ThreadPoolExecutor({ZPAQ_THREADS}) as pool:
    for i in range(0, len(blocks), {ZPAQ_THREADS}):
        out += pool.map(lambda b: zpaq.decompress(b, threads=1), blocks[i:i + {ZPAQ_THREADS}])
        if sum(map(len, out)) > n:
            break
sys.stdout.buffer.write(b"".join(out)[:n + 1])"""

def _unzpaq(blob, n):
    """ZPAQ decodes by running the model program that its stream carries, to an output of any length: a child
    process does it, its memory and time capped by the declared size n (level 5 needs ~1.2 GB, ~0.2 MB/s per
    thread), so that a crafted stream costs no more than a genuine file of that size. The stream's blocks (each
    starts with ZPAQ's locator tag) decode ZPAQ_THREADS at a time, and decoding stops at the first wave whose output
    passes n: a stream of many blocks never expands past n + one wave."""
    try:
        r = subprocess.run([sys.executable, "-c", UNZPAQ, str(n)], input=blob, capture_output=True,
                           timeout=60 + n / 1e5)
    except subprocess.TimeoutExpired:
        raise ValueError(f"zpaq stream not decoded within {60 + n / 1e5:.0f}s") from None
    if r.returncode:
        raise ValueError(f"zpaq stream rejected ({(r.stderr.decode(errors='replace').splitlines() or [''])[-1]})")
    return r.stdout

def codecs():
    """name -> (compress(raw, entries), decompress(blob, entries)) or a reason it is unavailable."""
    out = {"none": (lambda r, e: r, lambda b, e: b),
           "lzma-9": (lambda r, e: lzma.compress(r, preset=9), lambda b, e: _unlzma(b, raw_len(e))),
           "rans": (_rans_pack, _rans_unpack)}
    try:
        import zstandard
        out["zstd-22"] = (lambda r, e: zstandard.ZstdCompressor(level=22).compress(r),
                          lambda b, e: zstandard.ZstdDecompressor().stream_reader(b).read(raw_len(e) + 1))
    except ImportError:
        out["zstd-22"] = "python package zstandard is not installed"
    try:
        import brotli
        out["brotli-11"] = (lambda r, e: brotli.compress(r, quality=11),
                            lambda b, e: brotli.Decompressor().process(b, output_buffer_limit=raw_len(e) + 1))
    except ImportError:
        out["brotli-11"] = "python package brotli is not installed"
    try:
        import zpaq
        out["zpaq-5"] = (lambda r, e: zpaq.compress(r, level=5, threads=ZPAQ_THREADS),
                         lambda b, e: _unzpaq(b, raw_len(e)))
    except ImportError:
        out["zpaq-5"] = "python package zpaq is not installed"
    return out

class ArtifactError(ConfigError):
    pass

def encode_artifact(tensors, codec, label, config, payload=None):
    """The artifact's bytes; `payload` is the tensors already compressed by `codec`, when the caller has it."""
    entries, raw = pack_raw(tensors)
    payload = codecs()[codec][0](raw, entries) if payload is None else payload
    header = json.dumps(dict(label=label, codec=codec, config=config, entries=entries, raw_bytes=len(raw),
                             raw_sha256=hashlib.sha256(raw).hexdigest(), payload_bytes=len(payload),
                             payload_sha256=hashlib.sha256(payload).hexdigest()), separators=(",", ":")).encode()
    return ART_PREFIX.pack(ART_MAGIC, ART_VERSION, len(header), hashlib.sha256(header).digest()) + header + payload

ART_HEADER_MAX = 1 << 22  # bytes; a genuine header takes about 150 per tensor
HEADER_FIELDS = dict(label=str, codec=str, config=dict, entries=list, raw_bytes=int, raw_sha256=str,
                     payload_bytes=int, payload_sha256=str)
ENTRY_FIELDS = dict(key=str, kind=str, shape=list, offset=int, nbytes=int)

def read_artifact(path, check_model=True):
    """(header, arrays), checked before anything large is read or allocated; never unpickles; any damage is one
    ArtifactError. check_model=False skips the config and model checks: any tensors (the format's own tests)."""
    def bad(why):
        return ArtifactError(f"artifact {path}: {why}; fix: re-export it or point ARTIFACT at an intact file")
    if not Path(path).is_file():  # before open(): a FIFO would block
        raise bad("not a regular file")
    try:
        with open(path, "rb") as f:
            size, prefix = os.fstat(f.fileno()).st_size, f.read(ART_PREFIX.size)
            if len(prefix) < ART_PREFIX.size:
                raise bad(f"only {size} bytes, shorter than the {ART_PREFIX.size}-byte prefix (truncated)")
            magic, version, hlen, hsha = ART_PREFIX.unpack(prefix)
            if magic != ART_MAGIC or version != ART_VERSION:
                raise bad(f"magic {magic!r} version {version}: not a train_gpt.py artifact (magic {ART_MAGIC!r})")
            if hlen > min(ART_HEADER_MAX, size - ART_PREFIX.size):
                raise bad(f"header length {hlen} exceeds the file or the {ART_HEADER_MAX}-byte cap (truncated?)")
            if hashlib.sha256(header_bytes := f.read(hlen)).digest() != hsha:
                raise bad("header checksum mismatch (truncated or corrupt)")
            header = json.loads(header_bytes)
            if (not isinstance(header, dict) or any(type(header.get(k)) is not t for k, t in HEADER_FIELDS.items())
                    or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", header["label"])):  # the label names log lines
                raise bad(f"header needs the fields {', '.join(HEADER_FIELDS)} with their types, and a plain label")
            entries, off = header["entries"], 0
            for i, e in enumerate(entries):
                if (not isinstance(e, dict) or any(type(e.get(k)) is not t for k, t in ENTRY_FIELDS.items())
                        or e["kind"] not in NP_DTYPE or any(type(n) is not int or n < 0 for n in e["shape"])
                        or e["offset"] != off or e["nbytes"] != math.prod(e["shape"]) * NP_DTYPE[e["kind"]]().itemsize
                        or i and store_order(entries[i - 1]["key"], entries[i - 1]["kind"]) > store_order(e["key"],
                                                                                                     e["kind"])):
                    raise bad(f"entry {i} is malformed, out of order or not contiguous ({str(e)[:100]})")
                off += e["nbytes"]
            if off != header["raw_bytes"] or off > 4 * MAX_PARAMS or len({e["key"] for e in entries}) < len(entries):
                raise bad(f"entries sum to {off} bytes, header says raw_bytes {header['raw_bytes']} (or keys repeat)")
            if check_model:
                header["config"] = Settings.from_arch(header["config"]).arch()  # checked, and typed for GPT()
                want = {}  # key -> (kind, shape) as quantize_state (or the prequant export: all fp32) writes them
                with torch.device("meta"):  # the model's tensor shapes, nothing allocated
                    shapes = {k: tuple(v.shape) for k, v in GPT(header["config"]).state_dict().items()}
                got, rows = {e["key"]: (e["kind"], tuple(e["shape"])) for e in entries}, {}
                for name, sh in shapes.items():
                    kind = "fp32" if header["label"] == "prequant" else quant_kind(
                        name, torch.empty(sh, device="meta"), header["config"])
                    want.update({name + "#q": (kind, sh), name + "#scale": ("fp16", sh[:1])} if kind in INT_KINDS
                                else {name: (kind, sh)})
                    if role(name + "#q", kind):
                        rows[role(name + "#q", kind)] = rows.get(role(name + "#q", kind), 0) + sh[0]
                    r = got.get(name + "#lqa", ("", (0, 0)))[1][-1]  # LQER factors: any rank up to the matrix's
                    if kind in INT_KINDS and name + "#awqm" in got:  # AWQ-lite: a column mask, a row scale
                        want.update({name + "#awqm": ("int8", sh[1:]), name + "#awqs": ("fp16", sh[:1])})
                    if kind in INT_KINDS and 0 < r <= min(sh):
                        want.update({name + "#lqa": ("int2", (sh[0], r)), name + "#lqb": ("int4", (r, sh[1])),
                                     name + "#lqas": ("fp16", (1,)),
                                     name + "#lqbs": ("fp16", (r, -(-sh[1] // LQER_GROUP)))})
                want.update({r + "#perm": ("u16", (n,)) for r, n in rows.items() if r + "#perm" in got})
                if got != want:
                    k = min(set(got.items()) ^ set(want.items()))[0]
                    raise bad(f"tensor {k} is {got.get(k)} (kind, shape) but its config's model needs {want.get(k)}")
            if size != ART_PREFIX.size + hlen + header["payload_bytes"]:
                raise bad(f"file is {size} bytes, its header declares {hlen} + {header['payload_bytes']} after the "
                          "prefix (truncated or padded)")
            payload = f.read()
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise bad("payload checksum mismatch (corrupt)")
        codec = codecs().get(header["codec"])
        if not isinstance(codec, tuple):
            raise bad(f"codec {header['codec']} unavailable ({codec or 'unknown codec'})")
        raw = codec[1](payload, entries)
        if len(raw) != off or hashlib.sha256(raw).hexdigest() != header["raw_sha256"]:
            raise bad(f"decoded data checksum mismatch (codec {header['codec']})")
        return header, unpack_raw(entries, raw)
    except ArtifactError:
        raise
    except Exception as e:  # checksums are no signature: an edited file with fresh sums must still fail cleanly
        why = (str(e).splitlines() or [""])[0].split("; fix:")[0]  # a ConfigError: a bad setting in its config
        raise bad(f"invalid header, config or payload ({type(e).__name__}: {why})") from None

@contextlib.contextmanager
def exact_fp32():
    """TF32 off: GPTQ's Hessians and Cholesky factors, and every eval's scoring logits (and SLOT's fit), in true fp32
    as stated (the run turns TF32 on for training; bf16 autocast matmuls are unaffected)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old

def export(a, ctx, state, hessians, code_bytes):
    """Quantises, measures every codec, keeps the smallest bit-exact one, prunes to TARGET_BYTES, writes ARTIFACT.
    Rank 0 only; returns the model byte count."""
    t0 = time.perf_counter()
    tensors, hdiag = quantize_state(state, hessians, a, ctx.log)
    lqer = sorted(k[:-4] for k, *_ in tensors if k.endswith("#lqa"))
    ctx.log(f"gptq: {len(hdiag)} matrices in {time.perf_counter() - t0:.1f}s (bits attn:{a.attn_bits} mlp:{a.mlp_bits} "
            f"embed:{a.embed_bits}) lqer:{','.join(lqer) or 'off'}")
    entries, raw = pack_raw(tensors)
    lens = int_lens(entries)
    sym = np.frombuffer(raw[:sum(lens)], np.int8)
    bound = entropy_bound_bytes(sym, lens)
    payloads, seconds = {}, {}
    for name, codec in codecs().items():
        if isinstance(codec, str):
            ctx.log(f"codec:{name} skipped ({codec})")
        if isinstance(codec, str) or name == "none" or (a.codecs and name not in a.codecs):
            continue
        t = time.perf_counter()
        blob = codec[0](raw, entries)
        seconds[name] = time.perf_counter() - t
        exact = codec[1](blob, entries) == raw
        n = struct.unpack_from("<Q", blob)[0] if name == "rans" else 0
        extra = f" symbols_bytes:{n} symbols/bound:{n / bound:.4f}" if n else ""
        ctx.log(f"codec:{name} bytes:{len(blob)} exact:{int(exact)} seconds:{seconds[name]:.1f}{extra}")
        if exact:
            payloads[name] = blob
    ctx.log(f"entropy_bound: symbols:{len(sym)} bytes:{bound:.0f} (order-0, per role group or tensor, int values)")
    best = min(payloads, key=lambda k: len(payloads[k]))
    fast = min(payloads, key=seconds.get)
    t, ordered = time.perf_counter(), tensors + row_orders(tensors, ctx.device)  # kept where the rows' order pays
    entries, raw = pack_raw(ordered)
    blob = codecs()[best][0](raw, entries)
    keep = len(blob) < len(payloads[best]) and codecs()[best][1](blob, entries) == raw
    ctx.log(f"row_order: {','.join(k[:-5] for k, *_ in ordered[len(tensors):]) or 'none'} bytes:{len(blob)} with {best}"
            f" ({len(blob) - len(payloads[best]):+d}) kept:{int(keep)} seconds:{time.perf_counter() - t:.1f}")
    tensors, payloads[best] = (ordered, blob) if keep else (tensors, payloads[best])
    ctx.log(f"codec_chosen: {best}")
    config, label = a.arch(), a.quant_label()
    size = {c: lambda ts, c=c: code_bytes + len(encode_artifact(ts, c, label, config)) for c in (best, fast)}
    blob = encode_artifact(tensors, best, label, config, payloads[best])  # no second compression of the winner
    if pruned := a.target_bytes and code_bytes + len(blob) > a.target_bytes:
        tensors = prune_ones(tensors, hdiag, size[fast], size[best], a.target_bytes, ctx.log)
        blob = encode_artifact(tensors, best, label, config)
    Path(a.artifact).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.artifact, blob)
    if pruned:  # the pruned encode was never decoded: check the file as written
        back = read_artifact(a.artifact)[1]
        if sorted(back) != sorted(k for k, *_ in tensors) or any(
                back[k].tobytes() != np.ascontiguousarray(v).tobytes() for k, _, v in tensors):
            raise ConfigError(f"artifact {a.artifact}: the written file does not decode to the exported tensors; "
                              f"fix: report it, or set CODECS to a codec other than {best}")
        ctx.log("prune_decode: exact:1 (the written artifact decodes to the pruned tensors)")
    ctx.log(f"artifact_path: {a.artifact}")
    ctx.log(f"export: {time.perf_counter() - t0:.1f}s (GPTQ, codecs, pruning, write; rank 0 while the others wait)")
    return len(blob)


# ----------------------------------------------------------------------------- evaluation

def window_starts(n_targets, seq_len, stride):
    """Window k starts at k*stride and scores targets from k*stride + seq_len - stride on (window 0: from 0), so
    every target is scored exactly once, after window 0 with at least seq_len - stride tokens of context."""
    span = n_targets - seq_len + stride
    return np.arange(max(1, -(-span // stride)) if span > 0 else 1) * stride

class Val(tuple):
    """(tokens, target bytes) on the host; on_device() keeps one copy per device."""

    def __new__(cls, tokens, tbytes):
        val = super().__new__(cls, (tokens, tbytes))
        val.dev = {}
        return val

def on_device(val, device):
    """The val tokens (int64) and target bytes (int32) resident on the device, copied once per Val: the evals index
    them there, with no per-batch host copy or sync."""
    val = val if isinstance(val, Val) else Val(*val)
    if device not in val.dev:
        val.dev[device] = (torch.from_numpy(val[0].astype(np.int64)).to(device),
                           torch.from_numpy(np.asarray(val[1]).astype(np.int32)).to(device))
    return val.dev[device]

def to_device(a, device):
    """A small host array on the device without waiting for the device's queued work (pinned, non-blocking copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

def ngram_hints(tokens, order, threshold):
    """The tilt's hint at each stream position t (-1: none; SPEC section 11): the token that most often followed
    tokens[t - order:t] before t (ties: the smallest id) if its share is >= threshold; none at t < order (padded)."""
    n, K, hints = len(tokens), order, np.full(len(tokens), -1, np.int32)
    bits = max(int(tokens.max(initial=0)).bit_length(), 1)
    V, c, m = 1 << bits, min(K, 64 // bits), n - K  # ids < V; c tokens packed exactly in a word; m contexts
    if m < 1:
        return hints
    w = sum(np.left_shift(tokens[i:n - c + 1 + i], bits * i, dtype=np.uint64) for i in range(c))
    h = np.zeros(m, np.uint64)
    for off in sorted({*range(0, K - c + 1, c), K - c}):  # 64-bit hash of the words that cover the K tokens
        h = (h ^ w[off:off + m]) * np.uint64(0x9E3779B97F4A7C15)  # odd multiplier, then a shift: both bijective
        h ^= h >> np.uint64(31)
    o = np.argsort(h, kind="stable")  # positions grouped by context, in time order
    new = np.r_[True, np.diff(h[o]) != 0]
    keep = ~(new & np.r_[new[1:], True])  # a context seen once gives no hint and counts for no other
    pos, new = o[keep] + K, new[keep]
    rank = lambda starts: np.arange(len(starts)) - np.flatnonzero(starts)[np.cumsum(starts) - 1]  # index in its run
    g, occ, y = np.cumsum(new) - 1, rank(new), tokens[pos].astype(np.int64)
    pk, sp = g * V + y, np.argsort(g * V + y, kind="stable")
    cnt = np.empty_like(pk)
    cnt[sp] = rank(np.r_[True, np.diff(pk[sp]) != 0]) + 1  # count of (context, y) up to this occurrence
    base = V * (np.arange(len(pos)) - occ + g)  # above every key of the contexts before: the running max restarts
    top = np.maximum.accumulate(cnt * V + V - 1 - y + base)[:-1] - base[1:]  # top (count, -token) so far
    ok = (occ[1:] > 0) & (top // V / np.maximum(occ[1:], 1) >= threshold)
    hints[pos[1:][ok]] = V - 1 - top[ok] % V
    return hints

def scored_nll(val, z, y, tgt):
    """(nll, logits) of targets y [...] (target indices tgt) under logits z [..., V] as scored; val.tilt = (beta, hints
    on z's device): softmax(z + beta e_h) = e^{beta [a = h]} p(a) / (1 + p(h)(e^beta - 1)) at a hint h."""
    if getattr(val, "tilt", None) is not None:
        h = val.tilt[1][tgt + 1].long()  # target j predicts stream position j + 1
        z = z.scatter_add(-1, h.clamp_min(0)[..., None], ((h >= 0) * val.tilt[0]).to(z.dtype)[..., None])
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").view_as(y), z

def window_batch(val, starts, seq_len, stride, batch, device):
    """Inputs, targets, scored mask, already-scored (context) mask, target bytes and indices of a window batch, built on
    the device and padded to `batch` windows with empty masks so that every batch has one shape."""
    tokens, tbytes = on_device(val, device)
    T = len(tokens) - 1
    starts = torch.as_tensor(starts, device=device)
    starts = F.pad(starts, (0, batch - len(starts)), value=-1)
    pos = torch.arange(seq_len, device=device)
    tgt = starts.clamp_min(0)[:, None] + pos  # target index of each position
    valid = (tgt < T) & (starts[:, None] >= 0)
    idx = tgt.clamp_max(T - 1)
    score = valid & (pos >= torch.where(starts == 0, 0, seq_len - stride)[:, None])
    context = valid & (pos < seq_len - stride) & (starts[:, None] > 0)
    return tokens[idx], tokens[idx + 1], score, context, tbytes[idx], idx

def slot_fit(model, h, mask, y, p, span=None):
    """SLOT: a delta on the final hidden state and a logit bias (zero-init; per window, or one per batch) fitted by
    AdamW (eps, weight decay from the point) with a cosine lr on the mean NLL of the masked positions. Logits are
    projected only over the span [c0, c1) of columns that hold masked positions (the scored tail, or the context;
    evaluate() knows it without a sync), with the deltas broadcast over it: no per-position gather or indexed-add
    backward. Returns delta [n, d], bias [n, V]."""
    n = h.size(0) if p["delta"] == "window" else 1
    W = model.head_weight().detach().float()
    delta = torch.zeros(n, 1, h.size(-1), device=h.device, requires_grad=True)
    bias = torch.zeros(n, 1, W.size(0), device=h.device, requires_grad=True)
    if span is None:
        cols = mask.any(0).nonzero()
        span = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
    c0, c1 = span
    if p["steps"] > 0 and c1 > c0:
        hs, ys, m = h[:, c0:c1], y[:, c0:c1].reshape(-1), mask[:, c0:c1].float()
        m = m / m.sum()
        opt = torch.optim.AdamW([delta, bias], lr=p["lr"], weight_decay=p["wd"], eps=p["eps"])
        with torch.enable_grad():
            for i in range(p["steps"]):
                cosine = 0.5 * (1 + math.cos(math.pi * i / p["steps"]))
                opt.param_groups[0]["lr"] = p["lr_min"] + (p["lr"] - p["lr_min"]) * cosine
                z = softcap_logits(hs + delta, W, model.softcap, bias)
                loss = (F.cross_entropy(z.view(-1, z.size(-1)), ys, reduction="none").view_as(m) * m).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return delta.detach()[:, 0], bias.detach()[:, 0]

EVAL_BUDGET_SECONDS = 600.0

def evaluate(ctx, model, val, seq_len, stride, batch, points=(None,), label="eval"):
    """Scores every val target once (windows of seq_len every stride tokens, split across ranks). Each point is
    None (plain scoring) or a SLOT setting; hidden states are computed once per batch for all points. The data
    stay on the device, sums are masked (no boolean indexing) and times are CUDA events, so the host never waits
    on the GPU but for the first batches' projection. Returns [(val_loss, val_bpb, seconds)] per point, the shared
    hidden pass charged to the first point only (so the points' seconds add up to the pass's);
    bpb = sum of nll / ln 2 / sum of bytes, in float64."""
    hidden = getattr(model, "eval_hidden", model.forward_hidden)
    starts = np.array_split(window_starts(len(val[0]) - 1, seq_len, stride), ctx.world)[ctx.rank]
    starts_dev = to_device(starts, ctx.device)
    n_batches = -(-len(starts) // batch)
    sums = torch.zeros(len(points), 3, dtype=torch.float64, device=ctx.device)
    spans = [[] for _ in points]
    W = model.head_weight().detach().float()
    t0 = time.perf_counter()
    for b in range(n_batches):
        m0, mine = ctx.mark(), starts[b * batch:(b + 1) * batch]
        x, y, score, context, nbytes, tgt = window_batch(val, starts_dev[b * batch:(b + 1) * batch], seq_len, stride,
                                                         batch, ctx.device)
        with torch.no_grad(), ctx.autocast():
            h = hidden(x)
        h, m1 = h.detach().float(), ctx.mark()
        c0 = 0 if mine[0] == 0 else seq_len - stride  # scored columns: [c0, seq_len); context: [0, seq_len - stride)
        sel, ys = score[:, c0:], y[:, c0:]
        counts = torch.stack([(nbytes[:, c0:] * sel).sum().double(), sel.sum().double()])
        for i, p in enumerate(points):
            m = ctx.mark()
            bias = delta = None
            if p is not None:
                span = (c0, seq_len) if p["mode"] == "scored" else (0, (seq_len - stride) * bool((mine > 0).any()))
                delta, bias = slot_fit(model, h, score if p["mode"] == "scored" else context, y, p, span)
                delta, bias = delta[:, None], bias[:, None]
            with torch.no_grad():
                hs = h[:, c0:] if delta is None else h[:, c0:] + delta
                nll = scored_nll(val, softcap_logits(hs, W, model.softcap, bias), ys, tgt[:, c0:])[0]
            sums[i] += torch.cat([(nll.view_as(sel).double() * sel).sum()[None], counts])
            spans[i] += [(m0, m1)] * (i == 0) + [(m, ctx.mark())]
        if b == 0:  # the first batch includes compilation: not projected
            ctx.sync()
            first, t_first = time.perf_counter() - t0, time.perf_counter()
        elif b == min(3, n_batches - 1):
            ctx.sync()
            projected = first + (time.perf_counter() - t_first) / b * (n_batches - 1)
            if projected > ctx.budget:
                ctx.log(f"warning: {label} projected to take {projected:.0f}s on this hardware, over the "
                        f"{ctx.budget:g} s evaluation budget ({n_batches} batches per rank)")
    ctx.all_reduce(sums)
    return [(s[0].item() / s[2].item(), s[0].item() / math.log(2) / s[1].item(), ctx.seconds(sp))
            for s, sp in zip(sums, spans)]


# ----------------------------------------------------------------------------- evaluation: score-first TTT

def documents(tokens):
    """[start, n_targets] per document. A document runs from its BOS up to the next BOS, which is its last
    target: every val target is scored exactly once, from its own document's tokens only."""
    starts = np.union1d([0], np.flatnonzero(tokens[:-1] == BOS_ID))
    return np.stack([starts, np.append(starts[1:], len(tokens) - 1) - starts], 1)

def ttt_chunk(p, longest):
    """TTT_SHORT_CHUNKS: the chunk of a TTT batch (or of each) whose longest document has `longest` tokens."""
    sc = [tuple(map(int, x.split(":"))) for x in p["short_chunks"]]
    return np.array([c for _, c in sc] + [p["chunk"]])[np.searchsorted([t for t, _ in sc], longest, "right")]

def ttt_window_tokens(n, chunk, seq_len):
    """Tokens forwarded to score documents of n targets chunk by chunk, each chunk with a window of at most seq_len
    tokens (the last partial chunk counted whole): the unit of TTT work for projections."""
    m, k = -(-np.asarray(n, np.int64) // chunk), seq_len // chunk
    k = np.minimum(m, k)
    return chunk * k * (k + 1) // 2 + (m - k) * seq_len

class TTTAdapters:
    """Per-document LoRA adapters of every slot and target, banked: A [N, k, r, d] for all k adapters (every input
    is d wide) and B [N, k_o, o, r] per output width o, so AdamW runs a few large ops. A batch's documents run
    longest first, so the live and the still-training ones are prefixes: views [:n] (contiguous, one stride for
    every n) leave finished documents out of the forward and the optimiser. B and the AdamW state start afresh
    with each document. A is one fixed U(+-1/sqrt(d)) draw for every document (warm_a off), or drawn per batch
    slot and kept, as trained, from one document to the next in its slot (warm_a on, as the record: A then learned
    only from documents already scored).
    AdamW with beta1 = 0, as torch's but stepping only the training prefix; delta = alpha/r x A B."""

    def __init__(self, model, p, N, device):
        d, r = model.tok_emb.embedding_dim, p["rank"]
        width = dict(q=d, k=model.blocks[0].attn.k.out_features, v=model.blocks[0].attn.v.out_features, o=d, mlp=d,
                     head=model.head_weight().size(0))
        keys = [(s, t) for s in range(len(model.slots)) for t in p["targets"] if t != "head"]
        keys += [(-1, "head")] * ("head" in p["targets"])
        count, self.where = {}, {}
        for i, (s, t) in enumerate(keys):
            o = width[t]
            self.where[s, t], count[o] = (i, o, count.get(o, 0)), count.get(o, 0) + 1
        gen = torch.Generator(device=device).manual_seed(0)
        self.draw = lambda n: (torch.rand(n, len(keys), r, d, generator=gen, device=device) * 2 - 1) / math.sqrt(d)
        self.A0, self.N, self.p = self.draw(1), N, p
        self.A = self.A0.expand(N, -1, -1, -1).clone()
        self.fresh()
        self.B = {o: torch.zeros(N, k, o, r, device=device) for o, k in count.items()}
        self.vA, self.vB = torch.zeros_like(self.A), {o: torch.zeros_like(b) for o, b in self.B.items()}
        self.scale, self.targets = p["alpha"] / r, [t for t in p["targets"] if t != "head"]

    def fresh(self):
        """A fresh draw of the warm A of every batch slot (the record's draw after each global phase)."""
        self.bank, self.slots = (self.draw(self.N) if self.p["warm_a"] else None), None

    def reset(self, slots=None):
        """A new document in every row; warm A: row i takes the A trained in batch slot slots[i] (the record's slot
        of that document: it orders a batch shortest first), and the last batch's rows go back to their slots."""
        for t in [*self.B.values(), self.vA, *self.vB.values()]:
            t.zero_()
        if not self.p["warm_a"]:
            self.A.copy_(self.A0.expand_as(self.A))
        else:
            if self.slots is not None:
                self.bank[self.slots] = self.A[:len(self.slots)]
            slots = torch.arange(self.N, device=self.A.device) if slots is None else slots
            self.A[:len(slots)], self.slots = self.bank[slots], slots
        self.t = 0

    def open(self, n, train):
        """Leaf views of the first n documents' adapters for one forward (and backward), unbound into one tensor per
        adapter: the backward stacks their gradients once (a slice each would add a whole bank per adapter)."""
        self.a = self.A[:n].detach().requires_grad_(train)
        self.b = {o: b[:n].detach().requires_grad_(train) for o, b in self.B.items()}
        self.parts = self.a.unbind(1), {o: b.unbind(1) for o, b in self.b.items()}
        return [*self.parts[0], *(t for p in self.parts[1].values() for t in p)]

    def adapter(self, s, t):
        i, o, j = self.where[s, t]
        return self.parts[0][i], self.parts[1][o][j], self.scale

    def slot(self, s):
        return {t: self.adapter(s, t) for t in self.targets}

    def head(self):
        return self.adapter(-1, "head") if (-1, "head") in self.where else None

    @torch.no_grad()
    def step(self, n):
        """One AdamW step (betas (0, beta2), decoupled weight decay) of the first n documents' adapters."""
        p, self.t = self.p, self.t + 1
        c2, lr = math.sqrt(1 - p["beta2"] ** self.t), p["lr"] * p["local_lr_mult"]
        for w, g, v in [(self.A, self.a.grad, self.vA)] + [(self.B[o], self.b[o].grad, self.vB[o]) for o in self.B]:
            w, g, v = w[:n], g[:n], v[:n]
            v.mul_(p["beta2"]).addcmul_(g, g, value=1 - p["beta2"])
            w.mul_(1 - lr * p["wd"]).addcdiv_(g, v.sqrt() / c2 + p["eps"], value=-lr)

def ttt_nll(model, x, y, slot, lora, bf16, keep_logits):
    """NLL [n, C] of each document's chunk (positions `slot` of its window x): hidden states under bf16 autocast,
    logits in fp32 as every other eval scores. The unit TTT compiles (dynamic shapes: one graph for all)."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        h = model.forward_hidden(x, lora)
    z = model.logits(h.gather(1, slot[..., None].expand(-1, -1, h.size(-1))).float(), lora=lora.head())
    nll = F.cross_entropy(z.flatten(0, 1), y.gather(1, slot).flatten(), reduction="none").view_as(slot)
    return nll, z if keep_logits else None

TTT_PAD = 64  # window lengths are padded to a multiple of this (positions past the scored ones change nothing)

def ttt_batch(ctx, model, val, docs, p, lora, nll_fn, on_scored=None, adapt=True):
    """Per-document LoRA TTT of a batch of documents: chunk c of every document is scored (context: at most seq_len
    tokens of the same document), and only then do the document's adapters take `steps` AdamW steps on it (the
    scoring forward doubles as the first step). Losses are per-document means, so documents never interact. Index
    tensors are built on the device and sums are masked: the host never waits on the GPU. adapt=False (past the
    eval deadline): scored the same way, no adapter step. Returns float64 [sum of nll, sum of bytes, count]."""
    tokens, tbytes = on_device(val, ctx.device)
    tilt = getattr(val, "tilt", None) is not None  # the score is tilted; the adapters train on the model's nll
    order, slot_of = np.argsort(-docs[:, 1], kind="stable"), np.empty(len(docs), np.int64)
    slot_of[np.argsort(docs[:, 1], kind="stable")] = np.arange(len(docs))  # the record's slots: shortest first
    docs = docs[order]  # longest first: live documents are a prefix of the batch
    lens, C, L, dev = docs[:, 1], int(ttt_chunk(p, docs[0, 1])), p["seq_len"], ctx.device
    st, ln = to_device(docs[:, 0].astype(np.int64), dev), to_device(lens.astype(np.int64), dev)
    ar = torch.arange(max(C, -(-L // TTT_PAD) * TTT_PAD), device=dev)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    lora.reset(to_device(slot_of[order], dev))
    for c in range(-(-int(lens[0]) // C)):
        live_n, nt = int((lens > c * C).sum()), int((lens > (c + 1) * C).sum()) * (p["steps"] > 0 and adapt)
        n = max(live_n, min(2, len(docs)))  # >= 2 rows: a batch of one would compile its own graph
        T = -(-min((c + 1) * C, int(lens[0]), L) // TTT_PAD) * TTT_PAD  # the longest window, padded
        s, l = st[:n, None], ln[:n, None]
        end = l.clamp_max((c + 1) * C)
        ws = (end - L).clamp_min(0)
        pos = torch.minimum(ws + ar[:T], l - 1)  # past a document's end: repeats, never scored
        tgt = torch.minimum(c * C + ar[:C], l - 1)
        live = c * C + ar[:C] < l
        slot, nbytes = tgt - ws, tbytes[s + tgt]
        weight = (live & (l > (c + 1) * C)) / live.sum(1, keepdim=True).clamp_min(1)
        x, y = tokens[s + pos], tokens[s + pos + 1]
        for step in range(max(p["steps"], 1)):
            for t in (x, y, slot, *lora.open(n, train=p["steps"] > 0)):  # one graph for every batch and window size
                torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(x, 1)
            if p["short_chunks"]:  # chunks of several sizes: still one graph
                torch._dynamo.maybe_mark_dynamic(slot, 1)
            with torch.set_grad_enabled(p["steps"] > 0):  # also where no document trains: one compiled graph
                nll, z = nll_fn(model, x, y, slot, lora, ctx.bf16, bool(on_scored) or tilt)
            if step == 0:  # the score, final before any update that used these targets
                score, z = scored_nll(val, z.detach(), y.gather(1, slot), s + tgt) if tilt else (nll.detach(), z)
                sums += torch.stack([(score.double() * live).sum(), (nbytes * live).sum().double(),
                                     live.sum().double()])
                if on_scored is not None:
                    mask = (c * C + np.arange(C) < lens[:n, None])
                    on_scored((docs[:n, :1] + c * C + np.arange(C))[mask], F.log_softmax(z.detach(), -1)[live])
            if not nt:
                break
            (nll * weight).sum().backward()
            lora.step(nt)
    return sums

def global_sgd(ctx, model, val, scored, p):
    """Phased global TTT: a fresh SGD (momentum, lr cosine-decayed to 0 over the phase) of the base weights over the
    documents scored so far (rows [start, n_targets], in the order they were scored), concatenated, in sequences of
    seq_len tokens whose attention never crosses a document boundary; global_chunk tokens per step across ranks,
    gradients summed over ranks and clipped as one model's. As the record, the final partial chunk is skipped."""
    idx = np.concatenate([np.arange(s, s + m) for s, m in scored] + [scored[-1:, 0] + scored[-1:, 1]])
    L, params = p["seq_len"], list(model.parameters())
    tokens, n = on_device(val, ctx.device)[0][to_device(idx.astype(np.int64), ctx.device)], len(idx) - 1
    per_step = max(1, p["global_chunk"] // L)
    seqs = np.arange(0, n // (per_step * L) * per_step * L, L)  # whole chunks of whole sequences only
    opt = torch.optim.SGD(params, lr=p["global_lr"], momentum=p["global_momentum"])
    total, k = p["global_epochs"] * (len(seqs) // per_step), 0
    model.requires_grad_(True)
    for _ in range(p["global_epochs"]):
        for i in range(0, len(seqs), per_step):
            opt.param_groups[0]["lr"] = p["global_lr"] * 0.5 * (1 + math.cos(math.pi * k / total))
            k += 1
            mine = np.array_split(seqs[i:i + per_step], ctx.world)[ctx.rank]
            if len(mine):
                pos = to_device(mine[:, None] + np.arange(L), ctx.device)
                x, y = tokens[pos.clamp_max(n - 1)], tokens[pos.clamp_max(n - 1) + 1]
                with ctx.autocast():
                    h = model.forward_hidden(x, doc_mask=True)
                nll = F.cross_entropy(model.logits(h.float()).flatten(0, 1), y.flatten(), reduction="none")
                count = sum(min(L, n - s) for s in seqs[i:i + per_step])
                ((nll * (pos < n).flatten()).sum() / count).backward()
            g = ctx.all_reduce(torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                                          for q in params]))
            if p["global_clip"] > 0:
                g *= torch.clamp(p["global_clip"] / (g.norm() + 1e-6), max=1.0)
            for q, gq in zip(params, g.split([q.numel() for q in params])):
                q.grad = gq.view_as(q)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)

class Shared:
    """Counters every rank sees at once: the process group's store (TCP) across ranks, a dict in one process (where
    a rank of a world without a process group, as the bench traces one, takes every world-th batch). Keys carry the
    eval's sequence number, so a sweep's evals never share one."""
    calls = itertools.count()

    def __init__(self, ctx):
        self.store = dist.distributed_c10d._get_default_store() if ctx.world > 1 and dist.is_initialized() else None
        self.tag, self.local, self.rank, self.world = f"ttt{next(Shared.calls)}/", {}, ctx.rank, ctx.world

    def next_batch(self, phase):  # the index of the next batch of the phase that no rank has taken
        if self.store is not None:
            return self.add(f"batch{phase}") - 1
        j = self.local[phase] = self.local.get(phase, self.rank - self.world) + self.world
        return j

    def add(self, key, n=1):  # the value after adding n
        if self.store is not None:
            return self.store.add(self.tag + key, n)
        self.local[key] = self.local.get(key, 0) + n
        return self.local[key]

def ttt_evaluate(ctx, model, val, p, on_scored=None, label="TTT eval", compiled=False, deadline=None):
    """Score-first TTT over the val documents (SPEC section 9): per-document LoRA (ttt_batch), documents run longest
    first in batches that each rank takes from a shared counter (the slowest rank ends within a batch of the
    others); at each of `phases` boundaries floor(k prefix_docs / phases) of that order, global SGD over every
    document scored so far (the longest ones, in the order scored) and a fresh draw of the warm A; later documents
    are scored with the updated base. The model's weights are restored at the end. compiled: the LoRA
    forward/backward through torch.compile. deadline (ctx.clock() time): adaptation stops, for every rank at once,
    when what is left of it would no longer cover adapting the next batch (or a global phase) and then scoring the
    rest unadapted at the measured rates, less a margin; every document is still scored, once, in order.
    Returns (val_loss, val_bpb, seconds)."""
    t0 = ctx.clock()
    docs = documents(val[0])
    n_pre, B = min(p["prefix_docs"], len(docs)), p["batch"]
    cuts = {k * n_pre // p["phases"] for k in range(1, p["phases"] + 1)} if p["phases"] else set()
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(docs)) + [len(docs)]
    saved = [q.detach().clone() for q in model.parameters()]
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # nll, bytes, targets; unadapted docs, targets
    order = np.argsort(-docs[:, 1], kind="stable")  # longest first: even batches, and the longest learn first
    chunk = np.empty(len(docs), np.int64)  # each document's: that of its batch, which the batch's longest one leads
    for j, hi in ((j, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) for j in range(lo, hi, B)):
        chunk[order[j:min(j + B, hi)]] = ttt_chunk(p, docs[order[j], 1])
    work = ttt_window_tokens(docs[:, 1], chunk, p["seq_len"])
    total = int(work.sum()) / ctx.world  # window tokens a rank
    lora, shared = TTTAdapters(model, p, B, ctx.device), Shared(ctx)
    nll_fn = compile_fn(ttt_nll, "ttt_nll", 1) if compiled else ttt_nll  # dynamic dims: one graph for all batches
    margin = 2.0 + 0.02 * ctx.budget  # the reductions, the last logs and submission.json, and the estimates' error
    spent = {True: [0.0, 0], False: [0.0, 0]}  # adapted / unadapted batches after the first: seconds, window tokens
    n_batches, adapting, skipped, first, n_first = 0, True, 0, 0.0, 0

    def rate(adapt):  # seconds per window token; scoring alone costs as much as adapting until measured (the
        sec, n = spent[adapt]  # forward, with gradients on for one graph, dominates a chunk step on a CPU)
        return sec / n if n else rate(True) if not adapt and spent[True][1] else first / max(n_first, 1)

    def affordable(cost, rest):  # `cost` more seconds of adapting still leaves time to score `rest` unadapted
        return deadline is None or ctx.clock() + cost + rate(False) * rest / ctx.world + margin <= deadline

    def project():
        if not n_batches:  # the other ranks took every batch
            return ctx.log(f"ttt_projected: {label} no batch ran on this rank")
        proj = first + rate(True) * max(total - n_first, 0)
        ctx.log(f"ttt_projected: {label} {proj:.0f}s for {total:.0f} window tokens a rank (first batch {first:.1f}s, "
                f"then {spent[True][1]} in {spent[True][0]:.1f}s; global steps not included)"
                + (" warning: over the evaluation budget" if proj > ctx.budget else ""))

    model.requires_grad_(False)
    try:
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            while (j := shared.next_batch(k)) * B < hi - lo:  # the next batch of this phase, any rank's
                mine = order[lo + j * B:min(lo + (j + 1) * B, hi)]
                n = int(work[mine].sum())
                rest = int(work.sum()) - shared.add("taken", n)
                # before the first batch nothing is measured: it adapts if any time is left beyond the margin
                if adapting and (shared.add("stop", 0) or not affordable(rate(True) * n if n_batches else 0.0, rest)):
                    adapting = False
                    if not shared.add("stop", 0):
                        shared.add("stop")
                        ctx.log(f"ttt_deadline: {label} adaptation stops at {ctx.clock() - deadline + ctx.budget:.1f}s "
                                f"of EVAL_BUDGET_SECONDS={ctx.budget:g}: {rest + n} window tokens left, scored with "
                                "the base weights as they are")
                t = ctx.clock()
                sums[:3] += ttt_batch(ctx, model, val, docs[mine], p, lora, nll_fn, on_scored, adapting)
                if not adapting:
                    sums[3:] += torch.tensor([len(mine), docs[mine, 1].sum()], dtype=torch.float64, device=ctx.device)
                if deadline is not None or n_batches in (0, 3):
                    ctx.sync()
                n_batches += 1
                if n_batches == 1:  # the first batch compiles: the rates and the projection leave it out
                    first, n_first = ctx.clock() - t0, n
                else:
                    spent[adapting][0] += ctx.clock() - t
                    spent[adapting][1] += n
                if n_batches == 4:
                    project()
            if k + 1 < len(bounds) - 1:  # a boundary: the base learns from every document scored so far
                scored = docs[order[:bounds[k + 1]]]
                go = adapting and affordable(rate(True) * scored[:, 1].sum() * p["global_epochs"],
                                             int(work.sum()) - shared.add("taken", 0))
                if ctx.all_reduce(torch.tensor(float(not go), device=ctx.device), dist.ReduceOp.MAX).item():
                    adapting, skipped = False, skipped + 1  # every rank skips it: no rank left in a collective
                    continue
                global_sgd(ctx, model, val, scored, p)
                lora.fresh()
    finally:
        with torch.no_grad():
            for q, s in zip(model.parameters(), saved):
                q.copy_(s)
        model.requires_grad_(False)
    if n_batches < 4:  # a rank of few batches projects from what it ran
        project()
    ctx.all_reduce(sums)
    ctx.sync()
    s = sums.tolist()
    if deadline is not None:
        ctx.notes.update(ttt_unadapted_documents=int(s[3]), ttt_unadapted_targets=int(s[4]), ttt_phases_skipped=skipped)
        if s[3] or skipped:
            ctx.log(f"ttt_deadline: {label} {int(s[3])} documents ({int(s[4])} targets) scored without adaptation, "
                    f"{skipped} global phases skipped, to end inside EVAL_BUDGET_SECONDS={ctx.budget:g}")
    return s[0] / s[2], s[0] / math.log(2) / s[1], ctx.clock() - t0

def ttt_desc(p):
    return " ".join(f"{k}:{','.join(v) if isinstance(v, list) else v}" for k, v in p.items())

LEGAL = ("ttt", "slot_causal", "sliding", "roundtrip")  # score-first; slot_scored fits the targets it then scores

@exact_fp32()
def final_evals(a, ctx, model, val, results, label):
    """Round trip on plain windows, then ONE hidden-state pass per stride that serves sliding scoring and SLOT
    (or every grid point of a sweep), then TTT (or its sweep, in the same table). Fills results[name] =
    (val_loss, val_bpb, seconds) and logs each figure."""
    K, t = a.ngram_tilt_order, ctx.clock()
    if K:  # every rank hints the whole stream on its host, inside the eval's time
        val, hints = Val(*val), ngram_hints(val[0], K, a.ngram_tilt_threshold)
        val.tilt, hit = (a.ngram_tilt_beta, torch.from_numpy(hints).to(ctx.device)), hints[1:] >= 0
        ctx.log(f"ngram_tilt: order:{K} hinted:{hit.mean():.4%} of {hit.size} targets seconds:{ctx.clock() - t:.1f}")
    with ctx.phase("eval"):
        L = a.eval_seq_len
        results["roundtrip"] = r = evaluate(ctx, model, val, L, L, a.eval_batch, label="round-trip eval")[0]
        ctx.log(f"final_{label}_roundtrip_exact val_loss:{r[0]:.8f} val_bpb:{r[1]:.8f} eval_time:{r[2]:.1f}s")
        grid = a.sweep_grid()
        slot = [] if grid or not a.slot_enabled else [a.slot_point()]
        rows = []
        for stride in sorted({p["stride"] for p in grid + slot} | ({a.eval_stride} if a.sliding_enabled else set())):
            plain = bool(grid) or (a.sliding_enabled and stride == a.eval_stride)
            pts = [None] * plain + [p for p in grid + slot if p["stride"] == stride]
            t = time.perf_counter()
            res = evaluate(ctx, model, val, L, stride, a.slot_batch if len(pts) > plain else a.eval_batch, pts,
                           label=f"stride-{stride} pass ({len(pts)} points)")
            ctx.log(f"eval_pass: stride:{stride} points:{len(pts)} hidden_passes:1 "
                    f"seconds:{time.perf_counter() - t:.1f}")
            for p, r in zip(pts, res):
                if p is None and a.sliding_enabled and stride == a.eval_stride:
                    results["sliding"] = r
                    ctx.log(f"final_sliding_window_exact stride:{stride} val_loss:{r[0]:.8f} val_bpb:{r[1]:.8f} "
                            f"eval_time:{r[2]:.1f}s")
                if p is not None and not grid:
                    results["slot_" + p["mode"]] = r
                    ctx.log(f"final_slot_exact mode:{p['mode']} delta:{p['delta']} steps:{p['steps']} "
                            f"val_loss:{r[0]:.8f} val_bpb:{r[1]:.8f} eval_time:{r[2]:.1f}s")
                if grid:
                    p = p or dict(mode="plain", delta="-", steps=0, lr=0.0, lr_min=0.0)
                    rows.append(f"| {p['mode']} | {p['delta']} | {p['steps']} | {p['lr']:g} | {p['lr_min']:g} | "
                                f"{stride} | {r[0]:.6f} | {r[1]:.6f} | {r[2]:.1f} |")
                    ctx.log("sweep_row " + rows[-1])
    ctx.compiles("eval (round trip, sliding, SLOT)")
    ttt_grid, compiled = a.ttt_grid(), a.compile and ctx.compile
    with ctx.phase("TTT") if a.ttt_enabled or ttt_grid else contextlib.nullcontext():
        if a.ttt_enabled and not ttt_grid:
            results["ttt"] = r = ttt_evaluate(ctx, model, val, a.ttt_point(), compiled=compiled, deadline=ctx.deadline)
            ctx.log(f"final_ttt_exact val_loss:{r[0]:.8f} val_bpb:{r[1]:.8f} eval_time:{r[2]:.1f}s "
                    + ttt_desc(a.ttt_point()))
        for p in ttt_grid:
            r = ttt_evaluate(ctx, model, val, p, label=f"sweep TTT {ttt_desc(p)}", compiled=compiled)
            rows.append(f"| ttt | rank {p['rank']} chunk {p['chunk']} docs {p['prefix_docs']} | {p['steps']} | "
                        f"{p['lr']:g} | - | - | {r[0]:.6f} | {r[1]:.6f} | {r[2]:.1f} |")
            ctx.log("sweep_row " + rows[-1])
    if a.ttt_enabled or ttt_grid:
        ctx.compiles("TTT")
    if rows:
        ctx.log("sweep table:\n| mode | delta | steps | lr | lr_min | stride | val_loss | val_bpb | seconds |\n"
                "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


# ----------------------------------------------------------------------------- main

def setup_distributed():
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1:  # the other ranks wait while rank 0 exports: at the record size about 1.5 min of codecs and at
        # most 5 of pruning's slow-codec calls (up to ~35 s each), so 30 min is > 5x the worst export, not NCCL's 10
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, local, device

def on_main(ctx, fn):
    """Runs fn on rank 0 and hands its result (or its one-line error) to every rank."""
    out = [None, None]
    if ctx.main:
        try:
            out[0] = fn()
        except (ConfigError, OSError) as e:
            out[1] = error_text(e)
    if ctx.world > 1:
        dist.broadcast_object_list(out, src=0)
    if out[1]:
        raise ConfigError(out[1])
    return out[0]

def error_text(e):
    """The text of the one `error:` line for a ConfigError, an OSError (any file read or written) or an interrupt."""
    if isinstance(e, KeyboardInterrupt):
        return ("interrupted (Ctrl-C or SIGTERM); files already written are complete; fix: run again (this RUN_ID is "
                "free again: its log ends with this line)")
    if isinstance(e, OSError):
        e = (f"{e.filename or 'a file'}: {e.strerror or e} ({type(e).__name__}); fix: check that path (it or its "
             "folder must exist and be readable or writable) and the free disk space")
    return esc(e)

def write_atomic(path, data):
    """Bytes (or a dict, as strict JSON) to a temporary name, then renamed: never a partial file under `path`."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        if isinstance(data, dict):
            data = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except ValueError:
        raise ConfigError(f"{path}: a result is NaN or infinite (diverged); fix: lower the learning rates") from None
    except OSError as e:  # a full disk names no file: this names the one being written
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); fix: free disk space, check the folder") from None
    finally:
        tmp.unlink(missing_ok=True)

def open_run(a, ctx, code_bytes):
    """Rank 0, before any data is read: names the run, checks its outputs and opens its log; returns the run id."""
    run_id = a.run_id or datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    base = Path(a.log_dir) / run_id
    try:
        Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"LOG_DIR={a.log_dir!r} is not a writable folder ({e.strerror}); fix: point LOG_DIR at a "
                          "folder you can write, or move the file in its way") from None
    outputs = [f"{base}.submission.json"]
    outputs += [] if a.eval_only else [a.artifact or f"{base}.{a.quant_label()}.pgz", f"{base}.prequant.pgz"]
    log, note = Path(f"{base}.txt"), None
    if not any(map(os.path.lexists, outputs)) and log.is_file() and not log.is_symlink() and failed_log(log):
        kept = next(f"{base}.failed{k}.txt" for k in range(1, 1 << 20) if not os.path.lexists(f"{base}.failed{k}.txt"))
        os.replace(log, kept)  # a run that failed before writing anything does not keep its RUN_ID
        note = f"note: {log} was a failed run's log (it wrote no weights, artifact or submission): moved to {kept}"
    for p in filter(os.path.lexists, outputs + [log]):
        raise ConfigError(f"RUN_ID={run_id!r}: {p} already exists{' as a folder' if Path(p).is_dir() else ''} and a "
                          f"run never replaces another's files; fix: pick another RUN_ID (or ARTIFACT), or delete "
                          f"{base}.* to reuse it on purpose")
    if not a.eval_only and 0 < a.target_bytes <= code_bytes:
        raise ConfigError(f"TARGET_BYTES={a.target_bytes}: the code alone is {code_bytes} bytes, no room for the "
                          "model; fix: raise TARGET_BYTES (the record uses 16000000) or set 0 (no pruning)")
    ctx.log_file = open(f"{base}.txt", "x", encoding="utf-8")  # "x": two runs racing for one RUN_ID cannot share it
    if note:
        ctx.log(note)
    return run_id

def failed_log(path):
    """A run's log that ends with its `error:` line: the run stopped on it (a running or killed run's does not)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return bool(lines) and lines[-1].startswith("error: ")

def model_from(config, state, ctx, compile_eval):
    model = build_model(config, ctx.device, train=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"artifact tensors do not match its model config ({str(e).splitlines()[0]})") from None
    model.requires_grad_(False)
    if compile_eval and ctx.compile:
        # one graph per batch size: EVAL_BATCH and SLOT_BATCH
        model.eval_hidden = compile_fn(model.forward_hidden, "GPT.forward_hidden (eval)", 2, dynamic=False)
    return model

def run(a, ctx, run_id, code_bytes):
    ctx.budget = a.eval_budget_seconds
    t_val = time.perf_counter()
    sp = load_tokenizer(a.tokenizer_path, a.vocab_size)
    val_files = find_shards(a.data_path, "val")
    train_files = None if a.eval_only else find_shards(a.data_path, "train")
    tokens = np.concatenate([load_shard(f, a.vocab_size) for f in val_files])[:a.val_tokens or None]
    if len(tokens) < 2:  # token ids were checked by load_shard
        raise ConfigError(f"DATA_PATH={a.data_path!r}: the val shards hold {len(tokens)} tokens, no target to score; "
                          "fix: use the full val shards, or VAL_TOKENS=0 or >= 2")
    if a.val_longest_docs:  # each kept document followed by a BOS, its last target as in the stream
        docs = documents(tokens)
        keep = np.sort(np.argsort(-docs[:, 1], kind="stable")[:a.val_longest_docs])
        tokens = np.concatenate([tokens[s:s + n] for s, n in docs[keep]] + [np.array([BOS_ID], tokens.dtype)])
    val = Val(tokens, target_bytes(tokens, byte_tables(sp, a.vocab_size)))
    t_val = time.perf_counter() - t_val  # the eval's share of the start-up, counted in eval_total
    ctx.log(f"val_loader: tokens:{len(tokens)} bytes:{int(val[1].sum())} seconds:{t_val:.1f}")
    ctx.bytes_ratio = sidecar_ratio(val_files, val, ctx.log)
    results, steps, train_ms = {}, 0, 0.0
    L, log_base = a.eval_seq_len, Path(a.log_dir) / run_id
    if not a.eval_only:
        torch.manual_seed(a.seed)
        model = build_model(a.arch(), ctx.device)
        ctx.log(f"model_params:{sum(p.numel() for p in model.parameters())} rope_base:{rope_base(a.arch()):.1f}")
        with ctx.phase("training"):
            steps, train_ms, loader = train(a, ctx, model, train_files, val)
        with ctx.phase("export"):
            t = time.perf_counter()
            n_cal = -(-a.gptq_calib_batches // ctx.world)
            if a.gptq_calib == "train":
                x, _, _ = loader.next_batch(n_cal * a.train_seq_len, a.train_seq_len)
                with exact_fp32():
                    H = collect_hessians(ctx, model, x.split(8))
                cal = time.perf_counter() - t
                used = round(train_ms / 1000 + cal, 1)  # one rounding: the figure and its check agree
                ctx.log(f"gptq_calib: train, {n_cal * ctx.world} sequences in {cal:.1f}s; training "
                        f"{train_ms / 1000:.1f}s + calibration = {used:.1f}s "
                        + (f"of the {a.max_wallclock_seconds:g}s cap" if a.max_wallclock_seconds else "(no time cap)")
                        + (" warning: over the cap, so not a valid record run; fix: a larger GPTQ_RESERVE_SECONDS"
                           if a.max_wallclock_seconds and used > a.max_wallclock_seconds else ""))
            state = {k: v.detach().float() for k, v in model.state_dict().items()}
            on_main(ctx, lambda: write_atomic(f"{log_base}.prequant.pgz", encode_artifact(
                [(k, "fp32", v.cpu().numpy()) for k, v in state.items()], "none", "prequant", a.arch())))
            ctx.log(f"prequant_path: {log_base}.prequant.pgz")
            if a.gptq_calib == "selfgen":
                seqs = self_generate(ctx, model, n_cal, a.train_seq_len, a.gptq_temperature, a.seed)
                with exact_fp32():
                    H = collect_hessians(ctx, model, seqs.split(8))
                ctx.log(f"gptq_calib: selfgen, {n_cal * ctx.world} sequences of {a.train_seq_len} tokens generated at "
                        f"temperature {a.gptq_temperature} in {time.perf_counter() - t:.1f}s")
            with exact_fp32():
                model_bytes = on_main(ctx, lambda: export(a, ctx, state, H, code_bytes))
            total = code_bytes + model_bytes
            ctx.log(f"artifact_bytes: code:{code_bytes} model:{model_bytes} total:{total} limit:{a.size_limit_bytes}")
            if total > a.size_limit_bytes:
                raise ConfigError(f"artifact {a.artifact}: code + model = {total} bytes exceeds SIZE_LIMIT_BYTES="
                                  f"{a.size_limit_bytes}; fix: set TARGET_BYTES at or below the limit so that pruning "
                                  "fits it, or shrink the model")
        with exact_fp32():
            results["prequant"] = evaluate(ctx, model, val, L, L, a.eval_batch, label="prequant eval")[0]
        ctx.log(f"final_prequant_exact val_loss:{results['prequant'][0]:.8f} val_bpb:{results['prequant'][1]:.8f}")
        del model
    t_eval = time.perf_counter()  # the evaluation as a submission runs it: from the artifact to the last score
    ctx.deadline = t_eval - t_val + ctx.budget  # on ctx.clock, counted from the first read of the val data
    header, arrays = read_artifact(a.artifact)
    if a.eval_only:
        for k in sorted(set(a.explicit) & set(ARCH_KEYS)):
            if header["config"][k] != getattr(a, k.lower()):
                ctx.log(f"warning: {k} is set but ignored: the artifact's model has {k}={header['config'][k]}")
        ctx.log(f"eval_only: artifact {a.artifact} label:{header['label']} codec:{header['codec']}")
    # with TTT the headline and no sliding window or SLOT, the round trip's one pass runs eager: a cold compile of
    # the whole forward would cost more of the budget than it saves (TTT compiles its own step)
    plain_only = a.ttt_enabled and not (a.sliding_enabled or a.slot_enabled or a.sweep_grid())
    model = model_from(header["config"], dequantize(arrays), ctx, a.compile and not plain_only)
    if plain_only and a.compile and ctx.compile:
        ctx.log("eval_compile: the round trip runs eager (TTT is the headline, no sliding or SLOT): one cold compile "
                "fewer; TTT's step is compiled")
    final_evals(a, ctx, model, val, results, header["label"])
    ctx.sync()
    took = round(ctx.all_reduce(torch.tensor(time.perf_counter() - t_eval, dtype=torch.float64, device=ctx.device),
                                dist.ReduceOp.MAX).item() + t_val, 1)  # one rounding: the log and the JSON agree
    ctx.log(f"eval_total: {took:.1f}s of the {ctx.budget:g} s evaluation budget (val data {t_val:.1f}s, "
            f"then artifact read, decompression, model build, every compile and eval to the last score; slowest rank)"
            + (" warning: over the budget" if took > ctx.budget else ""))
    if took > ctx.budget and not (a.sweep_grid() or a.ttt_grid()):  # a sweep is no submission: it may run long
        raise ConfigError(f"EVAL_BUDGET_SECONDS={ctx.budget:g}: the evaluation took {took:.1f}s even with adaptation "
                          "stopped at its deadline, so no headline is reported; fix: a larger budget, or evals that "
                          "fit it (SLIDING_ENABLED=0, SLOT_ENABLED=0, a smaller EVAL_BATCH or VAL_TOKENS)")
    if ctx.main:
        write_submission(a, ctx, run_id, results, code_bytes, os.path.getsize(a.artifact), header, steps, train_ms,
                         took)

def write_submission(a, ctx, run_id, results, code_bytes, model_bytes, header, steps, train_ms, eval_seconds):
    """The headline is the best figure of a legal (score-first) method; every figure, scored SLOT's included, is kept
    under `results` with its method and whether it is legal."""
    metric = min((k for k in LEGAL if k in results), key=lambda k: results[k][1])
    r = ctx.bytes_ratio  # with val byte sidecars: every figure on their bytes too, labelled; the headline unchanged
    hw = (f"{ctx.world}x {torch.cuda.get_device_name()}" if ctx.device.type == "cuda"
          else f"{ctx.world}x CPU ({torch.get_num_threads()} threads)")
    c, label = header["config"], header["label"]
    slot = f"({a.slot_steps} steps, lr {a.slot_lr:g}, stride {a.eval_stride})"
    method = {"prequant": "plain windows, weights before quantisation", "roundtrip": "plain windows",
              "sliding": f"sliding window stride {a.eval_stride}", "slot_causal": f"causal SLOT {slot}",
              "slot_scored": f"scored-position SLOT {slot}, the seeds' method: not score-first, never merged",
              "ttt": f"score-first TTT ({ttt_desc(a.ttt_point())})"}
    sub = dict(author=a.author, github_id=a.github_id, name=run_id, date=datetime.now(timezone.utc).isoformat(),
               val_loss=results[metric][0], val_bpb=results[metric][1], bytes_total=code_bytes + model_bytes,
               bytes_code=code_bytes, bytes_model=model_bytes, artifact=Path(a.artifact).name,
               blurb=f"{c['NUM_LAYERS']}L d{c['MODEL_DIM']} GQA {c['NUM_HEADS']}/{c['NUM_KV_HEADS']}, {label} "
                     f"artifact; val_bpb from {method[metric]}; {hw}; {steps} training steps"
                     + (" (eval-only run)" if a.eval_only else ""),
               metric=metric, hardware=hw, seed=a.seed, train_steps=steps, train_time_ms=round(train_ms),
               eval_seconds=eval_seconds, eval_budget_seconds=ctx.budget, **ctx.notes,
               val_tokens=int(a.val_tokens) or "all",
               results={k: dict(val_loss=v[0], val_bpb=v[1], seconds=round(v[2], 1), method=method.get(k, k),
                                legal=k in LEGAL, **({"val_bpb_on_sidecar_bytes": v[1] * r} if r else {}))
                        for k, v in results.items()}, **({"sidecar_bytes_ratio": r} if r else {}))
    path = Path(a.log_dir) / f"{run_id}.submission.json"
    write_atomic(path, sub)
    ctx.log(f"submission: {path} val_bpb:{sub['val_bpb']:.8f} ({metric}: {method[metric]})")

PACK_HEAD = 'exec(compile(__import__("{}").decompress(__import__("base64").b85decode(\n"'  # line 2: the payload, so
PACK_TAIL = '")),__file__,"exec"))\n'  # a traceback's line of the wrapper is line 1, not the payload

def pack_source(src):
    """train_gpt.py as a record submits it: the source bz2- or xz-compressed (the smaller), base85 in a 2-line wrapper
    that runs it unchanged in the wrapper's own globals (same __name__ and __file__). Deterministic."""
    blobs = {"bz2": bz2.compress(src, 9), "lzma": lzma.compress(src, preset=9 | lzma.PRESET_EXTREME)}
    mod = min(blobs, key=lambda m: len(blobs[m]))
    return (PACK_HEAD.format(mod) + base64.b85encode(blobs[mod]).decode() + PACK_TAIL).encode()

def code_identity(path):
    """(bytes counted, plain source) of the plain or the packed script at `path`: both count the packed size."""
    raw = Path(path).read_bytes()
    for mod in ("bz2", "lzma"):
        head, tail = PACK_HEAD.format(mod).encode(), PACK_TAIL.encode()
        if raw.startswith(head) and raw.endswith(tail):
            return len(raw), importlib.import_module(mod).decompress(base64.b85decode(raw[len(head):-len(tail)]))
    return len(pack_source(raw)), raw

def main():
    code_bytes, source = code_identity(__file__)
    rank0, status, ctx = os.environ.get("RANK", "0") == "0", 0, None
    # SIGTERM stops a run as Ctrl-C does; SIGINT too where it arrives ignored (a background job of a shell)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        a = Settings()
        typos = warn_env_typos()
        rank, world, local, device = setup_distributed()
        ctx = Ctx(rank, world, local, device)
        run_id = on_main(ctx, lambda: open_run(a, ctx, code_bytes))
        a.artifact = a.artifact or str(Path(a.log_dir) / f"{run_id}.{a.quant_label()}.pgz")
        for t in typos:
            ctx.log(t)
        ctx.log(f"run_id:{run_id} mode:{'eval_only' if a.eval_only else 'train'} world:{world} device:{device} "
                f"attention:{ATTN_NAME} torch:{torch.__version__} code_bytes:{code_bytes} (packed; source "
                f"{len(source)} bytes, sha256 {hashlib.sha256(source).hexdigest()[:16]})")
        ctx.log("settings: " + " ".join(f"{n}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                        for n, v in ((n, getattr(a, n.lower())) for n, *_ in SETTINGS)))
        run(a, ctx, run_id, code_bytes)
    except (ConfigError, OSError, KeyboardInterrupt) as e:
        if rank0:
            print(f"error: {error_text(e)}", file=sys.stderr, flush=True)
        if ctx and ctx.log_file:  # a failed run's log says why
            print(f"error: {error_text(e)}", file=ctx.log_file, flush=True)
        status = 130 if isinstance(e, KeyboardInterrupt) else 2
    except BaseException as e:
        traceback.print_exc()
        if ctx and ctx.log_file:
            print(f"error: crashed ({type(e).__name__}); the traceback is on stderr", file=ctx.log_file, flush=True)
        status = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skips interpreter teardown, where gloo's threads can abort a finished multi-rank run

if __name__ == "__main__":
    main()
