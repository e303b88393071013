"""Codec sizes and times for the quantised weights, in four layouts, against the order-0 entropy bound: for a saved
artifact (default: the smoke run's) and for a record-sized model (26,993,756 parameters) with random weights,
quantised by the same GPTQ code (--no-record: the artifact only).

Layouts: "per tensor" (format 1: each tensor's values on their own, rANS with one table per tensor), "groups"
(all layers' q together, k, v, ...; stored transposed; one rANS table per group), "groups untransposed" (the same
row by row, to measure the transposition) and "groups+order" (the embedding, q and MLP-up rows reordered by the
greedy nearest-neighbour walk, which the export keeps where it pays). Besides the export's codecs, candidates
measured on the same bytes: PPMd (pyppmd), ZPAQ level 4 and 5 in one block (zpaq), and lrzip's ZPAQ back end
(the Debian binary), each where installed. Random weights have no row structure to find: their reordering gains
nothing, and they compress differently from trained weights.

    python bench/codec_table.py [ARTIFACT] [--no-record]
"""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


LAYOUTS = ("per tensor", "groups untransposed", "groups", "groups+order")


def lrzip(args):
    def run(data, n=None):
        p = subprocess.run(["lrzip", "-q", *args], input=data, capture_output=True, check=True)
        return p.stdout
    return run


def candidates():
    """Codecs measured here only: name -> (compress(raw), decompress(blob)) or the reason it is missing."""
    out = {}
    try:
        import pyppmd
        for order in (2, 6):
            out[f"ppmd-o{order}"] = (lambda r, o=order: pyppmd.compress(r, max_order=o, mem_size=256 << 20),
                                     lambda b, n, o=order: pyppmd.Ppmd8Decoder(o, 256 << 20).decode(b, n))
    except ImportError:
        out["ppmd"] = "python package pyppmd is not installed"
    try:
        import zpaq
        for level in (4, 5):
            out[f"zpaq-{level} 1 thread"] = (lambda r, v=level: zpaq.compress(r, level=v, threads=1),
                                             lambda b, n: zpaq.decompress(b, threads=1))
    except ImportError:
        out["zpaq"] = "python package zpaq is not installed"
    if shutil.which("lrzip"):
        out["lrzip -z"] = (lrzip(["-z", "-T"]), lrzip(["-d"]))
    else:
        out["lrzip"] = "the lrzip binary is not installed (Debian package lrzip)"
    return out


def layouts(tensors):
    """name -> tensor list: format 1's (keys that match no role, no row orders), groups, groups + row orders."""
    plain = [(k, kind, a) for k, kind, a in tensors if not k.endswith("#perm")]
    t = time.perf_counter()
    perms = [x for x in tensors if x[0].endswith("#perm")] or tg.row_orders(plain, torch.device("cpu"))
    print(f"row orders ({', '.join(k for k, *_ in perms)}): {time.perf_counter() - t:.1f}s")
    layer = lambda t: int(t[0].split(".")[1]) if t[0].startswith("blocks.") else -1  # format 1: layer by layer
    return {"per tensor": [(k + "_" if kind in tg.INT_KINDS else k, kind, a)
                           for k, kind, a in sorted(plain, key=layer)],
            "groups": plain, "groups+order": plain + perms}


def measure(name, enc, dec, raw):
    t = time.perf_counter()
    blob = enc(raw)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    try:
        out = dec(blob, len(raw))
    except Exception as e:  # noqa: BLE001 -- a candidate that fails is reported, not fatal
        out = f"{type(e).__name__}: {e}"
    if out != raw:
        return f"NOT EXACT ({out if isinstance(out, str) else 'other bytes'})", t_enc, time.perf_counter() - t
    return len(blob), t_enc, time.perf_counter() - t


