"""Build the embedded corpus: a small offline stand-in for the FineWeb sp1024 data.

The text is real English already present wherever Python is installed: the docstrings of
the standard library (tests excluded) and the reference-manual topics of pydoc_data. A
SentencePiece BPE tokenizer (vocab 1024) is trained on the train documents with the same
settings and id layout as the official fineweb_1024_bpe.model (pad 0, <s> 1, </s> 2,
<unk> 3, no byte pieces), and the documents are written as official-format shards, each
document encoded as [BOS] + pieces. No network is needed; the output is deterministic for
a given Python installation.

With --site-packages the documents also come from every installed package: the docstrings of
its .py files and its prose files (.txt, .md, .rst, METADATA), read in sorted order up to
--max-chars characters, so that a GPU box without network access has a corpus a record-sized
model does not memorise in minutes (tens of millions of tokens on a large Python environment).
It is written under its own names (sitepkg_1024_bpe, sitepkg_sp1024) and prints how many tokens
it produced.

    python data/build_corpus.py [--out data] [--train-tokens N] [--force] [--site-packages [--max-chars N]]

writes <out>/tokenizers/embedded_1024_bpe.{model,vocab} and
<out>/datasets/embedded_sp1024/fineweb_{train,val}_NNNNNN.bin.
"""

import argparse
import ast
import io
import os
import random
import site
import sys
import sysconfig
from pathlib import Path

import numpy as np
import sentencepiece as spm

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
SHARD_TOKENS = 100_000_000  # tokens per train shard, as in the official data
MIN_DOC_CHARS = 200  # shorter docstrings are mostly one-line summaries
VAL_EVERY = 10  # every 10th document (after a seeded shuffle) is validation
BOS_ID = 1
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test"}
TOKENIZER_NAME, DATASET_NAME = "embedded_1024_bpe", "embedded_sp1024"
SITE_TOKENIZER_NAME, SITE_DATASET_NAME = "sitepkg_1024_bpe", "sitepkg_sp1024"
PROSE_SUFFIXES = {".txt", ".md", ".rst"}
PROSE_NAMES = {"METADATA", "PKG-INFO", "README", "DESCRIPTION"}
MAX_FILE_BYTES = 1_000_000  # larger files are data (word lists, tables, generated code), not prose
MIN_PROSE_SHARE = 0.7  # letters and whitespace among a prose file's characters; below that it is a table or data
TOKENIZER_LINES = 1_000_000  # the tokenizer trains on at most this many lines, evenly spaced
ENCODE_CHUNK = 2000  # documents encoded per call, so the token ids never sit in one Python list


def stdlib_files():
    """The standard library's .py files, in sorted order, test packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                yield os.path.join(dirpath, name)


def docstrings(path):
    """The docstrings of one .py file (module, classes, functions), in ast.walk order."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def site_dirs():
    """Every site-packages/dist-packages folder on this interpreter, sorted, nested ones dropped."""
    dirs = set(site.getsitepackages() + [site.getusersitepackages()])
    dirs |= {p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")}
    dirs = sorted(str(Path(d).resolve()) for d in dirs if Path(d).is_dir())
    return [d for d in dirs if not any(d != o and d.startswith(o + os.sep) for o in dirs)]


def site_texts():
    """Docstrings and prose files of every installed package, walked in sorted order."""
    for root in site_dirs():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                suffix = os.path.splitext(name)[1]
                if suffix not in PROSE_SUFFIXES | {".py"} and name not in PROSE_NAMES:
                    continue
                try:
                    if os.path.getsize(path) > MAX_FILE_BYTES:
                        continue
                except OSError:
                    continue
                if suffix == ".py":
                    yield from docstrings(path)
                    continue
                text = Path(path).read_bytes().decode("utf-8", errors="replace")
                if sum(c.isalpha() or c.isspace() for c in text) >= MIN_PROSE_SHARE * len(text):
                    yield text


def collect_docs(site_packages=False, max_chars=None):
    """All distinct documents (docstrings, then pydoc topics, then with site_packages every installed package's
    docstrings and prose) of at least MIN_DOC_CHARS, in a fixed order, stopping once max_chars are collected."""
    docs = {}  # insertion-ordered set
    for path in stdlib_files():
        for doc in docstrings(path):
            if len(doc) >= MIN_DOC_CHARS:
                docs[doc] = None
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        if len(topics[key]) >= MIN_DOC_CHARS:
            docs[topics[key]] = None
    if site_packages:
        chars = sum(map(len, docs))
        for doc in site_texts():
            if max_chars and chars >= max_chars:
                break
            if len(doc) >= MIN_DOC_CHARS and doc not in docs:
                docs[doc] = None
                chars += len(doc)
    return list(docs)


def split_docs(docs):
    """Seeded shuffle, then every VAL_EVERY-th document to val: returns (train, val)."""
    docs = list(docs)
    random.Random(1337).shuffle(docs)
    val = docs[::VAL_EVERY]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY]
    return train, val


