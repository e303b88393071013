"""Score-first TTT time: measured throughput of train_gpt.ttt_evaluate on this device, and the projected time of a
full TTT eval of the record-size model on 8xH100 next to the 600 s evaluation budget.

    python bench/ttt_speed.py                       # record model, TTT_* settings from the environment/defaults
    python bench/ttt_speed.py --val-shard PATH      # real document lengths from a val shard (else assumed)

What is measured: seconds of ttt_evaluate (per-document LoRA, no global phase) on a sample of synthetic documents
with the record architecture, and from it this device's FLOP rate under the FLOP model below. What is computed:
the FLOPs of the full eval, from the document lengths (the real split's when a shard is given; otherwise an
ASSUMED log-normal length distribution with the split's totals: 62,021,632 tokens in 50,000 documents).
What is assumed: the FLOP model (forward 2 x matrix params per token plus causal attention; backward of a
frozen base ~2x forward, so a training chunk costs 3x forward; a document's last chunk only its forward;
padding inside a batch ignored) and an H100 bf16 dense peak of 989 TFLOP/s at a given MFU (the seeds' measured
training MFU, ~26 %, is the reference). Every assumption is printed."""
from __future__ import annotations

import argparse, math, sys, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

VAL_TOKENS, VAL_DOCS, H100_BF16 = 62_021_632, 50_000, 989e12


def window_lengths(lens, chunk, seq_len):
    """Per chunk of every document: (window length, whether the adapters train after it)."""
    m = -(-lens // chunk)
    doc = np.repeat(np.arange(len(lens)), m)
    c = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
    n = lens[doc]
    return np.minimum(np.minimum((c + 1) * chunk, n), seq_len), (c + 1) * chunk < n


def ttt_flops(lens, p, cfg, n_matrix):
    """FLOPs of the per-document LoRA part and of the global phases, under the module's FLOP model."""
    T, train = window_lengths(lens.astype(np.int64), p["chunk"], p["seq_len"])
    d, L = cfg["MODEL_DIM"], cfg["NUM_LAYERS"]
    fwd = 2.0 * n_matrix * T + 2.0 * L * d * T.astype(np.float64) ** 2  # causal QK^T and AV: 4 L d T^2 / 2
    local = float((fwd * np.where(train & (p["steps"] > 0), 3 * p["steps"], 1)).sum())  # scoring fwd = 1st step fwd
    n_pre = min(p["prefix_docs"], len(lens))
    cuts = sorted({round(k * n_pre / p["phases"]) for k in range(1, p["phases"] + 1)} if p["phases"] else set())
    prefix = sum(int(lens[:c].sum()) for c in cuts if 0 < c < len(lens))
    S = p["seq_len"]
    per_tok = 3 * (2.0 * n_matrix + 2.0 * L * d * S)  # full training steps: weights get gradients too
    return local, float(prefix * p["global_epochs"] * per_tok)


def doc_lengths(shard):
    if shard:
        tokens = tg.load_shard(shard, 1 << 16)[:VAL_TOKENS]
        return tg.documents(tokens)[:, 1], f"real: {shard}, {len(tokens)} tokens"
    rng = np.random.default_rng(0)
    raw = rng.lognormal(0.0, 1.0, VAL_DOCS)
    lens = np.maximum(1, np.round(raw / raw.sum() * VAL_TOKENS)).astype(np.int64)
    return lens, ("ASSUMED: log-normal (sigma 1.0) document lengths scaled to 62,021,632 tokens in 50,000 documents "
                  "(no val shard given)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--val-shard", default="", help="fineweb_val_*.bin for the real document lengths")
    ap.add_argument("--docs", type=int, default=4, help="synthetic documents in the timed sample")
    ap.add_argument("--doc-len", type=int, default=192, help="targets per synthetic document")
    ap.add_argument("--mfu", type=float, default=0.26, help="assumed H100 model FLOP utilisation of TTT")
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    a = tg.Settings()
    cfg, p = a.arch(), a.ttt_point()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tg.GPT(cfg).to(device).requires_grad_(False)
    n_matrix = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, tg.CastedLinear) and n.startswith("blocks.")) + model.head_weight().numel()
    ctx = tg.Ctx(0, 1, 0, device)
    lens = np.full(args.docs, args.doc_len)
    rng = np.random.default_rng(1)
    tokens = np.concatenate([np.concatenate([[tg.BOS_ID], rng.integers(2, cfg["VOCAB_SIZE"], n)]) for n in lens]
                            + [[tg.BOS_ID]]).astype(np.uint16)
    val = (tokens, np.ones(len(tokens) - 1))
    sample = dict(p, phases=0, batch=args.docs)
    tg.ttt_evaluate(ctx, model, (tokens[:2 * args.doc_len], val[1][:2 * args.doc_len - 1]), sample)  # warm-up
    t = time.perf_counter()
    tg.ttt_evaluate(ctx, model, val, sample)
    ctx.sync()
    sec = time.perf_counter() - t
    flops_sample = ttt_flops(lens, sample, cfg, n_matrix)[0]
    rate = flops_sample / sec
    all_lens, source = doc_lengths(args.val_shard)
    local, glob = ttt_flops(all_lens, p, cfg, n_matrix)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model: {cfg['NUM_LAYERS']}L d{cfg['MODEL_DIM']} (settings from the environment), {sum(q.numel() for q in model.parameters())} parameters, "
          f"{n_matrix} in matrices (incl. head)")
    print("ttt settings: " + tg.ttt_desc(p))
    print(f"measured: {args.docs} docs x {args.doc_len} targets on {dev_name}: {sec:.2f}s, "
          f"{flops_sample / 1e12:.3f} TFLOP by the model -> {rate / 1e9:.1f} GFLOP/s")
    print(f"document lengths: {source}; {len(all_lens)} docs, mean {all_lens.mean():.0f}, max {all_lens.max()}")
    print(f"full eval FLOPs: per-document LoRA {local / 1e15:.2f} PFLOP + global phases {glob / 1e15:.3f} PFLOP")
    print(f"projection at this device's measured rate, {args.gpus} devices: {(local + glob) / rate / args.gpus:.0f}s")
    for mfu in (0.10, 0.15, 0.26, 0.40):
        print(f"  at MFU {mfu:.2f}: {(local + glob) / (args.gpus * H100_BF16 * mfu):.0f}s on {args.gpus}xH100")
    h100 = (local + glob) / (args.gpus * H100_BF16 * args.mfu)
    print(f"assumed: H100 bf16 dense peak {H100_BF16 / 1e12:.0f} TFLOP/s, MFU {args.mfu:.2f} "
          f"(reference: the seeds' training, ~0.26)")
    print(f"ttt_projected_8xh100: {h100:.0f}s of the 600 s evaluation budget "
          f"({'fits' if h100 < 600 else 'OVER'}; margin {600 - h100:.0f}s)")


if __name__ == "__main__":
    main()
