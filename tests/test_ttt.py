"""Score-first TTT (train_gpt.ttt_evaluate): equal to plain per-document scoring at lr 0 (checked against a direct
forward per position), causal across chunks, documents, batches and phase boundaries, adapters reset per
document, no gain on unpredictable tokens, 2 ranks equal 1, and the script's output line, sweep rows and
submission headline."""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import slot_leak  # noqa: E402

CPU = torch.device("cpu")
CTX = tg.Ctx(0, 1, 0, CPU)
V = 96
# chunk 8 and windows of 32 tokens; docs 0..5 are the prefix, boundaries after docs 3 and 6 (of 10)
P = tg.Settings({}).ttt_point(rank=4, chunk=8, batch=3, seq_len=32, phases=2, prefix_docs=6, lr=0.01,
                              global_lr=0.02, global_chunk=64)
LENS = [30, 5, 70, 12, 1, 44, 90, 20, 9, 33]
# TTT_SHORT_CHUNKS on LENS's documents (targets 91, 71, 45 | 33, 31, 21 | 13, 10, 6 | 2 in batches of 3, longest
# first): chunks 8, 6, 4, 4 by batch
SHORT = ["20:4", "40:6"]
SHORT_CHUNK = {91: 8, 71: 8, 45: 8, 33: 6, 31: 6, 21: 6, 13: 4, 10: 4, 6: 4, 2: 4}


# the seeds' architecture, and the record's parts on (a loop: 6 slots over 4 layers, parallel lanes, gates,
# input SmearGate, document-masked attention, gated skips): every legality test holds for both
FRONTIER = dict(NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=3, ATTN_OUT_GATE=1, SMEAR_MODE="input",
                DOC_MASK=1, SKIP_GATED=1, GATE_WINDOW=8)


@pytest.fixture(scope="module", params=["seeds", "frontier"])
def sharp_model(request):
    if request.param == "seeds":
        return slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1, perturb=0.3)
    model = slot_leak.toy_model(vocab=V, dim=32, layers=4, seed=1, perturb=0.3, **FRONTIER)
    assert model.slots == [0, 1, 2, 1, 2, 3]  # evals loop
    return model


@pytest.fixture(scope="module", params=["chunk", "short_chunks"])
def chunking(request):
    """TTT_CHUNK_SIZE alone, or TTT_SHORT_CHUNKS on too: the legality tests hold for both."""
    return request.param == "short_chunks"


def make_docs(lens, seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[tg.BOS_ID], rng.integers(2, vocab, n)]).astype(np.uint16) for n in lens]


def run_ttt(model, tokens, p, tbytes=None, tilt=None):
    """(val_loss, val_bpb) and log p [T, V] of every target, by target index; tilt: (order, threshold, beta) of the
    n-gram tilt, its hints computed from these tokens."""
    val = tg.Val(tokens, np.ones(len(tokens) - 1, np.int64) if tbytes is None else tbytes)
    if tilt:
        val.tilt = tilt[2], torch.from_numpy(tg.ngram_hints(tokens, *tilt[:2]))
    got = {}
    loss, bpb, _ = tg.ttt_evaluate(CTX, model, val, p, lambda t, lp: got.update(zip(t.tolist(), lp)))
    assert sorted(got) == list(range(len(tokens) - 1))  # every target scored exactly once
    return loss, bpb, torch.stack([got[j] for j in range(len(tokens) - 1)])


def nll_of(logp, tokens):
    return -logp.double()[torch.arange(len(tokens) - 1), torch.from_numpy(tokens[1:].astype(np.int64))]


def test_documents_split_at_bos():
    tokens = np.array([5, 1, 7, 8, 1, 1, 9, 1], np.uint16)  # text before the first BOS, an empty doc, a final BOS
    assert tg.documents(tokens).tolist() == [[0, 1], [1, 3], [4, 1], [5, 2]]
    assert tg.documents(tokens)[:, 1].sum() == len(tokens) - 1


