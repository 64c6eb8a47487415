#!/usr/bin/python3
"""attn-boost.py SRC.gguf OUT.gguf GGUF_PY_DIR: a copy of one of llama.cpp's
test-llama-archs models whose attention (deepseek2, llama) and routed
experts (every family) matter.

Their random weights (all N(0, 0.01)) leave the attention scores near 0,
so the softmax is uniform and the attention adds ~1e-2 of the logits: a
wrong RoPE (deepseek2's q_pe, llama's rope_freqs) or a wrong kq_scale
would still pass; and the routed experts' outputs are ~1e-9 of the
residual, so a wrong routing weight would too (it did: top-1 weights not
renormalised). Scaling the norms to ~1 and the q/k projections up
gives scores of a few units (the softmax far from uniform) and an
attention output on par with the residual (for deepseek2 in both of MLA's
parts, latent and rope). Tensors are rescaled in place in a copy;
llama.cpp then computes the oracle's logits from the same file."""
import shutil
import sys

sys.path.insert(0, sys.argv[3])
import gguf  # noqa: E402

BOOST = {}
BOOST["deepseek2"] = {
    "attn_q_a_norm.weight": 100.0,
    "attn_kv_a_norm.weight": 100.0,
    "attn_q_b.weight": 10.0,
    "attn_q.weight": 300.0,          # the lite form (no q_a)
    "attn_k_b.weight": 10.0,
    "attn_kv_b.weight": 10.0,        # the legacy form's k_b and v_b
    "attn_kv_a_mqa.weight": 1000.0,  # k_pe ~1 (the latent part is normed)
    "attn_output.scale": 50.0,
    # the routed experts too: with N(0, 0.01) weights their outputs are
    # ~1e-9 of the residual, and routing (exp_probs_b, per layer) or expert
    # scales would not show in the logits
    "ffn_norm.weight": 100.0,
    "ffn_gate_exps.weight": 10.0,
    "ffn_up_exps.weight": 10.0,
    "ffn_gate_up_exps.weight": 10.0,
    "ffn_down_exps.weight": 10.0,
}
# the other families' routed experts (their attention already reaches
# the logits)
FFN = {
    "ffn_norm.weight": 100.0,
    "ffn_gate_exps.weight": 3.0,
    "ffn_up_exps.weight": 3.0,
    "ffn_down_exps.weight": 3.0,
}
BOOST["llama"] = dict(FFN, **{
    "attn_norm.weight": 100.0,
    "attn_q.weight": 10.0,
    "attn_k.weight": 10.0,
    "attn_output.scale": 50.0,
})
BOOST["qwen3moe"] = BOOST["qwen2moe"] = BOOST["olmoe"] = FFN
# set, not multiplied: the upstream flavour's random q, k and expert
# scales (~0.01, llama.cpp multiplies the products by them) would undo the
# boost. (qwen2moe's, olmoe's and deepseek2's graphs apply no expert scale.)
EXPS_1 = {"ffn_gate_exps.scale": 1.0, "ffn_up_exps.scale": 1.0, "ffn_down_exps.scale": 1.0}
SET = {"deepseek2": {}, "qwen2moe": {}, "olmoe": {}, "qwen3moe": EXPS_1,
       "llama": dict(EXPS_1, **{"attn_q.scale": 1.0, "attn_k.scale": 1.0})}


def main():
    src, out = sys.argv[1], sys.argv[2]
    shutil.copyfile(src, out)
    r = gguf.GGUFReader(out, "r+")
    f = r.fields["general.architecture"]
    arch = bytes(f.parts[f.data[0]]).decode()
    if arch not in BOOST:
        sys.exit(f"attn-boost: architecture {arch}: none of " + ", ".join(BOOST))
    boost, put = BOOST[arch], SET[arch]
    n = 0
    for t in r.tensors:
        tail = t.name.split(".", 2)[-1]
        if t.name.startswith("blk.") and (tail in boost or tail in put):
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                sys.exit(f"attn-boost: {t.name} is {t.tensor_type.name}, want F32")
            if tail in put:
                t.data[...] = put[tail]
            else:
                t.data[...] *= boost[tail]
            n += 1
    if not n:
        sys.exit("attn-boost: no MLA attention tensor found")
    r.data.flush()
    print(f"attn-boost: {n} tensors rescaled")


if __name__ == "__main__":
    main()
