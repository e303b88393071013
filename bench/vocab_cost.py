"""What a larger vocabulary costs at the record width: parameters by train_gpt.param_count, and artifact bytes of
the vocabulary-sized tensors (the tied embedding V x MODEL_DIM and the value-embedding table V x VE_DIM) through the
export's own quantisation (int8 rows + fp16 scales) and codecs. The tables are random at their init scale (normal,
std TIED_EMBED_INIT_STD and 0.01): trained tables compress differently, so the bytes are an estimate of the order,
not a trained model's figure.

    python bench/vocab_cost.py [--vocabs 1024,4096,8192]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def table_bytes(tensors):
    """{codec: compressed bytes} of the quantised tensors, each codec checked to round-trip."""
    entries, raw = tg.pack_raw(tensors)
    out = {}
    for name, codec in tg.codecs().items():
        if isinstance(codec, str) or name == "none":
            continue
        blob = codec[0](raw, entries)
        assert codec[1](blob, entries) == raw, name
        out[name] = len(blob)
    return out, len(raw)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", default="1024,4096,8192")
    args = p.parse_args()
    base = tg.Settings({})
    torch.manual_seed(0)
    rows, ref = [], None
    for ve in (True, False):
        for V in [int(v) for v in args.vocabs.split(",")]:
            c = dict(base.arch(), VOCAB_SIZE=V, VE_ENABLED=ve)
            tensors = []
            for name, dim, std in [("tok_emb.weight", c["MODEL_DIM"], c["TIED_EMBED_INIT_STD"]),
                                   ("ve.embed.weight", c["VE_DIM"], 0.01)][:1 + ve]:
                w = torch.randn(V, dim) * std
                assert tg.quant_kind(name, w) == "int8"
                q, s = tg.quantize_rows(w, 127)
                tensors += [(name + "#q", "int8", q.numpy()), (name + "#scale", "fp16", s.numpy())]
            sizes, raw = table_bytes(tensors)
            best = min(sizes, key=sizes.get)
            n = tg.param_count(c)
            ref = ref if ref and ref[2] == ve else (n, sizes[best], ve)
            rows.append(f"| {V:,} | {'on' if ve else 'off'} | {n:,} | {n - ref[0]:+,} | {raw:,} | "
                        + " | ".join(f"{sizes[k]:,}" for k in sorted(sizes))
                        + f" | {best} | {sizes[best] - ref[1]:+,} |")
            codecs = sorted(sizes)
    print(f"record width: MODEL_DIM {base.model_dim}, VE_DIM {base.ve_dim}, tied embeddings; the vocabulary-sized "
          f"tables random at init scale (std {base.tied_embed_init_std}; value embedding 0.01), int8 rows + fp16 "
          "scales; bytes of those tables only\n")
    print("| VOCAB_SIZE | value embedding | parameters (model) | vs first | raw bytes | " + " | ".join(codecs)
          + " | best | best vs first |")
    print("|---" * (7 + len(codecs)) + "|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