def untransposed(entries, raw):
    """pack_raw's bytes with each role group's matrix stored row by row instead of transposed."""
    raw = bytearray(raw)
    for es in tg.role_groups(entries).values():
        n, cols, start = sum(e["shape"][0] for e in es), es[0]["shape"][1], es[0]["offset"]
        raw[start:start + n * cols] = np.frombuffer(raw, np.int8, n * cols, start).reshape(cols, n).T.tobytes()
    return entries, bytes(raw)


def table(title, tensors, lays=LAYOUTS, extra_on=("groups+order",)):
    packed = {name: tg.pack_raw(ts) for name, ts in layouts(tensors).items() if name in lays}
    if "groups untransposed" in lays:
        packed = {k: packed[k] if k in packed else untransposed(*packed["groups"]) for k in lays}
    entries, raw = packed["groups+order"]
    lens = tg.int_lens(entries)
    bounds = {}
    for name, (e, r) in packed.items():
        n = sum(tg.int_lens(e))
        bounds[name] = tg.entropy_bound_bytes(np.frombuffer(r[:n], np.int8), tg.int_lens(e))
    print(f"\n{title}: {sum(lens):,} int symbols, {len(raw) - sum(lens):,} bytes of fp16/fp32/uint16 tensors; order-0 "
          f"bound of the symbols: {', '.join(f'{k} {v:,.0f}' for k, v in bounds.items())} bytes")
    print(f"| codec | {' | '.join(f'{k} bytes' for k in packed)} | seconds (compress / decompress, "
          f"{' ; '.join(packed)}) |")
    print("|---|" + "---|" * (len(packed) + 1))
    sizes = {}
    rows = [(n, c, True) for n, c in tg.codecs().items() if n != "none"] + [(n, c, False)
                                                                           for n, c in candidates().items()]
    for name, codec, ours in rows:
        if isinstance(codec, str):
            print(f"| {name} | skipped: {codec} |")
            continue
        cells, secs = [], []
        for lay, (e, r) in packed.items():
            if not ours and lay not in extra_on:
                cells.append("-")
                continue
            n, te, td = measure(name, (lambda x: codec[0](x, e)) if ours else codec[0],
                                (lambda b, n: codec[1](b, e)) if ours else codec[1], r)
            if isinstance(n, int):
                sizes[(name, lay)] = n
            cells.append(f"{n:,}" if isinstance(n, int) else n)
            secs.append(f"{te:.1f} / {td:.1f}")
        print(f"| {name}{'' if ours else ' (candidate)'} | {' | '.join(cells)} | {' ; '.join(secs)} |", flush=True)
    (bn, bl) = min(sizes, key=sizes.get)
    print(f"best: {bn} on {bl}, {sizes[(bn, bl)]:,} bytes = {sizes[(bn, bl)] / bounds[bl]:.4f} x the order-0 bound "
          "of its symbols (the payload includes the fp16/fp32 tensors)")


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
        if name.startswith("blocks.") and tg.quant_kind(name, t, a.arch()) in tg.INT_KINDS:
            n = t.shape[1]
            x = torch.randn(4 * n, n) @ (torch.eye(n) + 0.3 * torch.randn(n, n) / n ** 0.5)
            hessians[name] = x.T @ x
    t = time.perf_counter()
    tensors, _ = tg.quantize_state(state, hessians, a)
    print(f"record-sized model: {sum(v.numel() for v in state.values()):,} parameters, GPTQ "
          f"{time.perf_counter() - t:.0f}s")
    return tensors


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    args = [x for x in sys.argv[1:] if x != "--no-record"]
    path = args[0] if args else "logs/smoke.int6.pgz"
    if Path(path).is_file():
        header, arrays = tg.read_artifact(path)
        kinds = {e["key"]: e["kind"] for e in header["entries"]}
        table(f"artifact {path}", [(k, kinds[k], v) for k, v in arrays.items()], extra_on=LAYOUTS)
    else:
        print(f"{path} not found (run `bash run.sh smoke` first); skipping it")
    if "--no-record" not in sys.argv:
        table("record-sized model", record_sized(), lays=("per tensor", "groups+order"))


if __name__ == "__main__":
    main()