def train_tokenizer(train_docs):
    """Serialized SentencePiece model, trained like the official fineweb_1024_bpe.model."""
    lines = [line for doc in train_docs for line in doc.splitlines() if line.strip()]
    lines = lines[::-(-len(lines) // TOKENIZER_LINES)]  # evenly spaced, so a big corpus trains in bounded time
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=1024,
        character_coverage=0.999, split_digits=True, byte_fallback=False, add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(path, tokens):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    write_atomic(path, header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    print(f"wrote {path} ({len(tokens):,} tokens)")


def encode(sp, docs):
    """[BOS] + pieces of every document, as one uint16 array."""
    parts = [np.zeros(0, dtype="<u2")]
    for i in range(0, len(docs), ENCODE_CHUNK):
        for ids in sp.encode(docs[i:i + ENCODE_CHUNK], num_threads=os.cpu_count() or 1):
            parts.append(np.array([BOS_ID, *ids], dtype="<u2"))
    return np.concatenate(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    parser.add_argument("--train-tokens", type=int, default=None,
                        help="cap on the train tokens written (default: all documents)")
    parser.add_argument("--force", action="store_true", help="rebuild even if all outputs exist")
    parser.add_argument("--site-packages", action="store_true",
                        help="also draw on every installed package (written as sitepkg_1024_bpe / sitepkg_sp1024)")
    parser.add_argument("--max-chars", type=int, default=400_000_000,
                        help="with --site-packages, stop collecting documents after this many characters "
                             "(default 400M, roughly 150M tokens at the 2.5 characters per token measured here)")
    args = parser.parse_args()
    if args.max_chars <= 0 or (args.train_tokens is not None and args.train_tokens <= 0):
        parser.error("--max-chars and --train-tokens must be positive")

    names = (SITE_TOKENIZER_NAME, SITE_DATASET_NAME) if args.site_packages else (TOKENIZER_NAME, DATASET_NAME)
    model_path = args.out / "tokenizers" / f"{names[0]}.model"
    vocab_path = model_path.with_suffix(".vocab")
    data_dir = args.out / "datasets" / names[1]
    val_path = data_dir / "fineweb_val_000000.bin"
    outputs = [model_path, vocab_path, data_dir / "fineweb_train_000000.bin", val_path]
    if not args.force and all(p.is_file() for p in outputs):
        print(f"embedded corpus already built in {args.out} (use --force to rebuild)")
        return

    train_docs, val_docs = split_docs(collect_docs(args.site_packages, args.max_chars))
    model = train_tokenizer(train_docs)
    write_atomic(model_path, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    write_atomic(vocab_path, vocab.encode("utf-8"))
    print(f"wrote {model_path} (vocab {sp.vocab_size()}, {len(train_docs)} train / {len(val_docs)} val docs)")

    train = encode(sp, train_docs)[: args.train_tokens]
    for start in range(0, len(train), SHARD_TOKENS):
        write_shard(data_dir / f"fineweb_train_{start // SHARD_TOKENS:06d}.bin", train[start:start + SHARD_TOKENS])
    val = encode(sp, val_docs)
    write_shard(val_path, val)
    chars = sum(map(len, train_docs + val_docs))
    print(f"corpus: {len(train):,} train tokens, {len(val):,} val tokens from {len(train_docs) + len(val_docs):,} "
          f"documents ({chars:,} characters) in {data_dir}")


if __name__ == "__main__":
    sys.exit(main())
