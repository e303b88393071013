"""Download a published FineWeb variant (shards and tokenizer) through the Hugging Face hub client.

    python data/download_fineweb.py [--variant NAME] [--repo OWNER/NAME] [--train-shards N] [--out DIR] [--workers W]

A dataset repo holds datasets/manifest.json: "datasets" entries (name fineweb10B_<variant>, tokenizer_name,
stats.files_train, stats.files_val) and "tokenizers" entries (name, model_path, vocab_path, relative to
datasets/). Remote datasets/X lands at DIR/X: the shards of variant V in DIR/datasets/fineweb10B_V/, its tokenizer
in DIR/tokenizers/; val byte sidecars (fineweb_val_bytes_NNNNNN.bin, the CaseOps dataset's) come along when the
repo has them. The last line printed is the DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE to train with.

Variants and the repo each defaults to (SPEC sections 2 and 10): sp1024 (willdepueoai/parameter-golf, the
default), sp4096 and sp8192 (kevclark/parameter-golf), sp8192_lossless_caps_caseops_v1_reserved
(romeerp/parameter-golf-caseops-v1). --train-shards defaults to what a 600 s record run reads, 40 shards (or every
train shard the manifest lists, if fewer): the best merged record trained 4,931 steps of 786,432 tokens, 3.88 B
tokens, 39 shards of 100 M, and one more for margin.

Every file goes through the hub client and its cache (HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply; a
dropped connection resumes where the client last wrote), W files at a time. Before a file gets its final name it is
checked: size and checksum against the hub's (sha256 for large files, git blob sha1 for small ones), and a shard's
header (magic 20240520, version 1, a token count that matches its size). It is then hard-linked from the cache (so
it shares the cache's disk space: never edit it in place; copied across file systems) under a temporary name and
renamed. Files already complete under their final names are skipped without a request. A bad copy is removed from
the cache and fetched once more; bad again: one `error:` line naming it, and nothing under its final name.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
DEFAULT_REPO = "willdepueoai/parameter-golf"
REPOS = {"sp1024": DEFAULT_REPO, "sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf",
         "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1"}
DOCS = "datasets/docs_selected.jsonl"  # the selected documents (in DEFAULT_REPO); data/retokenize.py reads them
PROGRESS_SECONDS = 10.0
NAME = re.compile(r"[A-Za-z0-9_.-]+")


class Failure(Exception):
    """What went wrong, printed as one `error:` line."""


def hub():
    """The huggingface_hub module, its own progress bars and warnings off (this script prints its own)."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.file_download
        import huggingface_hub.utils
    except ImportError:
        raise Failure("the huggingface_hub package is not installed; fix: pip install -r requirements.txt") from None
    huggingface_hub.utils.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()
    return huggingface_hub


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def shard_problem(path):
    """None if `path` is a complete shard, else what is wrong with it."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        return f"only {size} bytes, shorter than the {HEADER_BYTES}-byte header"
    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
    if magic != MAGIC or version != VERSION:
        return f"bad header: magic {magic}, version {version} (expected {MAGIC}, {VERSION})"
    if size != HEADER_BYTES + 2 * count:
        return f"{size} bytes, but its header declares {count} tokens ({HEADER_BYTES + 2 * count} bytes)"
    return None


def complete(path):
    """Whether `path` is a whole file already: a shard with a valid header and size, or any other non-empty file."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    return path.suffix != ".bin" or shard_problem(path) is None


