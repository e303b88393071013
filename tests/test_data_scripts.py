"""Tests for data/build_corpus.py (the embedded corpus); data/download_fineweb.py and data/retokenize.py are tested in
test_data_variants.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "data" / "build_corpus.py"
MAGIC = 20240520
TRAIN_TOKENS = 200_000


def run(script, *args):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


def read_shard(path):
    """(header, tokens) after checking the header against the file size."""
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    assert header[0] == MAGIC and header[1] == 1 and not header[3:].any(), header[:4]
    assert header[2] == len(tokens) and path.stat().st_size == 1024 + 2 * len(tokens)
    return header, tokens


# ---------------------------------------------------------------- build_corpus.py

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    result = run(BUILD, "--out", out, "--train-tokens", TRAIN_TOKENS)
    assert result.returncode == 0, result.stderr
    return out


def dataset_dir(out):
    return out / "datasets" / "embedded_sp1024"


def tokenizer(out):
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "embedded_1024_bpe.model"))


def test_shards_have_valid_headers_and_bos_per_document(corpus):
    shards = sorted(dataset_dir(corpus).glob("*.bin"))
    assert [p.name for p in shards] == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    _, train = read_shard(shards[0])
    _, val = read_shard(shards[1])
    assert len(train) == TRAIN_TOKENS and 10_000 < len(val) < 300_000
    for tokens in (train, val):
        assert tokens[0] == 1 and (tokens == 1).sum() > 1  # every document begins with BOS
        assert tokens.max() < 1024 and not np.isin(tokens, [0, 2]).any()  # no pad, no EOS
        assert not (tokens[1:] == tokens[:-1])[tokens[1:] == 1].any()  # no empty documents


def test_tokenizer_mirrors_official_layout(corpus):
    sp = tokenizer(corpus)
    assert sp.vocab_size() == 1024
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_control(i) for i in range(3)) and sp.is_unknown(3)
    assert not any(sp.is_byte(i) or sp.is_control(i) for i in range(4, 1024))  # like the official model
    vocab = (corpus / "tokenizers" / "embedded_1024_bpe.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 1024 and vocab[:4] == ["<pad>\t0", "<s>\t0", "</s>\t0", "<unk>\t0"]


@pytest.fixture(scope="module")
def build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_docs(build_corpus):
    """The embedded corpus's documents (stdlib docstrings and pydoc topics), collected once."""
    return build_corpus.collect_docs()


def test_val_documents_decode_to_the_docstrings(corpus, build_corpus, base_docs):
    _, val_docs = build_corpus.split_docs(base_docs)
    _, val = read_shard(dataset_dir(corpus) / "fineweb_val_000000.bin")
    docs = np.split(val, np.flatnonzero(val == 1))[1:]
    assert len(docs) == len(val_docs)
    sp = tokenizer(corpus)
    # Like the official tokenizer (nmt_nfkc, extra whitespace removed), decoding gives the
    # text with whitespace runs collapsed; documents with a rare character hold <unk> (3).
    clean = [(ids[1:].tolist(), text) for ids, text in zip(docs, val_docs) if 3 not in ids]
    assert len(clean) > len(docs) // 2
    for ids, text in clean:
        assert sp.decode(ids) == " ".join(text.split())
    assert any("\n" in text and len(text) >= 200 for _, text in clean)


def test_build_is_deterministic_and_idempotent(corpus, tmp_path):
    again = tmp_path / "again"
    result = run(BUILD, "--out", again, "--train-tokens", TRAIN_TOKENS)
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (corpus / name).read_bytes() == (again / name).read_bytes(), name
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    result = run(BUILD, "--out", again, "--train-tokens", TRAIN_TOKENS)
    assert result.returncode == 0 and "already built" in result.stdout
    assert before == {p: p.stat().st_mtime_ns for p in again.rglob("*")}


def test_site_packages_corpus_adds_installed_packages_within_its_caps(tmp_path, build_corpus, base_docs):
    max_chars, cap = 2_200_000, 50_000
    result = run(BUILD, "--site-packages", "--max-chars", max_chars, "--train-tokens", cap, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    data = tmp_path / "datasets" / "sitepkg_sp1024"
    assert sorted(p.name for p in data.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (tmp_path / "tokenizers" / "sitepkg_1024_bpe.model").is_file()
    _, train = read_shard(data / "fineweb_train_000000.bin")
    _, val = read_shard(data / "fineweb_val_000000.bin")
    line = result.stdout.splitlines()[-1]
    assert line.startswith(f"corpus: {cap:,} train tokens, {len(val):,} val tokens from ")  # what it produced
    assert len(train) == cap and train[0] == 1 and val.max() < 1024
    # the same documents in-process (deterministic): the embedded corpus's, then installed packages' up to the cap
    base = base_docs
    docs = build_corpus.collect_docs(site_packages=True, max_chars=max_chars)
    assert f" from {len(docs):,} documents " in line
    assert docs[:len(base)] == base and len(docs) > len(base)
    chars = sum(map(len, docs))
    assert max_chars <= chars < max_chars + build_corpus.MAX_FILE_BYTES
    first = next(d for d in build_corpus.site_texts() if len(d) >= build_corpus.MIN_DOC_CHARS and d not in base)
    assert docs[len(base)] == first
    assert all(p.endswith(("site-packages", "dist-packages")) for p in build_corpus.site_dirs())
