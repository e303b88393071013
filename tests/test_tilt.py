"""The token-only n-gram tilt (train_gpt.ngram_hints, scored_nll; SPEC section 11): hints equal a slow dict-based
reference, never read the token they hint or a later one, cannot beat log2(vocab) on independent uniform tokens,
gain on repeated text; the tilted distribution is a normalised one; sliding, SLOT and TTT scores are tilted at
the right targets; bad settings are one-line errors; the bench script runs at toy size."""
import math
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REPO, TOY

sys.path.insert(0, str(REPO / "bench"))
import slot_leak  # noqa: E402

CPU = torch.device("cpu")
CTX = tg.Ctx(0, 1, 0, CPU)
BETA = 2.625


def ref_hints(tokens, order, threshold):
    """The definition, position by position: a dict of Counters keyed by the order tokens before t (padded with
    -1 before the stream), read before position t's token is counted."""
    table, out = {}, []
    padded = [-1] * order + [int(x) for x in tokens]
    for t in range(len(tokens)):
        seen = table.setdefault(tuple(padded[t:t + order]), Counter())
        hint = -1
        if seen:
            top = max(seen.values())
            if top / sum(seen.values()) >= threshold:
                hint = min(a for a, k in seen.items() if k == top)  # equal counts: the smallest id
        out.append(hint)
        seen[int(tokens[t])] += 1
    return np.array(out)


