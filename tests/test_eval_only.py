"""Eval-only runs and SLOT sweeps from a saved artifact (no training), through the script as users run it."""
import json
import re

import pytest


@pytest.fixture(scope="module")
def trained(toy_env, run_script):
    r = run_script({**toy_env, "RUN_ID": "base", "SLOT_ENABLED": "0", "SLIDING_ENABLED": "0", "CODECS": "rans,lzma-9"})
    assert r.returncode == 0, r.stderr[-2000:]
    tried = [x.split()[0] for x in r.stdout.splitlines() if x.startswith("codec:") and " bytes:" in x]
    assert tried == ["codec:lzma-9", "codec:rans"], tried  # CODECS: only those compete
    return r


def line(text, prefix):
    found = [x for x in text.splitlines() if x.startswith(prefix)]
    assert len(found) == 1, f"expected one {prefix!r} line in:\n{text[-3000:]}"
    return found[0]


def test_eval_only_reproduces_the_round_trip_and_runs_causal_slot(trained, toy_env, run_script):
    artifact = trained.log_dir / "base.int6.pgz"
    r = run_script({**toy_env, "EVAL_ONLY": "1", "ARTIFACT": str(artifact), "RUN_ID": "ev", "SLOT_MODE": "causal",
                    "MLP_MULT": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step:" not in r.stdout and "model_params" not in r.stdout  # nothing trained
    assert "warning: MLP_MULT is set but ignored: the artifact's model has MLP_MULT=3" in r.stdout
    # the same artifact and data give the very same round-trip numbers as the training run printed
    assert line(r.stdout, "final_int6_roundtrip_exact").split(" eval_time")[0] == \
        line(trained.stdout, "final_int6_roundtrip_exact").split(" eval_time")[0]
    assert re.search(r"^final_slot_exact mode:causal delta:window steps:2 val_loss:\S+ val_bpb:\S+ eval_time:",
                     r.stdout, flags=re.M)
    assert (r.log_dir / "ev.submission.json").is_file()
    # eval_total covers every eval (and the reading, decompression, model build and compiles around them)
    total = float(re.search(r"^eval_total: ([0-9.]+)s of the 600 s evaluation budget", r.stdout, flags=re.M)[1])
    # the round trip, then one hidden pass shared by sliding and SLOT: charged once (to sliding), so the evals' own
    # figures add up to no more than eval_total (each printed to 0.1 s: 0.05 s of rounding a figure)
    evals = [float(x) for x in re.findall(r"^final_\S+ .*eval_time:([0-9.]+)s", r.stdout, flags=re.M)]
    assert len(evals) == 3 and sum(evals) <= total + 0.05 * len(evals)
    passes = [float(x) for x in re.findall(r"^eval_pass: .* seconds:([0-9.]+)", r.stdout, flags=re.M)]
    assert len(passes) == 1 and sum(evals[1:]) <= passes[0] + 0.1  # sliding's and SLOT's spans lie inside the pass
    assert json.loads((r.log_dir / "ev.submission.json").read_text())["eval_seconds"] == total  # one rounding


def test_sweep_prints_one_row_per_grid_point_and_zero_steps_equals_plain(trained, toy_env, run_script):
    artifact = trained.log_dir / "base.int6.pgz"
    r = run_script({**toy_env, "EVAL_ONLY": "1", "ARTIFACT": str(artifact), "RUN_ID": "sw",
                    "SWEEP_SLOT_MODE": "scored,causal", "SWEEP_SLOT_STEPS": "0,3", "SWEEP_EVAL_STRIDE": "32,64"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [x[len("sweep_row "):] for x in r.stdout.splitlines() if x.startswith("sweep_row ")]
    assert len(rows) == 2 * (1 + 2 * 2)  # per stride: the plain baseline and 2 modes x 2 step counts
    table = r.stdout.split("sweep table:\n", 1)[1].splitlines()
    assert table[0].startswith("| mode | delta | steps | lr | lr_min | stride | val_loss | val_bpb | seconds |")
    assert table[2:2 + len(rows)] == rows
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    for stride in ("32", "64"):
        at = {(c[0], c[2]): c[7] for c in cells if c[5] == stride}
        assert at[("scored", "0")] == at[("plain", "0")] == at[("causal", "0")]  # no steps: no change
        assert float(at[("scored", "3")]) < float(at[("plain", "0")])  # fitting the scored targets helps
    assert "final_slot_exact" not in r.stdout  # the sweep replaces the single SLOT eval
