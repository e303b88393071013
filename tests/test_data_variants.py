"""Data for every tokenizer: data/download_fineweb.py against a stand-in for the Hugging Face hub on 127.0.0.1
(tests/fake_hub.py), data/retokenize.py at N = 512 with and without CaseOps, and train_gpt.py's byte counting and
val byte sidecars on the CaseOps output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import caseops  # noqa: E402

DOWNLOAD, RETOKENIZE = ROOT / "data" / "download_fineweb.py", ROOT / "data" / "retokenize.py"
REPO = "owner/pg"
SHARDS = "datasets/datasets/fineweb10B_sp1024"
BIG = f"{SHARDS}/fineweb_train_000002.bin"  # 12 MB: more than the client's 10 MiB read chunk, so a drop can resume
VAL_DOCS = 24
ADVERSARIAL_DOCS = [  # first, so that they land in the val split that the byte-count checks read
    "NASA's iPhone met McDonald in PARIS. " + caseops.TITLE + " and " + caseops.ESCAPE * 2 + "X are literal here.",
    "", "  leading and trailing blanks  ", "ALL CAPS LINE\n\nthen\ttabs  and   runs of spaces",
    "Ünïcode ÀB Straße ΣΑΣ, ﬁne Ｆullwidth, 😀 and digits 1234567", "HTTPServer x1Y2z A.B.C IT'S",
]


def shard(path, tokens, magic=20240520, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, 1, len(tokens) if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())


def read_shard(path):
    header = np.fromfile(path, "<i4", count=256)
    tokens = np.fromfile(path, "<u2", offset=1024)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
    return tokens


def documents():
    import pydoc_data.topics
    return ADVERSARIAL_DOCS + list(pydoc_data.topics.topics.values())


def write_docs(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The stand-in's repo folder: a manifest with sp1024 (3 train + 1 val shard) and sp512_caseops (with a val
    byte sidecar), their tokenizers and the documents file."""
    root = tmp_path_factory.mktemp("hub")
    data = root / REPO / "datasets"
    rng = np.random.default_rng(0)
    for i, n in enumerate([5000, 7000, 6_000_000]):
        shard(data / "datasets" / "fineweb10B_sp1024" / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, n))
    shard(data / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", rng.integers(0, 1024, 3000))
    shard(data / "datasets" / "fineweb10B_sp512_caseops" / "fineweb_train_000000.bin", rng.integers(0, 512, 100))
    shard(data / "datasets" / "fineweb10B_sp512_caseops" / "fineweb_val_000000.bin", rng.integers(0, 512, 50))
    shard(data / "datasets" / "fineweb10B_sp512_caseops" / "fineweb_val_bytes_000000.bin", rng.integers(0, 9, 50))
    tok = data / "tokenizers"
    tok.mkdir(parents=True)
    for name, n in [("fineweb_1024_bpe", 1024), ("caseops_512", 512)]:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(documents()), model_prefix=str(tok / name),
                                       model_type="bpe", vocab_size=n, byte_fallback=True, minloglevel=2)
    write_docs(data / "docs_selected.jsonl")
    manifest = {"datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}},
        {"name": "fineweb10B_sp512_caseops", "tokenizer_name": "cops", "stats": {"files_train": 1, "files_val": 1}}],
        "tokenizers": [
            {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
             "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
            {"name": "cops", "model_path": "tokenizers/caseops_512.model"}]}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def hub(remote):
    with FakeHub(remote) as h:
        yield h


def run(cmd, hub, tmp_path, timeout=120):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "*"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def download(hub, tmp_path, *args):
    return run([sys.executable, str(DOWNLOAD), "--repo", REPO, "--out", str(tmp_path / "out"), *map(str, args)],
               hub, tmp_path)


