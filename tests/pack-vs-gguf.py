#!/usr/bin/python3
"""pack-vs-gguf.py - checks a .moepack's expert extents against the GGUF it
was converted from, reading both independently of moetierd's code: the pack
by doc/pack-format.md's offsets (version 1 parts or version 2 per-layer
layouts), the GGUF with llama.cpp's gguf-py.

Usage: pack-vs-gguf.py PACK GGUF GGUF_PY_DIR

For every MoE layer, expert and part: the bytes equal expert e's slab of
blk.L.ffn_{gate,up,down}_exps.weight or, for gate and up stored fused,
rows [0, m) and [m, 2m) of blk.L.ffn_gate_up_exps.weight (how llama.cpp's
build_moe_ffn splits it); where the GGUF has blk.L.ffn_*_exps.scale with an
entry other than 1 for the expert, the f32 slab times that entry (llama.cpp
multiplies the product by it). After the parts, the extent is zero up to
its read size. Exit 0 when all agree, 1 otherwise.
"""
import struct
import sys

import numpy as np

ROLES = {1: "gate", 2: "up", 3: "down"}


def main():
    pack, gguf_path, gguf_py = sys.argv[1:4]
    sys.path.insert(0, gguf_py)
    from gguf import GGUFReader  # noqa: E402 (llama.cpp's, at test time)

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    af = reader.fields["general.architecture"]
    arch = bytes(af.parts[af.data[0]]).decode()
    with open(pack, "rb") as f:
        blob = f.read()
    h = blob[:4096]
    version, = struct.unpack_from("<I", h, 8)
    n, m, n_exp = struct.unpack_from("<III", h, 96)
    n_moe, first, step = struct.unpack_from("<III", h, 116)
    step = step or 1
    n_parts, = struct.unpack_from("<I", h, 340)
    extent_bytes, index_offset = struct.unpack_from("<QQ", h, 616)

    def layout(l):
        if version == 1:
            return [struct.unpack_from("<IIIIQQ", h, 352 + 32 * i) for i in range(n_parts)], None
        k = h[2936 + l]
        base = 760 + 272 * k
        np_, _, payload = struct.unpack_from("<IIQ", h, base)
        return [struct.unpack_from("<IIIIQQ", h, base + 16 + 32 * i) for i in range(np_)], payload

    checked = scaled = bad = 0
    for l in range(n_moe):
        L = first + l * step
        parts, payload = layout(l)
        used = payload if payload is not None else sum(p[5] for p in parts)
        for e in range(n_exp):
            off, length = struct.unpack_from("<QQ", blob, index_offset + 32 * (l * n_exp + e))
            ext = blob[off:off + extent_bytes]
            for role, dtype, rows, cols, poff, pbytes in parts:
                name = f"blk.{L}.ffn_{ROLES[role]}_exps.weight"
                fused = f"blk.{L}.ffn_gate_up_exps.weight"
                if name not in tensors and role in (1, 2) and fused in tensors:
                    t = tensors[fused]
                    raw = t.data.tobytes()
                    slab = len(raw) // n_exp
                    half = slab // 2
                    want = raw[e * slab + (role - 1) * half:e * slab + role * half]
                else:
                    t = tensors[name]
                    raw = t.data.tobytes()
                    slab = len(raw) // n_exp
                    want = raw[e * slab:(e + 1) * slab]
                    # llama.cpp applies expert scales in its llama and qwen3moe graphs only
                    sc = tensors.get(f"blk.{L}.ffn_{ROLES[role]}_exps.scale") if arch in ("llama", "qwen3moe") else None
                    if sc is not None:
                        s = np.float32(np.asarray(sc.data, dtype=np.float32).reshape(-1)[e])
                        if s != np.float32(1.0):
                            want = (np.frombuffer(want, dtype="<f4") * s).astype("<f4").tobytes()
                            scaled += 1
                got = ext[poff:poff + pbytes]
                checked += 1
                if got != want:
                    bad += 1
                    print(f"pack-vs-gguf: layer {l} (blk.{L}) expert {e} {ROLES[role]}: "
                          f"{len(got)} bytes differ from the GGUF's {len(want)}", file=sys.stderr)
            if any(ext[used:]):
                bad += 1
                print(f"pack-vs-gguf: layer {l} expert {e}: nonzero bytes after the parts", file=sys.stderr)
    print(f"pack-vs-gguf: {checked} expert parts equal the GGUF's ({scaled} times their .scale)"
          + ("" if not bad else f"; {bad} differ"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