def digest(path, etag):
    """The file's checksum in the form of the hub's etag: sha256 (64 hex) or git blob sha1 (40 hex); None if the
    etag is neither."""
    if re.fullmatch("[0-9a-f]{64}", etag or ""):
        h = hashlib.sha256()
    elif re.fullmatch("[0-9a-f]{40}", etag or ""):
        h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    else:
        return None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Hub:
    """One dataset repo through the hub client: cached downloads with retries, checks and one-line failures."""

    def __init__(self, repo, attempts=3):
        self.hf, self.repo, self.attempts = hub(), repo, attempts
        self.endpoint = self.hf.constants.ENDPOINT

    def _retry(self, what, fn):
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # the client's errors differ across its versions; a 4xx is final
                status = getattr(getattr(e, "response", None), "status_code", None)
                final = attempt == self.attempts or (status is not None and 400 <= status < 500) \
                    or "NotFound" in type(e).__name__
                if final:
                    fix = ("check --repo and --variant (the repo's datasets/manifest.json lists the variants)"
                           if status == 404 or "NotFound" in type(e).__name__ else
                           f"check network access to {self.endpoint}, or set HF_ENDPOINT to a reachable mirror")
                    raise Failure(f"could not fetch {what} from {self.repo} at {self.endpoint} ({one_line(e)}); "
                                  f"fix: {fix}") from None
                time.sleep(attempt)

    def exists(self, remote):
        try:
            self.hf.get_hf_file_metadata(self.hf.hf_hub_url(self.repo, remote, repo_type="dataset"))
            return True
        except Exception as e:
            if getattr(getattr(e, "response", None), "status_code", None) == 404:
                return False
            raise Failure(f"could not look up {remote} in {self.repo} at {self.endpoint} ({one_line(e)}); fix: check "
                          f"network access to {self.endpoint}, or set HF_ENDPOINT to a reachable mirror") from None

    def fetch(self, remote):
        """The cache's copy of `remote`, downloaded if needed, after its size, checksum and (shards) header checks.
        A bad copy is removed from the cache and downloaded once more before the file counts as corrupt."""
        for attempt in (1, 2):
            path = self._retry(remote, lambda: self.hf.hf_hub_download(self.repo, remote, repo_type="dataset"))
            problem = self.problem(remote, path)
            if problem is None:
                return Path(path)
            for p in {os.path.realpath(path), path}:  # the cache blob and its snapshot link
                Path(p).unlink(missing_ok=True)
        raise Failure(f"{remote} from {self.repo} is corrupt or short ({problem}, twice); nothing was kept; fix: run "
                      "the same command again later, or use another --repo (this copy of the file is bad)")

    def problem(self, remote, path):
        """None if the cached file matches the hub's size and checksum (and is a whole shard), else what is wrong."""
        try:
            meta = self.hf.get_hf_file_metadata(self.hf.hf_hub_url(self.repo, remote, repo_type="dataset"))
            size, etag = meta.size, meta.etag
        except Exception:  # offline (HF_HUB_OFFLINE=1) with the file cached: the header check still applies
            size = etag = None
        got = os.path.getsize(path)
        if size is not None and got != size:
            return f"{got} bytes, the hub says {size}"
        if digest(path, etag) not in (None, etag):
            return f"checksum mismatch: the hub's is {etag}"
        return shard_problem(path) if remote.endswith(".bin") else None if got else "empty file"

    def in_flight_bytes(self, since):
        """Bytes of the partial downloads in this repo's cache folder written since `since` (the progress line)."""
        try:
            folder = Path(self.hf.constants.HF_HUB_CACHE) / self.hf.file_download.repo_folder_name(
                repo_id=self.repo, repo_type="dataset") / "blobs"
            stats = [p.stat() for p in folder.glob("*.incomplete")]
            return sum(st.st_size for st in stats if st.st_mtime >= since)
        except (OSError, AttributeError):
            return 0