def test_download_places_checked_files_then_skips_them(hub, remote, tmp_path):
    r = run(["bash", "run.sh", "data", "2", "--repo", REPO, "--out", str(tmp_path / "out")], hub, tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    local = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                       "fineweb_val_000000.bin"]  # no train_000002, no temp files
    for p in list(local.iterdir()) + list((out / "tokenizers").iterdir()):
        assert p.read_bytes() == (remote / REPO / "datasets" / p.relative_to(out)).read_bytes(), p
    assert sorted(p.name for p in (out / "tokenizers").iterdir()) == ["fineweb_1024_bpe.model",
                                                                      "fineweb_1024_bpe.vocab"]
    lines = r.stdout.splitlines()
    assert any(line.startswith("done: 5/5 files, ") and " in " in line and "B/s" in line for line in lines)
    assert lines[-1] == (f"sp1024 from {REPO}: DATA_PATH={local} TOKENIZER_PATH={out}/tokenizers/"
                         "fineweb_1024_bpe.model VOCAB_SIZE=1024")
    # again, with a shard truncated: only that one is fetched; the others are not even requested
    (local / "fineweb_val_000000.bin").write_bytes(b"\0" * 100)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    n_requests = len(hub.requests)
    r = download(hub, tmp_path, "--train-shards", 2)
    assert r.returncode == 0, r.stderr
    assert "skip: 4 of 5 files already complete" in r.stdout
    fetched = {p for m, p, _ in hub.requests[n_requests:] if m == "GET"}
    assert fetched == {f"{SHARDS}/fineweb_val_000000.bin"}
    assert {p for p in before if p.stat().st_mtime_ns != before[p]} == {local / "fineweb_val_000000.bin"}
    read_shard(local / "fineweb_val_000000.bin")


def test_download_resumes_a_dropped_connection(hub, remote, tmp_path):
    size = (remote / REPO / BIG).stat().st_size
    hub.drop[BIG] = 11 << 20  # the connection closes after 11 MiB of the 12 MB
    r = download(hub, tmp_path, "--train-shards", 3)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "datasets" / "fineweb10B_sp1024" / Path(BIG).name).read_bytes() == \
        (remote / REPO / BIG).read_bytes()
    first, *rest = hub.gets(BIG)
    assert first is None and len(rest) == 1  # one resumed request, not a second whole download
    start = int(rest[0].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 11 << 20 < size


@pytest.mark.parametrize("case", ["bad_magic", "short", "checksum"])
def test_download_refuses_a_corrupt_or_short_file(hub, remote, tmp_path, case):
    name = "fineweb_train_000001.bin"
    bad = remote / REPO / SHARDS / name
    original = bad.read_bytes()
    try:
        if case == "bad_magic":
            shard(bad, np.arange(7000), magic=12345)
        elif case == "short":
            shard(bad, np.arange(7000), count=9000)  # the header declares more tokens than the file holds
        else:
            hub.lie.add(f"{SHARDS}/{name}")
        r = download(hub, tmp_path, "--train-shards", 2, "--workers", 1)  # the files queued after it are cancelled
    finally:
        bad.write_bytes(original)
        hub.lie.clear()
    assert r.returncode == 1
    line, = r.stderr.splitlines()
    assert line.startswith("error: ") and f"{SHARDS}/{name}" in line and "corrupt or short" in line
    assert {"bad_magic": "magic 12345", "short": "declares 9000 tokens", "checksum": "checksum mismatch"}[case] in line
    local = tmp_path / "out" / "datasets" / "fineweb10B_sp1024"
    assert not (local / name).exists() and not list(local.glob(".*"))  # nothing under its name, no temp file
    assert len(hub.gets(f"{SHARDS}/{name}")) == 2  # a bad copy leaves the cache and is downloaded once more
    r = download(hub, tmp_path, "--train-shards", 2)  # then the file counts as corrupt; a later run fetches it anew
    assert r.returncode == 0, r.stderr
    assert (local / name).read_bytes() == original


def test_download_errors_are_one_line(hub, tmp_path):
    cases = [(["--variant", "sp9999"], "lists: sp1024, sp512_caseops"),
             (["--train-shards", 4], "exceeds the 3 train shards"),
             (["--repo", "nobody/nothing"], "could not fetch datasets/manifest.json from nobody/nothing")]
    for args, expected in cases:
        r = download(hub, tmp_path, *args)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and expected in r.stderr and "fix:" in r.stderr, r.stderr


def test_download_brings_the_val_byte_sidecars(hub, remote, tmp_path):
    r = download(hub, tmp_path, "--variant", "sp512_caseops")
    assert r.returncode == 0, r.stderr
    local = tmp_path / "out" / "datasets" / "fineweb10B_sp512_caseops"
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                       "fineweb_val_bytes_000000.bin"]
    assert "val byte sidecars: 1" in r.stdout
    assert r.stdout.splitlines()[-1].endswith(f"TOKENIZER_PATH={tmp_path}/out/tokenizers/caseops_512.model "
                                              "VOCAB_SIZE=512")


