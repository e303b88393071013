"""bench/bench.py: its table at toy size, and its ablations. Each ablation swaps a speed change for the code it
replaced; those replacements must compute the same thing, or the ablation's timing compares different maths."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402

ABLATE = "compile,gqa-copies,muon-per-matrix,ema-loop,sync-every-step,eval-batch-8"


def run_bench(repo, *args):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "bench/bench.py", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def ablation_run(repo):
    r = run_bench(repo, "--ablate", ABLATE)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_bench_ends_with_its_table(ablation_run):
    lines = ablation_run
    assert lines[-3].startswith("| ms/step | tokens/s/GPU | MFLOP/token | MFU |")
    values = [float(v.rstrip("%").replace(",", "")) for v in cells(lines[-1])]
    assert len(values) == 6 and all(v > 0 for v in values), lines[-1]
    ms_step, tok_s = values[0], values[1]
    assert abs(tok_s - 4096 / ms_step * 1000) / tok_s < 0.01  # tokens/s is the toy batch over ms/step
    assert any(line.startswith("code: train_gpt.py sha256 ") for line in lines)


def test_ablation_rows(ablation_run):
    names = ABLATE.split(",")
    rows = {cells(line)[0]: cells(line) for line in ablation_run if line.startswith("| ") and cells(line)[0] in names}
    assert list(rows) == names
    assert rows["compile"][2] == "n/a on CPU (CUDA only)"
    for name in ("gqa-copies", "muon-per-matrix", "ema-loop", "sync-every-step"):
        ms, gain = float(rows[name][2]), float(rows[name][3].rstrip("x"))
        assert ms > 0 and gain > 0
    # same maths: the same seed-0 training ends on the same weights (attention only to float rounding)
    assert float(rows["muon-per-matrix"][8]) <= 1e-5
    assert float(rows["ema-loop"][8]) == 0.0 and float(rows["sync-every-step"][8]) == 0.0
    assert float(rows["gqa-copies"][8]) <= 1e-3
    assert rows["eval-batch-8"][2] == "-" and float(rows["eval-batch-8"][4].replace(",", "")) > 0
    noise = [line for line in ablation_run if line.startswith("current code measured first and last:")]
    assert len(noise) == 1 and "their weights differ by 0.00e+00," in noise[0]  # eager CPU training repeats exactly


def test_readme_lists_every_ablation(repo):
    section = (repo / "docs" / "benchmarks.md").read_text()
    listed = re.findall(r"^\| `([a-z0-9-]+|eval-batch-N)` \|", section, flags=re.M)
    assert listed == [*bench.VARIANTS, "all-off", "eval-batch-N"]
    for name, (what, cuda_only, _, _) in bench.VARIANTS.items():
        assert ("(CUDA only)" in section.split(f"| `{name}` |")[1].split("\n")[0]) == cuda_only, name


def test_unknown_ablation_fails_before_any_work(repo):
    r = run_bench(repo, "--ablate", "gqa-copies,fused-everything")
    assert r.returncode != 0
    assert "error: --ablate: unknown change 'fused-everything'; fix: choose from all, all-off, eval-batch-N" in r.stderr
    assert "ablation gqa-copies: done" not in r.stdout
    r = run_bench(repo, "--ablate", "eval-batch-0")
    assert r.returncode != 0
    assert r.stderr.strip() == "error: --ablate: EVAL_BATCH=0: must be > 0; fix: set EVAL_BATCH to a value > 0"


@pytest.mark.parametrize("H,KV", [(8, 4), (8, 2), (4, 4)])
def test_gqa_with_copies_equals_causal_attention(H, KV):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, H, 8), torch.randn(2, 16, KV, 8), torch.randn(2, 16, KV, 8)
    torch.testing.assert_close(bench.gqa_with_copies(q, k, v), tg.causal_attention(q, k, v), rtol=1e-5, atol=1e-6)
    # and the grouping is the one that matters: head h reads KV head h // (H / KV)
    y = bench.gqa_with_copies(q, k, v)
    h = H - 1
    j = h // (H // KV)
    one = [t.transpose(1, 2) for t in (q[:, :, h:h + 1], k[:, :, j:j + 1], v[:, :, j:j + 1])]
    ref = torch.nn.functional.scaled_dot_product_attention(*one, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(y[:, :, h:h + 1], ref, rtol=1e-5, atol=1e-6)


def test_muon_per_matrix_equals_banked_muon():
    torch.manual_seed(0)
    shapes = [(96, 32), (96, 32), (32, 96), (64, 64)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    banked = tg.Muon(a, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
    single = bench.MuonPerMatrix(b, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        banked.step()
        single.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decay", [0.9, None])
def test_ema_loop_equals_foreach(decay):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4).bfloat16())]
    fast, slow = tg.WeightAverage(ps, decay), tg.WeightAverage(ps, decay)
    for _ in range(4):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn_like(p))
        fast.update()
        bench.ema_update_loop(slow)
    assert fast.count == slow.count == 4
    for x, y in zip(fast.avg, slow.avg):
        assert torch.equal(x, y)


def test_blocking_loader_gives_the_same_batches(tmp_path):
    tokens = np.arange(5000) % 1000
    bench.write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    files = tg.find_shards(tmp_path, "train")
    for rank in (0, 1):
        fast = tg.TrainLoader(files, rank, 2, torch.device("cpu"), 1024)
        slow = tg.TrainLoader(files, rank, 2, torch.device("cpu"), 1024)
        for _ in range(3):
            for x, y in zip(fast.next_batch(256, 64)[:2], bench.next_batch_blocking(slow, 256, 64)[:2]):
                assert torch.equal(x, y)