def repetitive(n, vocab, seed, period=None):
    """Random tokens, or a random period repeated with 10 % of the positions redrawn: many repeated contexts,
    counts that tie and shares on both sides of a threshold."""
    rng = np.random.default_rng(seed)
    if period is None:
        return rng.integers(0, vocab, n).astype(np.uint16)
    x = np.tile(rng.integers(0, vocab, period), n // period + 1)[:n].astype(np.uint16)
    flip = rng.random(n) < 0.1
    x[flip] = rng.integers(0, vocab, flip.sum())
    return x


def tilted_val(tokens, order, threshold, beta=BETA, tbytes=None):
    val = tg.Val(tokens, np.ones(len(tokens) - 1, np.int64) if tbytes is None else tbytes)
    val.tilt = beta, torch.from_numpy(tg.ngram_hints(tokens, order, threshold))
    return val


# vocab 1024: 6 ids a word, so order 16 is hashed over 3 words; vocab 65536: 4 a word; small orders: one exact word
@pytest.mark.parametrize("vocab,order,threshold,period", [
    (2, 3, 0.5, None), (5, 1, 0.3, None), (16, 2, 0.8, None), (16, 4, 0.5, 7), (3, 20, 1.0, 5),
    (1024, 16, 0.8, 3), (1024, 16, 0.5, 13), (1024, 6, 0.8, 9), (65536, 5, 0.8, 4), (65536, 2, 0.01, 3)])
def test_hints_equal_the_slow_reference(vocab, order, threshold, period):
    for seed in range(3):
        for n in (1, order, order + 1, order + 2, 300):
            x = repetitive(n, vocab, seed, period)
            np.testing.assert_array_equal(tg.ngram_hints(x, order, threshold), ref_hints(x, order, threshold))
    assert (ref_hints(repetitive(300, vocab, 0, period), order, threshold) >= 0).sum() > 10  # hints do fire


def test_hints_by_hand_ties_and_the_first_positions():
    """Order 1 on 0 5 0 3 0 3 0 5 0 9: after a 0 come 5, then 3, 3, 5; at t = 5 the counts tie (5: 1, 3: 1) and
    the smaller id is hinted; at t = 7 3 has 2 of 3; at t = 9 they tie again (2, 2)."""
    x = np.array([0, 5, 0, 3, 0, 3, 0, 5, 0, 9], np.uint16)
    assert tg.ngram_hints(x, 1, 0.5).tolist() == [-1, -1, -1, 5, -1, 3, 0, 3, 0, 3]
    assert tg.ngram_hints(x, 1, 0.6).tolist() == [-1, -1, -1, 5, -1, -1, 0, 3, 0, -1]
    assert tg.ngram_hints(x, 1, 0.7).tolist() == [-1, -1, -1, 5, -1, -1, 0, -1, 0, -1]
    zeros = tg.ngram_hints(np.zeros(40, np.uint16), 4, 1.0)  # t < 4: no context; t = 4: its first occurrence
    assert (zeros[:5] == -1).all() and (zeros[5:] == 0).all()


@pytest.mark.parametrize("order", [1, 3, 16])
def test_hint_at_t_never_depends_on_token_t_or_later(order):
    x = repetitive(600, 8 if order < 16 else 1024, 4, period=None if order < 16 else 11)
    ref = tg.ngram_hints(x, order, 0.5)
    assert (ref >= 0).sum() > 20
    rng = np.random.default_rng(order)
    for t in [0, order - 1, order, order + 1, 100, 333, 599]:
        changed = x.copy()
        changed[t] = (changed[t] + 1) % 8
        changed[t + 1:] = rng.integers(0, 8, len(x) - t - 1)
        got = tg.ngram_hints(changed, order, 0.5)
        np.testing.assert_array_equal(got[:t + 1], ref[:t + 1])


def test_the_tilted_distribution_is_normalised_and_its_nll_is_the_formula():
    rng = np.random.default_rng(0)
    n, V = 200, 37
    tokens = rng.integers(0, V, n + 1).astype(np.uint16)
    hints = rng.integers(-1, V, n + 1).astype(np.int32)
    hints[1::7] = tokens[1::7]  # some hints right
    val = tg.Val(tokens, np.ones(n, np.int64))
    val.tilt = BETA, torch.from_numpy(hints)
    z = torch.randn(n, V, dtype=torch.float32) * 3
    y, tgt = torch.from_numpy(tokens[1:].astype(np.int64)), torch.arange(n)
    nll, zt = tg.scored_nll(val, z, y, tgt)
    p = F.softmax(z.double(), -1)
    h = torch.from_numpy(hints[1:].astype(np.int64))
    has = h >= 0
    tilt = torch.zeros(n, V, dtype=torch.float64)
    tilt[has, h[has]] = BETA
    q = p * tilt.exp()
    q = q / q.sum(-1, keepdim=True)  # the explicit renormalised distribution
    torch.testing.assert_close(F.softmax(zt.double(), -1), q, atol=1e-6, rtol=0)
    torch.testing.assert_close(F.softmax(zt.double(), -1).sum(-1), torch.ones(n, dtype=torch.float64))
    base = -p.log()[torch.arange(n), y]
    ph = p[torch.arange(n), h.clamp_min(0)]
    formula = base - BETA * (y == h) * has + has * torch.log1p(ph * math.expm1(BETA))
    torch.testing.assert_close(nll.double(), formula, atol=1e-5, rtol=0)
    torch.testing.assert_close(nll.double(), -q.log()[torch.arange(n), y], atol=1e-5, rtol=0)
    assert has.sum() > 100 and (nll[~has] == F.cross_entropy(z[~has], y[~has], reduction="none")).all()


def uniform_bits(tokens, order, threshold):
    """Per-target bits of a uniform model (logits 0) under the tilt, and the share of hinted targets."""
    V = 1 << max(int(tokens.max()).bit_length(), 1)
    val = tilted_val(tokens, order, threshold)
    n = len(tokens) - 1
    nll, _ = tg.scored_nll(val, torch.zeros(n, V), torch.from_numpy(tokens[1:].astype(np.int64)), torch.arange(n))
    return nll.double() / math.log(2), (val.tilt[1][1:] >= 0).double().mean().item(), V


@pytest.mark.parametrize("vocab,order,threshold", [(1024, 1, 0.8), (16, 3, 0.3), (4, 1, 0.26)])
def test_uniform_tokens_gain_nothing(vocab, order, threshold):
    """Independent uniform tokens: no predictor that does not see the token beats log2(vocab) bits in expectation
    (Gibbs); the tilt of a uniform model stays above it within 4 standard errors (it is in fact worse)."""
    bits, hinted, V = uniform_bits(repetitive(40000, vocab, 1), order, threshold)
    assert V == vocab and hinted > 0.02
    assert bits.mean() >= math.log2(vocab) - 4 * bits.std() / len(bits) ** 0.5


def test_repeated_text_gains():
    bits, hinted, V = uniform_bits(repetitive(6000, 1024, 2, period=300), 4, 0.8)
    assert hinted > 0.5 and bits.mean() < math.log2(V) - 1.0


# ----------------------------------------------------------------------------- inside the evaluations

V = 96
SLOT = dict(slot_leak.SEEDS_SLOT, mode="causal", steps=2)


@pytest.fixture(scope="module")
def sharp():
    return slot_leak.toy_model(vocab=V, dim=32, layers=2, seed=1, perturb=0.3)


@pytest.fixture(scope="module")
def stream():
    tokens = np.concatenate([[tg.BOS_ID], repetitive(400, V, 5, period=37)]).astype(np.uint16)
    tokens[tokens == tg.BOS_ID] = 2
    tokens[0] = tokens[200] = tg.BOS_ID  # two documents for TTT
    return tokens, np.random.default_rng(3).integers(1, 5, len(tokens) - 1)


def explicit_tilt(logp, targets, tokens, hints, beta=BETA):
    """log p' [n, V] from untilted log p [n, V] of targets (target indices): + beta at the hint of token j + 1."""
    h = torch.from_numpy(hints[targets + 1].astype(np.int64))
    has = h >= 0
    out = logp.double().clone()
    ph = out[torch.arange(len(h)), h.clamp_min(0)].exp()
    out[has, h[has]] += beta
    return out - (has * torch.log1p(ph * math.expm1(beta)))[:, None], has


def test_sliding_and_slot_scores_are_tilted_at_their_targets(sharp, stream):
    """evaluate() with the tilt (sliding and causal SLOT in one pass) equals the untilted per-target log-probs of
    the same windows (slot_leak.scored_logprobs) tilted by hand at each target's own hint; and differs from off."""
    tokens, tbytes = stream
    val = tilted_val(tokens, 3, 0.8, tbytes=tbytes)
    hints = val.tilt[1].numpy()
    on = tg.evaluate(CTX, sharp, val, 64, 16, 4, [None, SLOT])
    off = tg.evaluate(CTX, sharp, (tokens, tbytes), 64, 16, 4, [None, SLOT])
    for point, r_on, r_off in zip([None, SLOT], on, off):
        t, _, logp = slot_leak.scored_logprobs(sharp, (tokens, tbytes), 64, 16, 4, point, full=True)
        lp, has = explicit_tilt(logp, t, tokens, hints)
        nll = -lp[torch.arange(len(t)), torch.from_numpy(tokens[t + 1].astype(np.int64))]
        assert sorted(t) == list(range(len(tokens) - 1)) and has.float().mean() > 0.3
        assert r_on[0] == pytest.approx(nll.mean().item(), rel=1e-6)
        assert r_on[1] == pytest.approx(nll.sum().item() / math.log(2) / tbytes.sum(), rel=1e-6)
        assert r_on[1] < r_off[1] - 0.05  # here, with repeats, the tilt gains


P = tg.Settings({}).ttt_point(rank=4, chunk=8, batch=3, seq_len=32, phases=2, prefix_docs=1, lr=0.01,
                              global_lr=0.02, global_chunk=64)


def ttt_logp(model, val):
    got = {}
    loss, bpb, _ = tg.ttt_evaluate(CTX, model, val, P, lambda t, lp: got.update(zip(t.tolist(), lp)))
    return loss, bpb, torch.stack([got[j] for j in range(len(val[0]) - 1)])


def test_ttt_scores_are_tilted_at_their_targets(sharp, stream):
    """Score-first TTT with the tilt: on_scored receives the tilted distributions, which are the untilted run's
    (the adapters and global steps train on the model's own nll, so they are the same) tilted at each target's
    hint; the figure is their mean nll, and differs from off."""
    tokens, tbytes = stream
    val = tilted_val(tokens, 3, 0.8, tbytes=tbytes)
    loss, bpb, lp_on = ttt_logp(sharp, val)
    loss_off, bpb_off, lp_off = ttt_logp(sharp, (tokens, tbytes))
    lp, has = explicit_tilt(lp_off, np.arange(len(tokens) - 1), tokens, val.tilt[1].numpy())
    torch.testing.assert_close(lp_on.double(), lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(lp_on.exp().sum(-1), torch.ones(len(tokens) - 1), atol=1e-5, rtol=0)
    nll = -lp_on.double()[torch.arange(len(tokens) - 1), torch.from_numpy(tokens[1:].astype(np.int64))]
    assert loss == pytest.approx(nll.mean().item(), rel=1e-5) and has.float().mean() > 0.3
    assert bpb < bpb_off - 0.05


def test_final_evals_tilt_every_figure_and_log_the_hints(sharp, stream):
    class LogCtx(tg.Ctx):
        def __init__(self):
            super().__init__(0, 1, 0, CPU)
            self.lines = []

        def log(self, msg):
            self.lines.append(msg)

    tokens, tbytes = stream
    env = dict(TOY, VOCAB_SIZE=V, EVAL_SEQ_LEN=64, EVAL_STRIDE=16, SLOT_STEPS=1, SLOT_BATCH=4, EVAL_BATCH=4,
               TTT_ENABLED=1, TTT_LORA_RANK=2, TTT_CHUNK_SIZE=16, TTT_BATCH_SIZE=2, TTT_EVAL_SEQ_LEN=32,
               PHASED_TTT_NUM_PHASES=1, PHASED_TTT_PREFIX_DOCS=1)
    figures = {}
    for order in (0, 3):
        ctx, results = LogCtx(), {}
        a = tg.Settings({k: str(v) for k, v in dict(env, NGRAM_TILT_ORDER=order).items()})
        tg.final_evals(a, ctx, sharp, (tokens, tbytes), results, "int6")
        figures[order] = results
        tilt_lines = [line for line in ctx.lines if line.startswith("ngram_tilt:")]
        assert len(tilt_lines) == (order > 0), ctx.lines
    hinted = (tg.ngram_hints(tokens, 3, 0.8)[1:] >= 0).mean()
    assert f"hinted:{hinted:.4%} of {len(tokens) - 1} targets seconds:" in tilt_lines[0]
    assert set(figures[0]) == set(figures[3]) == {"roundtrip", "sliding", "slot_scored", "ttt"}
    for k in figures[0]:
        assert figures[3][k][1] < figures[0][k][1] - 0.05, k


# ----------------------------------------------------------------------------- settings and the bench


@pytest.mark.parametrize("env,name", [
    ({"NGRAM_TILT_ORDER": "-1"}, "NGRAM_TILT_ORDER"), ({"NGRAM_TILT_ORDER": "1025"}, "NGRAM_TILT_ORDER"),
    ({"NGRAM_TILT_ORDER": "16.5"}, "NGRAM_TILT_ORDER"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_THRESHOLD": "0"}, "NGRAM_TILT_THRESHOLD"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_THRESHOLD": "1.01"}, "NGRAM_TILT_THRESHOLD"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_THRESHOLD": "nan"}, "NGRAM_TILT_THRESHOLD"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_BETA": "0"}, "NGRAM_TILT_BETA"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_BETA": "-2"}, "NGRAM_TILT_BETA"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_BETA": "inf"}, "NGRAM_TILT_BETA"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_BETA": "nan"}, "NGRAM_TILT_BETA"),
    ({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_BETA": "31"}, "NGRAM_TILT_BETA"),
    ({"NGRAM_TILT_BETA": "2"}, "NGRAM_TILT_ORDER"), ({"NGRAM_TILT_THRESHOLD": "0.9"}, "NGRAM_TILT_ORDER")])
def test_bad_tilt_settings_are_one_line_config_errors(env, name):
    with pytest.raises(tg.ConfigError) as e:
        tg.Settings(env)
    msg = str(e.value)
    assert msg.startswith(name + "=") and "fix:" in msg and "\n" not in msg, msg
    a = tg.Settings({"NGRAM_TILT_ORDER": "16", "NGRAM_TILT_THRESHOLD": "1", "NGRAM_TILT_BETA": "30"})
    assert (a.ngram_tilt_order, a.ngram_tilt_threshold, a.ngram_tilt_beta) == (16, 1.0, 30.0)
    assert tg.Settings({}).ngram_tilt_order == 0  # off by default


def test_bench_runs_at_toy_size(monkeypatch, capsys):
    import ngram_tilt  # bench/ngram_tilt.py, in this process: it sets one torch thread, restored after
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["ngram_tilt.py", "--tokens", "30000"])
    try:
        ngram_tilt.main()
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("stream: 30,000 tokens, vocab 1024") and "torch 1" in lines[0]
    assert lines[1].startswith("hinted: ") and lines[-1].startswith("seconds: ") and "60 s goal" in lines[-1]
    x = ngram_tilt.stream(5000, 64, 0.5, 16, 0)
    assert (tg.ngram_hints(x, 4, 0.8) >= 0).mean() > 0.2  # the stream repeats
