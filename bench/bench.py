"""Speed of train_gpt.py on whatever device is present, measured with the script's own train() and evaluate() on
synthetic shards: training ms/step, tokens/s, model FLOPs per token and MFU against a matmul rate measured in the
same run; sliding-eval tokens/s; SLOT windows/s. CUDA: the record config at one GPU's share of the 8-GPU batch
(98,304 tokens per step). CPU: a toy size, so that CI runs it. The last line is a short table.

    python bench/bench.py                      # the table
    python bench/bench.py --ablate all         # then each speed change undone in turn, side by side
    python bench/bench.py --ablate gqa-copies,ema-loop,eval-batch-64
    python bench/bench.py --ablate loops,doc-mask,record-frontier   # the record's parts: what each costs

--ablate re-runs the same training and evaluation (same seed, same shards) with one speed change undone, i.e.
with the implementation it replaced, and prints for each one how much slower it is than the current code ("gain":
before / after) and how far its final weights are from the current code's (0 where the two are the same maths).
`all-off` undoes every change at once: the starting point before any speed work. Changes that only act on CUDA
are listed as n/a on CPU. `eval-batch-N` runs the evaluation with N windows per batch instead of EVAL_BATCH.
"""
import argparse
import contextlib
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

RECORD = dict(TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1", ITERATIONS="40", WARMUP_STEPS="5",
              TRAIN_LOG_EVERY="10")
TOY = dict(NUM_LAYERS="11", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8", BIGRAM_VOCAB_SIZE="512",
           BIGRAM_DIM="32", VE_DIM="32", TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="4096", GRAD_ACCUM_STEPS="1",
           ITERATIONS="6", WARMUP_STEPS="1", TRAIN_LOG_EVERY="3", EVAL_SEQ_LEN="128", EVAL_STRIDE="32",
           SLOT_STEPS="4")
