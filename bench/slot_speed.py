"""SLOT step time, side by side in one run:
- scored mode: logits over the scored span only (train_gpt.slot_fit) versus the seeds' full projection (logits
  for all seq_len positions of every window at every step, masked mean NLL);
- causal mode (fit on the context, seq_len - stride positions per window): train_gpt.slot_fit's broadcast deltas
  over [windows, positions, d] versus the gather it replaced (delta[r], bias[r] for every context row, whose
  backward is an indexed add with ~seq_len duplicates per window).

    python bench/slot_speed.py            # seq 2048, stride 64, d 512, vocab 1024, 32 windows, fp32

Each path is timed as whole SLOT fits of `steps` AdamW steps (warm-up first, then several repeats, median),
reported per step, on CUDA if present, else CPU. The last lines are `slot_speedup: <full/scored>` and
`causal_speedup: <gather/broadcast>`. `slot_fit_full` and `slot_fit_gather` are also the reference
implementations the tests compare slot_fit against."""
from __future__ import annotations

import argparse, math, statistics, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def slot_fit_full(model, h, mask, y, p):
    """The seeds' SLOT: every step projects all positions of every window to logits [b, L, V] and takes the
    masked mean NLL. Same parameters, initialisation, optimizer and schedule as train_gpt.slot_fit; written
    independently of it (own soft-cap and loss). Returns (delta [n, d], bias [n, V])."""
    b, L, d = h.shape
    n = b if p["delta"] == "window" else 1
    W = model.head_weight().detach().float()
    cap = model.softcap
    delta = torch.zeros(n, 1, d, device=h.device, requires_grad=True)
    bias = torch.zeros(n, 1, W.size(0), device=h.device, requires_grad=True)
    m = mask.float()
    if p["steps"] == 0 or m.sum() == 0:
        return delta.detach().view(n, d), bias.detach().view(n, -1)
    opt = torch.optim.AdamW([delta, bias], lr=p["lr"], weight_decay=p["wd"], eps=p["eps"])
    with torch.enable_grad():
        for i in range(p["steps"]):
            opt.param_groups[0]["lr"] = p["lr_min"] + 0.5 * (p["lr"] - p["lr_min"]) * (1 + math.cos(math.pi * i / p["steps"]))
            z = (h + delta) @ W.T + bias  # [b, L, V]: every position, as the seeds do
            z = cap * torch.tanh(z / cap)
            nll = F.cross_entropy(z.reshape(-1, z.size(-1)), y.reshape(-1), reduction="none").view(b, L)
            loss = (nll * m).sum() / m.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return delta.detach().view(n, d), bias.detach().view(n, -1)


