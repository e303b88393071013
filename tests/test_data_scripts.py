"""Tests for data/build_corpus.py (embedded corpus) and data/download_fineweb.py (official data)."""

import functools
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "data" / "build_corpus.py"
DOWNLOAD = ROOT / "data" / "download_fineweb.py"
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


def make_shard(path, tokens, magic=MAGIC):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, 1, len(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


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


# ---------------------------------------------------------------- download_fineweb.py

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(directory) -> base URL of a local HTTP server for that directory."""
    servers = []

    def start(directory):
        handler = functools.partial(QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fake_repo(root, corpus, train_shards=3, val_shards=1, manifest=True, bad=None):
    """A copy of the Hugging Face repo layout with tiny shards; `bad` names a shard with a bad magic."""
    data = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    names = [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    names += [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    for i, name in enumerate(names):
        make_shard(data / name, [1, *range(10 + i, 50 + i)], magic=12345 if name == bad else MAGIC)
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    shutil.copy(corpus / "tokenizers" / "embedded_1024_bpe.model", root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    if manifest:
        stats = {"files_train": train_shards, "files_val": val_shards}
        entry = {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": stats}
        (root / "datasets" / "manifest.json").write_text(json.dumps({"datasets": [entry]}))
    return root / "datasets"


def test_download_fetches_shards_and_tokenizer_then_skips(serve, corpus, tmp_path):
    remote = fake_repo(tmp_path / "repo", corpus, val_shards=2)
    out = tmp_path / "out"
    result = run(DOWNLOAD, "--train-shards", 2, "--out", out, "--base-url", serve(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    local = out / "datasets" / "fineweb10B_sp1024"
    expected = ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert sorted(p.name for p in local.iterdir()) == expected  # no train_000002, no .part files
    for name in expected:
        assert (local / name).read_bytes() == (remote / "datasets" / "fineweb10B_sp1024" / name).read_bytes()
    tok = out / "tokenizers" / "fineweb_1024_bpe.model"
    assert tok.read_bytes() == (remote / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    (local / "fineweb_val_000001.bin").write_bytes(b"\0" * 100)  # a truncated file is fetched again
    result = run(DOWNLOAD, "--train-shards", 2, "--out", out, "--base-url", serve(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skip") == 4 and "got" in result.stdout
    read_shard(local / "fineweb_val_000001.bin")
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    assert {p for p in before if before[p] != after[p]} == {local / "fineweb_val_000001.bin"}


def test_download_without_manifest_uses_fixed_names(serve, corpus, tmp_path):
    fake_repo(tmp_path / "repo", corpus, val_shards=2, manifest=False)
    out = tmp_path / "out"
    result = run(DOWNLOAD, "--train-shards", 1, "--out", out, "--base-url", serve(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (out / "datasets" / "fineweb10B_sp1024").iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_download_rejects_corrupt_shard(serve, corpus, tmp_path):
    fake_repo(tmp_path / "repo", corpus, bad="fineweb_train_000001.bin")
    out = tmp_path / "out"
    base = serve(tmp_path / "repo")
    result = run(DOWNLOAD, "--train-shards", 3, "--out", out, "--base-url", base)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "magic 12345" in message
    assert f"{base}/datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin" in message
    names = sorted(p.name for p in (out / "datasets" / "fineweb10B_sp1024").iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]  # nothing kept of the bad one


def test_download_reports_missing_files_and_shard_limit(serve, corpus, tmp_path):
    fake_repo(tmp_path / "repo", corpus)
    base = serve(tmp_path / "repo")
    result = run(DOWNLOAD, "--train-shards", 4, "--out", tmp_path / "out", "--base-url", base)
    assert result.returncode != 0 and "exceeds the 3 train shards" in result.stderr
    (tmp_path / "empty").mkdir()
    base = serve(tmp_path / "empty")
    result = run(DOWNLOAD, "--train-shards", 1, "--out", tmp_path / "out", "--base-url", base)
    assert result.returncode != 0 and "404" in result.stderr
    assert f"{base}/datasets/tokenizers/fineweb_1024_bpe.model" in result.stderr and "Fix:" in result.stderr
