"""Tests of train_gpt.py's export and evaluation: GPTQ against round-to-nearest, the codecs and the rANS coder, the
pickle-free artifact and its loader, size accounting and pruning, sliding-window evaluation against a brute
force, SLOT causality, scored-positions-only SLOT against the seeds' full projection, and the uniform-random-token
leak test of SPEC section 8. Every check compares against an independent computation.

Helpers shared with the benchmarks live in bench/slot_speed.py (slot_fit_full: the seeds' full-projection SLOT)
and bench/slot_leak.py (toy_model, scored_logprobs, leak_table); they are loaded by file path under private names
so that nothing here shadows another module called `bench`."""

import hashlib
import importlib.util
import inspect
import json
import math
import pickle
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


slot_speed = _load("_pg_bench_slot_speed", ROOT / "bench" / "slot_speed.py")
slot_leak = _load("_pg_bench_slot_leak", ROOT / "bench" / "slot_leak.py")
CPU = torch.device("cpu")




# ----------------------------------------------------------------------------- 1. GPTQ


def correlated_layer(seed=0, n_in=256, n_out=128, rows=4096, dead=()):
    """Inputs X = Z @ A (A: random mixing with a decaying spectrum, so the input features are strongly correlated
    and of very different scales), a calibration and a held-out draw, and a weight matrix W [out, in]."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_in, n_in, generator=g) / math.sqrt(n_in) * torch.logspace(0, -1.5, n_in)[:, None]
    x_cal = torch.randn(rows, n_in, generator=g) @ A
    x_test = torch.randn(rows, n_in, generator=g) @ A
    x_cal[:, list(dead)] = 0
    x_test[:, list(dead)] = 0
    W = torch.randn(n_out, n_in, generator=g) * 0.05
    return W, x_cal, x_test


def out_err(x, W, Wq):
    return (x.double() @ (W.double() - Wq.double()).T).norm().item()


def rtn(W, scales):
    """Round to nearest int6 at given per-row scales."""
    s = scales.float()[:, None]
    return torch.clamp(torch.round(W / s), -31, 31) * s


@pytest.mark.parametrize("dead", [(), (3, 17, 100, 255)])
def test_gptq_beats_round_to_nearest(dead):
    W, x_cal, x_test = correlated_layer(dead=dead)
    H = x_cal.T @ x_cal
    q, s = tg.gptq_quantize(W, H)
    assert q.dtype == torch.int8 and q.shape == W.shape
    assert int(q.min()) >= -31 and int(q.max()) <= 31
    assert s.dtype == torch.float16 and s.shape == (W.size(0),) and bool((s > 0).all())
    assert torch.isfinite(s.float()).all()
    # clipping percentiles only ever shrink the row-max scale (fp16 rounding is monotone)
    assert bool((s <= tg.quantize_rows(W, 31)[1]).all())
    w_gptq = q.float() * s.float()[:, None]
    e_gptq = out_err(x_test, W, w_gptq)
    e_rtn_same = out_err(x_test, W, rtn(W, s))  # RTN at GPTQ's own chosen scales
    q0, s0 = tg.quantize_rows(W, 31)
    e_rtn_max = out_err(x_test, W, q0.float() * s0.float()[:, None])  # RTN at row-max scales
    assert e_gptq < 0.8 * e_rtn_same, (e_gptq, e_rtn_same)
    assert e_gptq < 0.8 * e_rtn_max, (e_gptq, e_rtn_max)
    if dead:
        # dead inputs (H diagonal 0) carry no signal: their weights quantise to 0 and nothing becomes NaN
        assert bool((H.diag()[list(dead)] == 0).all())
        assert bool((q[:, list(dead)] == 0).all())


def test_gptq_all_dead_inputs():
    W = torch.randn(8, 32)
    q, s = tg.gptq_quantize(W, torch.zeros(32, 32), block=8)
    assert bool((q == 0).all()) and bool((s > 0).all()) and torch.isfinite(s.float()).all()


def test_quantize_state_kinds_and_dequantize():
    """quantize_state picks the kind per tensor as documented and dequantize inverts it up to the quantisation step."""
    model = slot_leak.toy_model(vocab=1024, dim=96, layers=2, seed=3, perturb=0.1)  # tok_emb: 98304 > 65536
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    H = {n + ".weight": torch.eye(m.in_features) for n, m in model.named_modules()
         if isinstance(m, tg.CastedLinear) and m.quantized}
    tensors, hdiag = tg.quantize_state(state, H, tg.Settings({}))  # default bits: int6 GPTQ, int8 rows
    kinds = {k: kind for k, kind, _ in tensors}
    assert sorted(hdiag) == sorted(H)
    for name, t in state.items():
        if name in H:
            assert kinds[name + "#q"] == "int6" and kinds[name + "#scale"] == "fp16"
        elif name.endswith(".weight") and t.ndim == 2:
            assert kinds[name + "#q" if t.numel() > 65536 else name] == ("int8" if t.numel() > 65536 else "fp16")
        else:  # control vectors, scalars and 2-D mixes that are not weights
            assert kinds[name] == "fp32"
    arrays = {k: a for k, _, a in tensors}
    back = tg.dequantize(arrays)
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert back[name].shape == t.shape and back[name].dtype == torch.float32
        if name in H:  # int6 with clipping: small relative error
            assert (back[name] - t).norm() <= 0.05 * t.norm(), name
        elif kinds.get(name) == "fp32":
            assert torch.equal(back[name], t)
        elif kinds.get(name) == "fp16":
            assert torch.equal(back[name], t.half().float())
        else:  # int8 rows, scale = row max / 127: round to nearest, at most half a step off
            assert kinds[name + "#q"] == "int8"
            step = torch.from_numpy(arrays[name + "#scale"].astype(np.float32))[:, None]
            assert bool(((back[name] - t).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all()), name


# ----------------------------------------------------------------------------- 2. codecs and rANS


def mixed_tensors(seed=0):
    """A tensor list like quantize_state's, plus the awkward cases: empty, 0-d, 1-element, odd sizes, fp16
    specials (inf, -0, NaN, max), the full int8 range."""
    rng = np.random.default_rng(seed)
    gauss6 = np.clip(np.round(rng.normal(0, 6, (301, 700))), -31, 31).astype(np.int8)
    return [
        ("blocks.0.attn.q.weight#q", "int6", gauss6),
        ("blocks.0.attn.q.weight#scale", "fp16", rng.uniform(1e-3, 1e-2, 301).astype(np.float16)),
        ("blocks.0.mlp.fc.weight#q", "int6", rng.integers(-31, 32, (37, 129)).astype(np.int8)),
        ("blocks.0.mlp.fc.weight#scale", "fp16", rng.uniform(1e-3, 1e-2, 37).astype(np.float16)),
        ("tok_emb.weight#q", "int8", rng.integers(-128, 128, (13, 7)).astype(np.int8)),
        ("tok_emb.weight#scale", "fp16", rng.standard_normal(13).astype(np.float16)),
        ("one_value#q", "int8", np.array([[-128]], np.int8)),
        ("empty#q", "int6", np.zeros((0, 4), np.int8)),
        ("small.weight", "fp16", rng.standard_normal((3, 5)).astype(np.float16)),
        ("specials", "fp16", np.array([np.inf, -0.0, np.nan, 65504, -np.inf, 6e-8], np.float16)),
        ("gain", "fp32", rng.standard_normal(11).astype(np.float32)),
        ("scalar", "fp32", np.array(0.05, np.float32)),
        ("empty", "fp32", np.zeros((0,), np.float32)),
        ("blocks.1.attn.k.weight#q", "int6", np.full((5, 3), 7, np.int8)),  # a single symbol
    ]


def assert_bit_exact(arrays, tensors):
    assert sorted(arrays) == sorted(k for k, _, _ in tensors)
    for key, kind, a in tensors:
        b = arrays[key]
        assert b.dtype == tg.NP_DTYPE[kind] and b.shape == a.shape, key
        assert b.tobytes() == np.ascontiguousarray(a).tobytes(), key  # bitwise: NaN and -0 included


@pytest.mark.parametrize("name", list(tg.codecs()))
def test_codec_round_trip_bit_exact(name):
    codec = tg.codecs()[name]
    if not isinstance(codec, tuple):
        pytest.skip(f"codec {name} unavailable: {codec}")
    tensors = mixed_tensors()
    entries, raw = tg.pack_raw(tensors)
    assert len(raw) == sum(a.size * np.dtype(tg.NP_DTYPE[k]).itemsize for _, k, a in tensors)
    blob = codec[0](raw, entries)
    assert codec[1](blob, entries) == raw
    assert_bit_exact(tg.unpack_raw(entries, codec[1](blob, entries)), tensors)


def test_pack_raw_fp16_planes():
    a = np.array([1.0, -2.5, 3.0], np.float16)
    entries, raw = tg.pack_raw([("x", "fp16", a)])
    b = a.view(np.uint8)
    assert raw == b[0::2].tobytes() + b[1::2].tobytes()  # low bytes, then high bytes
    assert len(entries) == 1
    assert {k: entries[0][k] for k in ("key", "kind", "shape", "offset", "nbytes")} == dict(
        key="x", kind="fp16", shape=[3], offset=0, nbytes=6)


def gaussian_int6(n, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal(0, sigma, n)), -31, 31).astype(np.int8)


def rans_cases():
    rng = np.random.default_rng(1)
    segs = [int(x) for x in rng.integers(0, 3000, 100)]
    segs[5] = segs[50] = 0
    many = np.concatenate([gaussian_int6(n, 1 + i % 9, i) for i, n in enumerate(segs)])
    full = np.tile(np.arange(-128, 128, dtype=np.int8), 40)
    rng.shuffle(full)
    skewed = np.zeros(100_003, np.int8)  # 12 lanes, a partial last step, symbols that occur once
    skewed[rng.choice(len(skewed), 50, replace=False)] = rng.integers(-128, 128, 50)
    return {
        "empty_no_segments": (np.zeros(0, np.int8), []),
        "empty_segments": (np.zeros(0, np.int8), [0, 0]),
        "single_value": (np.array([-7], np.int8), [1]),
        "constant": (np.full(70_000, 3, np.int8), [70_000]),
        "int8_full_range": (full, [len(full)]),
        "extremes": (np.array([-128, 127] * 5000, np.int8), [3, 9997]),
        "many_segments": (many, segs),
        "skewed_rare_symbols": (skewed, [len(skewed)]),
    }


@pytest.mark.parametrize("case", list(rans_cases()))
def test_rans_round_trip(case):
    sym, segs = rans_cases()[case]
    blob = tg.rans_encode(sym, segs)
    out = tg.rans_decode(blob, segs)
    assert out.dtype == np.int8 and out.shape == sym.shape
    assert np.array_equal(out, sym)
    # the stream costs no more than its order-0 entropy plus tables, lane states and < 0.2% coding loss
    table = 16 + 2 * len(segs) + 2 * 256 * len(segs)
    lanes = struct.unpack_from("<4sIQ", blob)[1]
    assert len(blob) <= 1.002 * tg.entropy_bound_bytes(sym, segs) + table + 4 * lanes + 64


def test_rans_truncated_stream_raises():
    sym, segs = gaussian_int6(50_000, 5, 3), [20_000, 30_000]
    blob = tg.rans_encode(sym, segs)
    for cut in (0, 10, 16, 40, len(blob) // 2, len(blob) - 2):
        with pytest.raises(ValueError):
            tg.rans_decode(blob[:cut], segs)


def test_rans_near_entropy_bound():
    """2M gaussian int6 symbols in 3 tensors: the rANS stream is within 1% of the order-0 bound (and, being a
    static code, can not be below it)."""
    sym = np.concatenate([gaussian_int6(1_000_000, 4, 0), gaussian_int6(600_000, 9, 1), gaussian_int6(400_000, 2, 2)])
    segs = [1_000_000, 600_000, 400_000]
    blob = tg.rans_encode(sym, segs)
    bound = tg.entropy_bound_bytes(sym, segs)
    assert bound <= len(blob) <= 1.01 * bound, (len(blob), bound, len(blob) / bound)
    assert np.array_equal(tg.rans_decode(blob, segs), sym)


def test_entropy_bound_matches_independent_count():
    rng = np.random.default_rng(5)
    segs = [1000, 0, 1, 5000, 333]
    sym = np.concatenate([rng.integers(-128, 128, segs[0]), [], [9], gaussian_int6(5000, 3, 1),
                          rng.integers(-2, 3, 333)]).astype(np.int8)
    bits, pos = 0.0, 0
    for n in segs:
        c = Counter(sym[pos:pos + n].tolist())
        bits += -sum(k * math.log2(k / n) for k in c.values())
        pos += n
    assert tg.entropy_bound_bytes(sym, segs) == pytest.approx(bits / 8, rel=1e-12, abs=1e-9)


# ----------------------------------------------------------------------------- 3. artifact


CONFIG = {"NUM_LAYERS": 2, "VE_LAYERS": [0, 1], "LN_SCALE": True, "ROPE_BASE": 10000.0}


def available_codecs():
    return [n for n, c in tg.codecs().items() if isinstance(c, tuple)]


@pytest.mark.parametrize("codec", list(tg.codecs()))
def test_artifact_round_trip(tmp_path, codec):
    if codec not in available_codecs():
        pytest.skip(f"codec {codec} unavailable: {tg.codecs()[codec]}")
    tensors = mixed_tensors(1)
    path = tmp_path / "a.pgz"
    path.write_bytes(tg.encode_artifact(tensors, codec, "int6", CONFIG))
    header, arrays = tg.read_artifact(path, check_model=False)  # the format alone: these tensors are no model's
    assert header["label"] == "int6" and header["codec"] == codec and header["config"] == CONFIG
    assert_bit_exact(arrays, tensors)


@pytest.fixture(scope="module")
def artifact_bytes():
    return tg.encode_artifact(mixed_tensors(2), "lzma-9", "int6", CONFIG)


def check_rejected(path, data):
    Path(path).write_bytes(data)
    with pytest.raises(tg.ArtifactError) as e:
        tg.read_artifact(path, check_model=False)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "fix:" in msg, msg
    assert isinstance(e.value, tg.ConfigError)  # main() prints it as one `error:` line and exits 2
    return msg


def test_artifact_flipped_header_bytes(tmp_path, artifact_bytes):
    data = bytearray(artifact_bytes)
    hlen = tg.ART_PREFIX.unpack_from(data)[2]
    end = tg.ART_PREFIX.size + hlen
    positions = list(range(tg.ART_PREFIX.size)) + list(range(tg.ART_PREFIX.size, end, max(1, hlen // 40))) + [end - 1]
    for i in positions:
        bad = bytearray(data)
        bad[i] ^= 0x5A
        check_rejected(tmp_path / f"h{i}.pgz", bytes(bad))


def test_artifact_flipped_payload_bytes(tmp_path, artifact_bytes):
    data = bytearray(artifact_bytes)
    start = tg.ART_PREFIX.size + tg.ART_PREFIX.unpack_from(data)[2]
    for i in (start, start + 1, (start + len(data)) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x01
        assert "checksum" in check_rejected(tmp_path / f"p{i}.pgz", bytes(bad))


def test_artifact_truncated(tmp_path, artifact_bytes):
    hlen = tg.ART_PREFIX.unpack_from(artifact_bytes)[2]
    p = tg.ART_PREFIX.size
    for cut in (0, 1, 7, 20, p - 1, p, p + hlen // 2, p + hlen, p + hlen + 1, len(artifact_bytes) - 1):
        check_rejected(tmp_path / f"t{cut}.pgz", artifact_bytes[:cut])


def test_artifact_wrong_magic(tmp_path, artifact_bytes):
    assert "magic" in check_rejected(tmp_path / "m.pgz", b"NOTPGOLF" + artifact_bytes[8:])
    buf = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, buf)  # what the seeds wrote (zip + pickle)
    assert "magic" in check_rejected(tmp_path / "torch.pgz", buf.read_bytes())


class _Exploit:
    """Unpickling this creates the file `path`: stands in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft(header, payload):
    """An artifact with valid prefix and checksums around any header and payload (what a tamperer can write)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return tg.ART_PREFIX.pack(tg.ART_MAGIC, tg.ART_VERSION, len(hb), hashlib.sha256(hb).digest()) + hb + payload


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("read_artifact must never unpickle")
    for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"), (np, "load")]:
        monkeypatch.setattr(mod, attr, refuse)


def test_artifact_never_unpickles(tmp_path, artifact_bytes, no_unpickling):
    sentinel = tmp_path / "pwned"
    evil = pickle.dumps(_Exploit(sentinel))
    # a valid file still loads with every unpickler disabled
    (tmp_path / "ok.pgz").write_bytes(artifact_bytes)
    assert_bit_exact(tg.read_artifact(tmp_path / "ok.pgz", check_model=False)[1], mixed_tensors(2))
    # a pickle, alone or behind our prefix, is rejected by magic / checksum
    check_rejected(tmp_path / "evil.pgz", evil)
    hlen = tg.ART_PREFIX.unpack_from(artifact_bytes)[2]
    check_rejected(tmp_path / "evil2.pgz", artifact_bytes[:tg.ART_PREFIX.size + hlen] + evil)
    # a self-consistent file whose payload is a pickle: it is read as plain int8 data, never executed
    entries = [dict(key="x", kind="int8", shape=[len(evil)], offset=0, nbytes=len(evil))]
    header = dict(label="int6", codec="none", config={}, entries=entries, raw_bytes=len(evil),
                  raw_sha256=hashlib.sha256(evil).hexdigest(), payload_bytes=len(evil),
                  payload_sha256=hashlib.sha256(evil).hexdigest())
    (tmp_path / "evil3.pgz").write_bytes(craft(header, evil))
    _, arrays = tg.read_artifact(tmp_path / "evil3.pgz", check_model=False)
    assert arrays["x"].tobytes() == evil
    assert not sentinel.exists()


def test_exploit_payload_is_live(tmp_path):
    """The pickle used above really executes code when unpickled (so its absence of effect there means something)."""
    sentinel = tmp_path / "pwned"
    f = pickle.loads(pickle.dumps(_Exploit(sentinel)))
    f.close()
    assert sentinel.exists()


def test_artifact_loader_source_has_no_unpickler():
    names = ["read_artifact", "unpack_raw", "codecs", "rans_decode", "dequantize", "_rans_unpack"]
    src = "".join(inspect.getsource(getattr(tg, n)) for n in names if hasattr(tg, n))
    assert not re.search(r"pickle\.|torch\.load|np\.load|numpy\.load|allow_pickle|eval\(|exec\(", src)


def _good_parts():
    blob = tg.encode_artifact([("x", "int8", np.arange(6, dtype=np.int8).reshape(2, 3))], "none", "int6", {})
    hlen = tg.ART_PREFIX.unpack_from(blob)[2]
    return json.loads(blob[tg.ART_PREFIX.size:tg.ART_PREFIX.size + hlen]), blob[tg.ART_PREFIX.size + hlen:]


def _tampered():
    H, P = _good_parts()
    e = H["entries"][0]
    return {
        "header_not_utf8_json": (b"\xff\xfe{", P),
        "header_json_list": ([1, 2], P),
        "header_missing_keys": ({}, P),
        "entry_unknown_kind": (dict(H, entries=[dict(e, kind="object")]), P),
        "entry_shape_mismatch": (dict(H, entries=[dict(e, shape=[5, 5])]), P),
        "entry_offset_past_end": (dict(H, entries=[dict(e, offset=100)]), P),
        "codec_lzma_on_raw_bytes": (dict(H, codec="lzma-9"), P),
        "codec_rans_on_raw_bytes": (dict(H, codec="rans"), P),
    }


@pytest.mark.parametrize("case", list(_tampered()))
def test_artifact_tampered_but_checksummed_is_one_line_error(tmp_path, case):
    """A file rewritten with matching checksums (the checksum is no signature) must still give one ArtifactError
    line naming the file, not a traceback (read_artifact's contract: 'any damage is one ArtifactError line')."""
    header, payload = _tampered()[case]
    check_rejected(tmp_path / f"{case}.pgz", craft(header, payload))


# ----------------------------------------------------------------------------- 4. size limit and pruning


def synthetic_int6(seed=0):
    rng = np.random.default_rng(seed)
    tensors, hdiag = [], {}
    for name, shape in [("blocks.0.attn.q.weight", (20, 30)), ("blocks.1.mlp.fc.weight", (15, 40))]:
        tensors += [(name + "#q", "int6", rng.integers(-3, 4, shape).astype(np.int8)),
                    (name + "#scale", "fp16", rng.uniform(0.5, 2.0, shape[0]).astype(np.float16))]
        hdiag[name] = torch.tensor(rng.uniform(0.1, 10.0, shape[1]), dtype=torch.float32)
    tensors += [("tok_emb.weight#q", "int8", np.ones((4, 4), np.int8)),  # int8 ones: never pruned
                ("tok_emb.weight#scale", "fp16", np.ones(4, np.float16)),
                ("gain", "fp32", np.ones(3, np.float32))]
    return tensors, hdiag


def nonzeros(ts):
    return sum(int(np.count_nonzero(a)) for _, kind, a in ts if kind in ("int6", "int8"))


@pytest.mark.parametrize("need", [1, 37, 150])
def test_prune_ones_lowest_cost_first(need):
    tensors, hdiag = synthetic_int6()
    before = {k: a.copy() for k, _, a in tensors}
    target = nonzeros(tensors) - need
    log = []
    out = tg.prune_ones(tensors, hdiag, nonzeros, nonzeros, target, log.append)
    assert nonzeros(out) <= target
    assert [(k, kind) for k, kind, _ in out] == [(k, kind) for k, kind, _ in tensors]
    assert all(np.array_equal(a, before[k]) for k, _, a in tensors)  # inputs untouched
    n_ones = sum(int((np.abs(before[n + "#q"]) == 1).sum()) for n in hdiag)
    zeroed, kept = [], []
    for key, kind, a in out:
        b = before[key]
        if key[:-2] not in hdiag:
            assert np.array_equal(a, b), key
            continue
        changed = a != b
        assert bool((np.abs(b[changed]) == 1).all() and (a[changed] == 0).all()), key  # only +-1 -> 0
        s = before[key[:-2] + "#scale"].astype(np.float64)
        h = hdiag[key[:-2]].double().numpy()
        cost = s[:, None] ** 2 * h[None, :]  # independent cost: scale^2 * H_jj
        zeroed += cost[changed].tolist()
        kept += cost[(np.abs(b) == 1) & ~changed].tolist()
    assert need <= len(zeroed) <= need + max(1, n_ones // 2000)  # the binary search's stated tolerance
    assert max(zeroed) <= min(kept)
    assert len(log) == 1 and log[0].startswith(f"prune: zeroed {len(zeroed)} of {n_ones} ")


def test_prune_ones_impossible_target():
    tensors, hdiag = synthetic_int6()
    with pytest.raises(tg.ConfigError, match="TARGET_BYTES"):
        tg.prune_ones(tensors, hdiag, nonzeros, nonzeros, 10, lambda m: None)


@pytest.mark.parametrize("bias", [-40, -3, 0, 25, 10**6])
def test_prune_ones_bounded_confirm_calls(bias):
    """The search sizes candidates with a cheap estimate that is off by `bias` (a faster codec) and calls the
    chosen codec at most tries + 1 times; the result always fits the chosen codec's size. A usable estimate lands
    within the search tolerance of the exact answer; a useless one (10**6) falls back to a size known to fit."""
    tensors, hdiag = synthetic_int6()
    target = nonzeros(tensors) - 60
    calls = []

    def confirm(ts):
        calls.append(1)
        return nonzeros(ts)
    out = tg.prune_ones(tensors, hdiag, lambda ts: nonzeros(ts) + bias, confirm, target, lambda m: None, tries=4)
    assert nonzeros(out) <= target and len(calls) <= 5
    exact = nonzeros(tg.prune_ones(tensors, hdiag, nonzeros, nonzeros, target, lambda m: None))
    if abs(bias) < 100:
        assert nonzeros(out) >= exact - 1


SIZE_ENV = {"SLOT_ENABLED": "0", "SLIDING_ENABLED": "0", "RUN_ID": "size"}


@pytest.fixture(scope="module")
def size_runs(run_script, toy_env, tmp_path_factory):
    """Run 1: no pruning, SIZE_LIMIT_BYTES=1000 (fails after writing the artifact, whose size it prints).
    Run 2: TARGET_BYTES a little below run 1's total, so pruning must kick in."""
    over = run_script({**toy_env, **SIZE_ENV, "SIZE_LIMIT_BYTES": "1000", "TARGET_BYTES": "0",
                       "LOG_DIR": str(tmp_path_factory.mktemp("size_over"))}, timeout=300)
    m = re.search(r"^artifact_bytes: code:(\d+) model:(\d+) total:(\d+) limit:1000$", over.stdout, re.M)
    assert m, (over.stdout[-3000:], over.stderr[-3000:])
    target = int(m[1]) + int(m[2]) - 2000  # the code counts packed (train_gpt.pack_source), as submitted
    pruned = run_script({**toy_env, **SIZE_ENV, "TARGET_BYTES": str(target),
                         "LOG_DIR": str(tmp_path_factory.mktemp("size_pruned"))}, timeout=300)
    return over, pruned, m, target


def artifact_path(stdout):
    return Path(re.search(r"^artifact_path: (.+)$", stdout, re.M)[1])


def test_size_limit_fails_with_one_error_line(size_runs):
    over, _, m, _ = size_runs
    assert over.returncode == 2, over.stderr[-3000:]
    errors = [l for l in over.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in over.stderr, over.stderr
    assert "SIZE_LIMIT_BYTES=1000" in errors[0] and m[3] in errors[0], errors[0]
    # the accounting: code is the script's size, model is the artifact file's size, total their sum
    assert int(m[1]) + int(m[2]) == int(m[3])
    assert artifact_path(over.stdout).stat().st_size == int(m[2])
    assert "final_int6_roundtrip_exact" not in over.stdout


def test_target_bytes_prunes_to_fit(size_runs):
    over, pruned, _, target = size_runs
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    p = re.search(r"^prune: zeroed (\d+) of (\d+) ", pruned.stdout, re.M)
    assert p and 0 < int(p[1]) <= int(p[2]), pruned.stdout[-3000:]
    a = re.search(r"^artifact_bytes: code:(\d+) model:(\d+) total:(\d+) ", pruned.stdout, re.M)
    code, model, total = int(a[1]), int(a[2]), int(a[3])
    assert code + model == total <= target
    assert artifact_path(pruned.stdout).stat().st_size == model
    assert "final_int6_roundtrip_exact" in pruned.stdout
    assert "prune_decode: exact:1 " in pruned.stdout and "prune_decode" not in over.stdout  # the pruned file decoded
    # against the unpruned artifact of run 1 (same seed, same quantisation): only +-1 values became 0
    _, full = tg.read_artifact(artifact_path(over.stdout))
    _, cut = tg.read_artifact(artifact_path(pruned.stdout))
    assert sorted(full) == sorted(cut)
    n_zeroed = 0
    for k in full:
        changed = full[k] != cut[k]
        if changed.any():
            assert k.startswith("blocks.") and k.endswith("#q"), k
            assert bool((np.abs(full[k][changed]) == 1).all() and (cut[k][changed] == 0).all()), k
            n_zeroed += int(changed.sum())
    assert n_zeroed == int(p[1])


# ----------------------------------------------------------------------------- 5. sliding window


def windows_by_rule(T, L, S, starts):
    """Per the docstring: window k scores targets [k*S, k*S+L) for k = 0, else [k*S+L-S, k*S+L), within [0, T)."""
    scored = []
    for k, ws in enumerate(starts):
        lo = ws if k == 0 else ws + L - S
        scored.append(range(lo, min(ws + L, T)))
    return scored


COMBOS = [(T, L, S) for L in (1, 2, 8, 33) for S in sorted({1, 2, max(1, L // 2), max(1, L - 1), L}) if S <= L
          for T in sorted({1, 2, 5, max(1, L - 1), L, L + 1, 3 * L + 7, 10 * L + S})]


def test_window_starts_cover_every_target_once():
    rng = np.random.default_rng(0)
    for T, L, S in COMBOS:
        starts = tg.window_starts(T, L, S)
        assert np.array_equal(starts, np.arange(len(starts)) * S), (T, L, S)
        scored = windows_by_rule(T, L, S, starts)
        count = Counter(j for r in scored for j in r)
        assert sorted(count) == list(range(T)) and set(count.values()) == {1}, (T, L, S)
        assert all(len(r) > 0 for r in scored), (T, L, S)  # no window is wasted
        # the real masks agree with the rule; the context mask is exactly the window's already-scored part
        tokens = rng.integers(0, 50, T + 1)
        val = (tokens, np.ones(T, np.int64))
        x, y, score, context, nb, _ = tg.window_batch(val, starts, L, S, len(starts) + 1, CPU)
        for k, ws in enumerate(starts):
            tgt = ws + np.arange(L)
            assert sorted(tgt[score[k].numpy()]) == list(scored[k]), (T, L, S, k)
            ctx_tgt = tgt[context[k].numpy()]
            earlier = {j for r in scored[:k] for j in r}
            assert set(ctx_tgt) <= earlier and all(j < min(scored[k], default=T) for j in ctx_tgt)
            if k > 0:
                assert len(ctx_tgt) == min(L - S, T - ws)
                assert all(j >= L - S for j in score[k].nonzero()[:, 0].tolist())  # >= L-S tokens of context
            sel = score[k].numpy()
            assert np.array_equal(x[k].numpy()[sel], tokens[tgt[sel]]) and np.array_equal(y[k].numpy()[sel],
                                                                                           tokens[tgt[sel] + 1])
        assert not score[len(starts)].any() and not context[len(starts)].any()  # padding window


@pytest.fixture(scope="module")
def sharp_model():
    """A toy record-architecture model with perturbed weights, so that its predictions depend on the context."""
    return slot_leak.toy_model(vocab=96, dim=32, layers=2, seed=1, perturb=0.3)


def brute_force(model, tokens, tbytes, L, S, plan=True):
    """Sum of NLL (float64) and of bytes: each target j is predicted from exactly tokens[ws : j+1], ws = k*S for
    the window k that scores it (k = 0 for j < L, else (j - L) // S + 1). plan=False uses the longest context
    tokens[max(0, j+1-L) : j+1] instead (a different, wrong plan: the test must be able to tell)."""
    T = len(tokens) - 1
    nll = 0.0
    with torch.no_grad():
        for j in range(T):
            ws = (0 if j < L else ((j - L) // S + 1) * S) if plan else max(0, j + 1 - L)
            assert j - ws < L
            ids = torch.from_numpy(tokens[ws:j + 1].astype(np.int64))[None]
            z = model.logits(model.forward_hidden(ids)[0, -1]).double()
            nll -= F.log_softmax(z, -1)[int(tokens[j + 1])].item()
    return nll, float(np.sum(tbytes[:T]))


@pytest.mark.parametrize("T,L,S,batch", [(150, 32, 8, 5), (100, 32, 32, 3), (60, 16, 1, 7), (20, 32, 8, 4),
                                         (32, 32, 4, 2), (97, 24, 5, 64)])
def test_evaluate_equals_brute_force(sharp_model, T, L, S, batch):
    rng = np.random.default_rng(T + L + S)
    tokens = rng.integers(0, 96, T + 1).astype(np.uint16)
    tbytes = rng.integers(1, 5, T).astype(np.int64)
    ctx = tg.Ctx(0, 1, 0, CPU)
    (loss, bpb, _), = tg.evaluate(ctx, sharp_model, (tokens, tbytes), L, S, batch)
    nll, nbytes = brute_force(sharp_model, tokens, tbytes, L, S)
    assert loss == pytest.approx(nll / T, rel=1e-5)
    assert bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    if S > 1 and T > L:
        wrong, _ = brute_force(sharp_model, tokens, tbytes, L, S, plan=False)
        assert abs(wrong - nll) / nll > 1e-3  # the model is context-sensitive enough for this test to bite


@pytest.mark.parametrize("T,L,S,world", [(157, 48, 24, 3), (96, 48, 24, 2), (30, 48, 24, 1), (121, 32, 16, 4)])
def test_record_stride_scores_every_target_once_across_ranks(sharp_model, monkeypatch, T, L, S, world):
    """EVAL_SEQ_LEN = 2 x EVAL_STRIDE (the record's 3072 / 1536) at toy size, T not a multiple of the stride (or
    shorter than one window), windows split over ranks as evaluate() splits them: the masks evaluate() sums score
    every target exactly once, the final partial window's included, and the ranks' NLL adds up to the brute-force
    sum (each target predicted from its own window's context)."""
    rng = np.random.default_rng(T)
    tokens, tbytes = rng.integers(0, 96, T + 1).astype(np.uint16), rng.integers(1, 5, T).astype(np.int64)
    seen, window_batch = np.zeros((world, T), np.int64), tg.window_batch
    total = 0.0
    for rank in range(world):
        def spy(val, starts, seq_len, stride, batch, device, rank=rank):
            out = window_batch(val, starts, seq_len, stride, batch, device)
            c0 = 0 if int(starts[0]) == 0 else seq_len - stride  # the columns evaluate() sums
            tgt = starts[:, None].numpy() + np.arange(seq_len)
            np.add.at(seen[rank], tgt[:, c0:][out[2][:len(starts), c0:].numpy()], 1)
            return out
        monkeypatch.setattr(tg, "window_batch", spy)
        ctx = tg.Ctx(rank, world, 0, CPU)
        ctx.all_reduce = lambda t, op=None: t  # each rank's own sums
        (loss, _, _), = tg.evaluate(ctx, sharp_model, (tokens, tbytes), L, S, 4)
        total += loss * seen[rank].sum()
    assert (seen.sum(0) == 1).all() and (seen > 0).any(1).all()  # every target once, every rank scored some
    assert total == pytest.approx(brute_force(sharp_model, tokens, tbytes, L, S)[0], rel=1e-5)


# ----------------------------------------------------------------------------- 6. causality


CAUSAL = dict(mode="causal", delta="window", steps=8, lr=0.05, lr_min=0.005, eps=1e-8, wd=0.01)
SCORED = dict(CAUSAL, mode="scored")


def distributions(model, tokens, L, S, batch, point):
    """log p [T, V] of every target, by target index, from slot_leak.scored_logprobs (evaluate's batch loop
    rebuilt from window_batch + slot_fit + softcap_logits; test_scored_logprobs_match_evaluate checks it)."""
    t, _, lp = slot_leak.scored_logprobs(model, (tokens, np.ones(len(tokens) - 1, np.int64)), L, S, batch, point,
                                         full=True)
    assert sorted(t.tolist()) == list(range(len(tokens) - 1))
    return lp[np.argsort(t)]


CAUSAL_SETUP = dict(T=120, L=32, S=8, batch=6)


@pytest.fixture(scope="module")
def causal_tokens():
    return np.random.default_rng(7).integers(0, 96, CAUSAL_SETUP["T"] + 1).astype(np.uint16)


def test_scored_logprobs_match_evaluate(sharp_model, causal_tokens):
    L, S, batch = CAUSAL_SETUP["L"], CAUSAL_SETUP["S"], CAUSAL_SETUP["batch"]
    val = (causal_tokens, np.ones(len(causal_tokens) - 1, np.int64))
    points = [None, CAUSAL, SCORED, dict(SCORED, delta="batch")]
    results = tg.evaluate(tg.Ctx(0, 1, 0, CPU), sharp_model, val, L, S, batch, points)
    for p, (loss, _, _) in zip(points, results):
        _, nll, _ = slot_leak.scored_logprobs(sharp_model, val, L, S, batch, p)
        assert loss == pytest.approx(nll.mean(), rel=1e-6), p


@pytest.mark.parametrize("j", [5, 31, 40, 77, 100, 119])
def test_causal_slot_ignores_scored_and_later_tokens(sharp_model, causal_tokens, j):
    """Changing the target of position j and every later token leaves the predicted distribution of every target
    <= j unchanged in plain and causal SLOT scoring; scored SLOT (the seeds') changes it: it reads the targets."""
    L, S, batch = CAUSAL_SETUP["L"], CAUSAL_SETUP["S"], CAUSAL_SETUP["batch"]
    changed = causal_tokens.copy()
    rng = np.random.default_rng(j)
    changed[j + 1:] = (causal_tokens[j + 1:] + rng.integers(1, 96, len(changed) - j - 1)) % 96
    assert (changed[j + 1:] != causal_tokens[j + 1:]).all()
    for p in (None, CAUSAL):
        a = distributions(sharp_model, causal_tokens, L, S, batch, p)
        b = distributions(sharp_model, changed, L, S, batch, p)
        assert torch.allclose(a[:j + 1], b[:j + 1], atol=1e-6, rtol=0), (p, (a[:j + 1] - b[:j + 1]).abs().max())
    a = distributions(sharp_model, causal_tokens, L, S, batch, SCORED)
    b = distributions(sharp_model, changed, L, S, batch, SCORED)
    assert (a[j] - b[j]).abs().max() > 1e-3  # the leak


def test_batch_delta_would_leak_in_causal_mode(sharp_model, causal_tokens):
    """Why Settings rejects SLOT_DELTA=batch with SLOT_MODE=causal: a delta shared by the batch is fitted on later
    windows' context, which holds earlier windows' scored targets."""
    L, S, batch = CAUSAL_SETUP["L"], CAUSAL_SETUP["S"], CAUSAL_SETUP["batch"]
    j = 40  # scored by window 2; windows 3..5 of the same batch have target 40 in their context
    changed = causal_tokens.copy()
    changed[j + 1] = (changed[j + 1] + 1) % 96
    p = dict(CAUSAL, delta="batch")
    a = distributions(sharp_model, causal_tokens, L, S, batch, p)
    b = distributions(sharp_model, changed, L, S, batch, p)
    assert (a[j] - b[j]).abs().max() > 1e-4
    with pytest.raises(tg.ConfigError, match="SLOT_DELTA"):
        tg.Settings({"SLOT_MODE": "causal", "SLOT_DELTA": "batch"})


# ----------------------------------------------------------------------------- 7. scored-positions-only SLOT


def slot_problem(mask_kind, seed=0, b=6, L=64, S=16, d=32, V=128):
    model, h, mask, y = slot_speed.make_problem(b, L, S, d, V, CPU, seed)
    if mask_kind == "context":
        mask = torch.zeros_like(mask)
        mask[1:, :L - S] = True  # window 0 has no context
    elif mask_kind == "random":
        mask = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
    return model, h, mask, y


@pytest.mark.parametrize("delta", ["window", "batch"])
@pytest.mark.parametrize("mask_kind", ["scored", "context", "random"])
def test_slot_fit_equals_full_projection(delta, mask_kind):
    model, h, mask, y = slot_problem(mask_kind)
    p = dict(mode="scored", delta=delta, steps=10, lr=0.05, lr_min=0.005, eps=1e-8, wd=0.01)
    d1, b1 = tg.slot_fit(model, h, mask, y, p)
    d2, b2 = slot_speed.slot_fit_full(model, h, mask, y, p)
    assert d1.shape == d2.shape and b1.shape == b2.shape
    assert d2.abs().max() > 1e-2 and b2.abs().max() > 1e-2  # the fit moved
    assert (d1 - d2).abs().max() < 1e-5 and (b1 - b2).abs().max() < 1e-5
    score = torch.zeros_like(mask)
    score[:, -16:] = True
    n1 = slot_speed.scored_nll(model, h, score, y, d1, b1)
    n2 = slot_speed.scored_nll(model, h, score, y, d2, b2)
    assert (n1 - n2).abs().max() < 1e-5
    n0 = slot_speed.scored_nll(model, h, mask, y, torch.zeros_like(d1), torch.zeros_like(b1))
    assert slot_speed.scored_nll(model, h, mask, y, d1, b1).mean() < n0.mean() - 1e-3  # it fits its mask


def test_slot_fit_trivial_cases():
    model, h, mask, y = slot_problem("scored")
    p = dict(mode="scored", delta="window", steps=0, lr=0.05, lr_min=0.005, eps=1e-8, wd=0.01)
    for m, steps in [(mask, 0), (torch.zeros_like(mask), 5)]:
        d, b = tg.slot_fit(model, h, m, y, dict(p, steps=steps))
        assert d.shape == (h.size(0), h.size(-1)) and b.shape == (h.size(0), 128)
        assert not d.any() and not b.any()


# ----------------------------------------------------------------------------- 8. uniform random tokens


@pytest.fixture(scope="module")
def leak_rows():
    return {r["method"]: r for r in slot_leak.leak_table()}  # the configuration bench/slot_leak.py prints


def test_uniform_tokens_causal_cannot_beat_log2_vocab(leak_rows):
    """On independent uniform tokens E[bits] >= log2 V for any predictor that does not see the target (Gibbs).
    Noise margin: 4 standard errors of the per-token bits (paired against plain for the causal-vs-plain check),
    measured on the same data; a fixed seed makes the numbers deterministic."""
    log2v = math.log2(1024)
    for r in leak_rows.values():
        assert r["recomputed_bits_per_token"] == pytest.approx(r["bits_per_token"], rel=1e-7)
        assert r["n"] == 8191
    plain, causal = leak_rows["plain sliding"], leak_rows["causal SLOT"]
    assert plain["bits_per_token"] >= log2v - 4 * plain["se"]
    assert causal["bits_per_token"] >= log2v - 4 * causal["se"]
    assert causal["bits_per_token"] >= plain["bits_per_token"] - 4 * causal["se_vs_plain"]
    assert 0 < causal["se_vs_plain"] < 0.01 and plain["se"] < 0.01
    assert causal["val_bpb"] >= plain["val_bpb"] * (1 - 4 * causal["se_vs_plain"] / plain["bits_per_token"])


def test_uniform_tokens_scored_slot_leaks(leak_rows):
    """The seeds' scored SLOT (16 steps, 0.008 -> 0.0008) fits the very targets it scores: it 'beats' the
    impossible bound by far more than the noise."""
    log2v = math.log2(1024)
    plain, scored = leak_rows["plain sliding"], leak_rows["scored SLOT"]
    gain = plain["bits_per_token"] - scored["bits_per_token"]
    noise = max(scored["se_vs_plain"], scored["se"], plain["se"])
    assert gain > 0.05 and gain > 25 * noise, (gain, noise)
    assert scored["bits_per_token"] < log2v - 25 * scored["se"]
    assert scored["val_bpb"] < plain["val_bpb"] * (1 - 0.05 / log2v)
