"""Tests of the quantiser and the compressor options (issue 17): std clip against its formula, every bit width and
clip mode through GPTQ, the codecs and the artifact, the tied embedding's Hessian against the head's inputs, LQER
against the error it corrects and at load, int8 gate rows, and the grouped, reordered, transposed layout against
an independent construction. Every reference is computed another way than train_gpt.py computes it."""

import contextlib
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

TINY = {"VOCAB_SIZE": "256", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
        "MLP_MULT": "2", "ROPE_DIMS": "8", "XSA_LAST_N": "2", "BIGRAM_VOCAB_SIZE": "0", "VE_ENABLED": "0",
        "TRAIN_SEQ_LEN": "32", "SKIP_GATED": "1"}
CPU = torch.device("cpu")


class Ctx:  # what collect_hessians needs of a one-process run
    device = CPU
    autocast = staticmethod(contextlib.nullcontext)
    all_reduce = staticmethod(lambda t: t)


def codecs():
    return [n for n, c in tg.codecs().items() if isinstance(c, tuple)]


def toy(env, seed=0):
    """A tiny model whose matrices are drawn like trained ones, and its Hessians from random token batches."""
    a = tg.Settings({**TINY, **env})
    torch.manual_seed(seed)
    model = tg.GPT(a.arch())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed + i)) for i in range(2)]
    return a, model, tg.collect_hessians(Ctx, model, batches), batches


def state_of(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("env, name", [
    ({"ATTN_BITS": "4"}, "ATTN_BITS"), ({"MLP_BITS": "9"}, "MLP_BITS"), ({"EMBED_BITS": "5"}, "EMBED_BITS"),
    ({"MLP_CLIP_SIGMAS": "-1"}, "MLP_CLIP_SIGMAS"), ({"EMBED_BITS": "7", "TIE_EMBEDDINGS": "0"}, "EMBED_BITS"),
    ({"LQER_RANK": "-2"}, "LQER_RANK"), ({"ATTN_CLIP_SIGMAS": "nan"}, "ATTN_CLIP_SIGMAS"),
    ({"AWQ_TOP_K": "-1"}, "AWQ_TOP_K"), ({"AWQ_GROUP_SIZE": "0"}, "AWQ_GROUP_SIZE"), ({"AWQ_BITS": "9"}, "AWQ_BITS"),
    ({"AWQ_BITS": "4"}, "AWQ_BITS"), ({"AWQ_GROUP_SIZE": "1e3"}, "AWQ_GROUP_SIZE")])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(tg.ConfigError) as e:
        tg.Settings(env)
    assert str(e.value).startswith(f"{name}=") and "fix:" in str(e.value)


# ----------------------------------------------------------------------------- GPTQ


def layer(seed=0, n_in=128, n_out=96, rows=2048):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_in, n_in, generator=g) / math.sqrt(n_in) * torch.logspace(0, -1, n_in)[:, None]
    x_cal, x_test = torch.randn(rows, n_in, generator=g) @ A, torch.randn(rows, n_in, generator=g) @ A
    W = torch.randn(n_out, n_in, generator=g) * 0.05
    W[:3, :5] *= 8  # a few outliers, which a std clip cuts
    return W, x_cal, x_test


def out_err(x, W, Wq):
    return (x.double() @ (W.double() - Wq.double()).T).norm().item()


@pytest.mark.parametrize("bits, sigmas", [(5, 11.5), (6, 13.0), (7, 14.0), (8, 3.0)])
def test_std_clip_is_the_formula(bits, sigmas):
    W, x, _ = layer(bits)
    qmax = 2 ** (bits - 1) - 1
    q, s = tg.gptq_quantize(W, x.T @ x, qmax=qmax, sigmas=sigmas)
    w = W.double().numpy()
    ref = (sigmas * np.sqrt(((w - w.mean(1, keepdims=True)) ** 2).sum(1) / (w.shape[1] - 1)) / qmax).astype(np.float16)
    assert s.dtype == torch.float16 and np.allclose(s.numpy().astype(np.float64), ref.astype(np.float64), rtol=1e-3)
    assert int(q.abs().max()) <= qmax and q.dtype == torch.int8