COMMON = dict(WARMDOWN_ITERS="0", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", LATE_QAT_THRESHOLD="0")
FULL_VAL_TOKENS = 62_021_632  # SPEC: the challenge's val split with the 1024-token tokenizer
GOAL_TOKENS_PER_S, GOAL_SLOT_SECONDS, GPUS = 1.3e6, 60.0, 8


# ---- the implementations the speed changes replaced; each computes what the current code computes

def gqa_with_copies(q, k, v, doc=None):
    """K/V repeated to every query head (head h reads KV head h // group, as SDPA's enable_gqa does)."""
    if doc is not None:  # document masking has no copy-based variant: the current kernel
        return ATTENTION(q, k, v, doc)
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


class MuonPerMatrix(tg.Muon):
    """One Newton-Schulz call per matrix, every rank orthogonalising every matrix, no all-reduce."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g = self._nesterov(p, group["momentum"])
                u = tg.newton_schulz(g, group["backend_steps"]) * max(1.0, g.size(0) / g.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])


ADAMW, ATTENTION = torch.optim.AdamW, tg.causal_attention


def adamw_loop(*args, **kwargs):
    return ADAMW(*args, **{**kwargs, "fused": False, "foreach": False})


NEXT_BATCH = tg.TrainLoader.next_batch


def next_batch_blocking(self, local_tokens, seq_len, segments=False):
    """Pageable host memory and a blocking copy: the step waits for every batch's transfer."""
    device, self.device = self.device, torch.device("cpu")
    out = NEXT_BATCH(self, local_tokens, seq_len, segments)
    self.device = device
    return tuple(t if t is None else t.to(device) for t in out)


def ema_update_loop(self):
    self.count += 1
    w = 1.0 - self.decay if self.decay is not None else 1.0 / self.count
    for avg, p in zip(self.avg, self.params):
        avg.lerp_(p.detach().float(), w)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def sdpa_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    stack = contextlib.ExitStack()
    stack.enter_context(patched(tg, "ATTN_FN", None))
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


# name: (what undoing it means, CUDA only, settings overrides, patch context factory)
VARIANTS = {
    "compile": ("no torch.compile (training or eval)", True, dict(COMPILE="0"), contextlib.nullcontext),
    "attention": ("SDPA math kernel instead of the fastest available", False, {}, sdpa_math),
    "gqa-copies": ("K/V repeated to every head before attention", False, {},
                   lambda: patched(tg, "causal_attention", gqa_with_copies)),
    "muon-per-matrix": ("Newton-Schulz per matrix, no shape banks", False, {},
                        lambda: patched(tg, "Muon", MuonPerMatrix)),
    "adamw-loop": ("AdamW as a per-tensor loop, not fused", True, {},
                   lambda: patched(torch.optim, "AdamW", adamw_loop)),
    "loader-blocking": ("blocking host-to-device batch copies", True, {},
                        lambda: patched(tg.TrainLoader, "next_batch", next_batch_blocking)),
    "sync-every-step": ("loss read with .item() every step", False, dict(TRAIN_LOG_EVERY="1"), contextlib.nullcontext),
    "ema-loop": ("EMA updated tensor by tensor", False, {},
                 lambda: patched(tg.WeightAverage, "update", ema_update_loop)),
}

# the record's parts (issue 16), each turned on alone: what it costs, not a speed change undone
OPTIONS = {
    "loops": ("layers 3..5 run twice more (17 slots), on from the first step",
              dict(NUM_LOOPS="2", LOOP_START="3", LOOP_END="5", ENABLE_LOOPING_AT="0")),
    "lanes": ("parallel attention/MLP lanes from layer 8", dict(PARALLEL_START_LAYER="8")),
    "attn-gate": ("per-head attention-output gate", dict(ATTN_OUT_GATE="1")),
    "smear-input": ("input-dependent, BOS-masked SmearGate", dict(SMEAR_MODE="input")),
    "doc-mask": ("attention within documents (flash-attn varlen, else SDPA with a mask)", dict(DOC_MASK="1")),
    "polar": ("Polar-Express Newton-Schulz", dict(MUON_NS="polar")),
    "row-norm": ("MuonEq-R row normalisation", dict(MUON_ROW_NORM="1")),
}
WIDTH = dict(MODEL_DIM="512", NUM_HEADS="8", NUM_KV_HEADS="4", ROPE_DIMS="16", BIGRAM_VOCAB_SIZE="2048",
             BIGRAM_DIM="128", VE_DIM="128")  # the record width, for the record-frontier row on a CPU


def frontier_settings():
    """record_frontier.env's model and optimizer settings (its eval settings left out: the same evals compare)."""
    env = dict(line.split("=", 1) for line in (ROOT / "record_frontier.env").read_text().splitlines()
               if line and not line.startswith("#"))
    return {k: v for k, v in env.items() if not k.endswith("_ENABLED") or k == "VE_ENABLED"}


def variant(name, cuda):
    """(description, overrides, context factory) for a name; None where it does not apply to this device."""
    if name.startswith("eval-batch-") and name[11:].isdigit():
        n = name[11:]
        return f"{n} windows per eval and SLOT batch", dict(EVAL_BATCH=n, SLOT_BATCH=n), contextlib.nullcontext
    if name in OPTIONS:
        return f"on: {OPTIONS[name][0]}", OPTIONS[name][1], contextlib.nullcontext
    if name == "record-frontier":
        return "record_frontier.env's model and optimizer vs the seeds', both at the record width", {}, \
            contextlib.nullcontext
    if name == "all-off":
        names = [n for n, v in VARIANTS.items() if cuda or not v[1]]
        overrides = {k: v for n in names for k, v in VARIANTS[n][2].items()}

        def everything():
            stack = contextlib.ExitStack()
            for n in names:
                stack.enter_context(VARIANTS[n][3]())
            return stack
        return "every change above undone: the starting point", overrides, everything
    if name not in VARIANTS:
        raise SystemExit(f"error: --ablate: unknown change {name!r}; fix: choose from all, all-off, eval-batch-N, "
                         "record-frontier, " + ", ".join([*VARIANTS, *OPTIONS]))
    what, cuda_only, overrides, ctx = VARIANTS[name]
    return None if cuda_only and not cuda else (what, overrides, ctx)


# ---- measuring

def write_shard(path, tokens):
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = [tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)]
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def matmul_rate(device, dtype, n, reps):
    """FLOP/s of an n x n matrix product in the dtype training multiplies in."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = tg.Ctx(0, 1, 0, device).sync
    for _ in range(2):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


class QuietCtx(tg.Ctx):
    def log(self, msg):
        pass


def measure(a, ctx, files, val, train=True):
    """Trains (if asked) and evaluates a fresh seed-0 model; returns ms/step, sliding tokens/s, SLOT windows/s and
    the final weights."""
    torch._dynamo.reset()  # every measurement compiles its own graphs, under its own patches
    torch.manual_seed(0)
    model = tg.build_model(a.arch(), ctx.device)
    ms_step = None
    if train:
        steps, train_ms, _ = tg.train(a, ctx, model, files, val)
        ms_step = train_ms / steps
    model.requires_grad_(False)
    if ctx.device.type == "cuda" and a.compile:
        model.eval_hidden = torch.compile(model.forward_hidden, dynamic=False)
    L, S = a.eval_seq_len, a.eval_stride
    slot = a.slot_point(mode="scored")
    warm = (val[0][:L * 4 + 1], val[1][:L * 4])
    tg.evaluate(ctx, model, warm, L, S, a.eval_batch)  # compile outside the timed runs
    tg.evaluate(ctx, model, warm, L, S, a.slot_batch, [slot])
    sliding = tg.evaluate(ctx, model, val, L, S, a.eval_batch)[0]
    slot_r = tg.evaluate(ctx, model, val, L, S, a.slot_batch, [slot])[0]
    n_windows = len(tg.window_starts(len(val[0]) - 1, L, S))
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return dict(ms_step=ms_step, sliding=(len(val[0]) - 1) / sliding[2], slot=n_windows / slot_r[2], weights=weights)


def code_identity():
    """The SHA-256 of train_gpt.py, and the commit, marked if the measured files differ from it."""
    sha = hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()[:12]
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return f"train_gpt.py sha256 {sha}"
    changed = git("diff", "--quiet", "HEAD", "--", "train_gpt.py", "bench/bench.py").returncode
    return f"train_gpt.py sha256 {sha}, git {head.stdout.strip()}" + (" with uncommitted changes" if changed else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablate", default="", help="comma-separated changes to undo one at a time, or 'all'")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    names = [n for n in args.ablate.split(",") if n]
    names = [*VARIANTS, "all-off", *OPTIONS, "record-frontier"] if names == ["all"] else names
    plan = {n: variant(n, cuda) for n in names}  # unknown names fail here, before any work
    base = {**COMMON, **(RECORD if cuda else TOY)}
    a = tg.Settings(base)
    try:
        settings = {n: tg.Settings({**base, **spec[1]}) for n, spec in plan.items() if spec}
        if "record-frontier" in plan:
            wide = {**base, **({} if cuda else WIDTH)}
            settings["record-frontier"] = (tg.Settings(wide), tg.Settings({**wide, **frontier_settings()}))
    except tg.ConfigError as e:
        raise SystemExit(f"error: --ablate: {e}") from None

    device = torch.device("cuda" if cuda else "cpu")
    ctx = tg.Ctx(0, 1, 0, device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        n_train = (a.iterations + a.warmup_steps + 2) * a.train_batch_tokens + 1
        write_shard(Path(d) / "fineweb_train_000000.bin", rng.integers(0, a.vocab_size, n_train))
        files = tg.find_shards(d, "train")
        val_tokens = rng.integers(0, a.vocab_size, 262144 if cuda else 8192).astype(np.uint16)
        val = (val_tokens, np.ones(len(val_tokens) - 1))
        ref = measure(a, ctx, files, val)
        results = {}
        for name, spec in plan.items():
            if name == "record-frontier":
                t = time.perf_counter()
                seeds, front = (measure(s, QuietCtx(0, 1, 0, device), files, val) for s in settings[name])
                results[name] = dict(seeds=seeds, front=front)
                print(f"ablation {name}: done in {time.perf_counter() - t:.0f}s", flush=True)
            elif spec is not None:
                t = time.perf_counter()
                with spec[2]():
                    r = measure(settings[name], QuietCtx(0, 1, 0, device), files, val,
                                train=not name.startswith("eval-batch-"))
                weights = r.pop("weights")  # kept as one number: a model's worth of memory per ablation adds up
                same = r["ms_step"] and name not in OPTIONS  # an option changes the model: no weight comparison
                r["weight_diff"] = (weights - ref["weights"]).abs().max().item() if same else None
                results[name] = r
                print(f"ablation {name}: done in {time.perf_counter() - t:.0f}s", flush=True)
        if plan:  # the current code again: two runs bracket the ablations and show the run-to-run noise
            again = measure(a, QuietCtx(0, 1, 0, device), files, val)
    rows = []
    if plan:
        floor = (again["weights"] - ref["weights"]).abs().max().item()  # compiled kernels need not repeat bit for bit
        rows.append(f"current code measured first and last: {ref['ms_step']:.2f} and {again['ms_step']:.2f} ms/step, "
                    f"{ref['sliding']:,.0f} and {again['sliding']:,.0f} sliding tokens/s, {ref['slot']:,.1f} and "
                    f"{again['slot']:,.1f} SLOT windows/s; gains are against the mean of the two; their weights "
                    f"differ by {floor:.2e}, the noise floor of the last column")
        rows += ["| change undone (or option on) | what runs instead | ms/step | gain (cost) | sliding tokens/s | gain "
                 "(cost) | SLOT windows/s | gain (cost) | max abs weight diff |", "|---|---|---|---|---|---|---|---|---|"]
        cur = {k: (ref[k] + again[k]) / 2 for k in ("ms_step", "sliding", "slot")}
    for name, spec in plan.items():
        r = results.get(name)
        if r is None:
            rows.append(f"| {name} | {VARIANTS[name][0]} | n/a on CPU (CUDA only) | | | | | | |")
            continue
        if name == "record-frontier":  # cost of the record's model: frontier / seeds, at the record width
            sd, fr = r["seeds"], r["front"]
            rows.append(f"| {name} vs seeds | {spec[0]} | {sd['ms_step']:.2f} -> {fr['ms_step']:.2f} | "
                        f"{fr['ms_step'] / sd['ms_step']:.2f}x | {sd['sliding']:,.0f} -> {fr['sliding']:,.0f} | "
                        f"{sd['sliding'] / fr['sliding']:.2f}x | {sd['slot']:,.1f} -> {fr['slot']:,.1f} | "
                        f"{sd['slot'] / fr['slot']:.2f}x | - |")
            continue
        trained = r["ms_step"] is not None
        train_cols = f"{r['ms_step']:.2f} | {r['ms_step'] / cur['ms_step']:.2f}x" if trained else "- | -"
        dw = f"{r['weight_diff']:.2e}" if r["weight_diff"] is not None else "-"
        rows.append(f"| {name} | {spec[0]} | {train_cols} | {r['sliding']:,.0f} | {cur['sliding'] / r['sliding']:.2f}x "
                    f"| {r['slot']:,.1f} | {cur['slot'] / r['slot']:.2f}x | {dw} |")

    ms_step = ref["ms_step"]
    tok_s = a.train_batch_tokens / ms_step * 1000
    model = tg.GPT(a.arch())
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
    n_matmul += model.head_weight().numel() if model.lm_head is None else 0  # the tied head multiplies too
    # 6 FLOPs per matmul weight per token (forward + backward), plus causal attention scores and values
    flops_tok = 6 * n_matmul + 6 * a.num_layers * a.model_dim * a.train_seq_len
    rate = matmul_rate(device, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 1024, 20 if cuda else 5)
    mfu = flops_tok * tok_s / rate
    L, S = a.eval_seq_len, a.eval_stride

    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}  torch {torch.__version__}  attention {tg.ATTN_NAME}")
    print(f"code: {code_identity()}")
    print(f"config: {a.num_layers}L d{a.model_dim} seq {a.train_seq_len}, {a.train_batch_tokens} tokens/step, "
          f"{a.iterations} timed steps; eval seq {L} stride {S}, SLOT {a.slot_steps} steps x {a.slot_batch} windows")
    print(f"matmul_rate: {rate / 1e12:.2f} TFLOP/s ({'bf16' if cuda else 'fp32'}, measured)")
    if cuda:
        full_windows = len(tg.window_starts(FULL_VAL_TOKENS - 1, L, S))
        print(f"goals (issue 5): training {tok_s:,.0f} tokens/s/GPU vs >= {GOAL_TOKENS_PER_S:,.0f}; "
              f"SLOT-{a.slot_steps} over the full val ({full_windows:,} windows) on {GPUS} GPUs at this rate: "
              f"{full_windows / GPUS / ref['slot']:.0f} s vs <= {GOAL_SLOT_SECONDS:.0f} s")
    if rows:
        print("\nablation: each change undone (or record option turned on) alone; gain = undone / current (time per "
              "step, or rate ratio): above 1 the change helps, or the option costs that factor")
        print("\n".join(rows) + "\n")
    print("| ms/step | tokens/s/GPU | MFLOP/token | MFU | sliding tokens/s | SLOT windows/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {ms_step:.2f} | {tok_s:,.0f} | {flops_tok / 1e6:.1f} | {mfu:.1%} | {ref['sliding']:,.0f} | "
          f"{ref['slot']:,.1f} |")


if __name__ == "__main__":
    main()
