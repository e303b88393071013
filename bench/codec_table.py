"""Codec sizes against the order-0 entropy bound, for a saved artifact (default: the smoke run's) and for a
record-sized model (26,993,756 parameters) with random weights, quantised by the same GPTQ code.

    python bench/codec_table.py [ARTIFACT]
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def table(title, tensors):
    entries, raw = tg.pack_raw(tensors)
    lens = tg.int_lens(entries)
    bound = tg.entropy_bound_bytes(np.frombuffer(raw[:sum(lens)], np.int8), lens)
    print(f"\n{title}: {sum(lens):,} int6/int8 symbols, order-0 entropy bound {bound:,.0f} bytes, "
          f"{len(raw) - sum(lens):,} bytes of fp16/fp32 tensors")
    print("| codec | bytes | symbols part | symbols / bound | seconds |")
    print("|---|---|---|---|---|")
    sizes = {}
    for name, codec in tg.codecs().items():
        if name == "none" or isinstance(codec, str):
            continue
        t = time.perf_counter()
        blob = codec[0](raw, entries)
        assert codec[1](blob, entries) == raw, f"{name} does not round-trip"
        sym = tg.struct.unpack_from("<Q", blob)[0] if name == "rans" else None
        sizes[name] = len(blob)
        print(f"| {name} | {len(blob):,} | {f'{sym:,}' if sym else '-'} | {f'{sym / bound:.4f}' if sym else '-'} | "
              f"{time.perf_counter() - t:.1f} |")
    best = min(sizes, key=sizes.get)
    print(f"best: {best} {sizes[best]:,} bytes; best / bound = {sizes[best] / bound:.4f} (whole payload incl. "
          "fp16/fp32 tensors over the symbols' bound)")


def record_sized():
    """Record architecture; every matrix drawn like a trained one (normal, std 1/sqrt(fan_in)), GPTQ with the
    Hessian of random correlated inputs."""
    torch.manual_seed(0)
    a = tg.Settings({})
    model = tg.GPT(a.arch())
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    hessians = {}
    for name, t in state.items():
        if tg.quant_kind(name, t) == "int6":
            n = t.shape[1]
            x = torch.randn(4 * n, n) @ (torch.eye(n) + 0.3 * torch.randn(n, n) / n ** 0.5)
            hessians[name] = x.T @ x
    t = time.perf_counter()
    tensors, _ = tg.quantize_state(state, hessians, a.gptq_block, a.gptq_damp)
    print(f"record-sized model: {sum(v.numel() for v in state.values()):,} parameters, GPTQ {time.perf_counter() - t:.0f}s")
    return tensors


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "logs/smoke.int6.pgz"
    if Path(path).is_file():
        header, arrays = tg.read_artifact(path)
        kinds = {e["key"]: e["kind"] for e in header["entries"]}
        table(f"artifact {path}", [(k, kinds[k], v) for k, v in arrays.items()])
    else:
        print(f"{path} not found (run `bash run.sh smoke` first); skipping it")
    table("record-sized model", record_sized())


if __name__ == "__main__":
    main()
