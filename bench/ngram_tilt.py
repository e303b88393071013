"""What the n-gram tilt's hints cost (train_gpt.ngram_hints, SPEC section 11): the seconds to hint a stream as long
as the val split (47,851,520 tokens) on one CPU core, against a goal of 60 s.

    OMP_NUM_THREADS=1 python bench/ngram_tilt.py            # the val split's length, vocab 1024, order 16, 0.8
    python bench/ngram_tilt.py --tokens 100000              # a quick run

The stream is random but repetitive, like web text in its repeats only: token ids drawn with probability ~ 1/rank
(Zipf), then --copy-frac of the positions overwritten by spans (geometric lengths, mean --span) copied from
earlier in the stream, as quoted or boilerplate text. Only contexts that occur twice reach the second half of the
computation, so the time depends somewhat on how repetitive the stream is. Peak memory is the process's peak
resident size (the stream included)."""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy and torch load
    os.environ.setdefault(_v, "1")

import argparse, resource, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

VAL_TOKENS = 47_851_520  # the fineweb val split, sp1024 (SPEC section 2)
GOAL_SECONDS = 60.0


def stream(n, vocab, copy_frac, span, seed):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    x = rng.choice(vocab, n, p=p / p.sum()).astype(np.uint16)
    k = int(n * copy_frac / span)
    for d, length in zip(np.sort(rng.integers(1, n, k)).tolist(), rng.geometric(1 / span, k).tolist()):
        s = int(rng.integers(0, d))
        length = min(length, n - d, d - s)  # the source ends before the copy starts: it is earlier text
        x[d:d + length] = x[s:s + length]
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=VAL_TOKENS)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--order", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--copy-frac", type=float, default=0.3)
    ap.add_argument("--span", type=float, default=64.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = stream(args.tokens, args.vocab, args.copy_frac, args.span, args.seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    hints = tg.ngram_hints(x, args.order, args.threshold)
    sec = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hit = hints >= 0
    print(f"stream: {args.tokens:,} tokens, vocab {args.vocab}, Zipf ids, {args.copy_frac:g} of positions in copied "
          f"spans (mean {args.span:g}), seed {args.seed}; order {args.order}, threshold {args.threshold:g}; "
          f"threads: numpy/OMP {os.environ['OMP_NUM_THREADS']}, torch {torch.get_num_threads()}")
    print(f"hinted: {hit.sum():,} positions ({hit.mean():.2%}); hint right: {(hints[hit] == x[hit]).mean():.2%}")
    print(f"memory: peak RSS {rss:,.0f} MB ({rss0:,.0f} MB with the stream, before the hints)")
    print(f"seconds: {sec:.1f} for {args.tokens:,} tokens ({sec / args.tokens * 1e9:.0f} ns/token); "
          f"ratio to the {GOAL_SECONDS:g} s goal at {VAL_TOKENS:,} tokens: "
          f"{sec * VAL_TOKENS / args.tokens / GOAL_SECONDS:.2f}"
          + (" (scaled linearly from this length)" if args.tokens != VAL_TOKENS else ""))


if __name__ == "__main__":
    main()
