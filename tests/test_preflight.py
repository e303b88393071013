"""`bash run.sh record`'s preflight: a toy-size run of every phase that must pass before the real run starts."""
import os
import subprocess

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
    assert proc.stderr.strip() == ("error: PREFLIGHT=yes is not 0 or 1; fix: unset it (preflight on) or set "
                                   "PREFLIGHT=0 to skip")
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