def test_gptq_error_falls_with_bits_in_both_clip_modes():
    W, x, x_test = layer(7)
    for sigmas in (0.0, 12.0):
        errs = []
        for bits in (5, 6, 7, 8):
            q, s = tg.gptq_quantize(W, x.T @ x, qmax=2 ** (bits - 1) - 1, sigmas=sigmas)
            errs.append(out_err(x_test, W, q.float() * s.float()[:, None]))
        assert errs == sorted(errs, reverse=True) and errs[-1] < 0.25 * errs[0], (sigmas, errs)


def test_tied_embedding_hessian_is_the_head_inputs():
    """collect_hessians' embedding Hessian equals X^T X of what the head multiplies, captured at the head."""
    a, model, H, batches = toy({"EMBED_BITS": "7"})
    seen = []
    logits = model.logits
    model.logits = lambda h, bias=None: (seen.append(h.detach().double().reshape(-1, h.size(-1))), logits(h, bias))[1]
    for x in batches:
        model(x, x)
    X = torch.cat(seen)
    assert torch.allclose(H["tok_emb.weight"].double(), X.T @ X, rtol=1e-5, atol=1e-4)
    # and the int7 embedding is GPTQ with that Hessian and EMBED_CLIP_SIGMAS (0: the percentile search)
    for sig in ("0", "14"):
        b = tg.Settings({**TINY, "EMBED_BITS": "7", "EMBED_CLIP_SIGMAS": sig})
        arrays = {k: v for k, _, v in tg.quantize_state(state_of(model), H, b)[0]}
        q, s = tg.gptq_quantize(model.tok_emb.weight.detach(), (X.T @ X).float(), qmax=63, sigmas=float(sig))
        assert np.array_equal(arrays["tok_emb.weight#q"], q.numpy()) or \
            np.mean(arrays["tok_emb.weight#q"] != q.numpy()) < 1e-3  # float sums in another order
        assert np.abs(arrays["tok_emb.weight#q"]).max() <= 63


def kinds_of(tensors):
    return {k: kind for k, kind, _ in tensors}


