"""bench/ttt_speed.py: --val-shard on a small shard; the schedule replay against what ttt_evaluate runs; the traced
FLOPs against a formula of the model's matmuls; the (n, T) fit against a step it was not fitted on; the roofline
and fusion rules on a hand example."""
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import ttt_speed as ts  # noqa: E402

SMALL = ts.CHECK_MODEL  # a small model of the record's shape: GQA, partial RoPE, bigram, VE, XSA, U-Net skips


@pytest.fixture(scope="module")
def small():
    a = tg.Settings(SMALL)
    return a, ts.meta_model(a.arch())


@pytest.fixture(scope="module")
def fit_runs(small):
    a, model = small
    return ts.trace_fit_runs(model, a.ttt_point())


def write_shard(path, tokens):
    header = np.zeros(tg.HEADER_INTS, np.int32)
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())


def run_bench(monkeypatch, capsys, *args, env=()):
    """bench/ttt_speed.py's main() in this process (the meta device warm): (exit status, stdout, stderr)."""
    for k, v in {**SMALL, **dict(env)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(ts, "settings_1855", lambda: tg.Settings(SMALL))  # the anchor's model, small here
    monkeypatch.setattr(sys, "argv", ["ttt_speed.py", "--settings", "seeds", *args])
    try:
        ts.main()
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_val_shard_gives_its_documents_and_the_projection(tmp_path, monkeypatch, capsys):
    lens = [37, 5, 120, 64, 9, 300, 18]
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, ts.doc_tokens(lens, 128))
    status, out, err = run_bench(monkeypatch, capsys, "--val-shard", str(path), "--no-measure", "--compile-s", "0",
                                 "--load-s", "0")
    assert status == 0, err
    line = next(x for x in out.splitlines() if x.startswith("document lengths:"))
    assert f"from the shard {path}" in line and f"; {len(lens)} documents, {sum(lens)} targets" in line
    assert "ASSUMED (no --val-shard)" not in out and "sensitivity" not in out
    proj = [x for x in out.splitlines() if x.startswith(("ttt_projected_8xh100: ", "eval_projected_8xh100: "))]
    assert len(proj) == 2 and "compiled" in proj[0] and "600 s budget" in proj[1]
    assert proj[1].endswith("a FLOOR (every kernel at peak), not a forecast")
    anchor = next(x for x in out.splitlines() if x.startswith("anchor: "))
    modelled = float(anchor.split("compiled: ")[1].split("s modelled")[0])
    r0, r1 = map(float, anchor.split("measured / modelled = ")[1].split("-"))
    assert "measured 455-509s on its own timer" in anchor and "84-138s warm-up" in anchor
    assert "~24s decompression" in anchor
    tol = 0.06 / modelled + 0.006  # the printed roundings: modelled to 0.1 s, the ratios to 0.01
    assert r0 == pytest.approx(455 / modelled, rel=tol) and r1 == pytest.approx(509 / modelled, rel=tol)
    eval_line = next(x for x in out.splitlines() if x.startswith("eval_anchored_8xh100: "))
    lo, hi = map(float, eval_line.split("s ANCHORED")[0].split(": ")[1].split("-"))
    device = float(eval_line.split("modelled device seconds ")[1].split("s x")[0])
    tol = r1 * 0.06 + 1  # device printed to 0.1 s, the eval to 1 s
    assert lo == pytest.approx(r0 * device + 84 + 24, abs=tol) and hi == pytest.approx(r1 * device + 138 + 24, abs=tol)
    verdict = "would trigger" if lo > 600 else "may trigger" if hi > 600 else "would not trigger"
    assert f"a 600 s deadline {verdict} (at the floor" in eval_line
    # VAL_TOKENS cuts the shard: the first two documents and 10 targets of the third
    a = tg.Settings({**SMALL, "VAL_TOKENS": str(37 + 5 + 11)})
    lens_cut, what = ts.doc_lengths(a, str(path))
    assert lens_cut.tolist() == [37, 5, 10] and "53 tokens, VAL_TOKENS" in what


def test_without_a_shard_the_lengths_are_assumed_and_a_bad_shard_is_one_error_line(tmp_path, monkeypatch, capsys):
    lens, what = ts.doc_lengths(tg.Settings(SMALL), "")
    assert what.startswith("ASSUMED") and len(lens) == ts.VAL_DOCS and abs(lens.sum() - 62_021_632) < 1000
    lens, _ = ts.doc_lengths(tg.Settings({**SMALL, "VOCAB_SIZE": "8192"}), "")
    assert abs(lens.sum() - 40_540_160) < 1000
    lens, what = ts.doc_lengths(tg.Settings({**SMALL, "VOCAB_SIZE": "8192"}), "", split="caseops")
    assert abs(lens.sum() - 47_851_520) < 1000 and "caseops val split's 47,851,520 tokens" in what
    status, out, err = run_bench(monkeypatch, capsys, "--val-shard", str(tmp_path / "missing.bin"), "--no-measure")
    assert status == 2 and err.startswith("error: ") and "missing.bin" in err and not out
    assert len(err.strip().splitlines()) == 1


