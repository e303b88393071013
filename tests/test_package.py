"""The packed train_gpt.py (code bytes as submitted) and `run.sh package` (the record folder).

Three toy runs, shared by the module: `a` (plain script, seed 1), `b` (the packed script from its own folder, seed 1:
must log what `a` logs) and `c` (the packed script under torchrun on 2 gloo ranks, seed 2). `a` and `c` are the
two seeds packaged."""
import base64, importlib.util, json, lzma, math, os, re, shlex, shutil, statistics, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import package  # noqa: E402

# 2 layers instead of TOY's 11 halve the runs' time; scored SLOT is not a legal headline, so off
RUN_ENV = {"NUM_LAYERS": "2", "VE_LAYERS": "0,1", "XSA_LAST_N": "2", "SLOT_ENABLED": "0"}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SOURCE = (REPO / "train_gpt.py").read_bytes()


def run_at(script, env, launcher=()):
    """As conftest.run_script (clean environment), but runs `script` from its own folder, as a record folder runs."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "OMP_WAIT_POLICY": "PASSIVE", **env}
    return subprocess.run([sys.executable, *launcher, script.name], cwd=script.parent, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("record") / "train_gpt.py"
    path.write_bytes(tg.pack_source(SOURCE))
    return path


@pytest.fixture(scope="module")
def runs(run_script, toy_env, packed, tmp_path_factory):
    logs, logs_b = tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("logs_b")
    env = {**toy_env, **RUN_ENV}
    a = run_script({**env, "RUN_ID": "a", "SEED": "1", "LOG_DIR": str(logs)})
    b = run_at(packed, {**env, "RUN_ID": "a", "SEED": "1", "LOG_DIR": str(logs_b)})
    c = run_at(packed, {**env, "RUN_ID": "c", "SEED": "2", "LOG_DIR": str(logs)}, launcher=TORCHRUN)
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(a=a, b=b, c=c, logs=logs, logs_b=logs_b)


def code_line(stdout):
    return re.search(r"code_bytes:(\d+) \(packed; source (\d+) bytes, sha256 ([0-9a-f]{16})\)$", stdout, re.M)


def normalised(text, log_dir):
    """A log without what differs between two runs of one configuration: timings, rates, memory peaks and the log
    folder."""
    text = re.sub(r"peak [0-9.]+ GiB", "peak M GiB", text.replace(str(log_dir), "LOG_DIR"))
    text = re.sub(r"\b\d+(\.\d+)?(ms|s)\b", "T", text)
    return re.sub(r"(seconds|tokens_per_s|per_rank):[0-9.]+", r"\1:T", text)


# ----------------------------------------------------------------------------- the packer


def test_pack_is_deterministic_two_lines_of_ascii_and_counts_itself(packed):
    blob = tg.pack_source(SOURCE)
    assert blob == tg.pack_source(SOURCE) == packed.read_bytes()
    assert blob.isascii() and blob.count(b"\n") == 2 and blob.startswith(b"exec(compile(__import__(")
    assert len(blob) < len(SOURCE) / 2
    # the plain and the packed file count the same bytes: the packed file's own size
    assert tg.code_identity(REPO / "train_gpt.py") == (len(blob), SOURCE)
    assert tg.code_identity(packed) == (len(blob), SOURCE)


def test_packed_module_imports_like_the_plain_one(packed):
    spec = importlib.util.spec_from_file_location("packed_train_gpt", packed)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": main() must not run
    assert mod.__name__ == "packed_train_gpt" and mod.__file__ == str(packed)
    assert mod.pack_source(SOURCE) == packed.read_bytes() and [s[0] for s in mod.SETTINGS] == [
        s[0] for s in tg.SETTINGS]


@pytest.mark.parametrize("codec", ["bz2", "lzma"])
def test_wrapper_runs_the_source_unchanged_as_main(tmp_path, codec):
    """Both decoders of the wrapper: __name__, __file__ and argv as for the plain file; a traceback names the
    source's own line numbers."""
    src = b'"""doc"""\nimport sys\nprint(__name__, __file__, sys.argv[1:])\nraise ValueError("line 4")\n'
    comp = {"bz2": lambda b: __import__("bz2").compress(b, 9), "lzma": lzma.compress}[codec](src)
    script = tmp_path / "train_gpt.py"
    script.write_bytes((tg.PACK_HEAD.format(codec) + base64.b85encode(comp).decode() + tg.PACK_TAIL).encode())
    assert tg.code_identity(script) == (script.stat().st_size, src)
    r = subprocess.run([sys.executable, "train_gpt.py", "x"], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout == f"__main__ {script} ['x']\n"
    assert f'File "{script}", line 4, in <module>' in r.stderr and "ValueError: line 4" in r.stderr
    assert len(r.stderr) < 400  # the payload line is never printed


def test_packed_run_logs_what_the_plain_run_logs(runs):
    a, b = (runs.logs / "a.txt").read_text(), (runs.logs_b / "a.txt").read_text()
    assert normalised(a, runs.logs) == normalised(b, runs.logs_b)
    assert "final_int6_roundtrip_exact" in a and "final_sliding_window_exact" in a
    m = code_line(runs.a.stdout)
    assert m and int(m[1]) == len(tg.pack_source(SOURCE)) and int(m[2]) == len(SOURCE)
    assert f"artifact_bytes: code:{m[1]} " in a
    # the same weights, bit for bit, and the same figures in submission.json
    assert (runs.logs / "a.int6.pgz").read_bytes() == (runs.logs_b / "a.int6.pgz").read_bytes()
    sa, sb = (json.loads((d / "a.submission.json").read_text()) for d in (runs.logs, runs.logs_b))
    for s in (sa, sb):
        del s["date"], s["train_time_ms"], s["eval_seconds"]
        for v in s["results"].values():
            del v["seconds"]
    assert sa == sb and sa["bytes_code"] == int(m[1])


def test_packed_run_under_torchrun_two_gloo_ranks(runs):
    assert "world:2" in runs.c.stdout and code_line(runs.c.stdout)[0] == code_line(runs.a.stdout)[0]
    assert "submission: " in runs.c.stdout


# ----------------------------------------------------------------------------- the t-test


def t_sf_by_integration(t, df, n=4000):
    """P(T > t): 1/2 minus Simpson's rule over [0, |t|] of the Student t density (lgamma normaliser)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = abs(t) / n
    area = h / 3 * (f(0) + f(abs(t)) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n)))
    return 0.5 - math.copysign(area, t)


def test_t_sf_against_integration_and_tables():
    for df in range(1, 10):
        for t in (-2.0, -0.3, 0.0, 0.7, 1.5, 3.0, 6.965):
            assert package.t_sf(t, df) == pytest.approx(t_sf_by_integration(t, df), abs=1e-9), (t, df)
    # printed one-sided 1 % critical values: t_0.99 for df 2, 4, 9
    for t, df in ((6.965, 2), (3.747, 4), (2.821, 9)):
        assert package.t_sf(t, df) == pytest.approx(0.01, abs=2e-5)


# ----------------------------------------------------------------------------- run.sh package


def headline(log):
    """(val_loss, val_bpb) of the log's headline, from its printed lines."""
    metric = re.search(r"^submission: .* \((\w+): ", log, re.M)[1]
    prefix = {"roundtrip": r"final_\w+_roundtrip_exact", "sliding": "final_sliding_window_exact ",
              "ttt": "final_ttt_exact", "slot_causal": "final_slot_exact mode:causal"}[metric]
    m = re.search(rf"^{prefix}.*val_loss:([0-9.]+) val_bpb:([0-9.]+)", log, re.M)
    return float(m[1]), float(m[2])


@pytest.fixture(scope="module")
def record(runs, tmp_path_factory):
    """`bash run.sh package toyrec a c`, PREVIOUS_BPB set so that t = 1.5 by the logs' printed figures."""
    logs = [(runs.logs / f"{r}.txt").read_text() for r in ("a", "c")]
    (la, ba), (lc, bc) = map(headline, logs)
    mean, std = (ba + bc) / 2, statistics.stdev([ba, bc])
    margin = 0.005 * (ba / la + bc / lc) / 2
    previous = mean + margin + 1.5 * std / math.sqrt(2)
    out = tmp_path_factory.mktemp("records")
    env = {**os.environ, "LOG_DIR": str(runs.logs), "RECORDS_DIR": str(out), "PREVIOUS_BPB": repr(previous)}
    r = subprocess.run(["bash", "run.sh", "package", "toyrec", "a", "c"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=out / "toyrec", stdout=r.stdout, logs=logs, bpb=[ba, bc], loss=[la, lc],
                           mean=mean, std=std, previous=previous)


def test_package_writes_the_record_folder(record, runs):
    d = record.dir
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                    "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    assert (d / "train_gpt.py").read_bytes() == tg.pack_source(SOURCE)
    assert (d / "train_seed1.log").read_text() == record.logs[0] and (d / "train_seed2.log").read_text() == record.logs[1]
    reqs = (d / "requirements.txt").read_text().split()
    assert "numpy" in reqs and "torch>=2.11" in reqs and "pytest" not in reqs
    sub = json.loads((d / "submission.json").read_text())
    # mean and sample std of the headline figures equal those of the logs' printed figures (8 decimals)
    assert sub["val_bpb"] == pytest.approx(record.mean, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(record.std, abs=2e-8)
    assert sub["val_loss"] == pytest.approx(statistics.fmean(record.loss), abs=1e-8)
    assert [s["seed"] for s in sub["seeds"]] == [1, 2] and [s["run_id"] for s in sub["seeds"]] == ["a", "c"]
    assert [s["val_bpb"] for s in sub["seeds"]] == pytest.approx(record.bpb, abs=1e-8)
    code = int(code_line(runs.a.stdout)[1])
    assert sub["bytes_code"] == code == (d / "train_gpt.py").stat().st_size
    assert sub["bytes_total"] == code + max((runs.logs / f"{r}.int6.pgz").stat().st_size for r in ("a", "c"))
    # the p-value: t = 1.5 by construction, df = 1; against the integrated t density
    sig = sub["significance"]
    assert sig["df"] == 1 and sig["t"] == pytest.approx(1.5, rel=1e-3)
    assert sig["p_value"] == pytest.approx(t_sf_by_integration(1.5, 1), abs=1e-4)
    readme = (d / "README.md").read_text()
    assert f"p = {sig['p_value']:.3g}" in readme and "NOT significant" in readme
    assert f"p = {sig['p_value']:.3g}" in record.stdout


def test_package_readme_table_and_reproduction(record, runs):
    readme = (record.dir / "README.md").read_text()
    rows = {r.split(" | ")[0].strip("| "): r for r in readme.splitlines() if re.match(r"\| (\d+|\*\*\w+\*\*) \|", r)}
    assert set(rows) == {"1", "2", "**mean**", "**std**"}
    steps = re.search(r"^train_done: steps:(\d+) train_time:\d+ms step_avg:([0-9.]+)ms", record.logs[0], re.M)
    cells = [c.strip() for c in rows["1"].strip("|").split("|")]
    total = re.search(r"^eval_total: ([0-9.]+)s", record.logs[0], re.M)[1]
    assert cells[:3] == ["1", steps[1], steps[2]] and cells[6] == "n/a" and cells[9] == f"{total}s"  # no TTT
    assert cells[7].startswith(f"{record.bpb[0]:.6f} (") and cells[8] == f"{int(cells[8].replace(',', '')):,}"
    # each seed's command sets exactly the configuration its run logged
    cmds = re.findall(r"^SEED=.*train_gpt\.py$", readme, re.M)
    assert len(cmds) == 2 and "--nproc_per_node=1 " in cmds[0] and "--nproc_per_node=2 " in cmds[1]
    for cmd, log in zip(cmds, record.logs):
        env = dict(w.split("=", 1) for w in shlex.split(cmd) if "=" in w and not w.startswith("--"))
        a = tg.Settings(env)
        logged = package.parse_settings(re.search(r"^settings: (.*)$", log, re.M)[1], [n for n, *_ in tg.SETTINGS])
        for name, value in logged.items():
            if name not in package.NOT_REPRODUCED - {"SEED"}:
                assert package.render(getattr(a, name.lower())) == value, name


def copy_run(src_dir, dst_dir, src, dst):
    for suffix in (".txt", ".submission.json", ".int6.pgz"):
        shutil.copyfile(src_dir / f"{src}{suffix}", dst_dir / f"{dst}{suffix}")
    edit_json(dst_dir / f"{dst}.submission.json", artifact=f"{dst}.int6.pgz")
    return dst_dir / dst


def edit_json(path, **changes):
    sub = json.loads(path.read_text())
    sub.update(changes)
    path.write_text(json.dumps(sub))


@pytest.fixture(scope="module")
def bad_runs(runs, tmp_path_factory):
    """Copies of run a, each broken in one way, and the error each must give."""
    d = tmp_path_factory.mktemp("bad_logs")
    copy_run(runs.logs, d, "a", "a")
    cases = {"nope": "run nope: " + re.escape(str(d / "nope.txt")) + " is missing"}
    big = copy_run(runs.logs, d, "a", "big")
    os.truncate(f"{big}.int6.pgz", 16_000_000)  # sparse: no disk used
    edit_json(Path(f"{big}.submission.json"), bytes_model=16_000_000)
    cases["big"] = r"run big: code \d+ \+ model 16000000 = \d+ bytes exceeds the 16,000,000-byte limit; fix: "
    scored = copy_run(runs.logs, d, "a", "scored")
    sub = json.loads(Path(f"{scored}.submission.json").read_text())
    sub["results"]["slot_scored"] = dict(sub["results"][sub["metric"]], legal=False)
    edit_json(Path(f"{scored}.submission.json"), metric="slot_scored", results=sub["results"])
    cases["scored"] = r"run scored: its headline \(slot_scored\) is not a legal score-first figure; fix: "
    other = copy_run(runs.logs, d, "a", "other")
    Path(f"{other}.txt").write_text(re.sub(r"sha256 [0-9a-f]{16}", "sha256 0123456789abcdef",
                                           Path(f"{other}.txt").read_text()))
    cases["other"] = r"run other: it ran another train_gpt.py \(source sha256 0123456789abcdef, here [0-9a-f]{16}\)"
    evalonly = copy_run(runs.logs, d, "a", "evalonly")
    Path(f"{evalonly}.txt").write_text(re.sub(r"^train_done: .*\n", "", Path(f"{evalonly}.txt").read_text(),
                                              flags=re.M))
    cases["evalonly"] = r"run evalonly: its log has no train_done line: an eval-only or unfinished run"
    slow = copy_run(runs.logs, d, "a", "slow")
    edit_json(Path(f"{slow}.submission.json"), eval_seconds=700.0)
    cases["slow"] = r"run slow: training took [0-9.]+s, evaluation 700.0s: over the 600s limit"
    corrupt = copy_run(runs.logs, d, "a", "corrupt")
    Path(f"{corrupt}.submission.json").write_text('{"seed": 1, "metric": "roundtrip", "results": []}')
    cases["corrupt"] = r"run corrupt: .*corrupt.submission.json is not a run's submission \(TypeError: "
    differ = copy_run(runs.logs, d, "a", "differ")
    Path(f"{differ}.txt").write_text(Path(f"{differ}.txt").read_text().replace(" EVAL_STRIDE=32 ", " EVAL_STRIDE=16 "))
    edit_json(Path(f"{differ}.submission.json"), seed=7)
    cases["differ"] = r"the runs differ in EVAL_STRIDE: a record's seeds share one configuration; fix: "
    return d, cases


def refusals(monkeypatch, tmp_path, log_dir, run_ids):
    monkeypatch.setenv("LOG_DIR", str(log_dir))
    monkeypatch.setenv("RECORDS_DIR", str(tmp_path / "records"))
    with pytest.raises(package.Refused) as e:
        package.main(["rec", *run_ids])
    assert not (tmp_path / "records").exists()  # nothing written
    return e.value.args[0]


@pytest.mark.parametrize("case", ["nope", "big", "scored", "other", "evalonly", "slow", "corrupt", "differ"])
def test_package_refuses_a_run_with_its_error_line(bad_runs, case, monkeypatch, tmp_path):
    d, cases = bad_runs
    errors = refusals(monkeypatch, tmp_path, d, ["a", case])  # the good run beside it changes nothing
    assert len(errors) == 1 and re.match(cases[case], errors[0]), errors


def test_package_refuses_every_bad_run_and_shared_seeds(bad_runs, monkeypatch, tmp_path):
    d, cases = bad_runs
    copy_run(d, d, "a", "again")
    errors = refusals(monkeypatch, tmp_path, d, ["nope", "a", "big", "scored", "again"])
    assert len(errors) == 4, errors
    for err, case in zip(errors, ["nope", "big", "scored"]):
        assert re.match(cases[case], err), err
    assert errors[3].startswith("runs a, again share SEED=1; fix:")


def test_package_cli_prints_one_error_line(bad_runs, tmp_path):
    d, _ = bad_runs
    env = {**os.environ, "LOG_DIR": str(d), "RECORDS_DIR": str(tmp_path)}
    r = subprocess.run(["bash", "run.sh", "package", "rec", "nope"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: run nope: ")
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "rec").exists()
    r = subprocess.run(["bash", "run.sh", "package", "rec"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: usage: run.sh package NAME RUN_ID...")


def test_package_tests_caseops_runs_on_the_sidecar_bytes(runs, monkeypatch, tmp_path):
    """1.06108 was counted on CaseOps sidecar bytes: runs scored with sidecars are tested on the same bytes (the
    margin too, by their own ratio), the README says which; a mix is refused; a run of an older script (no artifact
    field) still finds <RUN_ID>.int6.pgz."""
    d = tmp_path / "logs"
    d.mkdir()
    side = {}
    for r, ratio in (("a", 1.25), ("c", 1.3)):
        sub = json.loads(copy_run(runs.logs, d, r, r).with_suffix(".submission.json").read_text())
        sub["results"][sub["metric"]]["val_bpb_on_sidecar_bytes"] = side[r] = sub["val_bpb"] * ratio
        del sub["artifact"]
        (d / f"{r}.submission.json").write_text(json.dumps(dict(sub, sidecar_bytes_ratio=ratio)))
    loss = [json.loads((d / f"{r}.submission.json").read_text())["val_loss"] for r in ("a", "c")]
    monkeypatch.setenv("LOG_DIR", str(d))
    monkeypatch.setenv("RECORDS_DIR", str(tmp_path / "ok"))
    package.main(["caseops", "a", "c"])
    out = tmp_path / "ok" / "caseops"
    sig = json.loads((out / "submission.json").read_text())["significance"]
    margin = 0.005 * (side["a"] / loss[0] + side["c"] / loss[1]) / 2
    t = (1.06108 - margin - (side["a"] + side["c"]) / 2) / (statistics.stdev(side.values()) / math.sqrt(2))
    assert sig["denominator"] == "CaseOps sidecar bytes" and sig["margin_bpb"] == pytest.approx(margin, rel=1e-12)
    assert sig["t"] == pytest.approx(t, rel=1e-9)
    assert "on CaseOps sidecar bytes (the headlines' figures on the same bytes)" in (out / "README.md").read_text()
    copy_run(runs.logs, d, "a", "plain")
    edit_json(d / "plain.submission.json", seed=3)
    errors = refusals(monkeypatch, tmp_path, d, ["a", "plain"])
    assert errors == ["some runs were scored with val byte sidecars and some without; fix: package runs of one "
                      "tokenisation"]