@pytest.mark.parametrize("env", [
    {"ATTN_BITS": "5", "MLP_BITS": "5", "EMBED_BITS": "6"},
    {"ATTN_BITS": "6", "MLP_BITS": "7", "EMBED_BITS": "8", "MLP_CLIP_SIGMAS": "11.5"},
    {"ATTN_BITS": "7", "MLP_BITS": "8", "EMBED_BITS": "7", "ATTN_CLIP_SIGMAS": "13", "EMBED_CLIP_SIGMAS": "14"},
    {"ATTN_BITS": "8", "MLP_BITS": "6", "EMBED_BITS": "7", "ATTN_CLIP_SIGMAS": "13", "MLP_CLIP_SIGMAS": "11.5",
     "EMBED_CLIP_SIGMAS": "14", "LQER_RANK": "4", "LQER_TOP_K": "3"},
])
def test_bit_widths_and_clip_modes_round_trip_through_the_artifact(tmp_path, env):
    a, model, H, _ = toy(env, seed=1)
    state = state_of(model)
    lines = []
    tensors, hdiag = tg.quantize_state(state, H, a, lines.append)
    kinds = kinds_of(tensors)
    for name, t in state.items():
        block = name.startswith("blocks.") and name.endswith(".weight")
        want = (f"int{a.mlp_bits if '.mlp.' in name else a.attn_bits}" if block
                else f"int{a.embed_bits}" if name == "tok_emb.weight" and a.embed_bits < 8
                else "int8" if name == "skip_gates" or name == "tok_emb.weight" and t.numel() > 65536 else None)
        if want:
            assert kinds[name + "#q"] == want and kinds[name + "#scale"] == "fp16", name
            qmax = 2 ** (int(want[3:]) - 1) - 1
            assert np.abs(dict((k, v) for k, _, v in tensors)[name + "#q"]).max() <= qmax, name
    assert ("tok_emb.weight" in hdiag) == (a.embed_bits < 8)
    # LQER_TOP_K candidates, each decided and logged; only the kept ones reach the artifact (on these random
    # matrices GPTQ's error has no low-rank part worth int2 factors: test_lqer_* plants one)
    assert len([x for x in lines if x.startswith("lqer: ")]) == (3 if a.lqer_rank else 0)
    assert sum(k.endswith("#lqa") for k in kinds) == sum(" kept " in x for x in lines)
    tensors += tg.row_orders(tensors, CPU)
    for codec in [c for c in codecs() if c in ("none", "rans", "zpaq-5")]:  # the general ones: test_export_eval
        path = tmp_path / f"{codec}.pgz"
        path.write_bytes(tg.encode_artifact(tensors, codec, "int6", a.arch()))
        header, arrays = tg.read_artifact(path)  # the model checks included
        assert header["config"]["ATTN_BITS"] == a.attn_bits
        assert sorted(arrays) == sorted(kinds_of(tensors))
        assert all(arrays[k].tobytes() == np.ascontiguousarray(v).tobytes() for k, _, v in tensors), codec
    back = tg.dequantize(arrays)
    model2 = tg.model_from(header["config"], back, Ctx, False)
    for name, t in state.items():
        w = model2.state_dict()[name]
        # the step is k*std/qmax (std clip) or at most ~8 std/qmax (clip percentiles): rounding noise is 0.29 steps,
        # and GPTQ moves error into the inputs' unused directions (here 128 calibration tokens): 1.2 steps at most
        kind, group = kinds.get(name + "#q", "fp"), "embed" if name.startswith("tok") else "mlp" if ".mlp." in name \
            else "attn"
        k = getattr(a, f"{group}_clip_sigmas") if name in hdiag else 0
        tol = 1.2 * (k or 8) / (2 ** (int(kind[3:]) - 1) - 1) if kind in tg.INT_KINDS else 1e-3
        assert (w - t).norm() <= tol * t.norm() + 1e-6, name


@pytest.mark.parametrize("env, label", [({}, "int6"), ({"ATTN_BITS": "5", "MLP_BITS": "5"}, "int5"),
                                        ({"EMBED_BITS": "7"}, "int6_embed7"),
                                        ({"ATTN_BITS": "8", "MLP_BITS": "6", "EMBED_BITS": "6"}, "attn8_mlp6_embed6")])
def test_the_artifact_label_names_the_bits_as_configured(env, label):
    a = tg.Settings(env)
    assert a.quant_label() == label and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", label)  # as read_artifact requires


def test_gate_weights_are_int8_rows_whatever_their_size():
    c = tg.Settings({}).arch()
    for name, shape in [("blocks.3.attn.gate_w", (8, 12)), ("skip_gates", (5, 512)), ("blocks.0.attn.gate_w", (2, 1))]:
        assert tg.quant_kind(name, torch.empty(shape), c) == "int8"
    w = torch.randn(8, 12)
    tensors, _ = tg.quantize_state({"blocks.3.attn.gate_w": w}, {}, tg.Settings({}))
    arrays = {k: v for k, _, v in tensors}
    s = np.abs(w.numpy()).max(1) / 127
    assert np.allclose(arrays["blocks.3.attn.gate_w#scale"], s, rtol=1e-3)
    assert np.abs(tg.dequantize(arrays)["blocks.3.attn.gate_w"].numpy() - w.numpy()).max() <= 0.51 * s.max()


# ----------------------------------------------------------------------------- LQER