# ---------------------------------------------------------------- retokenize.py

@pytest.fixture(scope="module")
def retokenized(tmp_path_factory):
    """{caseops flag: (dataset folder, tokenizer)} from retokenize.py at N = 512, the first VAL_DOCS documents val."""
    tmp = tmp_path_factory.mktemp("retok")
    docs = write_docs(tmp / "docs.jsonl")
    out = {}
    for flag in (False, True):
        r = subprocess.run([sys.executable, str(RETOKENIZE), "--vocab-size", "512", "--docs", str(docs), "--out",
                            str(tmp / "out"), "--val-docs", str(VAL_DOCS), "--workers", "2", "--shard-tokens",
                            "60000"] + ["--caseops"] * flag, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        name = "fineweb10B_sp512" + "_caseops" * flag
        tok = tmp / "out" / "tokenizers" / f"fineweb_512_bpe{'_caseops' * flag}.model"
        assert r.stdout.splitlines()[-1] == (f"{name}: DATA_PATH={tmp}/out/datasets/{name} TOKENIZER_PATH={tok} "
                                             "VOCAB_SIZE=512")
        out[flag] = tmp / "out" / "datasets" / name, tok
    return out


def test_tokenizer_never_learns_from_the_val_documents(tmp_path):
    """The val documents carry a marker repeated thousands of times, which BPE would surely learn as pieces; none of
    the learned pieces holds any part of it, and --val-docs other than 50,000 warns in one line."""
    marker = "qjzxwk vyqjzx "
    docs = tmp_path / "docs.jsonl"
    texts = [marker * 60] * 40 + documents()  # each under SentencePiece's 4,192-byte sentence limit
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in texts), encoding="utf-8")
    r = subprocess.run([sys.executable, str(RETOKENIZE), "--vocab-size", "512", "--docs", str(docs), "--out",
                        str(tmp_path / "out"), "--val-docs", "40", "--workers", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    warn = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and "--val-docs 40 is not the challenge's 50,000" in warn[0] and "train shards" in warn[0]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizers" / "fineweb_512_bpe.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert not [p for p in pieces if any(m in p for m in ("qj", "jz", "zx", "xw", "wk", "vy", "yq"))]
    _, val = split_docs(tmp_path / "out" / "datasets" / "fineweb10B_sp512", "val")
    assert len(val) == 40 and sp.decode(val[0][1:].tolist()) == (marker * 60).strip()


def split_docs(folder, split):
    tokens = np.concatenate([read_shard(p) for p in sorted(folder.glob(f"fineweb_{split}_[0-9]*.bin"))])
    return tokens, np.split(tokens, np.flatnonzero(tokens == 1))[1:]


@pytest.mark.parametrize("flag", [False, True], ids=["plain", "caseops"])
def test_retokenized_shards_decode_to_the_documents(retokenized, flag):
    folder, tok = retokenized[flag]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert sp.vocab_size() == 512 and [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    first_byte = 8 if flag else 4
    assert [sp.id_to_piece(i) for i in range(4, 8)] == (list(caseops.OPERATORS) if flag else
                                                        ["<0x00>", "<0x01>", "<0x02>", "<0x03>"])
    assert all(sp.is_byte(i) for i in range(first_byte, first_byte + 256)) and not sp.is_byte(first_byte + 256)
    _, val = split_docs(folder, "val")
    train_tokens, train = split_docs(folder, "train")
    assert len(val) == VAL_DOCS and len(list(folder.glob("fineweb_train_*.bin"))) >= 2  # documents span shards
    assert train_tokens[0] == 1 and len(val) + len(train) == len(documents())
    for ids, doc in zip(val + train, documents()):
        text = sp.decode(ids[1:].tolist())
        assert (caseops.decode(text) if flag else text) == sp.normalize(doc).replace("\u2581", " ")
    info = json.loads((folder / "retokenize.json").read_text())
    assert info["complete"] and info["val_documents"] == VAL_DOCS and info["documents"] == len(documents())


def test_train_gpt_counts_caseops_bytes_of_the_original_text(retokenized, tg):
    folder, tok = retokenized[True]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens, val = split_docs(folder, "val")
    counted = tg.target_bytes(tokens, tg.byte_tables(sp, 512))
    original = [caseops.decode(sp.decode(ids[1:].tolist())) for ids in val]
    assert int(counted.sum()) == sum(len(t.encode()) for t in original)
    naive = tg.target_bytes(tokens, tg.byte_tables(sp, 512)[:3] + (np.zeros(0, np.int64),))
    assert naive.sum() > counted.sum()  # the operators counted as 3 bytes each would inflate the denominator
    starts = np.flatnonzero(tokens == 1)
    for k, text in enumerate(original):  # per document too: its targets are BOS's successors up to the next BOS
        assert counted[starts[k]:starts[k + 1] - 1 if k + 1 < len(starts) else None].sum() == len(text.encode())
    side = read_shard(folder / "fineweb_val_bytes_000000.bin")
    assert len(side) == len(tokens) and not side[tokens == 1].any()
    bounds = list(starts) + [len(tokens)]  # the sidecar: each document's bytes, but for its outer whitespace
    assert [int(side[a:b].sum()) for a, b in zip(bounds, bounds[1:])] == \
        [len(d.strip().encode()) for d in documents()[:VAL_DOCS]]


def toy_artifact(tg, TOY, path):
    """An untrained toy model at VOCAB_SIZE 512, stored as an fp32 artifact (eval-only runs need no training)."""
    import torch
    a = tg.Settings({**TOY, "VOCAB_SIZE": "512"})
    torch.manual_seed(0)
    model = tg.build_model(a.arch(), torch.device("cpu"))
    tensors = [(k, "fp32", v.detach().float().numpy()) for k, v in model.state_dict().items()]
    path.write_bytes(tg.encode_artifact(tensors, "none", "prequant", a.arch()))
    return path


def test_train_gpt_logs_the_sidecar_figures_and_refuses_a_wrong_length_sidecar(retokenized, tg, TOY, run_script,
                                                                               tmp_path):
    folder, tok = retokenized[True]
    artifact = toy_artifact(tg, TOY, tmp_path / "toy.pgz")
    env = {**TOY, "VOCAB_SIZE": "512", "DATA_PATH": str(folder), "TOKENIZER_PATH": str(tok), "EVAL_ONLY": "1",
           "ARTIFACT": str(artifact), "SLIDING_ENABLED": "0", "SLOT_ENABLED": "0", "VAL_TOKENS": "0", "RUN_ID": "side"}
    r = run_script(env)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens, _ = split_docs(folder, "val")
    rule = int(tg.target_bytes(tokens, tg.byte_tables(sp, 512)).sum())
    side = int(read_shard(folder / "fineweb_val_bytes_000000.bin")[1:].sum())
    assert f"val_loader: tokens:{len(tokens)} bytes:{rule} seconds:" in r.stdout
    assert f"val_bytes_sidecar: files:1 bytes:{side} rule_bytes:{rule} ratio:{rule / side:.6f} " in r.stdout
    sub = json.loads((r.log_dir / "side.submission.json").read_text())
    assert sub["sidecar_bytes_ratio"] == pytest.approx(rule / side, rel=1e-12)
    rt = sub["results"]["roundtrip"]
    assert rt["val_bpb_on_sidecar_bytes"] == pytest.approx(rt["val_bpb"] * rule / side, rel=1e-12)
    assert sub["val_bpb"] == rt["val_bpb"]  # the headline stays on the rule's bytes
    # a sidecar one entry short: one error line naming it, before any evaluation
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard(bad / "fineweb_val_bytes_000000.bin", read_shard(bad / "fineweb_val_bytes_000000.bin")[:-1])
    r = run_script({**env, "DATA_PATH": str(bad), "RUN_ID": "bad"})
    assert r.returncode == 2
    line, = r.stderr.splitlines()
    assert line == (f"error: val byte sidecar {bad}/fineweb_val_bytes_000000.bin has {len(tokens) - 1} entries for "
                    f"the {len(tokens)} tokens of {bad}/fineweb_val_000000.bin, not one per token; fix: re-download "
                    "the variant's val files, or delete the fineweb_val_bytes_*.bin files (not needed to train)")


def test_sidecars_must_pair_with_the_val_shards(tg, tmp_path):
    shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6])
    shard(tmp_path / "fineweb_val_bytes_000001.bin", [0, 1, 1])
    val = [str(tmp_path / "fineweb_val_000000.bin")]
    with pytest.raises(tg.ConfigError, match=r"fineweb_val_bytes_000000.bin is missing"):
        tg.sidecar_ratio(val, (np.array([1, 5, 6]), np.array([1, 1])), print)
    (tmp_path / "fineweb_val_bytes_000001.bin").unlink()
    assert tg.sidecar_ratio(val, (np.array([1, 5, 6]), np.array([1, 1])), print) is None
    assert tg.find_shards(str(tmp_path), "val") == val  # a sidecar is never read as a val shard


def test_retokenize_fetches_the_documents_through_the_hub(hub, tmp_path):
    args = ["bash", "run.sh", "data", "--out", str(tmp_path / "out"), "--repo", REPO, "--workers", "1"]
    r = run(args + ["--vocab-size", "300"], hub, tmp_path)  # the text needs more pieces than that: one error line
    assert r.returncode == 1 and r.stderr.startswith("error: --vocab-size 300: SentencePiece could not train")
    assert len(r.stderr.splitlines()) == 1 and hub.gets("datasets/docs_selected.jsonl") == [None]
    r = run(args + ["--vocab-size", "512", "--val-docs", "5"], hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert hub.gets("datasets/docs_selected.jsonl") == [None]  # from the hub cache the second time
    _, val = split_docs(tmp_path / "out" / "datasets" / "fineweb10B_sp512", "val")
    assert len(val) == 5
    r = run(args + ["--vocab-size", "512"], hub, tmp_path)
    assert r.returncode == 0 and "already built" in r.stdout, r.stderr


def test_a_variant_fetches_the_shards_a_record_run_reads_unless_told(tmp_path, monkeypatch, capsys):
    """Without --train-shards, a variant's download plans RUN_SHARDS (40) train shards, or all that the manifest
    lists if fewer; --train-shards overrides it."""
    sys.path.insert(0, str(ROOT / "data"))
    import download_fineweb as dl
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"datasets": [{"name": "fineweb10B_v", "tokenizer_name": "t",
                                                  "stats": {"files_val": 1, "files_train": 120}}],
                                    "tokenizers": [{"name": "t", "model_path": "tokenizers/t.model"}]}))

    class Hub:
        repo = "x/y"

        def fetch(self, path):
            return manifest

        def exists(self, path):
            return False

    def trains(n):
        files = dl.plan(Hub(), "v", n, tmp_path / "out")[0]
        return len([r for r, _ in files if "fineweb_train_" in r])

    assert dl.RUN_SHARDS == 40 and trains(None) == 40 and trains(7) == 7 and trains(120) == 120
    assert "train shards: 40 of the 120 listed" in capsys.readouterr().out
    monkeypatch.setattr(dl, "RUN_SHARDS", 500)
    assert trains(None) == 120  # never more than the manifest lists
