"""Build the embedded corpus: a small offline stand-in for the FineWeb sp1024 data.

The text is real English already present wherever Python is installed: the docstrings of
the standard library (tests excluded) and the reference-manual topics of pydoc_data. A
SentencePiece BPE tokenizer (vocab 1024) is trained on the train documents with the same
settings and id layout as the official fineweb_1024_bpe.model (pad 0, <s> 1, </s> 2,
<unk> 3, no byte pieces), and the documents are written as official-format shards, each
document encoded as [BOS] + pieces. No network is needed; the output is deterministic for
a given Python installation.

    python data/build_corpus.py [--out data] [--train-tokens N] [--force]

writes <out>/tokenizers/embedded_1024_bpe.{model,vocab} and
<out>/datasets/embedded_sp1024/fineweb_{train,val}_NNNNNN.bin.
"""

import argparse
import ast
import io
import os
import random
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


def stdlib_files():
    """The standard library's .py files, in sorted order, test packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                yield os.path.join(dirpath, name)


def collect_docs():
    """All distinct documents (docstrings, then pydoc topics) of at least MIN_DOC_CHARS, in a fixed order."""
    docs = {}  # insertion-ordered set
    for path in stdlib_files():
        try:
            tree = ast.parse(Path(path).read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS:
                    docs[doc] = None
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        if len(topics[key]) >= MIN_DOC_CHARS:
            docs[topics[key]] = None
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
    return [tok for ids in sp.encode(docs) for tok in [BOS_ID, *ids]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    parser.add_argument("--train-tokens", type=int, default=None,
                        help="cap on the train tokens written (default: all documents)")
    parser.add_argument("--force", action="store_true", help="rebuild even if all outputs exist")
    args = parser.parse_args()

    model_path = args.out / "tokenizers" / f"{TOKENIZER_NAME}.model"
    vocab_path = model_path.with_suffix(".vocab")
    data_dir = args.out / "datasets" / DATASET_NAME
    val_path = data_dir / "fineweb_val_000000.bin"
    outputs = [model_path, vocab_path, data_dir / "fineweb_train_000000.bin", val_path]
    if not args.force and all(p.is_file() for p in outputs):
        print(f"embedded corpus already built in {args.out} (use --force to rebuild)")
        return

    train_docs, val_docs = split_docs(collect_docs())
    model = train_tokenizer(train_docs)
    write_atomic(model_path, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    write_atomic(vocab_path, vocab.encode("utf-8"))
    print(f"wrote {model_path} (vocab {sp.vocab_size()}, {len(train_docs)} train / {len(val_docs)} val docs)")

    train = encode(sp, train_docs)[: args.train_tokens]
    for start in range(0, len(train), SHARD_TOKENS):
        write_shard(data_dir / f"fineweb_train_{start // SHARD_TOKENS:06d}.bin", train[start:start + SHARD_TOKENS])
    write_shard(val_path, encode(sp, val_docs))


if __name__ == "__main__":
    sys.exit(main())
