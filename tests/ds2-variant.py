#!/usr/bin/python3
"""ds2-variant.py SRC.gguf OUT.gguf GGUF_PY_DIR [options]: another deepseek2
model from llama.cpp's test-llama-archs one (1 head, q_lora, attn_k_b /
attn_v_b, plain RoPE, one MoE layer), for the MLA paths that model leaves
out. llama.cpp loads the result and is the oracle of its logits.

  --heads H     H attention heads (new random q_b / q, k_b, v_b, kv_b, output)
  --kv-b        the legacy form: attn_kv_b [n_head*(nope+v), kv_lora], no
                key_length_mla (key_length / value_length the per-head dims)
  --lite        no q LoRA: q_lora_rank 0, attn_q instead of q_a / q_a_norm / q_b
  --yarn F M    rope.scaling.type yarn, factor F, yarn_log_multiplier M
  --moe-layer   a second MoE layer (a copy of the first) whose exp_probs_b
                is the first's negated: each layer must route with its own
New tensors are N(0, 0.01) as the fixture's; tests/attn-boost.py then makes
the attention matter."""
import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("gguf_py")
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--kv-b", action="store_true")
    ap.add_argument("--lite", action="store_true")
    ap.add_argument("--yarn", nargs=2, type=float)
    ap.add_argument("--moe-layer", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, a.gguf_py)
    import gguf

    r = gguf.GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    if arch != "deepseek2":
        sys.exit(f"ds2-variant: {a.src} is {arch}, not deepseek2")

    def kv(name):
        f = r.fields.get(f"{arch}.{name}")
        return f.contents() if f else None

    H = a.heads or kv("attention.head_count")
    kmla, vmla = kv("attention.key_length_mla"), kv("attention.value_length_mla")
    if not kmla:
        sys.exit("ds2-variant: the source has no key_length_mla")
    rot, r_kv, r_q = kv("rope.dimension_count"), kv("attention.kv_lora_rank"), kv("attention.q_lora_rank")
    nope, n_embd, nl = kmla - rot, kv("embedding_length"), kv("block_count")
    rng = np.random.default_rng(7)

    def rnd(*shape):
        return rng.normal(0.0, 0.01, size=shape).astype(np.float32)

    # the MLA cache is one K head (MQA); the legacy form decompresses to H
    over = {f"{arch}.attention.head_count": H, f"{arch}.attention.head_count_kv": H if a.kv_b else 1}
    drop = set()
    if a.kv_b:
        drop |= {f"{arch}.attention.key_length_mla", f"{arch}.attention.value_length_mla"}
        over[f"{arch}.attention.key_length"] = kmla
        over[f"{arch}.attention.value_length"] = vmla
    if a.lite:
        over[f"{arch}.attention.q_lora_rank"] = 0
    if a.yarn:
        over[f"{arch}.rope.scaling.type"] = "yarn"
        over[f"{arch}.rope.scaling.factor"] = a.yarn[0]
        over[f"{arch}.rope.scaling.yarn_log_multiplier"] = a.yarn[1]
    if a.moe_layer:
        over[f"{arch}.block_count"] = nl + 1

    w = gguf.GGUFWriter(a.out, arch)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name in drop:
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        val = over.pop(f.name, f.contents())
        if val is None or (isinstance(val, list) and not val):
            continue  # empty arrays: gguf-py writes none (llama.cpp reads them as absent)
        if isinstance(val, str):
            vt = gguf.GGUFValueType.STRING
        w.add_key_value(f.name, val, vt, sub_type=sub)
    for k, v in over.items():
        w.add_key_value(k, v, gguf.GGUFValueType.UINT32 if isinstance(v, int) else gguf.GGUFValueType.FLOAT32)

    out = []  # (name, array)
    for t in r.tensors:
        name, d = t.name, np.array(t.data)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            sys.exit(f"ds2-variant: {name} is not F32")
        tail = name.split(".", 2)[-1] if name.startswith("blk.") else None
        blk = name.split(".")[1] if tail else None
        pre = f"blk.{blk}." if tail else ""
        if tail in ("attn_q_a.weight", "attn_q_a_norm.weight") and a.lite:
            continue
        if tail == "attn_q_b.weight":
            out.append((pre + ("attn_q.weight" if a.lite else tail),
                        rnd(H * kmla, n_embd if a.lite else r_q)))
            continue
        if tail == "attn_k_b.weight":
            if a.kv_b:
                out.append((pre + "attn_kv_b.weight", rnd(H * (nope + vmla), r_kv)))
            else:
                out.append((name, rnd(H, r_kv, nope)))
            continue
        if tail == "attn_v_b.weight":
            if not a.kv_b:
                out.append((name, rnd(H, vmla, r_kv)))
            continue
        if tail == "attn_output.weight":
            out.append((name, rnd(n_embd, H * vmla)))
            continue
        out.append((name, d))
    if a.moe_layer:
        last = f"blk.{nl - 1}."
        for name, d in list(out):
            if name.startswith(last):
                d = -d if name.endswith("exp_probs_b.bias") else d
                out.append((f"blk.{nl}." + name[len(last):], d))
    for name, d in out:
        w.add_tensor(name, np.ascontiguousarray(d, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
