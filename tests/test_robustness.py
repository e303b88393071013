"""Issue 11: every bad input is one clear `error:` line (naming the variable or file, with a fix), never a traceback,
a hang or a memory bomb; crafted artifacts cost no more than genuine ones; runs never mix their files.

One table per class (settings, data, artifact, faults), each case a clean error or a correct success, plus a
crafted-artifact fuzz test. In-process wherever possible; subprocesses only where the process is the point
(signals, exit codes, the log file)."""

import hashlib
import json
import lzma
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

import train_gpt as tg

# ----------------------------------------------------------------------------- helpers


def one_line_error(fn, *names):
    """fn() must raise ConfigError with one line holding every name and a fix; returns the message."""
    with pytest.raises(tg.ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in tg.error_text(e.value) and "fix:" in msg, msg
    for n in names:
        assert str(n) in msg, (n, msg)
    return msg


def write_shard(path, tokens, declared=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, len(tokens) if declared is None else declared
    Path(path).write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return Path(path)


# ----------------------------------------------------------------------------- 1. settings

SETTINGS_CASES = {
    # (env, names the error must hold) or (env, None) for a correct success
    "softcap_inf": ({"LOGIT_SOFTCAP": "inf"}, ["LOGIT_SOFTCAP", "finite"]),
    "qk_gain_nan": ({"QK_GAIN_INIT": "nan"}, ["QK_GAIN_INIT", "finite"]),
    "gptq_damp_inf": ({"GPTQ_DAMP": "inf"}, ["GPTQ_DAMP"]),
    "gptq_temperature_tiny": ({"GPTQ_TEMPERATURE": "1e-300"}, ["GPTQ_TEMPERATURE"]),
    "lr_minus_inf": ({"MATRIX_LR": "-inf"}, ["MATRIX_LR"]),
    "sweep_lr_nan": ({"SWEEP_SLOT_LR": "0.01,nan"}, ["SWEEP_SLOT_LR"]),
    "num_layers_1e26": ({"NUM_LAYERS": str(10**26)}, ["NUM_LAYERS"]),
    "num_layers_2000": ({"NUM_LAYERS": "2000", "XSA_LAST_N": "0", "VE_ENABLED": "0"}, ["NUM_LAYERS", "1024"]),
    "model_dim_2_20": ({"MODEL_DIM": str(2**20)}, ["MODEL_DIM"]),
    "params_over_cap": ({"MODEL_DIM": "16384", "NUM_LAYERS": "100", "XSA_LAST_N": "0"}, ["MODEL_DIM", "parameters"]),
    "bigram_rows_huge": ({"BIGRAM_VOCAB_SIZE": str(2**31)}, ["MODEL_DIM", "parameters"]),
    "vocab_over_uint16": ({"VOCAB_SIZE": "70000"}, ["VOCAB_SIZE", "65536"]),
    "seq_len_huge": ({"TRAIN_SEQ_LEN": str(2**20)}, ["TRAIN_SEQ_LEN"]),
    "ve_layer_huge": ({"VE_LAYERS": f"1,{10**20}"}, ["VE_LAYERS"]),
    "seed_2_64": ({"SEED": str(2**64)}, ["SEED"]),
    "seed_negative": ({"SEED": "-1"}, ["SEED", ">= 0"]),
    "seed_max_ok": ({"SEED": str(2**32 - 1)}, None),
    "run_id_slash": ({"RUN_ID": "../escape"}, ["RUN_ID"]),
    "run_id_300": ({"RUN_ID": "x" * 300}, ["RUN_ID", "100"]),
    "run_id_newline": ({"RUN_ID": "a\nfinal_slot_exact"}, ["RUN_ID"]),
    "run_id_plain_ok": ({"RUN_ID": "seed-1.run_2"}, None),
    "data_path_newline": ({"DATA_PATH": "data\nfinal_x val_bpb:0.1"}, ["DATA_PATH", "control"]),
    "artifact_escape_char": ({"ARTIFACT": "a\x1b[2Jb.pgz"}, ["ARTIFACT", "control"]),
    "sweep_lr_min_above": ({"SWEEP_SLOT_LR_MIN": "0.1"}, ["SWEEP_SLOT_LR_MIN", "SLOT_LR"]),
    "sweep_lr_min_above_grid": ({"SWEEP_SLOT_LR": "0.001,0.01", "SWEEP_SLOT_LR_MIN": "0.005"}, ["SWEEP_SLOT_LR_MIN"]),
    "sweep_lr_grid_ok": ({"SWEEP_SLOT_LR": "0.004,0.01", "SWEEP_SLOT_LR_MIN": "0.0001,0.004"}, None),
    "world_size_garbage": ({"WORLD_SIZE": "eight"}, ["WORLD_SIZE", "integer"]),
    "world_size_zero": ({"WORLD_SIZE": "0"}, ["WORLD_SIZE"]),
    "rank_garbage": ({"RANK": "0x1"}, ["RANK"]),
    "rank_past_world": ({"WORLD_SIZE": "2", "RANK": "2"}, ["RANK", "WORLD_SIZE"]),
    "local_rank_negative": ({"LOCAL_RANK": "-1"}, ["LOCAL_RANK"]),
    "local_world_garbage": ({"LOCAL_WORLD_SIZE": ""}, ["LOCAL_WORLD_SIZE"]),
    "torchrun_ok": ({"WORLD_SIZE": "8", "RANK": "7", "LOCAL_RANK": "7", "LOCAL_WORLD_SIZE": "8"}, None),
}


@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_settings_class(case):
    env, names = SETTINGS_CASES[case]
    t = time.process_time()
    if names is None:
        a = tg.Settings(env)
        for k, v in env.items():
            if k in ("SEED", "RUN_ID"):
                assert str(getattr(a, k.lower())) == v
    else:
        one_line_error(lambda: tg.Settings(env), *names)
    assert time.process_time() - t < 1.0  # checked by arithmetic, before anything is allocated (CPU time: load-proof)


@pytest.mark.parametrize("extra", [{}, {"TIE_EMBEDDINGS": "0", "SKIP_GATED": "1", "SMEAR_ENABLED": "0"},
                                   {"UNET_SKIPS": "0", "BIGRAM_VOCAB_SIZE": "0", "VE_ENABLED": "0", "NUM_LAYERS": "3",
                                    "XSA_LAST_N": "1"},
                                   {"TRAIN_SEQ_LEN": "100", "TRAIN_BATCH_TOKENS": "1600", "GRAD_ACCUM_STEPS": "2"},
                                   {"NUM_LOOPS": "2", "PARALLEL_START_LAYER": "8", "ATTN_OUT_GATE": "1",
                                    "SMEAR_MODE": "input", "DOC_MASK": "1", "SKIP_GATED": "1", "GATE_WINDOW": "7"},
                                   {"NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "9", "UNET_SKIPS": "1"}])
def test_param_count_matches_the_model_and_configs_round_trip(extra):
    c = tg.Settings({"MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8", **extra}).arch()
    assert tg.param_count(c) == sum(p.numel() for p in tg.GPT(c).parameters())
    assert tg.Settings.from_arch(json.loads(json.dumps(c))).arch() == c  # what an artifact's header holds


# ----------------------------------------------------------------------------- 2. data


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory, corpus):
    """name -> (callable to run, names the error must hold, or None: must succeed)."""
    tmp = tmp_path_factory.mktemp("data")
    good_val = Path(corpus[0]) / "fineweb_val_000000.bin"

    def folder(name, *files):
        d = tmp / name
        d.mkdir()
        (d / "fineweb_val_000000.bin").write_bytes(good_val.read_bytes())
        for f in files:
            f(d)
        return d

    shard = lambda d, toks=range(100), n="fineweb_train_000000.bin": write_shard(d / n, np.array(toks) % 1024)
    d_dir = folder("dir_shard", lambda d: (d / "fineweb_train_000000.bin").mkdir())
    d_fifo = folder("fifo_shard", lambda d: os.mkfifo(d / "fineweb_train_000000.bin"))
    d_link = folder("dangling", lambda d: (d / "fineweb_train_000000.bin").symlink_to(d / "gone.bin"))
    d_empty = folder("zero_tokens", shard, lambda d: write_shard(d / "fineweb_train_000001.bin", []))
    d_ids = folder("big_ids", lambda d: write_shard(d / "fineweb_train_000000.bin", [5, 1023, 1024, 7]))
    d_glob = folder("glob[chars]*?", shard)
    d_ok_link = folder("good_link", lambda d: (d / "fineweb_train_000000.bin").symlink_to(shard(d, n="real.bin")))
    bad_val = folder("bad_val_ids", shard)
    write_shard(bad_val / "fineweb_val_000000.bin", [1, 2, 4000])
    tok_garbage = tmp / "garbage.model"
    tok_garbage.write_bytes(os.urandom(2000))
    tok_empty = tmp / "empty.model"
    tok_empty.write_bytes(b"")
    tok_fifo = tmp / "fifo.model"
    os.mkfifo(tok_fifo)
    tok_dir = tmp / "dir.model"
    tok_dir.mkdir()
    cpu = torch.device("cpu")
    loader = lambda d: tg.TrainLoader(tg.find_shards(d, "train"), 0, 1, cpu, 1024).next_batch(128, 64)
    return {
        "shard_is_folder": (lambda: tg.find_shards(d_dir, "train"), [d_dir / "fineweb_train_000000.bin"]),
        "shard_is_fifo_no_hang": (lambda: tg.find_shards(d_fifo, "train"), [d_fifo / "fineweb_train_000000.bin"]),
        "shard_dangling_link": (lambda: tg.find_shards(d_link, "train"), [d_link / "fineweb_train_000000.bin"]),
        "shard_zero_tokens": (lambda: tg.find_shards(d_empty, "train"), [d_empty / "fineweb_train_000001.bin", "0"]),
        "train_ids_past_vocab": (lambda: loader(d_ids), [d_ids / "fineweb_train_000000.bin", "1024", "VOCAB_SIZE"]),
        "val_ids_past_vocab": (lambda: tg.load_shard(bad_val / "fineweb_val_000000.bin", 1024),
                               [bad_val / "fineweb_val_000000.bin", "4000"]),
        "data_path_glob_chars_ok": (lambda: loader(d_glob), None),
        "shard_symlink_to_file_ok": (lambda: loader(d_ok_link), None),
        "tokenizer_garbage": (lambda: tg.load_tokenizer(tok_garbage, 1024), ["TOKENIZER_PATH", tok_garbage]),
        "tokenizer_empty": (lambda: tg.load_tokenizer(tok_empty, 1024), ["TOKENIZER_PATH", tok_empty]),
        "tokenizer_fifo_no_hang": (lambda: tg.load_tokenizer(tok_fifo, 1024), ["TOKENIZER_PATH", tok_fifo]),
        "tokenizer_folder": (lambda: tg.load_tokenizer(tok_dir, 1024), ["TOKENIZER_PATH", tok_dir]),
        "tokenizer_ok": (lambda: tg.load_tokenizer(corpus[1], 1024), None),
    }


DATA_CASES = ["shard_is_folder", "shard_is_fifo_no_hang", "shard_dangling_link", "shard_zero_tokens",
              "train_ids_past_vocab", "val_ids_past_vocab", "data_path_glob_chars_ok", "shard_symlink_to_file_ok",
              "tokenizer_garbage", "tokenizer_empty", "tokenizer_fifo_no_hang", "tokenizer_folder", "tokenizer_ok"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_class(data_dirs, case):
    assert sorted(data_dirs) == sorted(DATA_CASES)
    fn, names = data_dirs[case]
    t = time.perf_counter()
    if names is None:
        fn()
    else:
        one_line_error(fn, *names)
    assert time.perf_counter() - t < 30.0  # a FIFO is never opened (opening one would block for ever: a generous bound)


# ----------------------------------------------------------------------------- 3. artifacts

TINY = {"VOCAB_SIZE": "1024", "NUM_LAYERS": "2", "MODEL_DIM": "96", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
        "MLP_MULT": "2", "ROPE_DIMS": "8", "XSA_LAST_N": "2", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "16",
        "VE_DIM": "16", "VE_LAYERS": "0,1"}


def make_genuine():
    """A tiny model's quantised tensors (tok_emb int8, block matrices int6 GPTQ, small matrices fp16, vectors
    fp32) and its fp32 prequant tensors, as export() and run() write them."""
    config = tg.Settings(TINY).arch()
    torch.manual_seed(0)
    state = {k: v.detach().float() for k, v in tg.GPT(config).state_dict().items()}
    hess = {k: torch.eye(v.shape[1]) for k, v in state.items() if tg.quant_kind(k, v, config) == "int6"}
    tensors, _ = tg.quantize_state(state, hess, tg.Settings(TINY))
    tensors = tg.row_orders(tensors, torch.device("cpu")) + tensors  # the last entry stays a model tensor
    assert {kind for _, kind, _ in tensors} == {"int6", "int8", "fp16", "fp32", "u16"}
    return config, tensors, [(k, "fp32", v.numpy()) for k, v in state.items()]


def lqer_tensors(config):
    """The same tiny model with LQER factors on its 2 worst tensors (rank 2) and every row order."""
    torch.manual_seed(0)
    state = {k: v.detach().float() for k, v in tg.GPT(config).state_dict().items()}
    hess = {k: torch.eye(v.shape[1]) for k, v in state.items() if tg.quant_kind(k, v, config) == "int6"}
    tensors, _ = tg.quantize_state(state, hess, tg.Settings({**TINY, "LQER_RANK": "2", "LQER_TOP_K": "2",
                                                             "ATTN_CLIP_SIGMAS": "3"}))
    assert sum(k.endswith("#lqa") for k, _, _ in tensors) == 2
    return tensors + tg.row_orders(tensors, torch.device("cpu"))


def awq_tensors(config):
    """The same tiny model with AWQ-lite on (2 groups of 16 columns at int8)."""
    torch.manual_seed(0)
    state = {k: v.detach().float() for k, v in tg.GPT(config).state_dict().items()}
    hess = {k: torch.eye(v.shape[1]) for k, v in state.items() if tg.quant_kind(k, v, config) == "int6"}
    tensors, _ = tg.quantize_state(state, hess, tg.Settings({**TINY, "AWQ_TOP_K": "2", "AWQ_GROUP_SIZE": "16"}))
    assert sum(k.endswith("#awqm") for k, _, _ in tensors) in (1, 2)
    return tensors


def split(blob):
    hlen = tg.ART_PREFIX.unpack_from(blob)[2]
    return json.loads(blob[tg.ART_PREFIX.size:tg.ART_PREFIX.size + hlen]), blob[tg.ART_PREFIX.size + hlen:]


def craft(header, payload):
    """Valid prefix and header checksum around any header (what someone editing a file can write)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return tg.ART_PREFIX.pack(tg.ART_MAGIC, tg.ART_VERSION, len(hb), hashlib.sha256(hb).digest()) + hb + payload


def with_payload(header, payload):
    return craft(dict(header, payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest()), payload)


def zeros_bomb(compress, flush, mib):
    """mib MiB of zeros compressed in 1 MiB pieces (never held whole): a few KB that inflate to mib MiB."""
    z = bytes(1 << 20)
    return b"".join(compress(z) for _ in range(mib)) + flush()


def artifact_cases(config, tensors, prequant):
    """name -> (artifact bytes, names the error must hold, or None: loads to exactly the encoded tensors)."""
    blob = tg.encode_artifact(tensors, "lzma-9", "int6", config)
    H, P = split(blob)
    E = H["entries"]
    q = next(i for i, e in enumerate(E) if e["kind"] == "int6")
    fp = next(i for i, e in enumerate(E) if e["kind"] == "fp32")
    raw_n = H["raw_bytes"]
    cfg = lambda **kw: craft(dict(H, config=dict(config, **kw)), P)
    ent = lambda i, **kw: craft(dict(H, entries=E[:i] + [dict(E[i], **kw)] + E[i + 1:]), P)
    drop = lambda k: craft({x: v for x, v in H.items() if x != k}, P)
    n_sym = sum(tg.int_lens(E))
    rans = tg.encode_artifact(tensors, "rans", "int6", config)
    RH, RP = split(rans)
    rans_hdr = lambda lanes, words: RP[:8] + struct.pack("<4sIQ", b"rAN1", lanes, words) + RP[24:]
    c = lzma.LZMACompressor(preset=0)
    cases = {
        "genuine_lzma": (blob, None),
        "genuine_rans": (rans, None),
        "genuine_none": (tg.encode_artifact(tensors, "none", "int6", config), None),
        "prequant_all_fp32": (tg.encode_artifact(prequant, "none", "prequant", config), None),
        "harmless_label": (craft(dict(H, label="int6_renamed"), P), None),
        "config_num_heads_5": (cfg(NUM_HEADS=5), ["NUM_HEADS"]),
        "config_ve_layers_out": (cfg(VE_LAYERS=[0, 7]), ["VE_LAYERS"]),
        "config_xsa_negative": (cfg(XSA_LAST_N=-3), ["XSA_LAST_N"]),
        "config_softcap_zero": (cfg(LOGIT_SOFTCAP=0), ["LOGIT_SOFTCAP"]),
        "config_softcap_string": (cfg(LOGIT_SOFTCAP="30"), None),  # parsed as the environment would: same model
        "config_layers_float": (cfg(NUM_LAYERS=2.5), ["NUM_LAYERS"]),
        "config_huge_no_alloc": (cfg(NUM_LAYERS=1000, MODEL_DIM=8192, XSA_LAST_N=0), ["parameters"]),
        "config_layers_1e26": (cfg(NUM_LAYERS=10**26), ["NUM_LAYERS"]),
        "config_missing_key": (craft(dict(H, config={k: v for k, v in config.items() if k != "VE_DIM"}), P),
                               ["VE_DIM"]),
        "config_unknown_key": (cfg(EVIL=1), ["EVIL"]),
        "config_other_model": (cfg(MODEL_DIM=64, NUM_HEADS=2), ["tensor"]),
        "missing_label": (drop("label"), ["label"]),
        "missing_config": (drop("config"), ["config"]),
        "missing_entries": (drop("entries"), ["entries"]),
        "label_newline": (craft(dict(H, label="int6\nfinal_slot_exact val_bpb:0.5"), P), ["label"]),
        "label_prequant_on_int6": (craft(dict(H, label="prequant"), P), ["tensor"]),
        "entry_unknown_tensor": (ent(fp, key="evil.weight"), ["tensor"]),
        "entry_missing_tensor": (craft(dict(H, entries=E[:-1], raw_bytes=raw_n - E[-1]["nbytes"]), P), ["tensor"]),
        "entry_wrong_shape": (ent(fp, shape=E[fp]["shape"][::-1] + [1]), ["tensor", "shape"]),
        "entry_wrong_kind": (ent(q, kind="int8"), ["tensor"]),
        "entry_unknown_kind": (ent(q, kind="object"), ["entry"]),
        "entry_offset_gap": (ent(q, offset=E[q]["offset"] + 1), ["entry"]),
        "entry_nbytes_lies": (ent(q, nbytes=E[q]["nbytes"] * 1000), ["entry"]),
        "entry_negative_shape": (ent(q, shape=[-1, 5]), ["entry"]),
        "entry_shape_not_list": (ent(q, shape="5"), ["entry"]),
        "raw_bytes_lies": (craft(dict(H, raw_bytes=raw_n * 10**6), P), ["raw_bytes"]),
        "raw_bytes_bool": (craft(dict(H, raw_bytes=True), P), ["raw_bytes"]),
        "header_len_huge": (tg.ART_PREFIX.pack(tg.ART_MAGIC, tg.ART_VERSION, 2**32 - 1, b"\0" * 32) + b"{}",
                            ["header length"]),
        "header_json_list": (craft(b"[1, 2]", P), ["fields"]),
        "header_not_json": (craft(b"\xff{", P), ["invalid"]),
        "payload_padded": (blob + b"\0" * 10, ["bytes"]),
        "payload_truncated": (blob[:-1], ["bytes"]),
        "payload_bytes_huge": (craft(dict(H, payload_bytes=2**40), P), ["bytes"]),
        "unknown_codec": (with_payload(dict(H, codec="pickle"), P), ["codec"]),
        "lzma_bomb_64mib": (with_payload(H, zeros_bomb(c.compress, c.flush, 64)), ["checksum"]),
        "none_codec_long_payload": (with_payload(dict(H, codec="none"), b"\0" * (raw_n * 3)), ["checksum"]),
        "rans_one_lane_spin": (with_payload(RH, rans_hdr(1, 0)), ["rANS"]),
        "rans_words_past_symbols": (with_payload(RH, rans_hdr(max(1, n_sym // 8192), 10**12)), ["rANS"]),
        "rans_coded_len_lies": (with_payload(RH, struct.pack("<Q", 2**62) + RP[8:]), ["artifact"]),
        "rans_payload_flip": (with_payload(RH, RP[:30] + bytes([RP[30] ^ 1]) + RP[31:]), ["artifact"]),
    }
    perm = next(i for i, (k, _, _) in enumerate(tensors) if k.endswith("#perm"))
    key, _, order = tensors[perm]
    bad_perm = lambda p: tg.encode_artifact(tensors[:perm] + [(key, "u16", p)] + tensors[perm + 1:], "none", "int6",
                                            config)
    lq = lqer_tensors(config)
    lqa = next(i for i, (k, _, _) in enumerate(lq) if k.endswith("#lqb"))
    j = next(i for i, e in enumerate(E) if e["kind"] == "int6" and i and E[i - 1]["kind"] == "int6" and
             tg.role(e["key"], "int6") != tg.role(E[i - 1]["key"], "int6"))  # the first entry of a second role group
    swapped = E[:j - 1] + [dict(E[j], offset=E[j - 1]["offset"]), dict(E[j - 1], offset=E[j - 1]["offset"] +
                                                                       E[j]["nbytes"])] + E[j + 1:]
    cases.update({
        "config_bits_9": (cfg(ATTN_BITS=9), ["ATTN_BITS"]),
        "config_bits_other": (cfg(MLP_BITS=5), ["tensor"]),
        "perm_repeats_a_row": (bad_perm(np.concatenate([order[:1], order[:-1]])), ["perm"]),
        "perm_too_short": (bad_perm(order[:-1]), ["tensor"]),
        "perm_of_no_group": (tg.encode_artifact(tensors + [("zz#perm", "u16", order)], "none", "int6", config),
                             ["tensor"]),
        "group_entries_swapped": (craft(dict(H, entries=swapped), P), ["entry"]),
        "lqer_genuine": (tg.encode_artifact(lq, "lzma-9", "int6", config), None),
        "lqer_rank_mismatch": (tg.encode_artifact(lq[:lqa] + [(lq[lqa][0], "int4", lq[lqa][2][:1])] + lq[lqa + 1:],
                                                  "none", "int6", config), ["tensor"]),
    })
    aw = awq_tensors(config)
    m = next(i for i, (k, _, _) in enumerate(aw) if k.endswith("#awqm"))
    key = aw[m][0][:-5]
    awq_art = lambda ts: tg.encode_artifact(ts, "none", "int6", config)
    cases.update({
        "awq_genuine": (tg.encode_artifact(aw, "lzma-9", "int6", config), None),
        "awq_mask_too_short": (awq_art(aw[:m] + [(aw[m][0], "int8", aw[m][2][:-1])] + aw[m + 1:]), ["tensor", "awqm"]),
        "awq_mask_not_int": (awq_art(aw[:m] + [(aw[m][0], "fp16", aw[m][2].astype(np.float16))] + aw[m + 1:]),
                             ["tensor", "awqm"]),
        "awq_scale_missing": (awq_art([t for t in aw if t[0] != key + "#awqs"]), ["tensor", key + "#awqs", "None"]),
        "awq_scale_without_mask": (awq_art([t for t in aw if t[0] != key + "#awqm"]), ["tensor", "awqs"]),
        "awq_on_a_vector": (awq_art(aw + [("skip_weights#awqm", "int8", np.ones(96, np.int8))]), ["tensor"]),
    })
    codecs = tg.codecs()
    if isinstance(codecs.get("zpaq-5"), tuple):
        import zpaq
        cases["zpaq_genuine"] = (tg.encode_artifact(tensors, "zpaq-5", "int6", config), None)
        cases["zpaq_bomb_64mib"] = (with_payload(dict(H, codec="zpaq-5"), zpaq.compress(bytes(64 << 20), level=1,
                                                                                         threads=1)), ["checksum"])
        cases["zpaq_garbage"] = (with_payload(dict(H, codec="zpaq-5"), random.Random(3).randbytes(5000)), ["zpaq"])
    if isinstance(codecs.get("zstd-22"), tuple):
        import zstandard
        z = zstandard.ZstdCompressor(level=1).compressobj()
        cases["zstd_bomb_1gib"] = (with_payload(dict(H, codec="zstd-22"), zeros_bomb(z.compress, z.flush, 1024)),
                                   ["checksum"])
    if isinstance(codecs.get("brotli-11"), tuple):
        import brotli
        b = brotli.Compressor(quality=1)
        cases["brotli_bomb_1gib"] = (with_payload(dict(H, codec="brotli-11"), zeros_bomb(b.process, b.finish, 1024)),
                                     ["checksum"])
    return cases


# listed here so that parametrize needs no fixture at collection time; the report checks the list
ART_CASES = ["genuine_lzma", "genuine_rans", "genuine_none", "prequant_all_fp32", "harmless_label",
             "config_num_heads_5", "config_ve_layers_out", "config_xsa_negative", "config_softcap_zero",
             "config_softcap_string", "config_layers_float", "config_huge_no_alloc", "config_layers_1e26",
             "config_missing_key", "config_unknown_key", "config_other_model", "missing_label", "missing_config",
             "missing_entries", "label_newline", "label_prequant_on_int6", "entry_unknown_tensor",
             "entry_missing_tensor", "entry_wrong_shape", "entry_wrong_kind", "entry_unknown_kind", "entry_offset_gap",
             "entry_nbytes_lies", "entry_negative_shape", "entry_shape_not_list", "raw_bytes_lies", "raw_bytes_bool",
             "header_len_huge", "header_json_list", "header_not_json", "payload_padded", "payload_truncated",
             "payload_bytes_huge", "unknown_codec", "lzma_bomb_64mib", "none_codec_long_payload", "rans_one_lane_spin",
             "rans_words_past_symbols", "rans_coded_len_lies", "rans_payload_flip", "zstd_bomb_1gib",
             "brotli_bomb_1gib", "config_bits_9", "config_bits_other", "perm_repeats_a_row", "perm_too_short",
             "perm_of_no_group", "group_entries_swapped", "lqer_genuine", "lqer_rank_mismatch", "awq_genuine",
             "awq_mask_too_short", "awq_mask_not_int", "awq_scale_missing", "awq_scale_without_mask", "awq_on_a_vector",
             "zpaq_genuine",
             "zpaq_bomb_64mib", "zpaq_garbage"]


def mutate_value(rng, v):
    pool = [-1, 0, 1, 2, 2**31, 2**63, 10**30, 1.5, -0.0, float("inf"), "x", "", None, [], {}, True, [1, 2],
            "int6\nfinal", [-5, 3], [2**40]]
    r = rng.random()
    if isinstance(v, int) and not isinstance(v, bool) and r < 0.4:
        return v + rng.choice([-1, 1, 8, -8, 2**20])
    if isinstance(v, list) and v and r < 0.3:
        return v[:-1] if rng.random() < 0.5 else v + [rng.choice(pool)]
    return rng.choice(pool)


def mutate_header(rng, H):
    H = json.loads(json.dumps(H))
    kind = rng.random()
    if kind < 0.35:  # an entry field
        e = rng.choice(H["entries"])
        k = rng.choice(list(e))
        e[k] = mutate_value(rng, e[k])
    elif kind < 0.6:  # a config value
        k = rng.choice(list(H["config"]))
        H["config"][k] = mutate_value(rng, H["config"][k])
    elif kind < 0.7:  # entries swapped or dropped
        i, j = rng.randrange(len(H["entries"])), rng.randrange(len(H["entries"]))
        H["entries"][i], H["entries"][j] = H["entries"][j], H["entries"][i]
        if rng.random() < 0.5:
            del H["entries"][i]
    else:  # a top-level field
        k = rng.choice(list(H))
        if rng.random() < 0.15:
            del H[k]
        else:
            H[k] = mutate_value(rng, H[k])
    return H


def fuzz_cases(config, tensors):
    """Random byte flips and truncations, headers edited with fresh checksums, payloads edited and re-summed."""
    rng = random.Random(11)
    cases = []
    for c in ("lzma-9", "rans", "none"):
        blob = tg.encode_artifact(tensors, c, "int6", config)
        for _ in range(40):
            b = bytearray(blob)
            for _ in range(rng.choice([1, 1, 2, 8])):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            cases.append(bytes(b))
        cases += [blob[:rng.randrange(len(blob))] for _ in range(15)]
        H, P = split(blob)
        cases += [craft(mutate_header(rng, H), P) for _ in range(45)]
        for _ in range(10):  # only the decoded-data checksum can catch these
            p = bytearray(P)
            p[rng.randrange(len(p))] ^= 0xFF
            cases.append(with_payload(H, bytes(p)))
    return cases


def cpu_seconds():
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def artifact_report(tmp):
    """Reads every table case and fuzz case; per case its outcome, error text, CPU seconds (this process's and its
    children's, so a busy machine does not inflate them; ZPAQ decodes in a child) and the growth of the
    process's peak memory (RSS, so C allocations by the decoders count too) over reading the genuine artifacts."""
    import resource
    genuine = make_genuine()
    config, tensors, prequant = genuine
    table, fuzz = artifact_cases(*genuine), fuzz_cases(config, tensors)
    refs = {"prequant_all_fp32": prequant, "lqer_genuine": lqer_tensors(config), "awq_genuine": awq_tensors(config)}
    want = {name: {k: a for k, _, a in refs.get(name, tensors)} for name in table}
    path = Path(tmp) / "case.pgz"
    for name in ("genuine_lzma", "genuine_rans", "genuine_none", "prequant_all_fp32"):  # the genuine peak first
        path.write_bytes(table[name][0])
        tg.read_artifact(path)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, data in [*((n, d) for n, (d, _) in table.items()), *((f"fuzz_{i}", d) for i, d in enumerate(fuzz))]:
        path.write_bytes(data)
        del data
        t = cpu_seconds()
        try:
            header, arrays = tg.read_artifact(path)
            ref = want.get(name, want["genuine_lzma"])
            same = sorted(arrays) == sorted(ref) and all(
                arrays[k].shape == a.shape and arrays[k].tobytes() == np.ascontiguousarray(a).tobytes()
                for k, a in ref.items()) and (header["config"] == config or name.startswith("fuzz_"))
            outcome, msg = ("identical" if same else "different"), ""
        except tg.ArtifactError as e:
            outcome, msg = "error", tg.error_text(e)
        except BaseException as e:  # noqa: BLE001 -- reported, and the test fails on it
            outcome, msg = f"escaped {type(e).__name__}", str(e)[:300]
        out[name] = dict(outcome=outcome, msg=msg, seconds=cpu_seconds() - t, path=str(path),
                         rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    return dict(cases=out, table=sorted(table), expected={n: names for n, (_, names) in table.items()})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One subprocess reads every crafted artifact, so that its peak memory measures the reader alone."""
    tmp = tmp_path_factory.mktemp("artifacts")
    code = (f"import json, sys; sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO)!r}]; import test_robustness as T; "
            f"print(json.dumps(T.artifact_report({str(tmp)!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_case(rep, name, names):
    c = rep["cases"][name]
    if names is None:
        assert c["outcome"] == "identical", (name, c)
    else:
        assert c["outcome"] == "error", (name, c)
        assert c["msg"].startswith(f"artifact {c['path']}: ") and "fix:" in c["msg"] and "\n" not in c["msg"], c
        for n in names:
            assert n in c["msg"], (n, c["msg"])
    # a crafted file costs no more CPU time than a genuine one (~0.4 s for rANS; ZPAQ, a context-mixing coder, runs
    # in a child process at ~0.2 MB/s a thread: ~1.5 s for this model)
    assert c["seconds"] < (10.0 if name.startswith("zpaq") else 3.0), (name, c)
    assert c["rss_growth_mb"] < 40, (name, c)  # ...nor memory: the 1 GiB bombs stop at the model's declared size


@pytest.mark.parametrize("case", ART_CASES)
def test_artifact_class(report, case):
    if case not in report["expected"]:
        assert case.startswith(("zstd", "brotli", "zpaq")), case
        pytest.skip(f"{case}: codec not installed")
    assert set(report["table"]) <= set(ART_CASES)
    check_case(report, case, report["expected"][case])


def test_zpaq_decoding_stops_one_wave_past_the_declared_size():
    """The ZPAQ child decodes blocks ZPAQ_THREADS at a time and stops at the first wave whose output passes the
    declared size: the blocks after it are never decoded (here they are garbage, which decoding would reject), so
    a stream of any number of blocks expands at most one wave past the bound."""
    zpaq = pytest.importorskip("zpaq")
    wave = b"".join(zpaq.compress(bytes(1 << 17), level=1, threads=1) for _ in range(tg.ZPAQ_THREADS))
    assert wave.count(tg.ZPAQ_TAG) == tg.ZPAQ_THREADS and wave.startswith(tg.ZPAQ_TAG)
    garbage = tg.ZPAQ_TAG + b"zPQ\x01\x01" + random.Random(5).randbytes(4000)  # a block header, then noise
    assert tg._unzpaq(wave + garbage * 1000, 1000) == bytes(1001)  # n + 1 bytes, as every decoder returns
    assert tg._unzpaq(wave, 2 << 20) == bytes(tg.ZPAQ_THREADS << 17)  # the whole stream when it is within n
    with pytest.raises(ValueError, match="zpaq stream rejected"):
        tg._unzpaq(wave + garbage, 2 << 20)  # past the first wave: the garbage is read and rejected


def test_crafted_artifact_fuzz(report):
    """330 fuzzed files: each a clean ArtifactError or, where the edit is harmless, exactly the genuine tensors
    (a config edited into another valid one, say LOGIT_SOFTCAP true = 1.0, is a valid artifact of that model)."""
    fuzz = {n: c for n, c in report["cases"].items() if n.startswith("fuzz_")}
    assert len(fuzz) >= 300
    counts = {}
    for name, c in fuzz.items():
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
        check_case(report, name, [] if c["outcome"] == "error" else None)
    assert counts.get("error", 0) > 250, counts


def test_error_text_escapes_control_characters():
    """Any message (an OS error's text, a file name) is printed on one line: a newline cannot forge a log line."""
    assert tg.error_text(tg.ConfigError("x\nfinal_slot_exact val_bpb:0.1\x1b[2J")) == \
        "x\\nfinal_slot_exact val_bpb:0.1\\x1b[2J"
    e = FileNotFoundError(2, "No such file or directory", "/tmp/a\nb")
    assert tg.error_text(e).startswith("/tmp/a\\nb: No such file or directory") and "fix:" in tg.error_text(e)


# ----------------------------------------------------------------------------- 4. faults


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "out.pgz"
    target.write_bytes(b"previous complete file")
    code = (f"import resource, signal, sys; sys.path.insert(0, {str(REPO)!r}); import train_gpt as tg; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            f"tg.write_atomic({str(target)!r}, b'x' * 100000)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = r.stderr.strip().splitlines()[-1]  # the ConfigError main() prints as its one `error:` line
    assert r.returncode != 0 and f"cannot write {target} (File too large)" in line and "fix:" in line, r.stderr[-2000:]
    assert target.read_bytes() == b"previous complete file"  # the "disk" filled up: the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pgz"]  # and no temporary file is left behind


@pytest.fixture(scope="module")
def fault_env(toy_env, tmp_path_factory):
    return {**toy_env, "LOG_DIR": str(tmp_path_factory.mktemp("faults"))}


def open_run_case(env, code_bytes=1000):
    a = tg.Settings(env)
    ctx = tg.Ctx(0, 1, 0, torch.device("cpu"))
    try:
        return tg.open_run(a, ctx, code_bytes)
    finally:
        if ctx.log_file:
            ctx.log_file.close()


def fault_cases(tmp):
    used = tmp / "used"
    used.mkdir()
    (used / "taken.txt").write_text("another run's log\n")
    (used / "taken2.submission.json").write_text("{}")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    art_dir = tmp / "art_dir.pgz"
    art_dir.mkdir()
    return {
        "run_id_log_exists": ({"LOG_DIR": str(used), "RUN_ID": "taken"}, ["RUN_ID", "taken.txt", "delete"]),
        "run_id_submission_exists": ({"LOG_DIR": str(used), "RUN_ID": "taken2"}, ["taken2.submission.json"]),
        "log_dir_is_a_file": ({"LOG_DIR": str(a_file), "RUN_ID": "r"}, ["LOG_DIR", str(a_file)]),
        "log_dir_under_a_file": ({"LOG_DIR": str(a_file / "sub"), "RUN_ID": "r"}, ["LOG_DIR"]),
        "artifact_is_a_folder": ({"LOG_DIR": str(tmp / "l1"), "RUN_ID": "r", "ARTIFACT": str(art_dir)},
                                 ["ARTIFACT", str(art_dir), "folder"]),
        "target_below_code": ({"LOG_DIR": str(tmp / "l2"), "RUN_ID": "r", "TARGET_BYTES": "999"},
                              ["TARGET_BYTES", "1000"]),
        "new_log_dir_created": ({"LOG_DIR": str(tmp / "new" / "deeper"), "RUN_ID": "fresh"}, None),
        "eval_only_needs_no_new_artifact": ({"LOG_DIR": str(used), "RUN_ID": "ev", "EVAL_ONLY": "1",
                                             "ARTIFACT": str(used / "taken.txt")}, None),
    }


FAULT_CASES = ["run_id_log_exists", "run_id_submission_exists", "log_dir_is_a_file", "log_dir_under_a_file",
               "artifact_is_a_folder", "target_below_code", "new_log_dir_created", "eval_only_needs_no_new_artifact"]


@pytest.mark.parametrize("case", FAULT_CASES)
def test_faults_class(tmp_path, case):
    cases = fault_cases(tmp_path)
    assert sorted(cases) == sorted(FAULT_CASES)
    env, names = cases[case]
    if names is None:
        run_id = open_run_case(env)
        assert (Path(env["LOG_DIR"]) / f"{run_id}.txt").is_file()
    else:
        one_line_error(lambda: open_run_case(env), *names)
    assert (tmp_path / "used" / "taken.txt").read_text() == "another run's log\n"


def test_nan_result_is_an_error_not_a_file(tmp_path):
    path = tmp_path / "r.submission.json"
    one_line_error(lambda: tg.write_atomic(path, {"val_bpb": float("nan"), "results": {}}), str(path), "NaN")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    tg.write_atomic(path, {"val_bpb": 1.25})
    assert json.loads(path.read_text()) == {"val_bpb": 1.25}


def start(env, ignore_sigint=False):
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", **env}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "train_gpt.py"], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore)


@pytest.mark.parametrize("sig, ignored", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)])
def test_interrupt_is_one_clean_line(fault_env, sig, ignored):
    """Ctrl-C or SIGTERM mid-training: one `error: interrupted` line on stderr and in the log, a non-zero exit,
    and no half-written file. Also when the run starts with SIGINT ignored, as a shell's background job does
    (Python then installs no handler of its own: the run would go on)."""
    run_id = f"int_{sig.name}_{ignored:d}"
    env = {**fault_env, "RUN_ID": run_id, "ITERATIONS": "100000", "TRAIN_LOG_EVERY": "1"}
    log = Path(env["LOG_DIR"]) / f"{run_id}.txt"
    p = start(env, ignored)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and "step:2/" in log.read_text()):
            time.sleep(0.2)
        assert log.is_file() and "step:2/" in log.read_text(), "training never started"
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "fix:" in lines[0], err[-2000:]
    assert log.read_text().splitlines()[-1] == lines[0]  # the log says why it stopped
    files = [f for f in Path(env["LOG_DIR"]).iterdir() if f.name.startswith(run_id)]
    assert [f.name for f in files] == [log.name]  # stopped in training: nothing else written, no temporary file


def test_failed_run_logs_its_error_and_its_run_id_stays_free(fault_env, tmp_path):
    """A typo in DATA_PATH fails with one error line, also in the log; the corrected re-run with the same RUN_ID then
    runs (the failed log is kept beside as failing.failed1.txt). A run that wrote files keeps its RUN_ID: so does a
    failed one that had written its prequant weights, and a log without a final error line (a running run)."""
    env = {**fault_env, "RUN_ID": "failing", "DATA_PATH": str(tmp_path / "missing"), "LOG_DIR": str(tmp_path)}
    p = start(env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.startswith("error: DATA_PATH="), err
    log = (tmp_path / "failing.txt").read_text()
    assert log.splitlines()[-1] == err.strip()  # the error line also went to the run's log
    p = start({**env, "DATA_PATH": fault_env["DATA_PATH"], "ITERATIONS": "1", "SLOT_ENABLED": "0",
               "SLIDING_ENABLED": "0"})  # fixed: runs
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert (tmp_path / "failing.failed1.txt").read_text() == log and "moved to" in out
    assert (tmp_path / "failing.submission.json").is_file()
    one_line_error(lambda: open_run_case(env), "RUN_ID='failing'", "failing.submission.json", "delete")
    (tmp_path / "half.txt").write_text("step:1/2 ...\nerror: interrupted\n")
    (tmp_path / "half.prequant.pgz").write_bytes(b"weights")
    one_line_error(lambda: open_run_case({**env, "RUN_ID": "half"}), "half.prequant.pgz")
    (tmp_path / "busy.txt").write_text("step:1/2 train_loss:5.0\n")
    one_line_error(lambda: open_run_case({**env, "RUN_ID": "busy"}), "busy.txt", "delete")


def test_warmup_covers_every_compile_variant(monkeypatch):
    """On CUDA with compile on, loop x late QAT make up to 4 graphs: fewer warm-up steps would compile one in the
    timed run (the default, 20, and the record-frontier's loop without late QAT, 2 variants, pass)."""
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: True)
    one_line_error(lambda: tg.Settings({"WARMUP_STEPS": "3", "NUM_LOOPS": "1"}), "WARMUP_STEPS", "4 compile variants")
    assert tg.Settings({"WARMUP_STEPS": "2", "NUM_LOOPS": "1", "LATE_QAT_THRESHOLD": "0"}).warmup_steps == 2
    assert tg.Settings({"WARMUP_STEPS": "1", "COMPILE": "0", "NUM_LOOPS": "1"}).warmup_steps == 1