def test_lqer_lowers_the_held_out_error_and_is_applied_on_load(tmp_path):
    """A std clip cuts the outliers: an error of low rank, which LQER stores and the loaded model adds back."""
    Ws, xs = {}, {}
    for i, name in enumerate(["blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.1.attn.q.weight"]):
        W, x_cal, x_test = layer(10 + i, n_in=128, n_out=96)
        W[:, 7] += 0.6 * (i != 1)  # a column of outliers in two of the three tensors
        Ws[name], xs[name] = W, (x_cal, x_test)
    a = tg.Settings({"ATTN_CLIP_SIGMAS": "4", "LQER_RANK": "2", "LQER_TOP_K": "2"})
    H = {n: x.T @ x for n, (x, _) in xs.items()}
    tensors, _ = tg.quantize_state(Ws, H, a)
    arrays = {k: v for k, _, v in tensors}
    plain = {n: arrays[n + "#q"].astype(np.float64) * arrays[n + "#scale"].astype(np.float64)[:, None] for n in Ws}
    norms = {n: np.linalg.norm(Ws[n].double().numpy() - plain[n]) for n in Ws}
    top, errs = sorted(norms, key=norms.get)[1:], []
    assert sorted(k[:-4] for k in arrays if k.endswith("#lqa")) == sorted(top)
    for n in top:
        qa, qb, sa, sb = (arrays[n + s] for s in ("#lqa", "#lqb", "#lqas", "#lqbs"))
        assert qa.shape == (96, 2) and qb.shape == (2, 128) and sa.shape == (1,) and sb.shape == (2, 2)
        assert qa.min() >= -2 and qa.max() <= 1 and qb.min() >= -8 and qb.max() <= 7
        A = qa * sa.astype(np.float64)
        B = (qb.reshape(2, 2, 64) * sb.astype(np.float64)[..., None]).reshape(2, 128)
        E = Ws[n].double().numpy() - plain[n]
        U, S, Vt = np.linalg.svd(E)
        assert np.linalg.norm(A @ B - (U[:, :2] * S[:2]) @ Vt[:2]) < np.linalg.norm(S[:2])  # int2 A is coarse
        corrected = plain[n] + A @ B
        x_test = xs[n][1].double().numpy()
        e0 = np.linalg.norm(x_test @ (Ws[n].double().numpy() - plain[n]).T)
        e1 = np.linalg.norm(x_test @ (Ws[n].double().numpy() - corrected).T)
        assert e1 < 0.95 * e0, (n, e0, e1)
        errs.append((e0, e1))
        tensors_path = tmp_path / "lqer.pgz"
        tensors_path.write_bytes(tg.encode_artifact(tensors, "lzma-9", "int6", {}))
        loaded = tg.dequantize(tg.read_artifact(tensors_path, check_model=False)[1])
        assert np.allclose(loaded[n].double().numpy(), corrected, atol=1e-5)
    assert sum(e1 for _, e1 in errs) < 0.75 * sum(e0 for e0, _ in errs), errs
    bottom = min(norms, key=norms.get)
    assert np.array_equal(tg.dequantize(arrays)[bottom].double().numpy(), plain[bottom])


