"""`bash run.sh record`'s preflight: a toy-size run of every phase that must pass before the real run starts."""
import os
import re
import subprocess

import numpy as np

import train_gpt as tg
from conftest import REPO


def record(tmp_path, **env):
    """Runs `bash run.sh record 7` with a clean environment plus env; returns (CompletedProcess, LOG_DIR)."""
    log_dir = tmp_path / "logs"
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "LOG_DIR": str(log_dir), **env}
    proc = subprocess.run(["bash", "run.sh", "record", "7"], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)
    return proc, log_dir


def test_preflight_failure_stops_before_the_real_run(tmp_path, corpus):
    (tmp_path / "no_shards").mkdir()
    proc, log_dir = record(tmp_path, DATA_PATH=str(tmp_path / "no_shards"), TOKENIZER_PATH=str(corpus[1]))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    out = log_dir / "preflight" / "record_seed7_preflight.out"
    assert len(errors) == 1 and proc.stderr.strip() == errors[0], proc.stderr
    assert errors[0].startswith("error: preflight failed, the real run was not started: DATA_PATH=")
    assert "fix:" in errors[0] and str(out) in errors[0] and "PREFLIGHT=0" in errors[0]
    assert "no_shards" in out.read_text()  # the preflight's own output holds train_gpt.py's error
    assert sorted(p.name for p in log_dir.iterdir()) == ["preflight"]  # no real-run log, weights or artifact
    assert "run_id:record_seed7 " not in proc.stdout


def test_preflight_0_skips_it_and_a_bad_value_is_one_error_line(tmp_path, corpus):
    proc, log_dir = record(tmp_path, PREFLIGHT="yes")
    assert proc.returncode == 2 and not log_dir.exists()
    assert proc.stderr.strip() == ("error: PREFLIGHT=yes is not 0, 1 or full; fix: unset it (toy-size preflight), "
                                   "PREFLIGHT=full (full size, memory per phase) or PREFLIGHT=0 to skip")
    (tmp_path / "no_shards").mkdir()
    proc, log_dir = record(tmp_path, PREFLIGHT="0", DATA_PATH=str(tmp_path / "no_shards"),
                           TOKENIZER_PATH=str(corpus[1]))
    assert proc.returncode == 2 and "preflight:" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: DATA_PATH=") and len(proc.stderr.strip().splitlines()) == 1
    assert (log_dir / "record_seed7.txt").is_file() and not (log_dir / "preflight").exists()


