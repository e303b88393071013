"""`bash run.sh package NAME RUN_ID...`: the record folder a pull request needs (SPEC §1), from finished runs.

Reads each run's files as the run wrote them under LOG_DIR (<RUN_ID>.txt, .submission.json and the artifact it
names, e.g. <RUN_ID>.int6.pgz), refuses any run that cannot be part of a record (one `error:` line each, nothing
written), and writes RECORDS_DIR/NAME/: the packed train_gpt.py, requirements.txt, train_seed<SEED>.log per run,
submission.json (every seed's figures, their mean and sample standard deviation, the significance test) and
README.md. Standard library only (plus the train_gpt module, for the packer and the settings)."""
import hashlib, json, math, os, re, shlex, shutil, statistics, sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

LIMIT_BYTES = 16_000_000  # SPEC §1: code + compressed model, decimal
LIMIT_SECONDS = 600  # SPEC §1: training, and evaluation, each on 8xH100
MARGIN_NATS = 0.005  # SPEC §1: a record beats the previous one by 0.005 nats with p < 0.01
DEFAULT_PREVIOUS_BPB = 1.06108  # SPEC §10: the best merged record (PR #1855), counted on CaseOps sidecar bytes
NOT_REPRODUCED = {"RUN_ID", "LOG_DIR", "SEED", "ARTIFACT", "AUTHOR", "GITHUB_ID"}  # per run, or not the model's
FIGURES = ["prequant", "roundtrip", "sliding", "ttt"]  # the table's columns before the headline


class Refused(Exception):
    """Why the folder was not written: one `error:` line each (args[0], a list)."""


def t_sf(t, df):
    """P(T > t) for Student's t with integer df >= 1: the closed forms of Abramowitz & Stegun 26.7.3/26.7.4 for
    A = P(|T| <= |t|) (a finite series in cos^2 of atan(|t|/sqrt(df))), then symmetry."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        a = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = math.sin(theta) * total
    return (1 - a) / 2 if t >= 0 else (1 + a) / 2


def significance(bpbs, losses, previous_bpb):
    """One-sided t-test of H1: mean val_bpb < previous - margin, the margin being MARGIN_NATS per token in bpb:
    bpb = nats/token / ln 2 * tokens/byte, so margin_bpb = MARGIN_NATS * val_bpb / val_loss (each run's own
    tokens-per-byte ratio, averaged). t = (previous - margin_bpb - mean) / (std / sqrt(n)), df = n - 1."""
    n, mean = len(bpbs), statistics.fmean(bpbs)
    margin = MARGIN_NATS * statistics.fmean(b / l for b, l in zip(bpbs, losses))
    gap = previous_bpb - margin - mean
    out = dict(previous_bpb=previous_bpb, margin_nats=MARGIN_NATS, margin_bpb=margin,
               threshold_bpb=previous_bpb - margin, n=n, df=n - 1, t=None, p_value=None)
    if n >= 2 and statistics.stdev(bpbs) > 0:
        t = gap / (statistics.stdev(bpbs) / math.sqrt(n))
        out.update(t=t, p_value=t_sf(t, n - 1))
    elif n >= 2:  # identical figures: no spread, the mean alone decides
        out.update(p_value=0.0 if gap > 0 else 1.0)
    return out


def parse_settings(line, names):
    """The run's `settings:` line as {name: rendered value} (values may hold spaces: split before known names)."""
    parts = re.split(r" (?=(?:%s)=)" % "|".join(map(re.escape, names)), line)
    return dict(p.split("=", 1) for p in parts)


def render(v):  # as main() prints a setting on its `settings:` line
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def one(pattern, text):
    m = re.search(pattern, text, re.M)
    return m and m.groups()