def test_lqer_keeps_a_factor_only_where_it_lowers_the_activation_weighted_error():
    """Candidates are GPTQ'd matrices only; a factor is kept when ||X (E - AB)^T|| < ||X E^T|| on the calibration
    inputs (checked here with X itself, not H), and dropped where the inputs never touch the columns it corrects;
    each decision is logged with both errors."""
    Ws, xs = {}, {}
    for i, name in enumerate(["blocks.0.attn.q.weight", "blocks.1.attn.q.weight"]):
        W, x_cal, _ = layer(20 + i, n_in=128, n_out=96)
        W[:, 7] += 0.6  # outliers in column 7: a low-rank error after the std clip
        Ws[name], xs[name] = W, x_cal
    xs["blocks.1.attn.q.weight"][:, 7:] = 0  # these inputs reach columns 0..6 alone, where the factor is ~0
    H = {n: x.T @ x for n, x in xs.items()}
    lines = []
    tensors, _ = tg.quantize_state(Ws, H, tg.Settings({"ATTN_CLIP_SIGMAS": "4", "LQER_RANK": "1",
                                                       "LQER_TOP_K": "2"}), lines.append)
    arrays = {k: v for k, _, v in tensors}
    assert sorted(k[:-4] for k in arrays if k.endswith("#lqa")) == ["blocks.0.attn.q.weight"]
    for n, x in xs.items():
        plain = arrays[n + "#q"].astype(np.float64) * arrays[n + "#scale"].astype(np.float64)[:, None]
        E = Ws[n].double().numpy() - plain
        qa, qb, sa, sb = (tg.lqer_factors(n, torch.from_numpy(E).float(), 1)[i][2] for i in range(4))
        AB = (qa * sa.astype(np.float64)) @ (qb.reshape(1, 2, 64) * sb.astype(np.float64)[..., None]).reshape(1, 128)
        before, after = (np.linalg.norm(x.double().numpy() @ M.T) ** 2 for M in (E, E - AB))
        line = next(x for x in lines if x.startswith(f"lqer: {n} "))
        assert line == (f"lqer: {n} {'kept' if after < before else 'dropped'} activation-weighted error "
                        f"{before:.4g} -> {after:.4g}")
    assert [x.split()[2] for x in lines] == ["kept", "dropped"] or [x.split()[2] for x in lines] == ["dropped", "kept"]


# ----------------------------------------------------------------------------- AWQ-lite

AWQ = {"NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "0", "EMBED_BITS": "7", "AWQ_GROUP_SIZE": "16"}


def activations(model, batches):
    """Every input row of each GPTQ matrix (float64), captured by hooks: a looped layer's once per pass; the tied
    embedding's are the final-norm outputs (the head's inputs)."""
    xs, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, tg.CastedLinear) and m.quantized:
            hooks.append(m.register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n + ".weight", []).append(
                i[0].detach().double().reshape(-1, i[0].size(-1)))))
    for x in batches:
        xs.setdefault("tok_emb.weight", []).append(model.forward_hidden(x).detach().double().reshape(-1, 64))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).numpy() for n, v in xs.items()}