def test_gpu_box_whose_gpus_torch_cannot_see_is_refused(tmp_path, corpus):
    """nvidia-smi lists GPUs but torch (here a CPU build) sees none: `record` refuses with one error line instead of
    training the record config on the CPU; with PREFLIGHT=0 too, and no run starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
                                        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    for extra in ({}, {"PREFLIGHT": "0"}):
        proc, log_dir = record(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", DATA_PATH=str(corpus[0]),
                               TOKENIZER_PATH=str(corpus[1]), **extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: nvidia-smi lists 2 GPU(s) but torch ") and "fix:" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not log_dir.exists(), proc.stderr


def test_a_torch_built_for_a_newer_cuda_than_the_driver_is_refused_and_never_replaced(tmp_path):
    """nvidia-smi's banner says the driver supports CUDA 12.4; the installed torch (a stand-in module) is built for
    12.8: `record` stops with one error line naming both, before any run or pip, and changes no package."""
    bin_dir, fake = tmp_path / "bin", tmp_path / "site" / "torch"
    bin_dir.mkdir()
    fake.mkdir(parents=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nif [ \"$1\" = -L ]; then echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'; "
                                        "else echo '| NVIDIA-SMI 550.54   Driver Version: 550.54   CUDA Version: 12.4 "
                                        "|'; fi\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    (bin_dir / "pip").write_text("#!/bin/sh\necho pip was called >&2; exit 9\n")
    (bin_dir / "pip").chmod(0o755)
    (fake / "__init__.py").write_text("import types\n__version__ = '2.11.0+cu128'\nversion = types.SimpleNamespace("
                                      "cuda='12.8')\n")
    proc, log_dir = record(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(tmp_path / "site"))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: torch 2.11.0+cu128 is built for CUDA 12.8 but this driver "
                                               "supports CUDA 12.4 at most") and "fix:" in err[0], proc.stderr
    assert "never replaces an installed torch" in err[0] and "pip was called" not in proc.stderr
    assert not log_dir.exists() and "preflight:" not in proc.stdout


def test_full_preflight_prints_memory_per_phase_and_refuses_a_phase_over_the_fraction(tmp_path, corpus):
    """PREFLIGHT=full on a CPU: the real settings at toy width, 2 steps, every eval on the TTT_BATCH_SIZE longest val
    documents (in stream order, each followed by a BOS); a memory line per phase, and a phase over
    PREFLIGHT_MEMORY_FRACTION of the device refuses the run with one error line. A bad fraction: one line too."""
    log_dir = tmp_path / "logs"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "LOG_DIR": str(log_dir), "DATA_PATH": str(corpus[0]),
           "TOKENIZER_PATH": str(corpus[1]), "PREFLIGHT": "full", "WARMUP_STEPS": "1", "SLOT_ENABLED": "0",
           "CODECS": "lzma-9", "TTT_ENABLED": "1", "TTT_BATCH_SIZE": "6", "PREFLIGHT_MEMORY_FRACTION": "0.0001"}
    run = lambda **kw: subprocess.run(["bash", "run.sh", "preflight"], cwd=REPO, env={**env, **kw},
                                      capture_output=True, text=True, timeout=300)
    proc = run()
    assert proc.returncode == 2, proc.stderr
    phases = re.findall(r"^preflight: memory: (\w+) peak ([0-9.]+) GiB of ([0-9.]+) GiB \(RSS\)$", proc.stdout, re.M)
    assert [p[0] for p in phases] == ["training", "export", "eval", "TTT"], proc.stdout
    assert re.search(r"^preflight: train_done: steps:2 ", proc.stdout, re.M)
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(
        f"error: preflight failed, the real run was not started: training peaked at {phases[0][1]} of "
        f"{phases[0][2]} GiB; export peaked at ") and "over PREFLIGHT_MEMORY_FRACTION=0.0001 of the device; fix:" \
        in proc.stderr
    tokens = tg.load_shard(corpus[0] / "fineweb_val_000000.bin", 1024)
    docs = tg.documents(tokens)
    kept = np.sort(np.argsort(-docs[:, 1], kind="stable")[:6])
    log = (log_dir / "preflight" / "record_preflight.txt").read_text()
    assert f"val_loader: tokens:{docs[kept, 1].sum() + 1} " in log and " VAL_LONGEST_DOCS=6 " in log
    assert sorted(p.name for p in log_dir.iterdir()) == ["preflight"]  # the real run never started
    bad = run(PREFLIGHT_MEMORY_FRACTION="2")
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: PREFLIGHT_MEMORY_FRACTION=2 is not a fraction in "
                                                          "(0, 1]; fix: unset it (0.95) or set e.g. 0.9")


def test_running_out_of_memory_in_a_phase_is_one_error_naming_it_and_its_fix():
    lines = []
    ctx = tg.Ctx(0, 1, 0, tg.torch.device("cpu"))
    ctx.log = lines.append
    with ctx.phase("eval"):
        pass
    assert re.fullmatch(r"memory: eval peak [0-9.]+ GiB of [0-9.]+ GiB \(RSS\)", lines[0])
    for phase, fix in tg.MEMORY_FIX.items():
        try:
            with ctx.phase(phase):
                raise tg.torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except tg.ConfigError as e:
            assert re.fullmatch(rf"{phase} ran out of device memory \(peak [0-9.]+ of [0-9.]+ GiB\); fix: "
                                + re.escape(fix), str(e))
        else:
            raise AssertionError(phase)
    assert len(lines) == 1  # a phase that failed logs no peak line of its own
