"""The project around train_gpt.py: the README's settings table, its commands, CI, and the speed bench at toy size."""
import os
import re
import subprocess
import sys

import train_gpt as tg


def readme(repo):
    return (repo / "README.md").read_text()


def test_readme_lists_every_setting_with_its_default(repo):
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (.+?) \|", readme(repo), flags=re.M))
    for name, default, _, _ in tg.SETTINGS:
        assert name in rows, f"{name} missing from the README settings table"
        shown = ",".join(map(str, default)) if isinstance(default, list) else int(default) if isinstance(
            default, bool) else default
        assert rows[name] == (f"`{shown}`" if shown != "" else "(empty)"), f"{name}: README says {rows[name]}"
    assert set(rows) == {n for n, *_ in tg.SETTINGS}, "README lists settings the script does not have"


def test_readme_quickstart_and_ci_use_the_same_test_command(repo):
    quick = readme(repo).split("## Quickstart")[1].split("##")[0]
    commands = re.findall(r"^(bash run\.sh \w+)", quick, flags=re.M)
    assert commands == ["bash run.sh smoke", "bash run.sh test"]
    assert "bash run.sh test" in (repo / ".ci" / "run").read_text()


def test_bench_runs_at_toy_size_and_ends_with_its_table(repo):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "bench/bench.py"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-3].startswith("| ms/step | tokens/s/GPU | MFLOP/token | MFU |")
    values = [float(v.strip().rstrip("%").replace(",", "")) for v in lines[-1].strip("|").split("|")]
    assert len(values) == 6 and all(v > 0 for v in values), lines[-1]
    ms_step, tok_s = values[0], values[1]
    assert abs(tok_s - 4096 / ms_step * 1000) / tok_s < 0.01  # tokens/s is the toy batch over ms/step
