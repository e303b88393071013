"""Re-tokenise the published FineWeb documents with a new SentencePiece BPE: any vocabulary size, plain or CaseOps.

    python data/retokenize.py --vocab-size N [--caseops] [--docs PATH] [--out DIR] [--val-docs K]
                              [--sample-docs S] [--train-shards T] [--shard-tokens M] [--workers W] [--force]

The documents: datasets/docs_selected.jsonl of the dataset willdepueoai/parameter-golf (one JSON object a line,
the text under "text"; fetched through the hub client into its cache when --docs is not given), read line by line,
never whole.
1. Tokenizer: a SentencePiece BPE of N pieces trained on the first S documents after the K val documents (never on
   val text; default 5,000,000, the sample the sp4096 and sp8192 records used) with the records' settings (SPEC
   section 10): character_coverage 0.999, byte_fallback, split_digits, nmt_nfkc normalisation, no dummy prefix,
   ids 0-3 pad/BOS/EOS/unk. With --caseops
   every document is first CaseOps-transformed (data/caseops.py) and the four operators are user-defined pieces
   4-7 (byte pieces 8-263). An existing tokenizer of that name is reused (--force retrains it).
2. Shards: every document as [BOS] + its pieces, encoded by W worker processes (default: every core), in order.
   The first K documents (default 50,000) make the val shards, the rest the train shards; M tokens a shard
   (default 100,000,000), official format. With --caseops the val shards get byte sidecars as the published
   CaseOps dataset has (fineweb_val_bytes_NNNNNN.bin, uint16 per token: the bytes of the original text the token
   covers, whitespace that normalisation removes included; 0 for BOS and operators).
Outputs: DIR/tokenizers/fineweb_N_bpe[_caseops].{model,vocab}; DIR/datasets/fineweb10B_spN[_caseops]/ with the
shards and retokenize.json (settings and counts, written last: the build is complete when it is there). A progress
line every 10 s; the last line printed is the DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE to train with.
"""

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402
from download_fineweb import DEFAULT_REPO, DOCS, Failure, Hub, human, one_line, shown  # noqa: E402

MAGIC, VERSION, HEADER_INTS, BOS = 20240520, 1, 256, 1
BATCH_DOCS, BATCH_BYTES = 512, 4 << 20  # documents sent to a worker at a time, at most this much text
PROGRESS_SECONDS = 10.0