def place(src, dest):
    """`src` (a cache file) at `dest` under a temporary name first, then renamed: never a partial file at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        try:
            os.link(os.path.realpath(src), tmp)  # the cache blob, not the cache's link to it
        except OSError:  # another file system than the cache, or no hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def human(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000


class Progress:
    """Counts finished files and bytes; a thread prints a progress line every PROGRESS_SECONDS."""

    def __init__(self, hub_, total):
        self.hub, self.total, self.files, self.bytes, self.start = hub_, total, 0, 0, time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def done(self, n):
        self.files, self.bytes = self.files + 1, self.bytes + n

    def line(self, partial=0):
        t = max(time.time() - self.start, 1e-9)
        return (f"{self.files}/{self.total} files, {human(self.bytes + partial)} in {t:.1f} s, "
                f"{human((self.bytes + partial) / t)}/s")

    def _loop(self):
        while not self.stop.wait(PROGRESS_SECONDS):
            print(f"progress: {self.line(self.hub.in_flight_bytes(self.start))}", flush=True)

    def close(self):
        self.stop.set()
        self.thread.join()


def get(h, remote, dest):
    place(h.fetch(remote), dest)
    return dest.stat().st_size


def rel(remote):
    """A manifest path relative to datasets/, checked to stay inside the output folder."""
    parts = str(remote).split("/")
    if not remote or str(remote).startswith("/") or any(p in ("", ".", "..") or not NAME.fullmatch(p) for p in parts):
        raise Failure(f"the manifest names the path {remote!r}, which is not a plain relative path; fix: use another "
                      "--repo (this one's datasets/manifest.json is malformed)")
    return str(remote)


RUN_SHARDS = 40  # train shards a 600 s record run reads (see above)


def plan(h, variant, train_shards, out):
    """[(remote path, local path)] of the variant's files, its local shard folder, its tokenizer's local model
    path, and how many val byte sidecars it has."""
    manifest_path = h.fetch("datasets/manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        datasets, tokenizers = manifest.get("datasets", []), manifest.get("tokenizers", [])
        names = [d.get("name") for d in datasets]
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise Failure(f"datasets/manifest.json of {h.repo} is not a manifest ({one_line(e)}); fix: check --repo") \
            from None
    name = variant if variant.startswith("fineweb10B_") else f"fineweb10B_{variant}"
    if name not in names:
        listed = ", ".join(str(n).removeprefix("fineweb10B_") for n in names) or "none"
        known = ", ".join(f"{k} in {v}" for k, v in REPOS.items())
        raise Failure(f"--variant {variant}: {h.repo} has no dataset {name} (its manifest lists: {listed}); fix: pick "
                      f"one of those, or the repo that has it (--repo; known: {known})")
    entry = datasets[names.index(name)]
    stats = entry.get("stats") or {}
    n_val, n_train = stats.get("files_val"), stats.get("files_train")
    if not all(isinstance(n, int) and n >= 0 for n in (n_val, n_train)):
        raise Failure(f"the manifest of {h.repo} gives {name} no shard counts (stats.files_val {n_val!r}, "
                      f"stats.files_train {n_train!r}); fix: check --repo")
    if train_shards is None:
        train_shards = min(RUN_SHARDS, n_train)
        print(f"train shards: {train_shards} of the {n_train} listed (what a 600 s record run reads; --train-shards "
              "N for more)", flush=True)
    if train_shards > n_train:
        raise Failure(f"--train-shards {train_shards} exceeds the {n_train} train shards {h.repo} lists for {name}; "
                      f"fix: pass --train-shards {n_train} or fewer")
    tok = next((t for t in tokenizers if t.get("name") == entry.get("tokenizer_name")), None)
    tok_files = [rel(tok[k]) for k in ("model_path", "vocab_path", "path") if tok and tok.get(k)]
    if not tok_files:
        raise Failure(f"the manifest of {h.repo} names no tokenizer files for {name} (tokenizer_name "
                      f"{entry.get('tokenizer_name')!r}); fix: check --repo")
    folder = f"datasets/{name}"
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)] + [f"fineweb_train_{i:06d}.bin"
                                                                    for i in range(train_shards)]
    sidecars = [f"fineweb_val_bytes_{i:06d}.bin" for i in range(n_val)]
    if n_val and (complete(out / folder / sidecars[0]) or h.exists(f"datasets/{folder}/{sidecars[0]}")):
        shards += sidecars
    files = [(f"datasets/{folder}/{s}", out / folder / s) for s in shards]
    files += [(f"datasets/{t}", out / t) for t in tok_files]
    model = next((out / t for t in tok_files if t.endswith(".model")), out / tok_files[0])
    return files, out / folder, model, sum(s.startswith("fineweb_val_bytes_") for s in shards)


def shown(path):
    return str(path) if path.is_absolute() else f"./{path}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="sp1024", help="sp1024 (default), sp4096, sp8192, "
                   "sp8192_lossless_caps_caseops_v1_reserved, or any other the repo's manifest lists")
    p.add_argument("--repo", help="Hugging Face dataset repo OWNER/NAME (default: the variant's, see above)")
    p.add_argument("--train-shards", type=int, help=f"train shards to fetch (default: {RUN_SHARDS}, what a record run reads)")
    p.add_argument("--out", type=Path, default=Path("data"), help="local data root (default: data)")
    p.add_argument("--workers", type=int, default=8, help="files downloaded at a time (default 8)")
    args = p.parse_args(argv)
    try:
        if not NAME.fullmatch(args.variant):
            raise Failure(f"--variant {args.variant!r} is not a plain name; fix: e.g. --variant sp8192")
        if args.train_shards is not None and args.train_shards < 0 or args.workers < 1:
            raise Failure("--train-shards must be >= 0 and --workers >= 1; fix: pass counts such as --train-shards 10")
        run(args)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; every file under its final name is complete; fix: run the same command again to "
              "fetch the rest", file=sys.stderr, flush=True)
        os._exit(130)  # now: not after the downloads in flight
    return 0


def run(args):
    repo = args.repo or REPOS.get(args.variant, DEFAULT_REPO)
    h = Hub(repo)
    files, data_path, model, n_sidecars = plan(h, args.variant, args.train_shards, args.out)
    todo = [(r, d) for r, d in files if not complete(d)]
    if len(todo) < len(files):
        print(f"skip: {len(files) - len(todo)} of {len(files)} files already complete", flush=True)
    progress, errors = Progress(h, len(todo)), []
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(get, h, r, d): d for r, d in todo}
        for job in as_completed(jobs):
            if job.cancelled():
                continue
            try:
                progress.done(job.result())
                print(f"[{progress.files}/{len(todo)}] got {jobs[job]} ({human(jobs[job].stat().st_size)})",
                      flush=True)
            except Failure as e:
                errors.append(str(e))
                for j in jobs:
                    j.cancel()
            except OSError as e:
                errors.append(f"could not write {jobs[job]} ({one_line(e)}); fix: check that folder and the free "
                              "disk space")
    progress.close()
    if errors:
        raise Failure("\nerror: ".join(errors))
    print(f"done: {progress.line()}; {len(files) - len(todo)} already complete", flush=True)
    vocab = ""
    try:
        import sentencepiece as spm
        vocab = f" VOCAB_SIZE={spm.SentencePieceProcessor(model_file=str(model)).vocab_size()}"
    except (ImportError, OSError, RuntimeError):
        pass
    if n_sidecars:
        print(f"val byte sidecars: {n_sidecars} (train_gpt.py logs every figure on their bytes too)")
    print(f"{args.variant} from {repo}: DATA_PATH={shown(data_path)} TOKENIZER_PATH={shown(model)}{vocab}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