def read_run(log_dir, run_id, packed, source):
    """The run's figures, or a ConfigError saying why it cannot be part of a record."""
    def bad(why, fix):
        raise tg.ConfigError(f"run {run_id}: {why}; fix: {fix}")
    base = Path(log_dir) / run_id
    def missing(path):
        bad(f"{path} is missing", "give the RUN_ID of a finished training run and its LOG_DIR (the files as the run "
            "wrote them: <RUN_ID>.txt, .submission.json and its artifact, e.g. .int6.pgz)")
    for suffix in (".txt", ".submission.json"):
        if not Path(f"{base}{suffix}").is_file():
            missing(f"{base}{suffix}")
    log = Path(f"{base}.txt").read_text(encoding="utf-8", errors="replace")
    try:
        sub = json.loads(Path(f"{base}.submission.json").read_text(encoding="utf-8"))
        metric, legal = sub["metric"], sub["results"][sub["metric"]]["legal"] is True
        seed, model_bytes, bpb, loss = int(sub["seed"]), int(sub["bytes_model"]), sub["val_bpb"], sub["val_loss"]
        eval_s = float(sub["eval_seconds"]) if "eval_seconds" in sub else None
        artifact = base.parent / Path(sub.get("artifact", f"{run_id}.int6.pgz")).name  # older runs: int6 always
        figures = [v[k] for v in [sub, *sub["results"].values()] for k in ("val_bpb", "val_loss")]
        if not all(isinstance(x, (int, float)) for x in figures):
            raise TypeError("a val_bpb or val_loss is not a number")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        bad(f"{base}.submission.json is not a run's submission ({type(e).__name__}: {e})", "rerun, or restore it")
    code = one(r"^run_id:.* world:(\d+) .* code_bytes:(\d+) \(packed; source (\d+) bytes, sha256 ([0-9a-f]+)\)$", log)
    done = one(r"^train_done: steps:(\d+) train_time:(\d+)ms step_avg:([0-9.]+)ms", log)
    settings = one(r"^settings: (.*)$", log)
    said = one(r"^submission: .* val_bpb:([0-9.]+) ", log)
    if not code or not settings:
        bad(f"{base}.txt has no code_bytes/settings line of this script (a log of an older train_gpt.py?)",
            "package runs made with this train_gpt.py")
    if code[3] != hashlib.sha256(source).hexdigest()[:16]:
        bad(f"it ran another train_gpt.py (source sha256 {code[3]}, here {hashlib.sha256(source).hexdigest()[:16]})",
            "check out the commit the runs used, then package")
    if int(code[1]) != len(packed):
        bad(f"it counted {code[1]} code bytes, the packer here writes {len(packed)} (another bz2/xz build)",
            "package on the machine that ran it")
    if not done:
        bad("its log has no train_done line: an eval-only or unfinished run", "package the training runs")
    if not said or f"{float(said[0]):.8f}" != f"{bpb:.8f}":
        bad(f"the log's submission line does not match {base}.submission.json (unfinished run, or files of "
            "different runs)", "package a finished run's own files")
    if metric not in tg.LEGAL or not legal:
        bad(f"its headline ({metric}) is not a legal score-first figure", f"score it with one of {', '.join(tg.LEGAL)}")
    if not artifact.is_file():
        missing(artifact)
    if artifact.stat().st_size != model_bytes:
        bad(f"{artifact} is {artifact.stat().st_size} bytes, the run wrote {model_bytes}",
            "restore the run's own artifact")
    if len(packed) + model_bytes > LIMIT_BYTES:
        bad(f"code {len(packed)} + model {model_bytes} = {len(packed) + model_bytes} bytes exceeds the "
            f"{LIMIT_BYTES:,}-byte limit", "rerun with TARGET_BYTES=16000000 so that pruning fits it")
    logged_eval = one(r"^eval_total: ([0-9.]+)s", log)
    eval_s = float(logged_eval[0]) if eval_s is None and logged_eval else eval_s
    if int(done[1]) > LIMIT_SECONDS * 1000 or (eval_s or 0) > LIMIT_SECONDS:
        bad(f"training took {int(done[1]) / 1000:.1f}s, evaluation {eval_s or 'n/a'}s: over the {LIMIT_SECONDS}s "
            "limit", "rerun with MAX_WALLCLOCK_SECONDS=600 and evals that fit 600 s")
    return dict(run_id=run_id, seed=seed, world=int(code[0]), val_loss=loss, val_bpb=bpb, metric=metric,
                train_steps=int(done[0]), train_time_ms=int(done[1]), step_avg_ms=float(done[2]), eval_seconds=eval_s,
                bytes_model=model_bytes, bytes_total=len(packed) + model_bytes, hardware=sub.get("hardware"),
                results=sub["results"], log=log, sub=sub,
                settings=parse_settings(settings[0], [n for n, *_ in tg.SETTINGS]))


def fmt(x, spec=".6f", unit=""):
    return "n/a" if x is None else format(x, spec) + unit


def summarise(runs, f, least):
    """f (mean or stdev) of each figure every run has (else None), when there are at least `least` runs."""
    cols = {"val_bpb": [r["val_bpb"] for r in runs], "val_loss": [r["val_loss"] for r in runs],
            **{k: [r["results"][k]["val_bpb"] for r in runs if k in r["results"]] for k in FIGURES}}
    return {k: f(v) if len(v) == len(runs) >= least else None for k, v in cols.items()}


