"""Sizes and times of the data commands, measured where the real hub cannot be reached: downloads from the hub
stand-in on 127.0.0.1 (tests/fake_hub.py) and re-tokenisation of local English text (the embedded corpus plus the
docstrings and prose of every installed package, build_corpus.py --site-packages). Also the CaseOps byte count:
the rule's bytes (train_gpt.py) against the val byte sidecar's on that text.

    python bench/data_prep.py [--out DIR] [--shards N] [--chars C] [--vocabs 1024,4096,8192] [--workers W]

Prints a table per part; docs/data.md quotes logs/data_prep_cpu.txt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "data")]
from fake_hub import FakeHub  # noqa: E402


def shard(path, tokens):
    header = np.zeros(256, "<i4")
    header[:3] = 20240520, 1, len(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, "<u2").tobytes())


def timed(cmd, env=None):
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed: {r.stderr.strip()}")
    return time.time() - t, r.stdout


def download_part(tmp, n_shards, workers):
    """Official-size shards (100M tokens, 200 MB) on the stand-in; a fresh download, a re-run that skips them all."""
    repo = tmp / "hub" / "owner" / "pg" / "datasets"
    rng = np.random.default_rng(0)
    for i in range(n_shards):
        shard(repo / "datasets" / "fineweb10B_sp1024" / f"fineweb_train_{i:06d}.bin",
              rng.integers(0, 1024, 100_000_000, dtype=np.uint16))
    shard(repo / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", rng.integers(0, 1024, 62_021_632,
                                                                                            dtype=np.uint16))
    tok = repo / "tokenizers"
    tok.mkdir(parents=True)
    (tok / "fineweb_1024_bpe.model").write_bytes(os.urandom(253_847))  # the official model's size
    (repo / "manifest.json").write_text(json.dumps({
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t", "stats": {"files_train": n_shards,
                                                                                    "files_val": 1}}],
        "tokenizers": [{"name": "t", "model_path": "tokenizers/fineweb_1024_bpe.model"}]}))
    total = sum(p.stat().st_size for p in repo.rglob("*.*"))
    print(f"## download from the stand-in: {n_shards} train shards + val (62,021,632 tokens) + tokenizer, "
          f"{total / 1e6:,.0f} MB\n\n| run | workers | seconds | MB/s |\n|---|---|---|---|")
    with FakeHub(tmp / "hub") as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*")
        for w in sorted({1, workers}):  # one file at a time, and the downloader's default
            env["HF_HOME"] = str(tmp / f"hf{w}")
            out = tmp / f"out{w}"
            cmd = [sys.executable, "data/download_fineweb.py", "--repo", "owner/pg", "--out", str(out),
                   "--workers", str(w)]
            t, _ = timed(cmd, env)
            print(f"| fresh | {w} | {t:.1f} | {total / 1e6 / t:.0f} |")
            t, stdout = timed(cmd, env)
            assert "already complete" in stdout
            print(f"| again (all complete: skipped) | {w} | {t:.1f} | - |")
    print()


def retokenize_part(tmp, chars, vocabs, workers):
    """Re-tokenise local English text at each vocabulary size (plain, and CaseOps at the largest)."""
    import build_corpus
    docs = build_corpus.collect_docs(site_packages=True, max_chars=chars)
    path = tmp / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    size = path.stat().st_size
    val_docs = len(docs) // 10
    print(f"## re-tokenise {len(docs):,} local documents ({sum(map(len, docs)):,} characters, {size / 1e6:.1f} MB of "
          f"JSON lines; the first {val_docs:,} are val), {workers} worker(s)\n\n"
          "| vocab | CaseOps | tokenizer s | total s | val tokens | train tokens | bytes/token (val, rule) |\n"
          "|---|---|---|---|---|---|---|")
    for vocab, caseops in [(v, False) for v in vocabs] + [(vocabs[-1], True)]:
        t, stdout = timed([sys.executable, "data/retokenize.py", "--vocab-size", str(vocab), "--docs", str(path),
                           "--out", str(tmp / "retok"), "--val-docs", str(val_docs), "--workers", str(workers)]
                          + ["--caseops"] * caseops)
        tok_s = next(float(x.split(" trained in ")[1].split()[0]) for x in stdout.splitlines() if "trained in" in x)
        name = f"fineweb10B_sp{vocab}" + "_caseops" * caseops
        info = json.loads((tmp / "retok" / "datasets" / name / "retokenize.json").read_text())
        rule = rule_bytes(tmp / "retok", vocab, caseops)
        print(f"| {vocab} | {'yes' if caseops else 'no'} | {tok_s:.1f} | {t:.1f} | {info['val_tokens']:,} | "
              f"{info['train_tokens']:,} | {rule / info['val_tokens']:.3f} |")
    print()
    return path, val_docs


def rule_bytes(out, vocab, caseops, ratio=False):
    import train_gpt as tg
    suffix = "_caseops" * caseops
    folder = out / "datasets" / f"fineweb10B_sp{vocab}{suffix}"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / f"fineweb_{vocab}_bpe{suffix}.model"))
    val_files = tg.find_shards(str(folder), "val")
    tokens = np.concatenate([tg.load_shard(f, vocab) for f in val_files])
    val = (tokens, tg.target_bytes(tokens, tg.byte_tables(sp, vocab)))
    if ratio:
        return val, tg.sidecar_ratio(val_files, val, print), sp, tokens
    return int(val[1].sum())


def caseops_part(tmp, vocab):
    import caseops
    import train_gpt as tg
    print(f"## CaseOps byte counts on the val split above (vocab {vocab})\n")
    val, ratio, sp, tokens = rule_bytes(tmp / "retok", vocab, True, ratio=True)
    docs = np.split(tokens, np.flatnonzero(tokens == 1))[1:]
    original = sum(len(caseops.decode(sp.decode(d[1:].tolist())).encode()) for d in docs)
    naive = int(tg.target_bytes(tokens, tg.byte_tables(sp, vocab)[:3] + (np.zeros(0, np.int64),)).sum())
    plain_rule = rule_bytes(tmp / "retok", vocab, False)
    print(f"\nrule bytes (train_gpt.py, operators 0): {int(val[1].sum()):,}; UTF-8 bytes of the decoded, inverse-"
          f"transformed text: {original:,}; the same text through the plain sp{vocab} tokenizer, rule bytes: "
          f"{plain_rule:,}; operators counted as 3 bytes each (the naive rule): {naive:,} "
          f"({naive / int(val[1].sum()) - 1:+.2%}); sidecar bytes: {int(val[1].sum()) / ratio:,.0f} "
          f"(sidecar / rule = {1 / ratio:.4f}, {1 / ratio - 1:+.2%})\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="keep the outputs here (default: a temporary folder)")
    p.add_argument("--shards", type=int, default=2, help="100M-token train shards on the stand-in")
    p.add_argument("--chars", type=int, default=40_000_000, help="characters of local text to re-tokenise")
    p.add_argument("--vocabs", default="1024,4096,8192")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-download", action="store_true")
    args = p.parse_args()
    tmp = args.out or Path(tempfile.mkdtemp(prefix="data_prep_"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"data_prep: {os.cpu_count()} CPU(s), outputs in {tmp}\n")
    if not args.skip_download:
        download_part(tmp, args.shards, 8)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    retokenize_part(tmp, args.chars, vocabs, args.workers)
    caseops_part(tmp, vocabs[-1])


if __name__ == "__main__":
    main()
