"""Speed of train_gpt.py on whatever device is present, measured with the script's own train() and evaluate() on
synthetic shards: training ms/step, tokens/s, model FLOPs per token and MFU against a matmul rate measured in the
same run; sliding-eval tokens/s; SLOT windows/s. CUDA: the record config at one GPU's share of the 8-GPU batch
(98,304 tokens per step). CPU: a toy size, so that CI runs it. The last line is a short table.

    python bench/bench.py
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

RECORD = dict(TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1", ITERATIONS="40", WARMUP_STEPS="5",
              TRAIN_LOG_EVERY="10")
TOY = dict(NUM_LAYERS="11", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8", BIGRAM_VOCAB_SIZE="512",
           BIGRAM_DIM="32", VE_DIM="32", TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="4096", GRAD_ACCUM_STEPS="1",
           ITERATIONS="6", WARMUP_STEPS="1", TRAIN_LOG_EVERY="3", EVAL_SEQ_LEN="128", EVAL_STRIDE="32",
           SLOT_STEPS="4")
COMMON = dict(WARMDOWN_ITERS="0", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", LATE_QAT_THRESHOLD="0")


def write_shard(path, tokens):
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = [tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)]
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def matmul_rate(device, dtype, n, reps):
    """FLOP/s of an n x n matrix product in the dtype training multiplies in."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = tg.Ctx(0, 1, 0, device).sync
    for _ in range(2):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main():
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    a = tg.Settings({**COMMON, **(RECORD if cuda else TOY)})
    ctx = tg.Ctx(0, 1, 0, device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        n_train = (a.iterations + a.warmup_steps + 2) * a.train_batch_tokens + 1
        write_shard(Path(d) / "fineweb_train_000000.bin", rng.integers(0, a.vocab_size, n_train))
        files = tg.find_shards(d, "train")
        val_tokens = rng.integers(0, a.vocab_size, 262144 if cuda else 8192).astype(np.uint16)
        val = (val_tokens, np.ones(len(val_tokens) - 1))
        torch.manual_seed(0)
        model = tg.GPT(a.arch()).to(device)
        if cuda:
            for m in model.modules():
                if isinstance(m, torch.nn.Embedding):
                    m.bfloat16()
        steps, train_ms, _ = tg.train(a, ctx, model, files, val)
    ms_step = train_ms / steps
    tok_s = a.train_batch_tokens / ms_step * 1000
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
    n_matmul += model.head_weight().numel() if model.lm_head is None else 0
    # 6 FLOPs per matmul weight per token (forward + backward), plus causal attention scores and values
    flops_tok = 6 * n_matmul + 6 * a.num_layers * a.model_dim * a.train_seq_len
    rate = matmul_rate(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024, 20 if cuda else 5)
    mfu = flops_tok * tok_s / rate

    model.requires_grad_(False)
    if cuda and a.compile:
        model.eval_hidden = torch.compile(model.forward_hidden, dynamic=False)
    L, S = a.eval_seq_len, a.eval_stride
    slot = dict(mode="scored", delta="window", steps=a.slot_steps, lr=a.slot_lr, lr_min=a.slot_lr_min)
    warm = (val[0][:L * 4 + 1], val[1][:L * 4])
    tg.evaluate(ctx, model, warm, L, S, a.eval_batch)  # compile outside the timed runs
    tg.evaluate(ctx, model, warm, L, S, a.slot_batch, [slot])
    sliding = tg.evaluate(ctx, model, val, L, S, a.eval_batch)[0]
    slot_r = tg.evaluate(ctx, model, val, L, S, a.slot_batch, [slot])[0]
    n_windows = len(tg.window_starts(len(val[0]) - 1, L, S))
    sliding_tok_s = (len(val[0]) - 1) / sliding[2]
    slot_win_s = n_windows / slot_r[2]

    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}  torch {torch.__version__}  attention {tg.ATTN_NAME}")
    print(f"config: {a.num_layers}L d{a.model_dim} seq {a.train_seq_len}, {a.train_batch_tokens} tokens/step, "
          f"{steps} timed steps; eval seq {L} stride {S}, SLOT {a.slot_steps} steps x {a.slot_batch} windows")
    print(f"matmul_rate: {rate / 1e12:.2f} TFLOP/s ({'bf16' if cuda else 'fp32'}, measured)")
    print("| ms/step | tokens/s/GPU | MFLOP/token | MFU | sliding tokens/s | SLOT windows/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {ms_step:.2f} | {tok_s:,.0f} | {flops_tok / 1e6:.1f} | {mfu:.1%} | {sliding_tok_s:,.0f} | "
          f"{slot_win_s:,.1f} |")


if __name__ == "__main__":
    main()
