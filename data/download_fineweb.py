"""Download the official FineWeb sp1024 shards and tokenizer (standard library only).

Source: the public Hugging Face dataset repo willdepueoai/parameter-golf. Remote paths
datasets/datasets/fineweb10B_sp1024/<shard> and datasets/tokenizers/fineweb_1024_bpe.model
are stored as <out>/datasets/fineweb10B_sp1024/<shard> and
<out>/tokenizers/fineweb_1024_bpe.model. Files already present (shards with a valid
header) are skipped; every file is downloaded to a .part file, checked, then renamed.

    python data/download_fineweb.py [--train-shards N] [--out data] [--base-url URL]
"""

import argparse
import http.client
import json
import os
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
DATASET = "fineweb10B_sp1024"
TOKENIZER = "fineweb_1024_bpe.model"
REPO = "datasets/willdepueoai/parameter-golf/resolve/main"
DEFAULT_BASE_URL = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{REPO}"
FIX = "Fix: check network access to huggingface.co, or pass --base-url (or set HF_ENDPOINT) to a reachable mirror."


def shard_problem(path):
    """None if `path` is a complete shard, else what is wrong with it."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return f"only {size} bytes, shorter than the header"
    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
    if magic != MAGIC or version != VERSION:
        return f"bad header: magic {magic}, version {version} (expected {MAGIC}, {VERSION})"
    if size != HEADER_BYTES + 2 * count:
        return f"size {size} bytes does not match the {count} tokens in its header"
    return None


def fetch(url, dest, attempts=3):
    """Download `url` to a .part file beside `dest` and return its path; retries transient errors."""
    tmp = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            return tmp
        except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
            tmp.unlink(missing_ok=True)
            transient = not isinstance(e, urllib.error.HTTPError) or e.code >= 500
            if not transient or attempt == attempts:
                sys.exit(f"error: could not download {url}: {e}. {FIX}")
            time.sleep(2 ** attempt)


def val_and_train_counts(base_url):
    """(val shards, train shards) listed by the manifest, or None if it is unavailable or unreadable.

    Expects the layout the official loader (data/cached_challenge_fineweb.py) is believed to
    read, unverified here: a "datasets" list whose entry named fineweb10B_sp1024 has "stats"
    with integer "files_val" and "files_train". Anything else falls back to the fixed names.
    """
    url = f"{base_url}/datasets/manifest.json"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            manifest = json.load(response)
        entry = next(d for d in manifest["datasets"] if d.get("name") == DATASET)
        counts = entry["stats"]["files_val"], entry["stats"]["files_train"]
        if all(isinstance(n, int) and n >= 0 for n in counts):
            return counts
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        pass
    print(f"note: could not read shard counts from {url}; assuming 1 val shard", flush=True)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (default: 80 = all)")
    parser.add_argument("--out", type=Path, default=Path("data"), help="local data root (default: data)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"repo root URL (default: {DEFAULT_BASE_URL})")
    args = parser.parse_args()
    base = args.base_url.rstrip("/")

    counts = val_and_train_counts(base)
    val_shards = counts[0] if counts else 1
    if counts and args.train_shards > counts[1]:
        sys.exit(f"error: --train-shards {args.train_shards} exceeds the {counts[1]} train shards listed in "
                 f"{base}/datasets/manifest.json. Fix: pass --train-shards {counts[1]} or fewer.")

    shards = [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    shards += [f"fineweb_train_{i:06d}.bin" for i in range(args.train_shards)]
    files = [(f"tokenizers/{TOKENIZER}", args.out / "tokenizers" / TOKENIZER)]
    files += [(f"datasets/{DATASET}/{s}", args.out / "datasets" / DATASET / s) for s in shards]

    for i, (remote, dest) in enumerate(files, 1):
        is_shard = dest.suffix == ".bin"
        if dest.is_file() and dest.stat().st_size > 0 and not (is_shard and shard_problem(dest)):
            print(f"[{i}/{len(files)}] skip {dest} (already present)", flush=True)
            continue
        url = f"{base}/datasets/{remote}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        tmp = fetch(url, dest)
        problem = shard_problem(tmp) if is_shard else (None if tmp.stat().st_size else "empty file")
        if problem:
            tmp.unlink()
            sys.exit(f"error: {url} is not a valid {'shard' if is_shard else 'file'} ({problem}); nothing was kept. "
                     "Fix: re-run to retry, or point --base-url at a copy of willdepueoai/parameter-golf.")
        size = tmp.stat().st_size
        os.replace(tmp, dest)
        print(f"[{i}/{len(files)}] got {dest} ({size / 1e6:.1f} MB, {time.time() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