class ReduceFree(tg.Ctx):
    def all_reduce(self, t, op=None):
        return t


@pytest.mark.parametrize("world,short", [(1, []), (2, []), (2, ["30:2", "45:4"])])
def test_replay_is_the_schedule_ttt_evaluate_runs(monkeypatch, world, short):
    """Every (n, nt, T) of every chunk step and every global phase's prefix, rank by rank, in order: batches of 3,
    windows of 64 to 192 (capped at 160 tokens), documents shorter than a chunk, two phase boundaries; with
    TTT_SHORT_CHUNKS, the batches led by 40 and by 21, 9 and 3 tokens at chunks 4 and 2."""
    lens = [5, 40, 17, 3, 164, 33, 8, 21, 150, 12, 9, 200, 1, 26]
    p = tg.Settings(SMALL).ttt_point(chunk=8, batch=3, seq_len=160, phases=2, prefix_docs=6, rank=4,
                                     short_chunks=short)
    model = tg.GPT(tg.Settings(SMALL).arch()).requires_grad_(False)
    tokens = ts.doc_tokens(lens, 128)
    assert tg.documents(tokens)[:, 1].tolist() == lens
    phases, global_tokens = ts.replay(np.array(lens), p, world)
    every = np.concatenate([np.stack(ph[r][:3], 1) for ph in phases for r in range(world)])
    assert set(every[:, 2]) == {64, 128, 192} and (every[:, 1] == 0).any()  # capped windows; untrained chunks
    assert ((every[:, 1] > 0) & (every[:, 1] < every[:, 0])).any()  # finished documents leave the optimiser
    real_nll, real_step = tg.ttt_nll, tg.TTTAdapters.step
    for rank in range(world):
        steps, prefixes = [], []

        def nll(model, x, *args):
            steps.append([x.size(0), 0, x.size(1)])
            return real_nll(model, x, *args)

        def step(self, nt):
            steps[-1][1] = nt
            return real_step(self, nt)

        monkeypatch.setattr(tg, "ttt_nll", nll)
        monkeypatch.setattr(tg.TTTAdapters, "step", step)
        monkeypatch.setattr(tg, "global_sgd", lambda ctx, model, val, docs, p: prefixes.append(docs[:, 1].sum()))
        ctx = ReduceFree(rank, world, 0, torch.device("cpu"))
        tg.ttt_evaluate(ctx, model, (tokens, np.ones(len(tokens) - 1, np.int32)), p)
        want = np.concatenate([np.stack(ph[rank][:3], 1) for ph in phases])
        assert np.array_equal(np.array(steps), want)
        # phases: the longest 3 (200, 164, 150), the next 3 (40, 33, 26), the other 8; each trains on all scored
        assert prefixes == global_tokens == [200 + 164 + 150, 200 + 164 + 150 + 40 + 33 + 26]
        assert [ph[rank][3] for ph in phases] == [len(range(rank, -(-k // 3), world)) for k in (3, 3, 8)]


def formula_flops(a, n, T, C, r):
    """FLOPs of one TTT step's matmuls and attention, forward and backward, written out from the architecture:
    the base is frozen (backward: input gradients only, none into the first layer's q/k/v whose input needs none);
    LoRA u = x A^T, y = u B^T (backward: dB, du, dA, and dx where x needs a gradient); attention causal, backward
    2.5x; logits only at the C scored positions, in fp32."""
    d, L, H, V = a.model_dim, a.num_layers, a.num_heads, a.vocab_size
    hd, f = d // H, a.mlp_mult * d
    kv = a.num_kv_heads * hd
    block = d * d + 2 * d * kv + d * d + 2 * d * f
    base = L * block + a.bigram_dim * d + a.ve_dim * kv
    lora = {"q": d, "k": kv, "v": kv, "o": d, "mlp": d}
    attn = L * 4 * n * H * T * T * hd / 2
    fwd = 2 * n * T * base + attn + 2 * n * C * d * V + sum(L * 2 * n * T * (d * r + r * o) for o in lora.values())
    fwd += 2 * n * C * (d * r + r * V)
    bwd = 2 * n * T * (L * block - (d * d + 2 * d * kv)) + 2.5 * attn + 2 * n * C * d * V
    for t, o in lora.items():
        per = 2 * n * T * (d * r + r * o)
        first = per * 2 - (2 * n * T * d * r if t in ("q", "k", "v", "o") else 0)  # layer 0: no dx into x0
        bwd += first + (L - 1) * 2 * per
    bwd += 2 * 2 * n * C * (d * r + r * V)
    return fwd, bwd


def test_traced_flops_match_a_formula_of_the_matmuls(small, fit_runs):
    a, _ = small
    p = a.ttt_point()
    model_fit = ts.StepModel(fit_runs, compiled=False)
    for n, T in ((5, 320), (64, 2048)):  # neither was traced: the fit carries them
        fwd, bwd = formula_flops(a, n, T, p["chunk"], p["rank"])
        got_fwd, got_bwd = (model_fit.work(s, n, T)[0].sum() for s in ("fwd", "bwd"))
        assert got_fwd == pytest.approx(fwd, rel=0.02) and got_bwd == pytest.approx(bwd, rel=0.02)
        assert ts.StepModel(fit_runs, compiled=True).work("bwd", n, T)[0].sum() == pytest.approx(got_bwd)


def test_fit_reproduces_a_step_it_was_not_fitted_on(small, fit_runs):
    """Step 4 of three 300-target documents: n = 3, window 240 -> 256, training; eager and compiled, per kernel."""
    a, model = small
    p = a.ttt_point()
    trace, steps = ts.trace_ttt_batch(model, p, [300, 300, 300])
    assert steps[4] == [3, 256, 3]
    for compiled in (False, True):
        seg, flops, _, nbytes, _ = ts.kernels(trace, compiled)
        fit = ts.StepModel(fit_runs, compiled)
        for s in ("pre", "fwd", "post", "bwd"):
            want_f, want_b = fit.work(s, 3, 256)
            assert np.allclose(flops[seg == f"{s}4"], want_f, rtol=1e-9, atol=1e-3)
            assert np.allclose(nbytes[seg == f"{s}4"], want_b, rtol=1e-9, atol=1e-3)
        assert np.allclose(nbytes[seg == "adam4"], fit.work("adam", 3)[1], rtol=1e-9)


def test_roofline_and_fusion_on_a_hand_example():
    """(x + 1) * 2, relu, cast to bf16, then a bf16 matmul, on 1024 x 1024: eager, five kernels; compiled, the four
    elementwise ops are one kernel that reads x once (fp32) and writes the bf16 result once."""
    N = 1024
    x, w = torch.empty(N, N, device="meta"), torch.empty(N, N, device="meta", dtype=torch.bfloat16)
    tr = ts.Trace()
    tr.seg = "fwd0"
    with tr:
        torch.relu((x + 1) * 2).to(torch.bfloat16) @ w
    mb4, mb2 = N * N * 4, N * N * 2
    mm = max(2 * N ** 3 / 989e12, 3 * mb2 / 3.35e12)
    eager = 3 * (2 * mb4 / 3.35e12) + (mb4 + mb2) / 3.35e12 + mm + 5 * 5e-6
    assert ts.trace_seconds(tr, compiled=False)["fwd0"][0] == pytest.approx(eager, rel=1e-9)
    compiled = (mb4 + mb2) / 3.35e12 + mm + 2 * 5e-6
    assert ts.trace_seconds(tr, compiled=True)["fwd0"] == pytest.approx((compiled, compiled - 10e-6, 2), rel=1e-9)
    assert ts.trace_seconds(tr, compiled=True)["fwd0"][0] < ts.trace_seconds(tr, compiled=False)["fwd0"][0] / 2
    assert ts.trace_seconds(tr, compiled=True, split=3.0)["fwd0"][2] == 3 + 1  # the fused kernel, split in three


def test_the_default_settings_are_record_frontier_and_the_anchor_is_measured_over_modelled():
    """record_frontier.env with vocabulary 8,192 is the default (an environment variable wins); the anchored eval by
    hand: device seconds (the parts but the two allowances) x #1855's 455 / modelled and 509 / modelled, plus its
    measured 84 / 138 s warm-up and 24 s decompression."""
    env = ts.frontier_env({"TTT_LORA_RANK": "8"})
    assert env["VOCAB_SIZE"] == "8192" and env["MLP_MULT"] == "4" and env["NUM_LOOPS"] == "2"
    assert env["TTT_LORA_RANK"] == "8" and "TTT_LORA_RANK" not in ts.frontier_env()
    # the anchor is #1855 itself: record_frontier.env's later parts (#1945-#2135) put back to #1855's values
    a = ts.settings_1855()
    assert set(ts.AT_1855) <= set(ts.frontier_env())
    assert (a.qk_gain_init, a.eval_seq_len, a.ttt_eval_seq_len, a.train_seq_len, a.ttt_lora_targets,
            a.phased_ttt_num_phases, a.ngram_tilt_order, a.logit_softcap_asym, a.ttt_short_chunks) == (
        5.0, 2048, 2048, 2048, ["q", "k", "v", "o", "mlp", "head"], 3, 0, False, [])
    assert ts.SPLITS == {"sp1024": 62_021_632, "sp8192": 40_540_160, "caseops": 47_851_520}
    parts = {"round trip": 10.0, "TTT per-document LoRA": 100.0, "TTT global SGD": 5.0, "compile warm-up": 138.0,
             "load and decode": 15.0}
    ratio, (lo, hi) = ts.anchored(parts, 200.0)
    assert ratio == pytest.approx((2.275, 2.545))
    assert (lo, hi) == pytest.approx((2.275 * 115 + 84 + 24, 2.545 * 115 + 138 + 24))