def write_atomic(path, chunks):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Appends tokens; writes fineweb_<split>_NNNNNN.bin (official header + uint16) every `size` tokens, up to
    `limit` shards (then it drops what it is given)."""

    def __init__(self, folder, split, size, limit=None):
        self.folder, self.split, self.buf, self.limit = folder, split, np.empty(size, np.uint16), limit
        self.fill = self.count = self.written = 0

    def full(self):
        return self.limit is not None and self.count >= self.limit

    def add(self, tokens):
        while len(tokens) and not self.full():
            k = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + k], tokens = tokens[:k], tokens[k:]
            self.fill += k
            if self.fill == len(self.buf):
                self.flush()

    def flush(self):
        if self.fill:
            header = np.zeros(HEADER_INTS, "<i4")
            header[:3] = MAGIC, VERSION, self.fill
            write_atomic(self.folder / f"fineweb_{self.split}_{self.count:06d}.bin",
                         [header.tobytes(), self.buf[:self.fill].astype("<u2").tobytes()])
            self.count, self.written, self.fill = self.count + 1, self.written + self.fill, 0


def doc_text(line, number):
    try:
        text = json.loads(line)["text"]
        if isinstance(text, str):
            return text
    except (ValueError, KeyError, TypeError):
        pass
    raise Failure(f"line {number} of the documents is not a JSON object with a string \"text\"; fix: pass the "
                  "published docs_selected.jsonl (or a file of the same layout) as --docs")


def sample(path, n, use_caseops, skip):
    """The first n documents after the first `skip` (the val split: a tokenizer never learns from val text), as the
    tokenizer trains on them (NULs as spaces, stripped; CaseOps form if asked)."""
    for lines, numbers, is_val in batches(path, skip):
        for line, number in zip(lines, numbers if not is_val else ()):
            if n == 0:
                return
            n -= 1
            text = doc_text(line, number).replace("\x00", " ").strip()
            yield caseops.encode(text) if use_caseops else text


def train_tokenizer(args, docs, prefix):
    model = io.BytesIO()
    t = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample(docs, args.sample_docs, args.caseops, args.val_docs), model_writer=model, model_type="bpe",
            vocab_size=args.vocab_size, character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            hard_vocab_limit=False, user_defined_symbols=list(caseops.OPERATORS) if args.caseops else [],
            num_threads=args.workers, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the characters that coverage 0.999 requires
        raise Failure(f"--vocab-size {args.vocab_size}: SentencePiece could not train on the "
                      f"{args.sample_docs:,} documents after the val split of {docs} ({one_line(e)}); fix: a larger --vocab-size") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != args.vocab_size:
        raise Failure(f"--vocab-size {args.vocab_size}: the {args.sample_docs:,} documents after the val split of {docs} support "
                      f"only {sp.vocab_size()} pieces; fix: a larger --sample-docs (or more documents), or a smaller "
                      "--vocab-size")
    write_atomic(prefix.with_suffix(".model"), [model.getvalue()])
    write_atomic(prefix.with_suffix(".vocab"), [("".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                                                         for i in range(sp.vocab_size()))).encode()])
    print(f"tokenizer: {prefix.with_suffix('.model')} trained in {time.time() - t:.1f} s", flush=True)


# ---------------------------------------------------------------- worker processes

SP, CASEOPS = None, False


def init_worker(model_path, use_caseops):
    global SP, CASEOPS
    SP, CASEOPS = spm.SentencePieceProcessor(model_file=str(model_path)), use_caseops


def surface_bytes(text):
    """(ids, per-token bytes of the text each covers, operators 0 unless escaped) of one CaseOps document."""
    m = SP.encode_as_offset_mapping(text)
    keep = caseops.counted(m["pieces"])
    return m["ids"], [len(text[b:e].encode("utf-8")) if k else 0 for (b, e), k in zip(m["offsets"], keep)]


def encode_batch(lines, numbers, sidecar):
    """Tokens ([BOS] + pieces per document), the val sidecar (or None) and the text bytes of a batch of lines."""
    texts = [doc_text(line, number) for line, number in zip(lines, numbers)]
    if CASEOPS:
        texts = [caseops.encode(t) for t in texts]
    if sidecar:
        pairs = [surface_bytes(t) for t in texts]
        ids, side = [p[0] for p in pairs], np.concatenate([[0, *p[1]] for p in pairs]).astype(np.uint16)
    else:
        ids, side = SP.encode(texts), None
    tokens = np.concatenate([[BOS, *d] for d in ids]).astype(np.uint16)
    return tokens, side, sum(map(len, lines))


# ---------------------------------------------------------------- main process

def batches(path, val_docs):
    """(raw lines, their line numbers, is_val) in order; blank lines skipped; none straddles the val/train split."""
    lines, numbers, n_bytes, docs = [], [], 0, 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if lines and (len(lines) == BATCH_DOCS or n_bytes > BATCH_BYTES or docs == val_docs):
                yield lines, numbers, docs - len(lines) < val_docs
                lines, numbers, n_bytes = [], [], 0
            lines.append(line)
            numbers.append(number)
            n_bytes, docs = n_bytes + len(line), docs + 1
    if lines:
        yield lines, numbers, docs - len(lines) < val_docs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, required=True, help="pieces of the new tokenizer (e.g. 4096, 8192)")
    p.add_argument("--caseops", action="store_true", help="CaseOps-transform the text; operators at ids 4-7")
    p.add_argument("--docs", type=Path, help="docs_selected.jsonl (default: fetched from the hub)")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"dataset repo holding {DOCS} (default {DEFAULT_REPO})")
    p.add_argument("--out", type=Path, default=Path("data"), help="local data root (default: data)")
    p.add_argument("--val-docs", type=int, default=50_000, help="the first K documents are val (default 50,000)")
    p.add_argument("--sample-docs", type=int, default=5_000_000, help="documents the tokenizer trains on")
    p.add_argument("--train-shards", type=int, help="stop after T train shards (default: every document)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100,000,000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    p.add_argument("--force", action="store_true", help="rebuild even if built, retrain an existing tokenizer")
    args = p.parse_args(argv)
    try:
        limits = [("vocab-size", args.vocab_size, 264 if args.caseops else 260, 65536),
                  ("val-docs", args.val_docs, 1, 10**12), ("sample-docs", args.sample_docs, 1, 10**12),
                  ("train-shards", args.train_shards or 1, 1, 10**6), ("shard-tokens", args.shard_tokens, 1, 2**31 - 1),
                  ("workers", args.workers, 1, 4096)]
        for name, value, lo, hi in limits:
            if not lo <= value <= hi:
                raise Failure(f"--{name} {value} is out of range; fix: use a value in [{lo}, {hi}] (the byte-fallback "
                              "and special pieces alone take 260, with --caseops 264)")
        if args.val_docs != 50_000:
            print(f"warning: --val-docs {args.val_docs:,} is not the challenge's 50,000: documents of the official val "
                  "split " + ("land in the train shards" if args.val_docs < 50_000 else "are left out of training")
                  + "; a record must use 50,000", file=sys.stderr, flush=True)
        run(args)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        print(f"error: {e.filename or 'a file'}: {e.strerror or one_line(e)}; fix: check that path and the free disk "
              "space", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the build is incomplete (no retokenize.json); fix: run the same command again",
              file=sys.stderr, flush=True)
        return 130
    return 0


def run(args):
    suffix = "_caseops" if args.caseops else ""
    name = f"fineweb10B_sp{args.vocab_size}{suffix}"
    folder, prefix = args.out / "datasets" / name, args.out / "tokenizers" / f"fineweb_{args.vocab_size}_bpe{suffix}"
    model, marker = prefix.with_suffix(".model"), folder / "retokenize.json"
    state = json.loads(marker.read_text()) if marker.is_file() else None
    if state and state.get("complete") and model.is_file() and not args.force:
        print(f"already built: {folder} ({marker.name} says so); --force rebuilds it", flush=True)
    else:
        old = sorted(folder.glob("fineweb_*.bin"))
        if old and state is None and not args.force:
            raise Failure(f"{folder} holds {len(old)} shards that retokenize.py did not write (a download?); fix: "
                          "pass another --out, or --force to replace them")
        docs = args.docs
        if docs is None:
            print(f"docs: fetching {DOCS} from {args.repo} through the hub cache", flush=True)
            docs = Hub(args.repo).fetch(DOCS)
        if not Path(docs).is_file():
            raise Failure(f"--docs {docs} is not a file; fix: pass the path of docs_selected.jsonl, or omit --docs")
        settings = dict(vocab_size=args.vocab_size, caseops=args.caseops, docs=str(docs), tokenizer=str(model),
                        val_docs=args.val_docs, sample_docs=args.sample_docs, shard_tokens=args.shard_tokens)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, [json.dumps(dict(settings, complete=False)).encode()])  # the folder is ours from here
        for p in old:
            p.unlink()
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if model.is_file() and not args.force:
            print(f"tokenizer: reusing {model} (--force retrains it)", flush=True)
        else:
            train_tokenizer(args, docs, prefix)
        check_tokenizer(model, args)
        stats = encode_all(args, docs, model, folder)
        write_atomic(marker, [(json.dumps(dict(settings, **stats, complete=True), indent=2) + "\n").encode()])
    print(f"{name}: DATA_PATH={shown(folder)} TOKENIZER_PATH={shown(model)} VOCAB_SIZE={args.vocab_size}", flush=True)


def check_tokenizer(model, args):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ops = [sp.id_to_piece(i) for i in range(4, 8)]
    if sp.vocab_size() != args.vocab_size or (ops == list(caseops.OPERATORS)) != args.caseops:
        raise Failure(f"{model} has {sp.vocab_size()} pieces and pieces 4-7 {ops!r}, not a "
                      f"{'CaseOps ' if args.caseops else ''}tokenizer of {args.vocab_size}; fix: --force retrains it")


def encode_all(args, docs, model, folder):
    writers = {s: ShardWriter(folder, s, args.shard_tokens, args.train_shards if s == "train" else None)
               for s in ("val", "train", "val_bytes")}
    sidecar = args.caseops and hasattr(spm.SentencePieceProcessor, "encode_as_offset_mapping")
    if args.caseops and not sidecar:
        print("note: this sentencepiece has no encode_as_offset_mapping: no val byte sidecars", flush=True)
    n = dict(documents=0, val_documents=0, text_bytes=0)
    start = last = time.time()
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(args.workers, init_worker, (model, args.caseops)) as pool:
        pending = deque()
        source = batches(docs, args.val_docs)
        while True:
            while len(pending) < 2 * args.workers and (item := next(source, None)) is not None:
                lines, numbers, is_val = item
                job = pool.apply_async(encode_batch, (lines, numbers, sidecar and is_val))
                pending.append((len(lines), is_val, job))
            if not pending:
                break
            count, is_val, job = pending.popleft()
            tokens, side, nbytes = job.get()
            writers["val" if is_val else "train"].add(tokens)
            if side is not None:
                writers["val_bytes"].add(side)
            n["documents"] += count
            n["val_documents"] += count * is_val
            n["text_bytes"] += nbytes
            if writers["train"].full():  # --train-shards reached: the documents after it are not read
                pool.terminate()
                break
            if time.time() - last > PROGRESS_SECONDS:
                last = time.time()
                print(f"progress: {progress(n, writers, start)}", flush=True)
    for w in writers.values():
        w.flush()
    print(f"done: {progress(n, writers, start)}", flush=True)
    return dict(n, val_tokens=writers["val"].written, train_tokens=writers["train"].written,
                val_shards=writers["val"].count, train_shards=writers["train"].count,
                val_sidecars=writers["val_bytes"].count, seconds=round(time.time() - start, 1))


def progress(n, writers, start):
    t = max(time.time() - start, 1e-9)
    val, train = (w.written + w.fill for w in (writers["val"], writers["train"]))
    return (f"{n['documents']:,} documents ({n['val_documents']:,} val), {val:,} val + {train:,} train tokens, "
            f"{human(n['text_bytes'])} of text in {t:.1f} s "
            f"({human(n['text_bytes'] / t)}/s), shards: "
            f"{writers['val'].count} val, {writers['train'].count} train")


if __name__ == "__main__":
    sys.exit(main())
