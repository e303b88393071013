"""Which SLOT mode leaks (SPEC section 8): on independent uniform random tokens no causal predictor can beat
log2(vocab) bits per token in expectation (Gibbs: E[-log2 q(y)] >= log2 V for any q chosen without seeing y), so
a method that does is reading the targets it scores.

    python bench/slot_leak.py              # 8192 tokens, vocab 1024, seq 128, stride 64, seeds' SLOT settings

Scores the same random stream with a random-init toy model (near-uniform predictions) three ways through
train_gpt.evaluate: plain sliding window, SLOT_MODE=causal, SLOT_MODE=scored. Bytes per token are a fixed random
table of 1..4 bytes per token id, so val_bpb = bits / mean bytes. The noise margin is 4 standard errors of the
per-token bits (paired against plain), from per-token NLLs that `scored_logprobs` recomputes with evaluate's own
pieces (window_batch, slot_fit, softcap_logits); their sums match evaluate's."""
from __future__ import annotations

import argparse, math, sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402

SEEDS_SLOT = dict(delta="window", steps=16, lr=0.008, lr_min=0.0008, eps=1e-8, wd=0.01)  # SPEC section 7, seeds 000/001


def toy_model(vocab, dim=64, layers=2, seed=0, perturb=0.0, **extra):
    """A small model of the record architecture (every feature on), built through Settings like a run; `extra`
    settings (e.g. NUM_LOOPS=1) override. perturb > 0 adds N(0, perturb^2) to every parameter and gives the
    embedding unit scale, so that predictions depend strongly on the context (random init alone is near-uniform)."""
    env = dict(VOCAB_SIZE=vocab, NUM_LAYERS=layers, MODEL_DIM=dim, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2,
               ROPE_DIMS=4, XSA_LAST_N=layers, BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, VE_DIM=16,
               VE_LAYERS=",".join(str(i) for i in range(layers)), **extra)
    cfg = train_gpt.Settings({k: str(v) for k, v in env.items()}).arch()
    torch.manual_seed(seed)
    model = train_gpt.GPT(cfg)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
            model.tok_emb.weight.normal_(0, 1.0)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def scored_logprobs(model, val, seq_len, stride, batch, point=None, full=False):
    """evaluate()'s per-batch scoring for one point on one CPU rank, kept per target: returns (targets [n]
    indices into val, nll [n] float64 nats, logp [n, V] or None). Uses train_gpt's window_starts, window_batch,
    slot_fit and softcap_logits exactly as evaluate does (the SLOT fit runs on the batch's scored mask, or its
    already-scored context mask in causal mode, and the scored positions are then scored with the fitted
    delta/bias)."""
    tg = train_gpt
    starts = tg.window_starts(len(val[0]) - 1, seq_len, stride)
    W = model.head_weight().detach().float()
    out_t, out_nll, out_lp = [], [], []
    for b in range(-(-len(starts) // batch)):
        s = starts[b * batch:(b + 1) * batch]
        x, y, score, context, _, _ = tg.window_batch(val, s, seq_len, stride, batch, torch.device("cpu"))
        h = model.forward_hidden(x).float()
        rows, cols = score.nonzero(as_tuple=True)
        hs, bias = h[rows, cols], None
        if point is not None:
            delta, bias = tg.slot_fit(model, h, score if point["mode"] == "scored" else context, y, point)
            r = rows if delta.size(0) > 1 else torch.zeros_like(rows)
            hs, bias = hs + delta[r], bias[r]
        logp = F.log_softmax(tg.softcap_logits(hs, W, model.softcap, bias), dim=-1)
        ys = y[rows, cols]
        out_t.append(torch.as_tensor(s)[rows] + cols)
        out_nll.append(-logp.gather(1, ys[:, None])[:, 0].double())
        if full:
            out_lp.append(logp)
    return torch.cat(out_t).numpy(), torch.cat(out_nll).numpy(), torch.cat(out_lp) if full else None


def uniform_val(n_tokens, vocab, seed=0):
    """Independent uniform tokens and a fixed per-id byte table (1..4 bytes) applied to the targets."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n_tokens).astype(np.uint16)
    per_id = rng.integers(1, 5, vocab)
    return tokens, per_id[tokens[1:].astype(np.int64)].astype(np.int64)


def leak_table(n_tokens=8192, vocab=1024, seq_len=128, stride=64, batch=32, slot=SEEDS_SLOT, seed=0, dim=64):
    """Rows (one per method: plain, causal SLOT, scored SLOT) with bits/token and val_bpb from train_gpt.evaluate,
    the same numbers from the per-token recomputation, and the noise: standard error of the mean bits/token
    (`se`) and of the paired difference to plain (`se_vs_plain`)."""
    torch.manual_seed(seed)
    model = toy_model(vocab, dim=dim, seed=seed)
    val = uniform_val(n_tokens, vocab, seed)
    points = [None, dict(slot, mode="causal"), dict(slot, mode="scored")]
    ctx = train_gpt.Ctx(0, 1, 0, torch.device("cpu"))
    results = train_gpt.evaluate(ctx, model, val, seq_len, stride, batch, points)
    rows, bits_plain = [], None
    for name, p, (loss, bpb, _) in zip(["plain sliding", "causal SLOT", "scored SLOT"], points, results):
        t, nll, _ = scored_logprobs(model, val, seq_len, stride, batch, p)
        bits = nll[np.argsort(t)] / math.log(2)
        bits_plain = bits if bits_plain is None else bits_plain
        n = len(bits)
        rows.append(dict(method=name, bits_per_token=loss / math.log(2), val_bpb=bpb, n=n,
                         recomputed_bits_per_token=bits.mean(), se=bits.std(ddof=1) / math.sqrt(n),
                         se_vs_plain=(bits - bits_plain).std(ddof=1) / math.sqrt(n),
                         diff_vs_plain=bits.mean() - bits_plain.mean()))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is much faster than two contending ones
    rows = leak_table(args.tokens, args.vocab, args.seq_len, args.stride, seed=args.seed)
    print(f"uniform random tokens: {args.tokens}, vocab {args.vocab} (log2 V = {math.log2(args.vocab):.4f} bits), "
          f"seq {args.seq_len}, stride {args.stride}; SLOT {SEEDS_SLOT['steps']} steps, lr {SEEDS_SLOT['lr']} -> "
          f"{SEEDS_SLOT['lr_min']}, delta per window + logit bias; random-init toy model")
    print("| method | bits/token | val_bpb | bits/token - log2 V (s.e.) | vs plain (s.e.) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_token']:.4f} | {r['val_bpb']:.4f} | "
              f"{r['bits_per_token'] - math.log2(args.vocab):+.4f} ({r['se']:.4f}) | "
              f"{r['diff_vs_plain']:+.4f} ({r['se_vs_plain']:.4f}) |")


if __name__ == "__main__":
    main()
