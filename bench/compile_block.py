"""Whole-model vs per-block torch.compile, MEASURED on this machine with inductor: compile seconds, dynamo's
`compile:` graph counts and the compiled training step, side by side, at the record-frontier architecture
(record_frontier.env: 11 layers looped to 17 slots, parallel lanes from layer 8, MLP 4x, vocabulary 8,192) at a
reduced width (default d64, 4 heads, 2 KV heads), one training forward + backward with the loops on, fp32.

    python bench/compile_block.py                  # every mode; --modes whole,block-buffer; --dim 128 --seq 512

Modes, each in a fresh process (no graph shared between them; inductor's caches off, so every kernel compiles):
  whole         torch.compile(model, dynamic=False, fullgraph=True): what train() compiles today
  block         each Block's forward compiled (Block.compile), the glue (embedding, skips, head, loss) eager; the
                code as it is: its per-layer LN scale 1/sqrt(layer+1) is a float that dynamo specialises, so every
                layer compiles its own graph (the recompile limit raised to let it)
  block-buffer  as block, with each LN scale moved into a 0-dim buffer (what adopting per-block would need): blocks
                with the same code path share one graph
Compile seconds = the warm-up steps' time less as many steady steps (inductor compiles some graphs lazily, on a
later call); step = the median of the timed steps after the warm-up."""
from __future__ import annotations

import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("whole", "block", "block-buffer")


def settings(dim, heads, kv):
    env = dict(line.split("=", 1) for line in (ROOT / "record_frontier.env").read_text().splitlines()
               if line and not line.startswith("#"))
    env.update(VOCAB_SIZE="8192", MODEL_DIM=str(dim), NUM_HEADS=str(heads), NUM_KV_HEADS=str(kv),
               ROPE_DIMS=str(dim // heads // 2))
    return env


def one(mode, args):
    """Runs one mode in this process; prints one JSON line."""
    import torch
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg
    from torch._dynamo.utils import counters
    torch._inductor.config.force_disable_caches = True
    torch.set_num_threads(args.threads)
    a = tg.Settings(settings(args.dim, args.heads, args.kv))
    torch.manual_seed(0)
    model = tg.build_model(a.arch(), torch.device("cpu"))
    tg.LOOPING = True
    if mode == "whole":
        net = torch.compile(model, dynamic=False, fullgraph=True)
    else:
        torch._dynamo.config.recompile_limit = 64
        for b in model.blocks:
            if mode == "block-buffer":
                b.register_buffer("in_scale_t", torch.tensor(b.in_scale), persistent=False)
                b.in_scale = b.in_scale_t
            b.compile(dynamic=False, fullgraph=True)
        net = model
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, a.vocab_size, (args.batch, args.seq), generator=g) for _ in range(2))

    def step():
        t = time.perf_counter()
        net(x, y).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    warm = [step() for _ in range(args.warmup)]
    steady = sorted(step() for _ in range(args.steps))[args.steps // 2]
    print(json.dumps(dict(mode=mode, first=warm[0], warm=sum(warm), steady=steady,
                          compile=sum(warm) - args.warmup * steady, graphs=counters["stats"]["unique_graphs"],
                          captured=counters["stats"]["calls_captured"], slots=len(model.slots),
                          params=sum(p.numel() for p in model.parameters()))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args)
    import torch
    print(f"compile_block: MEASURED on this machine ({os.cpu_count()} CPU cores, {args.threads} threads), torch "
          f"{torch.__version__}, inductor (CPU), fp32; record-frontier architecture at d{args.dim} ({args.heads} "
          f"heads, "
          f"{args.kv} KV), vocabulary 8,192, batch {args.batch} x {args.seq} tokens, loops on; one training step = "
          f"forward + backward; {args.warmup} warm-up steps, median of {args.steps} timed")
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", mode] + sys.argv[1:], capture_output=True, text=True)
        line = [s for s in out.stdout.splitlines() if s.startswith("{")]
        if out.returncode or not line:
            print(f"  {mode}: FAILED ({(out.stderr.strip().splitlines() or ['?'])[-1]})")
            continue
        rows.append(json.loads(line[-1]))
    if rows:
        print(f"model: {rows[0]['params']:,} parameters, {rows[0]['slots']} slots")
    print("| mode | compile: graphs | first step s | compile s (warm-up less steady) | compiled step ms | vs whole |")
    print("|---|---|---|---|---|---|")
    base = next((r["steady"] for r in rows if r["mode"] == "whole"), None)
    for r in rows:
        ratio = f"{r['steady'] / base:.2f}x" if base else "-"
        print(f"| {r['mode']} | {r['graphs']} | {r['first']:.1f} | {r['compile']:.1f} | {r['steady'] * 1e3:.1f} | "
              f"{ratio} |")


if __name__ == "__main__":
    main()