def slot_fit_gather(model, h, mask, y, p):
    """The previous train_gpt.slot_fit: the masked positions gathered into rows once, then delta[r] and bias[r]
    indexed per row at every step (an indexed-add backward). Returns (delta [n, d], bias [n, V])."""
    rows, cols = mask.nonzero(as_tuple=True)
    n = h.size(0) if p["delta"] == "window" else 1
    W = model.head_weight().detach().float()
    delta = torch.zeros(n, h.size(-1), device=h.device, requires_grad=True)
    bias = torch.zeros(n, W.size(0), device=h.device, requires_grad=True)
    if p["steps"] == 0 or len(rows) == 0:
        return delta.detach(), bias.detach()
    r = rows if n > 1 else torch.zeros_like(rows)
    hs, ys = h[rows, cols], y[rows, cols]
    opt = torch.optim.AdamW([delta, bias], lr=p["lr"], weight_decay=p["wd"], eps=p["eps"])
    with torch.enable_grad():
        for i in range(p["steps"]):
            opt.param_groups[0]["lr"] = p["lr_min"] + 0.5 * (p["lr"] - p["lr_min"]) * (1 + math.cos(math.pi * i / p["steps"]))
            z = (hs + delta[r]) @ W.T + bias[r]
            z = model.softcap * torch.tanh(z / model.softcap)
            loss = F.cross_entropy(z, ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return delta.detach(), bias.detach()


def context_mask(mask, stride):
    """The causal fit's mask: every position before the scored tail (all windows here have scored context)."""
    ctx = torch.zeros_like(mask)
    ctx[:, :mask.size(1) - stride] = True
    return ctx


def scored_nll(model, h, mask, y, delta, bias):
    """Per scored position NLL [n_scored] with a fitted delta/bias (rows of the mask in row-major order)."""
    rows, cols = mask.nonzero(as_tuple=True)
    r = rows if delta.size(0) > 1 else torch.zeros_like(rows)
    W = model.head_weight().detach().float()
    z = (h[rows, cols] + delta[r]) @ W.T + bias[r]
    z = model.softcap * torch.tanh(z / model.softcap)
    return F.cross_entropy(z, y[rows, cols], reduction="none")


def make_problem(batch, seq_len, stride, dim, vocab, device, seed=0):
    """Final-norm-like hidden states, a head with realistic logit scale, random targets, and the sliding-window
    scored mask (the last `stride` positions of each window, as for every window after the first)."""
    g = torch.Generator().manual_seed(seed)
    h = F.rms_norm(torch.randn(batch, seq_len, dim, generator=g), (dim,))
    W = torch.randn(vocab, dim, generator=g) * (3.0 / math.sqrt(dim))
    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[:, seq_len - stride:] = True
    model = SimpleNamespace(head_weight=lambda: W.to(device), softcap=30.0)
    return model, h.to(device), mask.to(device), y.to(device)


def time_fit(fn, model, h, mask, y, p, repeats, device):
    sync = train_gpt.Ctx(0, 1, 0, device).sync
    fn(model, h, mask, y, dict(p, steps=1))  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn(model, h, mask, y, p)
        sync()
        times.append((time.perf_counter() - t) / p["steps"])
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=0, help="AdamW steps per timed fit (0: 16 on CUDA, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed fits per path (0: 10 on CUDA, 3 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    steps = args.steps or (16 if device.type == "cuda" else 2)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    model, h, mask, y = make_problem(args.batch, args.seq_len, args.stride, args.dim, args.vocab, device)
    p = dict(mode="scored", delta="window", steps=steps, lr=0.008, lr_min=0.0008, eps=1e-8, wd=0.01)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}) torch {torch.__version__}")
    print(f"problem: {args.batch} windows x seq {args.seq_len}, stride {args.stride} ({int(mask.sum())} scored "
          f"positions), d {args.dim}, vocab {args.vocab}, fp32; {steps} AdamW steps per fit, median of {repeats}")
    t_scored, (d1, b1) = time_fit(train_gpt.slot_fit, model, h, mask, y, p, repeats, device)
    t_full, (d2, b2) = time_fit(slot_fit_full, model, h, mask, y, p, repeats, device)
    print(f"scored-positions step (train_gpt.slot_fit): {t_scored * 1000:.2f} ms")
    print(f"full-projection step (seeds):              {t_full * 1000:.2f} ms")
    n1, n2 = scored_nll(model, h, mask, y, d1, b1), scored_nll(model, h, mask, y, d2, b2)
    diff = max((d1 - d2).abs().max().item(), (b1 - b2).abs().max().item())
    print(f"equivalence after {steps} steps: max|delta,bias diff| {diff:.2e}, "
          f"max|scored nll diff| {(n1 - n2).abs().max().item():.2e}")
    cmask = context_mask(mask, args.stride)
    t_bcast, (d3, b3) = time_fit(train_gpt.slot_fit, model, h, cmask, y, dict(p, mode="causal"), repeats, device)
    t_gather, (d4, b4) = time_fit(slot_fit_gather, model, h, cmask, y, dict(p, mode="causal"), repeats, device)
    print(f"causal step, broadcast deltas (train_gpt.slot_fit): {t_bcast * 1000:.2f} ms "
          f"({int(cmask.sum())} context positions)")
    print(f"causal step, per-row gather (previous code):       {t_gather * 1000:.2f} ms")
    n3, n4 = scored_nll(model, h, mask, y, d3, b3), scored_nll(model, h, mask, y, d4, b4)
    diff = max((d3 - d4).abs().max().item(), (b3 - b4).abs().max().item())
    print(f"causal equivalence after {steps} steps: max|delta,bias diff| {diff:.2e}, "
          f"max|scored nll diff| {(n3 - n4).abs().max().item():.2e}")
    print(f"slot_speedup: {t_full / t_scored:.2f}")
    print(f"causal_speedup: {t_gather / t_bcast:.2f}")


if __name__ == "__main__":
    main()