def test_awq_saliency_and_chosen_groups_are_the_formula():
    """s_j = rms(x_j) mean_i |W_ij| over every calibration input row (layer 0 runs twice: its rows count twice),
    summed in groups of 16 columns; the 3 largest groups over all GPTQ'd matrices (the int7 embedding included) are
    the artifact's #awqm masks. train_gpt takes rms from H's diagonal without the token count (common to all), so
    its logged saliency is the formula's times sqrt(tokens)."""
    a, model, H, batches = toy({**AWQ, "AWQ_TOP_K": "3"})
    xs, state, lines = activations(model, batches), state_of(model), []
    tokens = sum(x.numel() for x in batches)
    ref = []
    for n, x in xs.items():
        assert len(x) == tokens * (2 if n.startswith("blocks.0.") else 1)
        s = np.sqrt((x ** 2).mean(0)) * np.abs(state[n].double().numpy()).mean(0)
        ref += [(v, n, g) for g, v in enumerate(s.reshape(-1, 16).sum(1))]
    top = sorted(ref, reverse=True)[:3]
    tensors, _ = tg.quantize_state(state, H, a, lines.append)
    arrays = {k: v for k, _, v in tensors}
    masks = {k[:-5]: v for k, v in arrays.items() if k.endswith("#awqm")}
    assert sorted(masks) == sorted({n for _, n, _ in top})
    for n, m in masks.items():
        want = np.zeros(len(m), np.int8)
        for _, name, g in top:
            want[16 * g:16 * g + 16] |= name == n
        assert np.array_equal(m, want), n
    logged = re.findall(r"(\S+)\[(\d+):(\d+)\] \(saliency (\S+)\)", next(x for x in lines if x.startswith("awq: ")))
    assert [(n, int(lo) // 16) for n, lo, _, _ in logged] == [(n, g) for _, n, g in top]
    for (v, _, _), (_, _, _, got) in zip(top, logged):
        assert float(got) == pytest.approx(v * math.sqrt(tokens), rel=1e-3)


@pytest.mark.parametrize("bits", [8, 7])
def test_awq_columns_use_their_grid_and_round_trip_through_the_artifact(tmp_path, bits):
    """The chosen group's columns hold integers of the AWQ_BITS grid (beyond int6's range: a finer step) with their
    own fp16 row scale, every other column the int6 grid; encode_artifact -> read_artifact (model checks on) ->
    dequantize gives exactly W[:, group] = q * awqs and q * scale elsewhere, for every codec."""
    a, model, H, _ = toy({**AWQ, "AWQ_TOP_K": "2", "AWQ_BITS": str(bits)})
    tensors, _ = tg.quantize_state(state_of(model), H, a)
    arrays = {k: v for k, _, v in tensors}
    assert {k for k, kind, _ in tensors if "#awq" in k} == {k[:-5] + s for k in arrays if k.endswith("#awqm")
                                                            for s in ("#awqm", "#awqs")}
    qmax = 2 ** (bits - 1) - 1
    for n in (k[:-5] for k in arrays if k.endswith("#awqm")):
        m, q, s, sa = (arrays[n + x] for x in ("#awqm", "#q", "#scale", "#awqs"))
        assert m.dtype == np.int8 and sa.dtype == np.float16 and sa.shape == s.shape and m.sum() in (16, 32)
        cols = m != 0
        assert np.abs(q[:, cols]).max() <= qmax and np.abs(q[:, cols]).max() > 31 and np.abs(q[:, ~cols]).max() <= 31
        want = q.astype(np.float32) * s.astype(np.float32)[:, None]
        want[:, cols] = q[:, cols] * sa.astype(np.float32)[:, None]
        assert np.array_equal(tg.dequantize_one(arrays, n), want)
    for codec in [c for c in codecs() if c in ("lzma-9", "rans")]:
        path = tmp_path / f"{codec}.pgz"
        path.write_bytes(tg.encode_artifact(tensors + tg.row_orders(tensors, CPU), codec, "int6", a.arch()))
        back = tg.dequantize(tg.read_artifact(path)[1])
        assert all(torch.equal(back[k], v) for k, v in tg.dequantize(arrays).items()), codec


def test_awq_lowers_the_chosen_matrix_activation_weighted_error():
    """With AWQ on, the chosen matrix's tr(E H E^T), E = W - W_q, is below its value with AWQ off (GPTQ still spreads
    every column's error); every other tensor is the same as with AWQ off."""
    a, model, H, _ = toy({**AWQ, "ATTN_BITS": "5", "MLP_BITS": "5"})
    state = state_of(model)
    off = {k: v for k, _, v in tg.quantize_state(state, H, a)[0]}
    on = {k: v for k, _, v in tg.quantize_state(state, H, tg.Settings({**TINY, **AWQ, "ATTN_BITS": "5", "MLP_BITS": "5",
                                                                       "AWQ_TOP_K": "1"}))[0]}
    (n,) = [k[:-5] for k in on if k.endswith("#awqm")]
    err = {}
    for name, arrays in (("off", off), ("on", on)):
        E = state[n].double().numpy() - tg.dequantize_one(arrays, n)
        err[name] = np.trace(E @ H[n].double().numpy() @ E.T)
    assert err["on"] < err["off"], err
    assert sorted(on) == sorted(list(off) + [n + "#awqm", n + "#awqs"])
    assert all(np.array_equal(v, on[k]) for k, v in off.items() if not k.startswith(n + "#")), n


# ----------------------------------------------------------------------------- layout


def greedy_walk(rows):
    """The nearest-neighbour walk spelled out: from row 0, always to the closest (L1) row not yet visited."""
    rows, order, left = rows.astype(np.int64), [0], set(range(1, len(rows)))
    while left:
        cur = rows[order[-1]]
        order.append(min(left, key=lambda j: (np.abs(rows[j] - cur).sum(), j)))
        left.remove(order[-1])
    return np.array(order)


def layout_tensors(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(-20, 21, (6, 24))
    out = []
    for i in range(3):  # q rows: noisy copies of 6 prototypes, shuffled, so that the walk has structure to find
        q = np.clip(base[rng.integers(0, 6, 10)] + rng.integers(-2, 3, (10, 24)), -31, 31).astype(np.int8)
        out += [(f"blocks.{i}.attn.q.weight#q", "int6", q),
                (f"blocks.{i}.attn.q.weight#scale", "fp16", rng.uniform(0.01, 0.02, 10).astype(np.float16)),
                (f"blocks.{i}.mlp.proj.weight#q", "int5", rng.integers(-15, 16, (24, 7)).astype(np.int8))]
    out += [("tok_emb.weight#q", "int7", rng.integers(-63, 64, (17, 24)).astype(np.int8)),
            ("blocks.0.attn.gate_w#q", "int8", rng.integers(-127, 128, (2, 5)).astype(np.int8)),
            ("gain", "fp32", rng.standard_normal(3).astype(np.float32))]
    return out


def test_row_order_is_the_greedy_l1_walk():
    q = np.concatenate([a for k, _, a in layout_tensors() if k.endswith("q.weight#q")])
    assert np.array_equal(tg.row_order(q, CPU), greedy_walk(q))
    perms = dict((k, a) for k, _, a in tg.row_orders(layout_tensors(), CPU))
    assert sorted(perms) == ["embed#perm", "q#perm"] and perms["q#perm"].dtype == np.uint16


def test_grouped_reordered_stream_decodes_bit_exactly():
    tensors = layout_tensors()
    tensors += tg.row_orders(tensors, CPU)
    entries, raw = tg.pack_raw(tensors)
    ent = {e["key"]: e for e in entries}
    arrays = {k: a for k, _, a in tensors}
    # independently: each role's matrices stacked, rows in the stored order, transposed, at its first entry
    for role, keys, perm in [("q", [f"blocks.{i}.attn.q.weight#q" for i in range(3)], "q#perm"),
                             ("down", [f"blocks.{i}.mlp.proj.weight#q" for i in range(3)], None),
                             ("embed", ["tok_emb.weight#q"], "embed#perm")]:
        m = np.vstack([arrays[k] for k in keys])
        m = m[arrays[perm].astype(int)] if perm else m
        start = ent[keys[0]]["offset"]
        assert raw[start:start + m.size] == m.T.tobytes(), role
        assert [ent[k]["offset"] for k in keys] == [start + sum(arrays[j].size for j in keys[:i])
                                                    for i in range(len(keys))]
    # rANS: one table per role group or other int tensor
    assert tg.int_lens(entries) == [3 * 10 * 24, 3 * 24 * 7, 17 * 24, 2 * 5]
    for name in codecs():
        enc, dec = tg.codecs()[name]
        back = tg.unpack_raw(entries, dec(enc(raw, entries), entries))
        assert sorted(back) == sorted(arrays)
        assert all(back[k].dtype == arrays[k].dtype and back[k].tobytes() == arrays[k].tobytes() for k in arrays), name


@pytest.mark.parametrize("bad", ["repeat", "short"])
def test_a_row_order_that_is_not_a_permutation_is_refused(tmp_path, bad):
    tensors = layout_tensors()
    perm = tg.row_orders(tensors, CPU)[0]
    p = perm[2].copy()
    p = np.concatenate([p[:1], p[:-1]]) if bad == "repeat" else p[:-1]
    path = tmp_path / "p.pgz"
    path.write_bytes(tg.encode_artifact(tensors + [(perm[0], "u16", p)], "none", "int6", {}))
    with pytest.raises(tg.ArtifactError, match="perm"):
        tg.read_artifact(path, check_model=False)