def test_window_tokens_formula():
    for n in [1, 7, 8, 9, 40, 100, 333]:
        brute = sum(min((c + 1) * 8, 32) for c in range(-(-n // 8)))
        assert tg.ttt_window_tokens(n, 8, 32) == brute


def test_zero_lr_equals_direct_per_document_scoring(sharp_model, chunking):
    """All learning rates 0: every target j of a document is predicted from the document's tokens of the window
    that scores its chunk, tokens[ws : j + 1], ws = max(0, chunk end - seq_len); one direct forward each. The chunk:
    8, or with TTT_SHORT_CHUNKS that of the document's batch (SHORT_CHUNK)."""
    tokens, p = np.concatenate(make_docs(LENS)), dict(P, short_chunks=SHORT if chunking else [])
    tbytes = np.random.default_rng(1).integers(1, 5, len(tokens) - 1)
    loss, bpb, _ = run_ttt(sharp_model, tokens, dict(p, lr=0.0, global_lr=0.0), tbytes)
    nll = 0.0
    with torch.no_grad():
        for s, n in tg.documents(tokens):
            C = SHORT_CHUNK[n] if chunking else 8
            for j in range(n):
                ws = max(0, min((j // C + 1) * C, n) - 32)
                z = sharp_model.logits(sharp_model.forward_hidden(torch.from_numpy(
                    tokens[s + ws:s + j + 1].astype(np.int64))[None])[0, -1]).double()
                nll -= F.log_softmax(z, -1)[int(tokens[s + j + 1])].item()
    assert loss == pytest.approx(nll / (len(tokens) - 1), rel=1e-6)
    assert bpb == pytest.approx(nll / math.log(2) / tbytes.sum(), rel=1e-6)
    ttt_loss, _, _ = run_ttt(sharp_model, tokens, p, tbytes)
    assert ttt_loss < loss - 1e-3  # with learning rates the same documents score differently (here: better)


def test_weights_restored(sharp_model):
    before = [p.clone() for p in sharp_model.parameters()]
    run_ttt(sharp_model, np.concatenate(make_docs(LENS)), P)
    assert all(torch.equal(a, b) for a, b in zip(before, sharp_model.parameters()))
    assert not any(p.requires_grad for p in sharp_model.parameters())


@pytest.fixture(scope="module")
def causal_ref(sharp_model, chunking):
    tokens = np.concatenate(make_docs(sorted(LENS, reverse=True)))  # the stream in the order TTT scores it
    p = dict(P, short_chunks=SHORT if chunking else [])
    return tokens, p, run_ttt(sharp_model, tokens, p)[2]


# positions in doc 0 (long: windows slide), doc 1, doc 2, doc 3 (after the first boundary), doc 5 (end of the
# prefix), doc 6 (after the last boundary)
@pytest.mark.parametrize("t", [3, 40, 60, 130, 200, 210, 280, 300])
def test_changing_token_t_and_later_leaves_earlier_scores(sharp_model, causal_ref, t, tilt=None):
    """Documents in the order they are scored (longest first): changing token t and every later one (BOS kept: the
    same documents) leaves the distribution of every target j < t (it predicts token j + 1 <= t) unchanged, though
    batches mix documents, adapters train on scored chunks and the base takes global steps at boundaries; later
    targets do change."""
    tokens, p, ref = causal_ref
    changed = tokens.copy()
    free = np.flatnonzero(tokens != tg.BOS_ID)
    free = free[free >= t]
    changed[free] = 2 + (changed[free] - 2 + np.random.default_rng(t).integers(1, V - 2, len(free))) % (V - 2)
    assert (changed[free] != tokens[free]).all() and (tg.documents(changed) == tg.documents(tokens)).all()
    got = run_ttt(sharp_model, changed, p, tilt=tilt)[2]
    torch.testing.assert_close(got[:t], ref[:t], atol=1e-6, rtol=0)
    assert (got[t:] - ref[t:]).abs().max() > 1e-3


TILT = (1, 0.5, 2.625)  # the n-gram tilt at order 1: on these random documents it hints about half the targets


@pytest.fixture(scope="module")
def causal_ref_tilt(sharp_model, causal_ref):
    tokens, p, untilted = causal_ref
    p = dict(p, targets=["k", "o", "mlp", "head"], local_lr_mult=0.8)  # with the tilt, every TTT switch of #2135
    ref = run_ttt(sharp_model, tokens, p, tilt=TILT)[2]
    assert ((ref - untilted).abs().amax(1) > 1e-3).float().mean() > 0.3  # the tilt changes many targets
    return tokens, p, ref


@pytest.mark.parametrize("t", [3, 130, 300])
def test_changing_token_t_and_later_leaves_earlier_scores_with_the_tilt(sharp_model, causal_ref_tilt, t):
    """The same with the n-gram tilt on top of TTT (hints recomputed from the changed stream): a hint reads only
    tokens before the target it tilts, so every target j < t keeps its tilted distribution."""
    test_changing_token_t_and_later_leaves_earlier_scores(sharp_model, causal_ref_tilt, t, tilt=TILT)


@pytest.mark.parametrize("t", [40, 210])
def test_the_audited_stack_at_once_still_scores_first(t):
    """Every TTT-side part after #1855 at once: the frontier model with the asymmetric cap (its caps apart), adapters
    on k, o, MLP and head at lr x0.8, short chunks, one global phase and the tilt: changing token t and every later
    one still leaves every earlier target's distribution as it was."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=4, seed=1, perturb=0.3, LOGIT_SOFTCAP_ASYM=1, **FRONTIER)
    with torch.no_grad():
        model.cap_pos.fill_(6.0), model.cap_neg.fill_(9.0)
    tokens = np.concatenate(make_docs(sorted(LENS, reverse=True)))
    p = dict(P, short_chunks=SHORT, targets=["k", "o", "mlp", "head"], local_lr_mult=0.8, phases=1)
    ref = run_ttt(model, tokens, p, tilt=TILT)[2]
    test_changing_token_t_and_later_leaves_earlier_scores(model, (tokens, p, ref), t, tilt=TILT)


def test_documents_scored_later_leave_earlier_scored_ones(sharp_model, chunking):
    """The stream out of scoring order: docs 3, 8, 1 and 4 (lengths 12, 9, 5, 1) run in the last two batches, after
    both boundaries; changing their tokens leaves every target of the other documents, earlier in the stream or
    later, unchanged, and changes their own."""
    tokens, p = np.concatenate(make_docs(LENS)), dict(P, short_chunks=SHORT if chunking else [])
    ref, changed = run_ttt(sharp_model, tokens, p)[2], tokens.copy()
    late = np.zeros(len(tokens) - 1, bool)
    for s, n in tg.documents(tokens)[[3, 8, 1, 4]]:
        late[s:s + n] = True
        changed[s + 1:s + n] = 2 + (tokens[s + 1:s + n] - 1) % (V - 2)
    got = run_ttt(sharp_model, changed, p)[2]
    torch.testing.assert_close(got[~late], ref[~late], atol=1e-6, rtol=0)
    assert (got[late] - ref[late]).abs().max() > 1e-3


def per_doc_nll(model, docs, p):
    tokens = np.concatenate(docs + [[tg.BOS_ID]])  # every document, the last too, ends by predicting a BOS
    nll = nll_of(run_ttt(model, tokens, p)[2], tokens)
    return [nll[s:s + n].sum().item() for s, n in tg.documents(tokens)]


def test_adapters_reset_per_document(sharp_model):
    """Global TTT off and one fixed A (TTT_WARM_A=0): a document's NLL is the same in any order of the documents, in
    any batch slot, and alone."""
    docs, p = make_docs(LENS, seed=3), dict(P, phases=0, warm_a=False)
    ref = per_doc_nll(sharp_model, docs, p)
    perm = np.random.default_rng(0).permutation(len(docs))
    swapped = per_doc_nll(sharp_model, [docs[i] for i in perm], p)
    assert [swapped[list(perm).index(i)] for i in range(len(docs))] == pytest.approx(ref, rel=1e-5)
    for i in (2, 6):
        assert per_doc_nll(sharp_model, [docs[i]], p)[0] == pytest.approx(ref[i], rel=1e-5)
    lr0 = per_doc_nll(sharp_model, docs, dict(p, lr=0.0))
    assert abs(lr0[6] - ref[6]) > 1e-2  # the adapters do learn within a document


def test_uniform_tokens_ttt_cannot_beat_the_bound():
    """Tokens uniform over the 1022 non-BOS, non-pad ids: no score-first method can beat log2(1022) bits on them
    in expectation (Gibbs). TTT with large learning rates, adapting strongly, stays above it and above plain
    per-document scoring (lr 0) minus the most a causal method can legitimately learn here (that ids 0 and 1
    never occur: log2(1024/1022) bits), within 4 standard errors."""
    model = slot_leak.toy_model(vocab=1024, dim=32, layers=2, seed=0)
    tokens = np.concatenate(make_docs([150] * 40, seed=5, vocab=1024))
    p = dict(P, chunk=16, seq_len=64, batch=8, phases=2, prefix_docs=20, lr=0.01, global_lr=0.1)
    keep = torch.from_numpy(tokens[1:] != tg.BOS_ID)
    ttt = nll_of(run_ttt(model, tokens, p)[2], tokens)[keep] / math.log(2)
    plain = nll_of(run_ttt(model, tokens, dict(p, lr=0.0, global_lr=0.0))[2], tokens)[keep] / math.log(2)
    n = len(ttt)
    se, se_paired = ttt.std().item() / n ** 0.5, (ttt - plain).std().item() / n ** 0.5
    assert (ttt - plain).abs().mean() > 1e-3  # TTT really adapted
    assert ttt.mean() >= math.log2(1022) - 4 * se
    assert ttt.mean() >= plain.mean() - math.log2(1024 / 1022) - 4 * se_paired


@pytest.mark.parametrize("env,msg", [({"TTT_CHUNK_SIZE": "64", "TTT_EVAL_SEQ_LEN": "32"}, "TTT_CHUNK_SIZE"),
                                     ({"TTT_LORA_TARGETS": "q,ffn"}, "TTT_LORA_TARGETS"),
                                     ({"GLOBAL_TTT_MOMENTUM": "1"}, "GLOBAL_TTT_MOMENTUM"),
                                     ({"SWEEP_TTT_LORA_RANK": "8,0"}, "SWEEP_TTT_LORA_RANK"),
                                     ({"TTT_LR": "-1"}, "TTT_LR"),
                                     *[({"TTT_LOCAL_LR_MULT": v}, "TTT_LOCAL_LR_MULT")
                                       for v in ("0", "-1", "nan", "inf", "x")],
                                     *[({"TTT_SHORT_CHUNKS": v}, "TTT_SHORT_CHUNKS") for v in (
                                         "256:8,200:24", "256:8,256:24", "256:0", "256", "0:8", "256:8:2", "a:8",
                                         "-5:8", "256:4096")]])
def test_bad_ttt_settings_are_config_errors(env, msg):
    with pytest.raises(tg.ConfigError, match=msg) as e:
        tg.Settings(env)
    assert "\n" not in str(e.value)


def test_short_chunks_pick_each_batchs_chunk_by_its_longest_document(monkeypatch, capsys):
    """The record's table (#2014): 8 under 256 tokens, 24 under 2,000, else 48. In ttt_evaluate each batch runs at its
    longest document's chunk (SHORT_CHUNK: 8, 6, 4, 4), and the window tokens that the projection and the deadline
    count are those of each document at its batch's chunk."""
    p = tg.Settings({"TTT_SHORT_CHUNKS": "256:8,2000:24"}).ttt_point()
    table = {1: 8, 200: 8, 255: 8, 256: 24, 1999: 24, 2000: 48, 10 ** 6: 48}
    assert [tg.ttt_chunk(p, n) for n in table] == list(table.values())
    assert tg.ttt_chunk(p, np.array(list(table))).tolist() == list(table.values())
    assert tg.ttt_chunk(tg.Settings({}).ttt_point(), 100) == 48
    calls, real_nll, real_reset = [], tg.ttt_nll, tg.TTTAdapters.reset
    monkeypatch.setattr(tg.TTTAdapters, "reset", lambda self, slots=None: (calls.append([]), real_reset(self, slots)))
    monkeypatch.setattr(tg, "ttt_nll", lambda model, x, y, slot, *a: (calls[-1].append(slot.size(1)),
                                                                      real_nll(model, x, y, slot, *a))[1])
    tokens = np.concatenate(make_docs(LENS))
    run_ttt(slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1), tokens, dict(P, short_chunks=SHORT))
    assert calls == [[8] * 12, [6] * 6, [4] * 4, [4]]  # one step per chunk of the longest: 91/8, 33/6, 13/4, 2/4
    n = tg.documents(tokens)[:, 1]
    brute = sum(min((c + 1) * SHORT_CHUNK[m], 32) for m in n for c in range(-(-m // SHORT_CHUNK[m])))
    assert f" for {brute} window tokens a rank " in capsys.readouterr().out
    assert brute != tg.ttt_window_tokens(n, 8, 32).sum()


def test_k_o_mlp_head_targets_adapt_every_slot_and_leave_q_and_v(monkeypatch):
    """TTT_LORA_TARGETS=k,o,mlp,head on the record's parts (6 slots: a loop, a parallel layer): adapters on k, o and
    MLP of every slot and on the head, none on q or v (their projections get no adapter in any slot); each adapter
    moves the logits from its own slot; the TTT figure differs from all targets'."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=4, seed=1, perturb=0.3, **FRONTIER)
    p = dict(P, targets=["k", "o", "mlp", "head"])
    lora = tg.TTTAdapters(model, p, 2, CPU)
    assert set(lora.where) == {(s, t) for s in range(6) for t in ("k", "o", "mlp")} | {(-1, "head")}
    seen, real_attn, real_mlp, real_linear = [], tg.Attention.forward, tg.MLP.forward, tg.CastedLinear.forward
    names = {m: n.split(".")[-1] for n, m in model.named_modules() if n.endswith(("attn.q", "attn.k", "attn.v"))}
    monkeypatch.setattr(tg.CastedLinear, "forward", lambda self, x, lora=None: (
        seen.append((names[self], lora is not None)) if self in names else None, real_linear(self, x, lora))[1])
    monkeypatch.setattr(tg.Attention, "forward", lambda self, x, cos, sin, ve, docs=None, lora=None: (
        seen.append(("o", "o" in (lora or {}))), real_attn(self, x, cos, sin, ve, docs, lora))[1])
    monkeypatch.setattr(tg.MLP, "forward", lambda self, x, lora=None: (
        seen.append(("mlp", lora is not None)), real_mlp(self, x, lora))[1])
    x = torch.from_numpy(np.concatenate(make_docs([14, 9]))[:24].astype(np.int64)).view(2, 12)
    base = model.logits(model.forward_hidden(x))

    def adapted():
        lora.open(2, train=False)
        return model.logits(model.forward_hidden(x, lora), lora=lora.head())
    lora.reset()
    seen.clear()
    torch.testing.assert_close(adapted(), base)  # B starts at zero
    assert seen == [("o", True), ("v", False), ("q", False), ("k", True), ("mlp", True)] * 6  # slot by slot
    gen = torch.Generator().manual_seed(0)
    for key, (_, o, j) in lora.where.items():
        lora.reset()
        lora.B[o][:, j] = torch.randn(lora.B[o][:, j].shape, generator=gen)
        assert (adapted() - base).abs().max() > 1e-3, key
    monkeypatch.undo()
    tokens = np.concatenate(make_docs(LENS))
    assert abs(run_ttt(model, tokens, p)[0] - run_ttt(model, tokens, P)[0]) > 1e-3


def test_local_lr_mult_scales_the_adapters_lr_and_not_global_ttt():
    """TTT_LOCAL_LR_MULT m: the same figure as TTT_LR x m with m = 1, bit for bit; another figure than m = 1; with
    the adapters' lr 0 (global TTT alone) m changes nothing."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1, perturb=0.3)
    tokens = np.concatenate(make_docs(LENS))
    assert tg.Settings({"TTT_LOCAL_LR_MULT": "0.75"}).ttt_point()["local_lr_mult"] == 0.75
    half = run_ttt(model, tokens, dict(P, local_lr_mult=0.5))[:2]
    assert half == run_ttt(model, tokens, dict(P, lr=P["lr"] * 0.5))[:2]
    assert abs(half[0] - run_ttt(model, tokens, P)[0]) > 1e-3
    assert run_ttt(model, tokens, dict(P, lr=0.0, local_lr_mult=0.5))[:2] == run_ttt(model, tokens, dict(P, lr=0.0))[:2]


# ----------------------------------------------------------------------------- through the script

TTT_ENV = {"EVAL_ONLY": "1", "SLIDING_ENABLED": "0", "SLOT_ENABLED": "0", "VAL_TOKENS": "1024",
           "TTT_LORA_RANK": "4", "TTT_LORA_ALPHA": "4", "TTT_WARM_A": "0", "TTT_CHUNK_SIZE": "32", "TTT_BATCH_SIZE": "4", "TTT_EVAL_SEQ_LEN": "64",
           "PHASED_TTT_NUM_PHASES": "2", "PHASED_TTT_PREFIX_DOCS": "4", "TTT_LR": "0.003",
           "GLOBAL_TTT_LR": "0.003", "GLOBAL_TTT_CHUNK": "256"}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, TOY):
    """An fp32 (prequant-format) artifact of a perturbed toy record-architecture model (no training needed)."""
    cfg = tg.Settings(dict(TOY)).arch()
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    path = tmp_path_factory.mktemp("ttt_art") / "toy.pgz"
    path.write_bytes(tg.encode_artifact([(k, "fp32", v.numpy()) for k, v in model.state_dict().items()], "none",
                                        "prequant", cfg))
    return path


def ttt_line(out):
    lines = [x for x in out.splitlines() if x.startswith("final_ttt_exact ")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def two_ranks(artifact, toy_env, run_script):
    r = run_script({**toy_env, **TTT_ENV, "ARTIFACT": str(artifact), "RUN_ID": "ttt2", "TTT_ENABLED": "1"},
                   launcher=TORCHRUN)
    assert "world:2" in r.stdout, r.stderr[-3000:]
    assert r.returncode == 0 or "terminate called" in r.stderr, r.stderr[-3000:]  # see test_train's torchrun test
    return r


def test_script_prints_ttt_line_and_headline(two_ranks):
    line = ttt_line(two_ranks.stdout)
    assert re.match(r"final_ttt_exact val_loss:[0-9.]+ val_bpb:[0-9.]+ eval_time:[0-9.]+s rank:4 "
                     r"alpha:4.0 targets:q,k,v,o,mlp,head warm_a:False lr:0.003 .*chunk:32 .*phases:2 prefix_docs:4 ", line), line
    assert "ttt_projected: TTT eval " in two_ranks.stdout
    sub = json.loads((two_ranks.log_dir / "ttt2.submission.json").read_text())
    assert sub["metric"] == "ttt" and f"{sub['val_bpb']:.8f}" == re.search(r"val_bpb:(\S+)", line)[1]
    # every eval second counted once: the evals' own figures (0.05 s of rounding each) never exceed eval_total
    evals = [float(x) for x in re.findall(r"^final_\S+ .*eval_time:([0-9.]+)s", two_ranks.stdout, flags=re.M)]
    total = float(re.search(r"^eval_total: ([0-9.]+)s", two_ranks.stdout, flags=re.M)[1])
    assert len(evals) >= 2 and sum(evals) <= total + 0.05 * len(evals) and sub["eval_seconds"] == total


def test_one_rank_sweep_rows_equal_two_ranks(two_ranks, artifact, toy_env, run_script):
    """A 1-process TTT sweep: one table row per grid point, and its TTT_LR row equals the 2-rank gloo run."""
    r = run_script({**toy_env, **TTT_ENV, "ARTIFACT": str(artifact), "RUN_ID": "tsw", "SWEEP_TTT_LR": "0.003,0",
                    "SWEEP_TTT_PREFIX_DOCS": "4"})
    assert r.returncode == 0 and "world:1" in r.stdout, r.stderr[-3000:]
    rows = [x[len("sweep_row "):] for x in r.stdout.splitlines() if x.startswith("sweep_row ")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[:4] for c in cells] == [["ttt", "rank 4 chunk 32 docs 4", "1", "0.003"],
                                      ["ttt", "rank 4 chunk 32 docs 4", "1", "0"]]
    assert r.stdout.split("sweep table:\n", 1)[1].splitlines()[2:4] == rows
    assert "final_ttt_exact" not in r.stdout
    two = float(re.search(r"val_loss:(\S+)", ttt_line(two_ranks.stdout))[1])
    assert float(cells[0][6]) == pytest.approx(two, abs=1.5e-6)  # rows print 6 decimals
    assert float(cells[1][6]) > float(cells[0][6]) + 1e-3  # and TTT learned something


# ----------------------------------------------------------------------------- issue 15: as on a GPU, and fast


@pytest.mark.parametrize("mult", [1.0, 0.75])
def test_adapter_step_is_torch_adamw_on_the_training_prefix(mult):
    """TTTAdapters.step equals torch's AdamW (lr TTT_LR x TTT_LOCAL_LR_MULT, betas (0, beta2), eps, decoupled weight
    decay) for the first nt documents, and leaves every later document's adapters and state untouched (they left the
    optimiser)."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=0)
    p = dict(P, lr=0.01, wd=0.5, eps=1e-10, beta2=0.99, warm_a=True, local_lr_mult=mult)
    lora = tg.TTTAdapters(model, p, 5, CPU)
    lora.reset()
    A0, B0 = lora.A.clone(), {o: b.clone() for o, b in lora.B.items()}
    ref = [lora.A[:3].clone().requires_grad_()] + [b[:3].clone().requires_grad_() for b in lora.B.values()]
    opt = torch.optim.AdamW(ref, lr=0.01 * mult, betas=(0.0, 0.99), eps=1e-10, weight_decay=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        lora.open(5, train=True)
        grads = [torch.randn(t.shape, generator=gen) for t in [lora.a, *lora.b.values()]]
        for t, g in zip([lora.a, *lora.b.values()], grads):
            t.grad = g
        for t, g in zip(ref, grads):
            t.grad = g[:3].clone()
        lora.step(3)
        opt.step()
    for mine, theirs in zip([lora.A, *lora.B.values()], ref):
        torch.testing.assert_close(mine[:3], theirs.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(lora.A[3:], A0[3:]) and all(torch.equal(lora.B[o][3:], B0[o][3:]) for o in B0)
    assert lora.vA[3:].abs().max() == 0


def test_phases_train_on_the_documents_scored_so_far(sharp_model, monkeypatch):
    """SPEC section 10, corrections: documents run longest first over the whole val (LENS: docs 6, 2, 5, 9, 0, 7,
    3, 8, 1, 4); boundaries floor(k * 5 / 3) = 1, 3, 5 (rounding would give 2); each global phase trains on the
    documents scored so far in the order scored, then the warm A is drawn afresh."""
    events, real_fresh = [], tg.TTTAdapters.fresh
    monkeypatch.setattr(tg, "global_sgd", lambda ctx, model, val, docs, p: events.append(docs.tolist()))
    monkeypatch.setattr(tg.TTTAdapters, "fresh", lambda self: (events.append("fresh"), real_fresh(self)))
    tokens = np.concatenate(make_docs(LENS))
    tg.ttt_evaluate(CTX, sharp_model, (tokens, np.ones(len(tokens) - 1)), dict(P, phases=3, prefix_docs=5))
    d = tg.documents(tokens).tolist()
    assert events == ["fresh", [d[6]], "fresh", [d[6], d[2], d[5]], "fresh", [d[6], d[2], d[5], d[9], d[0]], "fresh"]


def test_warm_a_is_carried_by_the_records_batch_slots(monkeypatch):
    """The record orders a batch shortest first (stable) and a slot's trained A goes to the document in the same
    slot of the next batch. Lengths 5, 9, 5, 2 run as rows 9, 5, 5, 2 (docs 1, 0, 2, 3), whose record slots are
    3, 1, 2, 0; a following batch of 2 takes slots 0 and 1, so rows 3 and 1 of the last batch; a fresh draw is new."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=0)
    seen, real_reset = [], tg.TTTAdapters.reset
    monkeypatch.setattr(tg.TTTAdapters, "reset", lambda self, slots=None: (seen.append(slots), real_reset(self, slots)))
    lora = tg.TTTAdapters(model, dict(P, warm_a=True), 4, CPU)
    tokens = np.concatenate(make_docs([5, 9, 5, 2]) + [[tg.BOS_ID]])
    tg.ttt_batch(CTX, model, (tokens, np.ones(len(tokens) - 1)), tg.documents(tokens), dict(P, steps=0), lora, tg.ttt_nll)
    assert seen[-1].tolist() == [3, 1, 2, 0]
    bank = lora.bank.clone()
    assert torch.equal(lora.A[:4], bank[[3, 1, 2, 0]])  # row i holds slot i's A (steps 0: untrained)
    marks = torch.arange(1.0, 5.0)[:, None, None, None]
    lora.A[:4] = bank[[3, 1, 2, 0]] + marks  # as if each row had trained
    lora.reset(torch.tensor([0, 1]))
    torch.testing.assert_close(lora.A[:2], torch.stack([bank[0] + 4, bank[1] + 2]))
    lora.fresh()
    assert lora.bank.shape == bank.shape and not torch.allclose(lora.bank, bank)


def test_finished_documents_leave_the_batch_and_the_optimiser(sharp_model, monkeypatch):
    """Per chunk, the forward runs the live documents only (at least 2 rows) and AdamW steps only those still
    training (a document's last chunk teaches nothing): both counted against the lengths."""
    seen = []
    monkeypatch.setattr(tg.TTTAdapters, "step", lambda self, n: seen.append(("step", n)))
    real_open = tg.TTTAdapters.open
    monkeypatch.setattr(tg.TTTAdapters, "open", lambda self, n, train: (seen.append(("open", n)),
                                                                          real_open(self, n, train))[1])
    lens = [70, 30, 12, 5]  # one batch, chunk 8
    tokens = np.concatenate(make_docs(lens) + [[tg.BOS_ID]])
    tg.ttt_evaluate(CTX, sharp_model, (tokens, np.ones(len(tokens) - 1)), dict(P, phases=0, batch=4))
    want = []
    for c in range(-(-max(lens) // 8)):
        live, train = sum(n > 8 * c for n in lens), sum(n > 8 * (c + 1) for n in lens)
        want += [("open", max(live, 2))] + ([("step", train)] if train else [])
    assert seen == want


def test_ttt_logits_are_fp32_under_cuda_like_autocast(sharp_model, monkeypatch):
    """With bf16 autocast on (as on CUDA; here the CPU's), TTT computes its hidden states under autocast but its
    logits outside it, in fp32, as sliding and SLOT score."""
    calls, real = [], tg.softcap_logits
    monkeypatch.setattr(tg, "softcap_logits", lambda h, w, cap, bias=None: (
        calls.append((torch.is_autocast_enabled("cpu"), h.dtype, w.dtype)), real(h, w, cap, bias))[1])
    ctx = tg.Ctx(0, 1, 0, CPU)
    ctx.bf16 = True
    tokens = np.concatenate(make_docs([20, 9]) + [[tg.BOS_ID]])
    loss = tg.ttt_evaluate(ctx, sharp_model, (tokens, np.ones(len(tokens) - 1)), dict(P, phases=0))[0]
    assert calls and set(calls) == {(False, torch.float32, torch.float32)} and math.isfinite(loss)


def test_compiled_ttt_equals_eager_with_one_graph():
    """torch.compile (inductor, on the CPU) of the TTT step: the same scores as eager to float tolerance, and one
    graph for every batch size and window length (dynamic dims), documents of many lengths and both phases."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    model = slot_leak.toy_model(vocab=V, dim=32, layers=1, seed=1, perturb=0.3)
    tokens = np.concatenate(make_docs([30, 5, 70, 12, 1, 44, 90, 20, 9, 33, 150, 3, 64, 65]))
    val = (tokens, np.random.default_rng(2).integers(1, 4, len(tokens) - 1))
    p = dict(P, alpha=4.0)
    eager = tg.ttt_evaluate(CTX, model, val, p)
    before = counters["stats"]["unique_graphs"]
    compiled = tg.ttt_evaluate(CTX, model, val, p, compiled=True)
    assert compiled[:2] == pytest.approx(eager[:2], rel=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 1


def test_global_sgd_is_a_fresh_cosine_sgd_over_document_masked_sequences():
    """global_sgd against a hand-written loop: SGD with momentum from zero, lr cosine-decayed over the phase's
    steps, gradients of the mean NLL over masked-attention sequences, clipped by global norm; the documents scored
    so far in the order scored (here docs 1, 3, 0: 92 targets, doc 2 not yet scored), the final partial chunk of
    32 tokens (targets 64..91) skipped."""
    model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=2)
    ref = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=2)
    stream = np.concatenate(make_docs([20, 40, 7, 30]))
    p = dict(P, seq_len=16, global_chunk=32, global_lr=0.05, global_momentum=0.9, global_clip=0.5, global_epochs=1)
    scored = tg.documents(stream)[[1, 3, 0]]
    tg.global_sgd(CTX, model, (stream, np.ones(len(stream) - 1)), scored, p)
    tokens = np.concatenate([stream[21:62], stream[70:100], stream[0:21], stream[21:22]])  # BOS to BOS, each
    n = len(tokens) - 1
    params, bufs = list(ref.parameters()), None
    steps = [[0, 16], [32, 48]]
    ref.requires_grad_(True)
    for k, group in enumerate(steps):
        loss = 0.0
        for s in group:
            x = torch.from_numpy(tokens[s:min(s + 16, n)].astype(np.int64))[None]
            y = torch.from_numpy(tokens[s + 1:min(s + 16, n) + 1].astype(np.int64))
            h = ref.forward_hidden(x, doc_mask=True)[0]
            loss = loss + F.cross_entropy(ref.logits(h), y, reduction="sum")
        grads = torch.autograd.grad(loss / sum(min(16, n - s) for s in group), params, allow_unused=True)
        grads = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads)]
        norm = torch.cat([g.flatten() for g in grads]).norm()
        grads = [g * min(1.0, 0.5 / (norm.item() + 1e-6)) for g in grads]
        bufs = grads if bufs is None else [0.9 * b + g for b, g in zip(bufs, grads)]
        lr = 0.05 * 0.5 * (1 + math.cos(math.pi * k / len(steps)))
        with torch.no_grad():
            for q, b in zip(params, bufs):
                q -= lr * b
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_document_masked_attention_equals_attention_per_document():
    """causal_attention with document segments: each document's output equals plain causal attention over that
    document alone (GQA, a row that starts mid-document, empty-free random documents); without ids it mixes."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 8, generator=gen) for h in (4, 2, 2))
    ids = torch.randint(2, 50, (2, 40), generator=gen)
    ids[0, [0, 9, 10, 31]] = tg.BOS_ID
    ids[1, [17, 30]] = tg.BOS_ID  # row 1 starts inside a document
    doc = torch.cumsum(ids == tg.BOS_ID, 1)
    out = tg.causal_attention(q, k, v, tg.doc_segments(ids, None, 40))
    for b in range(2):
        for d in doc[b].unique():
            m = doc[b] == d
            alone = tg.causal_attention(q[b:b + 1, m], k[b:b + 1, m], v[b:b + 1, m])
            torch.testing.assert_close(out[b:b + 1, m], alone, rtol=1e-5, atol=1e-6)
    assert (tg.causal_attention(q, k, v) - out).abs().max() > 1e-2


# ----------------------------------------------------------------------------- issue 22: the eval deadline, shared work


class TickCtx(tg.Ctx):
    """A clock that moves 1 s at every read: the deadline's decisions are the same on any machine, however busy."""

    def __init__(self):
        super().__init__(0, 1, 0, CPU)
        self.t = 0.0
        self.clock = self.tick  # Ctx sets its clock (time.perf_counter) on the instance

    def tick(self):
        self.t += 1.0
        return self.t


def test_deadline_stops_adapting_and_still_scores_every_target_once(sharp_model):
    """A deadline that cannot cover adapting every batch: later batches are scored with the base weights as they are
    (every target once, still score-first), the figure lies between no adaptation and full TTT, and the counts land
    in ctx.notes; a deadline far away is bit-identical to none."""
    tokens = np.concatenate(make_docs(LENS * 2, seed=4))
    val, p = (tokens, np.ones(len(tokens) - 1)), dict(P, phases=2, prefix_docs=12)
    full = tg.ttt_evaluate(CTX, sharp_model, val, p)
    base = tg.ttt_evaluate(CTX, sharp_model, val, dict(p, lr=0.0, global_lr=0.0))
    ctx = TickCtx()
    assert tg.ttt_evaluate(ctx, sharp_model, val, p, deadline=10 ** 6)[:2] == full[:2]
    assert ctx.notes == dict(ttt_unadapted_documents=0, ttt_unadapted_targets=0, ttt_phases_skipped=0)
    ctx, got = TickCtx(), {}
    loss = tg.ttt_evaluate(ctx, sharp_model, val, p, lambda t, lp: got.update(zip(t.tolist(), lp)), deadline=25)[0]
    assert sorted(got) == list(range(len(tokens) - 1))
    assert 0 < ctx.notes["ttt_unadapted_documents"] < 20 and ctx.notes["ttt_phases_skipped"] >= 1
    assert ctx.notes["ttt_unadapted_targets"] < len(tokens) - 1
    assert full[0] < loss < base[0]


def _shared_rank(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1, perturb=0.3)
        tokens = np.concatenate(make_docs(LENS * 2, seed=4))
        got = []
        r = tg.ttt_evaluate(tg.Ctx(rank, world, 0, CPU), model, (tokens, np.ones(len(tokens) - 1)),
                            dict(P, warm_a=False), lambda t, lp: got.extend(t.tolist()))
        torch.save(dict(targets=got, figure=r[:2]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_batches_and_equal_one_process(tmp_path):
    """Ranks take the next batch from the process group's store: they score disjoint sets of targets that together
    cover every target exactly once, and the figure equals one process's (one A for all: TTT_WARM_A=0)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_shared_rank, args=(2, port, str(tmp_path / "r")), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"r.{k}") for k in range(2)]
    tokens = np.concatenate(make_docs(LENS * 2, seed=4))
    a, b = (set(r["targets"]) for r in ranks)
    assert a and b and not a & b and sorted(a | b) == list(range(len(tokens) - 1))
    assert sum(len(r["targets"]) for r in ranks) == len(tokens) - 1
    model = slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1, perturb=0.3)
    one = tg.ttt_evaluate(CTX, model, (tokens, np.ones(len(tokens) - 1)), dict(P, warm_a=False))
    for r in ranks:  # float noise: global SGD's gradients are fp32 sums over 2 ranks in another order (2.7e-7 seen)
        assert r["figure"] == pytest.approx(one[:2], rel=1e-5)


def test_an_eval_that_cannot_fit_its_budget_ends_with_one_error_line(artifact, toy_env, run_script):
    r = run_script({**toy_env, **TTT_ENV, "ARTIFACT": str(artifact), "RUN_ID": "tiny", "TTT_ENABLED": "1",
                    "EVAL_BUDGET_SECONDS": "0.2"})
    assert r.returncode != 0
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "EVAL_BUDGET_SECONDS=0.2: the evaluation took" in err[0] and "fix:" in err[0], r.stderr
    assert "Traceback" not in r.stderr and "submission:" not in r.stdout
    assert re.search(r"^ttt_deadline: TTT eval \d+ documents", r.stdout, re.M)