def readme(name, runs, summary, sig, env, packed_len):
    rows = ["| seed | steps | ms/step | pre-quant | round trip | sliding | TTT | headline | artifact bytes | "
            "eval_total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        figs = [fmt(r["results"].get(k, {}).get("val_bpb")) for k in FIGURES]
        rows.append(f"| {r['seed']} | {r['train_steps']} | {r['step_avg_ms']:.2f} | " + " | ".join(figs)
                    + f" | {r['val_bpb']:.6f} ({r['metric']}) | {r['bytes_total']:,} | "
                    f"{fmt(r['eval_seconds'], '.1f', 's')} |")
    for stat in ("mean", "std"):
        figs = [fmt(summary[stat][k]) for k in FIGURES]
        rows.append(f"| **{stat}** | | | " + " | ".join(figs) + f" | **{fmt(summary[stat]['val_bpb'])}** | | |")
    cmds = [" ".join([f"SEED={r['seed']}"] + [f"{k}={shlex.quote(v)}" for k, v in env.items()]
                     + [f"torchrun --standalone --nproc_per_node={r['world']} records/{name}/train_gpt.py"])
            for r in runs]
    if sig["p_value"] is None:
        test = "n/a: one seed; a t-test needs at least two."
    else:
        verdict = "significant (p < 0.01)" if sig["p_value"] < 0.01 else "NOT significant (p >= 0.01)"
        test = f"t = {fmt(sig['t'], '.4f')}, df = {sig['df']}, one-sided **p = {sig['p_value']:.3g}**: {verdict}."
    return f"""# {name}

**val_bpb {summary['mean']['val_bpb']:.6f}** (mean of {len(runs)} seed{'s' * (len(runs) > 1)}, sample std \
{fmt(summary['std']['val_bpb'])}); each seed's headline is its best legal (score-first) figure. Code: \
{packed_len:,} bytes (train_gpt.py, packed: the source compressed, base85, in a 2-line wrapper that runs it \
unchanged). Hardware: {', '.join(sorted({str(r['hardware']) for r in runs}))}.

{chr(10).join(rows)}

Figures are val_bpb on the validation split the runs used; artifact bytes = code + compressed model (limit \
{LIMIT_BYTES:,}); ms/step and steps from each log's `train_done` line; eval_total from its `eval_total` line \
(n/a: the run did not log one). Logs: {', '.join(f'`train_seed{r["seed"]}.log`' for r in runs)}.

## Reproduction

From the folder holding `data/` (the FineWeb sp1024 shards and tokenizer at their default paths):

```bash
{chr(10).join(cmds)}
```

## Significance

Against the previous record, val_bpb {sig['previous_bpb']:.5f}, on {sig['denominator']} (the headlines' \
figures on the same bytes): a record must beat it by {MARGIN_NATS} nats per \
token with p < 0.01 (one-sided t-test over the seeds). In bits per byte, bpb = (nats/token) / ln 2 x \
(tokens/byte), so the margin is {MARGIN_NATS} x val_bpb / val_loss (each seed's own ratio, averaged) = \
{sig['margin_bpb']:.6f} bpb, and the threshold {sig['threshold_bpb']:.6f}. With n seeds of mean m and sample \
std s: t = (threshold - m) / (s / sqrt(n)), p = P(T_(n-1) >= t).

{test}
"""


def main(argv):
    """Checks every run, then writes the folder; raises Refused (or ConfigError) and writes nothing otherwise."""
    if len(argv) < 2:
        raise tg.ConfigError("usage: run.sh package NAME RUN_ID...; fix: name the record folder and the runs")
    name, run_ids = argv[0], argv[1:]
    for what, v in [("NAME", name)] + [("RUN_ID", r) for r in run_ids]:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", v):
            raise tg.ConfigError(f"{what} {v!r}: letters, digits, '_', '.', '-' only (at most 100, no leading "
                                 "'.'); fix: a plain folder name such as 2026-05-01_my_record")
    raw = os.environ.get("PREVIOUS_BPB", str(DEFAULT_PREVIOUS_BPB))
    try:
        previous = float(raw)
        assert 0 < previous < 100
    except (ValueError, AssertionError):
        raise tg.ConfigError(f"PREVIOUS_BPB={raw!r} is not a val_bpb; fix: set it to the previous record's val_bpb "
                             f"(default {DEFAULT_PREVIOUS_BPB})") from None
    log_dir, out = os.environ.get("LOG_DIR", "logs"), Path(os.environ.get("RECORDS_DIR", "records")) / name
    if os.path.lexists(out):
        raise tg.ConfigError(f"{out} already exists; fix: pick another NAME, or delete it to package again")
    source = tg.code_identity(ROOT / "train_gpt.py")[1]
    packed = tg.pack_source(source)
    runs, errors = [], []
    for run_id in run_ids:
        try:
            runs.append(read_run(log_dir, run_id, packed, source))
        except tg.ConfigError as e:
            errors.append(str(e))
    seeds = [r["seed"] for r in runs]
    errors += [f"runs {', '.join(r['run_id'] for r in runs if r['seed'] == s)} share SEED={s}; fix: one run per seed"
               for s in sorted({s for s in seeds if seeds.count(s) > 1})]
    differ = sorted(k for r in runs[1:] for k in set(r["settings"]) | set(runs[0]["settings"])
                    if k not in NOT_REPRODUCED and r["settings"].get(k) != runs[0]["settings"].get(k))
    if differ:
        errors.append(f"the runs differ in {', '.join(dict.fromkeys(differ))}: a record's seeds share one "
                      "configuration; fix: package runs made with the same settings")
    if errors:
        raise Refused(errors)
    defaults = tg.Settings({"WORLD_SIZE": str(runs[0]["world"])})
    kinds = {n: kind for n, _, kind, _ in tg.SETTINGS}
    env = {k: {"True": "1", "False": "0"}[v] if kinds[k] == "bool" else v for k, v in runs[0]["settings"].items()
           if k not in NOT_REPRODUCED and v != render(getattr(defaults, k.lower()))}  # as the environment spells it
    summary = {"mean": summarise(runs, statistics.fmean, 1), "std": summarise(runs, statistics.stdev, 2)}
    # CaseOps runs: the test on the sidecar bytes, the denominator the CaseOps records (1.06108 among them) counted
    side = [r["results"][r["metric"]].get("val_bpb_on_sidecar_bytes") for r in runs]
    if any(side) and not all(side):
        raise Refused(["some runs were scored with val byte sidecars and some without; fix: package runs of one "
                       "tokenisation"])
    sig = significance(side if all(side) else [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs], previous)
    sig["denominator"] = "CaseOps sidecar bytes" if all(side) else "the decoded text's bytes"
    first = runs[0]["sub"]
    sub = dict(author=first.get("author"), github_id=first.get("github_id"), name=name,
               date=datetime.now(timezone.utc).isoformat(), val_loss=summary["mean"]["val_loss"],
               val_bpb=summary["mean"]["val_bpb"], val_loss_std=summary["std"]["val_loss"],
               val_bpb_std=summary["std"]["val_bpb"], bytes_total=max(r["bytes_total"] for r in runs),
               bytes_code=len(packed),
               blurb=f"mean of {len(runs)} seeds ({', '.join(map(str, seeds))}); per seed: {first.get('blurb')}",
               mean=summary["mean"], std=summary["std"], significance=sig,
               seeds=[{k: r[k] for k in ("seed", "run_id", "val_loss", "val_bpb", "metric", "train_steps",
                                         "train_time_ms", "step_avg_ms", "eval_seconds", "bytes_model", "bytes_total",
                                         "hardware", "results")} for r in runs])
    tmp = out.parent / f".{name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True)
        (tmp / "train_gpt.py").write_bytes(packed)
        reqs = [l for l in (ROOT / "requirements.txt").read_text().splitlines()
                if l.strip() and not l.startswith("#") and not re.match(r"pytest\b", l)]
        (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
        for r in runs:
            shutil.copyfile(Path(log_dir) / f"{r['run_id']}.txt", tmp / f"train_seed{r['seed']}.log")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2, allow_nan=False) + "\n")
        (tmp / "README.md").write_text(readme(name, runs, summary, sig, env, len(packed)))
        os.rename(tmp, out)
    except OSError as e:
        raise tg.ConfigError(f"cannot write {out} ({e.strerror or e}); fix: check RECORDS_DIR and the free disk "
                             "space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p = "n/a (one seed)" if sig["p_value"] is None else f"{sig['p_value']:.3g}"
    print(f"package: wrote {out} ({len(runs)} seeds; val_bpb mean {sub['val_bpb']:.6f} std "
          f"{fmt(sub['val_bpb_std'])}; p = {p} against PREVIOUS_BPB={previous:g} less {MARGIN_NATS} nats)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (Refused, tg.ConfigError) as e:
        for line in e.args[0] if isinstance(e, Refused) else [str(e)]:
            print(f"error: {tg.esc(line)}", file=sys.stderr)
        sys.exit(2)
