"""Shared fixtures for the train_gpt.py tests.

Names other test files rely on: `repo`, `corpus`, `run_script`, `TOY` (fixtures; `run_script` and `TOY` are also
plain module attributes: `from conftest import run_script, TOY`). Extras: `toy_env` (TOY plus the embedded corpus
paths), `official_tokenizer` (skips when the official model is absent), `tg` (the imported train_gpt module).
"""

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import MappingProxyType

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb_1024_bpe.model"
CORPUS_TRAIN_TOKENS = 200_000

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A tiny model of the record architecture (11 layers, GQA, partial RoPE, bigram, value embedding, U-Net skips):
# every phase (train, GPTQ export, round trip, sliding, SLOT) runs in seconds on a CPU.
TOY = {
    "NUM_LAYERS": "11", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
    "BIGRAM_VOCAB_SIZE": "512", "BIGRAM_DIM": "32", "VE_DIM": "32",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1", "ITERATIONS": "4",
    "WARMUP_STEPS": "1", "WARMDOWN_ITERS": "2", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
    "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "VAL_TOKENS": "4096", "SLOT_STEPS": "2", "GPTQ_CALIB_BATCHES": "2",
}


def run_script(env, args=(), timeout=300, launcher=()):
    """Runs `python [launcher...] train_gpt.py [args...]` from the repo root with a minimal clean environment:
    PATH and HOME, no PYTHONPATH, plus `env` (values str()-ed). LOG_DIR defaults to a fresh temp folder.
    Returns the CompletedProcess (text mode) with `.log_dir` (Path) and `.env` (the full env) attached.

    OMP_WAIT_POLICY=PASSIVE (overridable through `env`): train_gpt.py sets torch to cpu_count // local world
    threads, and with spinning OpenMP workers a toy run on a 2-core machine that has any other load gets 10-40x
    slower (a 0.1 s forward/backward took 12 s); passive waiting changes no result, only the waiting."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "OMP_WAIT_POLICY": "PASSIVE"}
    full.update({k: str(v) for k, v in env.items()})
    if "LOG_DIR" not in full:
        full["LOG_DIR"] = tempfile.mkdtemp(prefix="train_gpt_logs_")
    cmd = [sys.executable, *map(str, launcher), "train_gpt.py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    proc.log_dir = Path(full["LOG_DIR"])
    proc.env = full
    return proc


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def tg():
    return importlib.import_module("train_gpt")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Builds the embedded corpus once per session; returns (data_path, tokenizer_path)."""
    out = tmp_path_factory.mktemp("corpus")
    result = subprocess.run([sys.executable, str(REPO / "data" / "build_corpus.py"), "--out", str(out),
                             "--train-tokens", str(CORPUS_TRAIN_TOKENS)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data_path = out / "datasets" / "embedded_sp1024"
    tokenizer_path = out / "tokenizers" / "embedded_1024_bpe.model"
    assert tokenizer_path.is_file() and (data_path / "fineweb_val_000000.bin").is_file()
    return data_path, tokenizer_path


@pytest.fixture(name="TOY", scope="session")
def toy_fixture():
    """Read-only view of TOY; build run envs as {**TOY, ...}."""
    return MappingProxyType(dict(TOY))


@pytest.fixture(scope="session")
def toy_env(corpus):
    """Read-only TOY plus DATA_PATH / TOKENIZER_PATH of the embedded corpus; build run envs as {**toy_env, ...}."""
    return MappingProxyType({**TOY, "DATA_PATH": str(corpus[0]), "TOKENIZER_PATH": str(corpus[1])})


@pytest.fixture(name="run_script", scope="session")
def run_script_fixture(tmp_path_factory):
    """run_script with LOG_DIR defaulting to a pytest-managed temp folder."""
    def run(env, args=(), timeout=300, launcher=()):
        env = dict(env)
        env.setdefault("LOG_DIR", str(tmp_path_factory.mktemp("logs")))
        return run_script(env, args, timeout, launcher)
    return run


@pytest.fixture(scope="session")
def official_tokenizer():
    if not OFFICIAL_TOKENIZER.is_file():
        pytest.skip(f"official tokenizer not found at {OFFICIAL_TOKENIZER}")
    return OFFICIAL_TOKENIZER


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """In-process tensors in the tests are small: one thread is as fast, and immune to other load on 2 cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _train_switches_restored():
    """train() flips the module's QAT and LOOPING switches; a test that stops it midway must not leak them."""
    yield
    tg = sys.modules.get("train_gpt")
    if tg is not None:
        tg.QAT, tg.LOOPING = False, True
