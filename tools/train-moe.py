#!/usr/bin/python3
"""Train a small qwen3moe-layout Mixture-of-Experts model on Debian's own text,
and serve as the torch reference for it (issue 12, item 2; models/debian-moe-12m).

Subcommands:
  train     learn a byte-level BPE, train the model, write the GGUF (F32 when it
            fits in 16 MB, else F16 if that fits, else Q8_0), the held-out text, the corpus manifest and a
            JSON of facts into models/; safetensors, config.json (and an F32 GGUF
            when the committed one is F16) into the build folder (--out)
  eval      held-out perplexity of a GGUF's weights (loaded FROM THE GGUF)
  tokenize  token ids of a text with the GGUF's tokenizer
  logits    teacher-forced logits in the MOELGT01 format
  to-f32    widen an F16 or Q8_0 GGUF to F32 exactly (no training)
  safetensors  the GGUF's weights as safetensors with HF names, and config.json
  greedy    greedy continuation (full recompute, the plain reference)
  routing   expert-load statistics of a GGUF on a text
  compare   max abs difference of two logits files (this script's, llama-oracle's, moe-run's)

Uses Debian's python3-torch 1.13 and python3-regex; run it with /usr/bin/python3.
The architecture is exactly what llama.cpp's qwen3moe graph computes:
RMSNorm, GQA attention with per-head RMSNorm on Q and K, NEOX RoPE, a router
softmax over all experts, top-k, the k weights renormalised to sum to one,
SwiGLU experts, no shared expert, an untied output head.
"""
import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time

# Threads that wait at a barrier sleep instead of spinning: on a shared,
# loaded machine a spinning thread burns the time its partner needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import regex
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- defaults

CONFIG = dict(
    vocab=1536,          # 256 bytes + 1279 merges + <|endoftext|>
    hidden=192,
    layers=6,
    heads=6,
    kv_heads=2,
    head_dim=32,
    experts=32,
    expert_ff=96,
    top_k=4,
    ctx_train=256,
    rope_base=10000.0,
    rms_eps=1e-6,
)

# Qwen2's pre-tokenizer, spelled exactly as llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2
# (tokenizer.ggml.pre "qwen2") so that llama.cpp picks its matching splitter.
QWEN2_PRE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
             r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EOT = "<|endoftext|>"

# The roots of the corpus: the packages scripts/install-deps names. Their
# Depends closure, as installed, gives the copyright files; a manifest with
# every file's sha256 is committed beside the model so a rerun checks it
# trains on the same bytes.
ROOT_PACKAGES = """build-essential autoconf automake libtool pkg-config ca-certificates
git liburing-dev libnuma-dev numactl libbpf-dev libelf-dev zlib1g-dev bpftool clang llvm
libcriterion-dev libcap-dev libcap2-bin libseccomp-dev libsystemd-dev systemd
libjansson-dev libisal-dev libpcre2-dev libopenblas-dev libdnnl-dev python3
python3-numpy fio gnuplot-nox procps util-linux python3-torch python3-regex""".split()

FILE_CAP = 48 * 1024     # bytes kept of one file: no single package dominates
HELDOUT_EVERY = 23       # every 23rd candidate file goes to the held-out set...
HELDOUT_TARGET = 40000   # ...until it holds this many bytes
HELDOUT_FILE_MAX = 12000 # held-out files are short ones, for variety


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- corpus

def depends_closure(roots):
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Depends}, ${Pre-Depends}\t${Provides}\n"],
        capture_output=True, text=True, check=True).stdout
    inst, prov = {}, {}
    for line in out.splitlines():
        pkg, st, dep, pv = line.split("\t")
        if not st.startswith("ii"):
            continue
        inst[pkg] = dep
        for x in pv.split(","):
            x = x.strip().split(" ")[0]
            if x:
                prov.setdefault(x, pkg)
    seen, stack = set(), list(roots)
    while stack:
        p = stack.pop().split(":")[0]
        if p not in inst:
            p = prov.get(p)
        if not p or p in seen:
            continue
        seen.add(p)
        for alt in inst[p].split(","):
            for a in alt.split("|"):
                n = a.strip().split(" ")[0].split(":")[0]
                if n and (n in inst or n in prov):
                    stack.append(n)
                    break
    return sorted(seen)


def read_doc(path):
    """A file's text, cut at FILE_CAP on a line boundary; None if not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(data) > FILE_CAP:
        cut = data[:FILE_CAP]
        cut = cut[:cut.rfind(b"\n") + 1]
        text = cut.decode("utf-8", errors="ignore")
    return text.replace("\r\n", "\n")


def build_manifest():
    paths = ["/usr/share/common-licenses/" + n for n in sorted(os.listdir("/usr/share/common-licenses"))]
    for p in depends_closure(ROOT_PACKAGES):
        paths.append("/usr/share/doc/%s/copyright" % p)
    files, seen = [], set()
    for p in paths:
        if not os.path.isfile(p):
            continue
        text = read_doc(p)
        if text is None or len(text) < 200:
            continue
        h = hashlib.sha256(text.encode()).hexdigest()
        if h in seen:      # many packages share one copyright file
            continue
        seen.add(h)
        files.append((p, h))
    # held-out: short files picked at a fixed stride, never the licence texts
    held, size, cand = set(), 0, 0
    for p, h in files:
        if p.startswith("/usr/share/common-licenses/"):
            continue
        n = len(read_doc(p).encode())
        if n > HELDOUT_FILE_MAX:
            continue
        cand += 1
        if cand % HELDOUT_EVERY == 0 and size < HELDOUT_TARGET:
            held.add(p)
            size += n
    return [(p, h, "heldout" if p in held else "train") for p, h in files]


def load_corpus(manifest):
    train, held = [], []
    for p, h, split in manifest:
        text = read_doc(p)
        if text is None or hashlib.sha256(text.encode()).hexdigest() != h:
            raise SystemExit("train-moe: %s differs from the manifest (not the same Debian packages?)" % p)
        (held if split == "heldout" else train).append(text)
    return train, held


# ---------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


B2U = bytes_to_unicode()
U2B = {v: k for k, v in B2U.items()}
PRE = regex.compile(QWEN2_PRE)


def pretokenize(text):
    return PRE.findall(text)


def learn_bpe(texts, n_merges):
    """Byte-level BPE: most frequent pair first, ties to the smallest (left, right) ids."""
    import heapq
    counts = {}
    for t in texts:
        for w in pretokenize(t):
            counts[w] = counts.get(w, 0) + 1
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    pair_count, where = {}, {}
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] = pair_count.get((a, b), 0) + freq[i]
            where.setdefault((a, b), set()).add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    next_id = 256
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if pair_count.get(p, 0) != -c or c == 0:
            continue
        merges.append(p)
        new = next_id
        next_id += 1
        touched = {}
        for i in sorted(where.pop(p, ())):
            w = words[i]
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and w[j] == p[0] and w[j + 1] == p[1]:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue
            for a, b in zip(w, w[1:]):
                pair_count[(a, b)] -= freq[i]
                touched[(a, b)] = True
            for a, b in zip(out, out[1:]):
                pair_count[(a, b)] = pair_count.get((a, b), 0) + freq[i]
                where.setdefault((a, b), set()).add(i)
                touched[(a, b)] = True
            words[i] = out
        pair_count.pop(p, None)
        for q in touched:
            if q in pair_count and q != p:
                if pair_count[q] > 0:
                    heapq.heappush(heap, (-pair_count[q], q))
                else:
                    del pair_count[q]
    return merges


class Tokenizer:
    """GPT-2 style byte-level BPE over token strings in byte-to-unicode form,
    encoding exactly as llama.cpp's BPE (lowest merge rank first, leftmost on ties)."""

    def __init__(self, tokens, merges, eot_id):
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.eot = eot_id
        self.cache = {}

    @classmethod
    def from_merges(cls, merge_pairs):
        tok = [B2U[b] for b in range(256)]
        strs = [B2U[b] for b in range(256)]
        merges = []
        for a, b in merge_pairs:
            merges.append(strs[a] + " " + strs[b])
            strs.append(strs[a] + strs[b])
            tok.append(strs[a] + strs[b])
        tok.append(EOT)
        return cls(tok, merges, len(tok) - 1), merges

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        sym = [B2U[b] for b in word.encode("utf-8")]
        while len(sym) > 1:
            best, bi = None, -1
            for i in range(len(sym) - 1):
                r = self.ranks.get((sym[i], sym[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            sym = sym[:bi] + [sym[bi] + sym[bi + 1]] + sym[bi + 2:]
        ids = [self.ids[s] for s in sym]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        out = []
        for w in pretokenize(text):
            out.extend(self.bpe(w))
        return out

    def decode(self, ids):
        bs = bytearray()
        for i in ids:
            t = self.tokens[i]
            if i == self.eot:
                bs += t.encode()
            else:
                bs += bytes(U2B[c] for c in t)
        return bs.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- model

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_neox(x, pos, base):
    # x [B, T, nh, d]; pairs (i, i + d/2), as GGML_ROPE_TYPE_NEOX / HF rotate_half
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(0, half, dtype=torch.float64) * 2.0 / d)
    ang = (pos.to(torch.float64)[:, None] * inv[None, :]).to(x.dtype)   # [T, half]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MoE(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg
        self.cfg = c
        self.kv_f16 = False
        H, L, E, Fe = c["hidden"], c["layers"], c["experts"], c["expert_ff"]
        nq, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
        P = torch.nn.Parameter
        self.tok_embd = P(torch.empty(c["vocab"], H))
        self.output_norm = P(torch.ones(H))
        self.output = P(torch.empty(c["vocab"], H))
        self.blk = torch.nn.ModuleList()
        for _ in range(L):
            b = torch.nn.Module()
            b.attn_norm = P(torch.ones(H))
            b.attn_q = P(torch.empty(nq * hd, H))
            b.attn_k = P(torch.empty(nkv * hd, H))
            b.attn_v = P(torch.empty(nkv * hd, H))
            b.attn_output = P(torch.empty(H, nq * hd))
            b.attn_q_norm = P(torch.ones(hd))
            b.attn_k_norm = P(torch.ones(hd))
            b.ffn_norm = P(torch.ones(H))
            b.ffn_gate_inp = P(torch.empty(E, H))
            b.ffn_gate_exps = P(torch.empty(E, Fe, H))
            b.ffn_up_exps = P(torch.empty(E, Fe, H))
            b.ffn_down_exps = P(torch.empty(E, H, Fe))
            self.blk.append(b)

    def init_weights(self, gen):
        std = 0.02
        L = self.cfg["layers"]
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            s = std
            if name.endswith("attn_output") or name.endswith("ffn_down_exps"):
                s = std / math.sqrt(2 * L)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def tensors(self):
        """GGUF name -> tensor (torch shape; GGUF ne is the reverse)."""
        t = {"token_embd.weight": self.tok_embd, "output_norm.weight": self.output_norm,
             "output.weight": self.output}
        for i, b in enumerate(self.blk):
            for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                      "attn_k_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                      "ffn_down_exps"):
                t["blk.%d.%s.weight" % (i, n)] = getattr(b, n)
        return t

    def moe(self, b, x, stats=None):
        c = self.cfg
        E, k = c["experts"], c["top_k"]
        N, H = x.shape
        logits = x @ b.ffn_gate_inp.t()
        probs = logits.softmax(-1)
        topv, topi = probs.topk(k, dim=-1)
        w = topv / topv.sum(-1, keepdim=True)          # norm_topk_prob
        flat = topi.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=E)
        tok_of = order // k
        w_of = w.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx = tok_of[start:start + n]
            xe = x.index_select(0, idx)
            h = F.silu(xe @ b.ffn_gate_exps[e].t()) * (xe @ b.ffn_up_exps[e].t())
            ye = (h @ b.ffn_down_exps[e].t()) * w_of[start:start + n, None]
            out.index_add_(0, idx, ye)
            start += n
        # Switch-style balance: E * sum_e (share of assignments) * (mean prob)
        f = counts.to(x.dtype) / (N * k)
        aux = E * (f * probs.mean(0)).sum()
        if stats is not None:
            stats.append((counts.detach(), probs.detach(), topi.detach()))
        return out, aux

    def forward(self, ids, stats=None):
        """ids [B, T] -> logits [B, T, V], balance loss (sum over layers)."""
        c = self.cfg
        B, T = ids.shape
        nq, nkv, hd, eps = c["heads"], c["kv_heads"], c["head_dim"], c["rms_eps"]
        pos = torch.arange(T)
        mask = torch.full((T, T), float("-inf")).triu(1)
        x = self.tok_embd[ids]
        aux = x.new_zeros(())
        for b in self.blk:
            h = rms_norm(x, b.attn_norm, eps)
            q = (h @ b.attn_q.t()).view(B, T, nq, hd)
            kk = (h @ b.attn_k.t()).view(B, T, nkv, hd)
            v = (h @ b.attn_v.t()).view(B, T, nkv, hd)
            q = rope_neox(rms_norm(q, b.attn_q_norm, eps), pos, c["rope_base"])
            kk = rope_neox(rms_norm(kk, b.attn_k_norm, eps), pos, c["rope_base"])
            if self.kv_f16:     # llama.cpp's default KV cache holds K (after RoPE) and V in F16
                kk, v = kk.half().float(), v.half().float()
            rep = nq // nkv
            kk = kk.repeat_interleave(rep, dim=2)      # head j uses kv head j // rep
            v = v.repeat_interleave(rep, dim=2)
            att = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd) + mask
            att = att.softmax(-1)
            a = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, nq * hd)
            x = x + a @ b.attn_output.t()
            h = rms_norm(x, b.ffn_norm, eps)
            m, al = self.moe(b, h.reshape(B * T, -1), stats)
            x = x + m.view(B, T, -1)
            aux = aux + al
        x = rms_norm(x, self.output_norm, eps)
        return x @ self.output.t(), aux


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- GGUF

GT_U8, GT_I8, GT_U16, GT_I16, GT_U32, GT_I32, GT_F32, GT_BOOL, GT_STR, GT_ARR, GT_U64, GT_I64, GT_F64 = range(13)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
LLAMA_FTYPE_MOSTLY_Q8_0 = 7   # general.file_type of a Q8_0 model (llama.h)
ALIGN = 32
QK8_0 = 32


class Q8_0:
    """A matrix in ggml's Q8_0 blocks (per 32 values: an f16 scale, 32 int8).
    Quantized as ggml's quantize_row_q8_0_ref does, in float32: d = amax/127,
    q = roundf(x * (1/d)) (half away from zero), d stored as f16."""

    def __init__(self, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        assert a.shape[-1] % QK8_0 == 0, "Q8_0 needs rows of a multiple of 32"
        self.shape = a.shape
        b = a.reshape(-1, QK8_0)
        amax = np.max(np.abs(b), axis=1)
        d = (amax / np.float32(127.0)).astype(np.float32)
        with np.errstate(divide="ignore"):
            idv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1.0)), np.float32(0.0)).astype(np.float32)
        x = (b * idv[:, None]).astype(np.float32)
        q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
        blk = np.zeros(b.shape[0], dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
        blk["d"] = d.astype(np.float16)
        blk["qs"] = q
        self.blocks = blk

    @property
    def nbytes(self):
        return self.blocks.nbytes

    def tobytes(self):
        return self.blocks.tobytes()


def q8_0_dequant(raw, n):
    """ggml's dequantize_row_q8_0: y = float(d) * q, in float32."""
    blk = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))], count=n // QK8_0)
    return (blk["d"].astype(np.float32)[:, None] * blk["qs"].astype(np.float32)).reshape(-1)


def _s(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv_val(t, v):
    if t == GT_STR:
        return _s(v)
    if t == GT_ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        if et == GT_STR:
            return out + b"".join(_s(x) for x in items)
        fmt = {GT_I32: "<i", GT_U32: "<I", GT_F32: "<f", GT_U8: "<B", GT_I8: "<b"}[et]
        return out + b"".join(struct.pack(fmt, x) for x in items)
    fmt = {GT_U32: "<I", GT_I32: "<i", GT_F32: "<f", GT_BOOL: "<?", GT_U64: "<Q", GT_U8: "<B"}[t]
    return struct.pack(fmt, v)


def gguf_write(path, kvs, tensors):
    """kvs: list of (key, type, value); tensors: list of (name, np.ndarray f32/f16, torch shape)."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for k, t, v in kvs:
        head += _s(k) + struct.pack("<I", t) + _kv_val(t, v)
    off = 0
    offs = []
    for name, arr in tensors:
        ne = list(reversed(arr.shape))
        gt = GGML_Q8_0 if isinstance(arr, Q8_0) else GGML_F16 if arr.dtype == np.float16 else GGML_F32
        head += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        head += struct.pack("<IQ", gt, off)
        offs.append(off)
        off += arr.nbytes
        off = (off + ALIGN - 1) // ALIGN * ALIGN
    head += b"\0" * ((-len(head)) % ALIGN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        for (name, arr), o in zip(tensors, offs):
            pad = len(head) + o - f.tell()
            f.write(b"\0" * pad)
            if isinstance(arr, Q8_0):
                f.write(arr.tobytes())
            else:
                f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        f.write(b"\0" * ((-f.tell()) % ALIGN))
    os.replace(tmp, path)


class GGUF:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.buf = f.read()
        self.p = 0
        magic = self.buf[:4]
        if magic != b"GGUF":
            raise SystemExit("%s: not a GGUF" % path)
        self.p = 4
        ver, nt, nkv = self._r("<IQQ")
        if ver != 3:
            raise SystemExit("%s: GGUF version %d" % (path, ver))
        self.kv, self.kvtype = {}, {}
        for _ in range(nkv):
            k = self._str()
            (t,) = self._r("<I")
            self.kvtype[k] = t
            self.kv[k] = self._val(t)
        align = self.kv.get("general.alignment", ALIGN)
        infos = []
        for _ in range(nt):
            name = self._str()
            (nd,) = self._r("<I")
            ne = self._r("<" + "Q" * nd)
            t, off = self._r("<IQ")
            infos.append((name, ne, t, off))
        base = (self.p + align - 1) // align * align
        self.tensors = {}
        self.order = []
        for name, ne, t, off in infos:
            n = int(np.prod(ne))
            if t == GGML_Q8_0:
                if ne[0] % QK8_0:
                    raise SystemExit("%s: Q8_0 tensor %s has rows of %d" % (path, name, ne[0]))
                a = q8_0_dequant(self.buf[base + off:base + off + n // QK8_0 * 34], n)
                self.tensors[name] = a.reshape(tuple(reversed(ne)))
                self.order.append(name)
                continue
            dt = {GGML_F32: np.float32, GGML_F16: np.float16}.get(t)
            if dt is None:
                raise SystemExit("%s: tensor %s has ggml type %d (only F32/F16/Q8_0 here)" % (path, name, t))
            a = np.frombuffer(self.buf, dtype=np.dtype(dt).newbyteorder("<"), count=n, offset=base + off)
            self.tensors[name] = a.reshape(tuple(reversed(ne)))
            self.order.append(name)

    def _r(self, fmt):
        v = struct.unpack_from(fmt, self.buf, self.p)
        self.p += struct.calcsize(fmt)
        return v

    def _str(self):
        (n,) = self._r("<Q")
        s = self.buf[self.p:self.p + n]
        self.p += n
        return s.decode("utf-8", errors="surrogateescape")

    def _val(self, t):
        if t == GT_STR:
            return self._str()
        if t == GT_ARR:
            et, n = self._r("<IQ")
            return (et, [self._val(et) for _ in range(n)])
        fmt = {GT_U8: "<B", GT_I8: "<b", GT_U16: "<H", GT_I16: "<h", GT_U32: "<I", GT_I32: "<i",
               GT_F32: "<f", GT_BOOL: "<?", GT_U64: "<Q", GT_I64: "<q", GT_F64: "<d"}[t]
        return self._r(fmt)[0]

    def kv_list(self):
        return [(k, self.kvtype[k], self.kv[k]) for k in self.kv]


def gguf_kvs(cfg, tok, merges, name, file_type):
    A = "qwen3moe."
    c = cfg
    return [
        ("general.architecture", GT_STR, "qwen3moe"),
        ("general.name", GT_STR, name),
        ("general.file_type", GT_U32, file_type),
        ("general.license", GT_STR, "GPL-2.0-or-later"),
        ("general.description", GT_STR, "small MoE trained by moetierd tools/train-moe.py on Debian copyright and licence texts"),
        (A + "context_length", GT_U32, c["ctx_train"]),
        (A + "embedding_length", GT_U32, c["hidden"]),
        (A + "block_count", GT_U32, c["layers"]),
        (A + "feed_forward_length", GT_U32, c["expert_ff"] * c["top_k"]),
        (A + "expert_feed_forward_length", GT_U32, c["expert_ff"]),
        (A + "attention.head_count", GT_U32, c["heads"]),
        (A + "attention.head_count_kv", GT_U32, c["kv_heads"]),
        (A + "attention.key_length", GT_U32, c["head_dim"]),
        (A + "attention.value_length", GT_U32, c["head_dim"]),
        (A + "attention.layer_norm_rms_epsilon", GT_F32, c["rms_eps"]),
        (A + "rope.freq_base", GT_F32, c["rope_base"]),
        (A + "rope.dimension_count", GT_U32, c["head_dim"]),
        (A + "expert_count", GT_U32, c["experts"]),
        (A + "expert_used_count", GT_U32, c["top_k"]),
        ("tokenizer.ggml.model", GT_STR, "gpt2"),
        ("tokenizer.ggml.pre", GT_STR, "qwen2"),
        ("tokenizer.ggml.tokens", GT_ARR, (GT_STR, tok.tokens)),
        ("tokenizer.ggml.token_type", GT_ARR, (GT_I32, [3 if i == tok.eot else 1 for i in range(len(tok.tokens))])),
        ("tokenizer.ggml.merges", GT_ARR, (GT_STR, merges)),
        ("tokenizer.ggml.bos_token_id", GT_U32, tok.eot),
        ("tokenizer.ggml.eos_token_id", GT_U32, tok.eot),
        ("tokenizer.ggml.padding_token_id", GT_U32, tok.eot),
        ("tokenizer.ggml.add_bos_token", GT_BOOL, False),
        ("tokenizer.ggml.add_eos_token", GT_BOOL, False),
    ]


def cfg_from_gguf(g):
    A = "qwen3moe."
    if g.kv.get("general.architecture") != "qwen3moe":
        raise SystemExit("not a qwen3moe GGUF")
    kv = g.kv
    return dict(
        vocab=len(kv["tokenizer.ggml.tokens"][1]),
        hidden=kv[A + "embedding_length"], layers=kv[A + "block_count"],
        heads=kv[A + "attention.head_count"], kv_heads=kv[A + "attention.head_count_kv"],
        head_dim=kv.get(A + "attention.key_length", kv[A + "embedding_length"] // kv[A + "attention.head_count"]),
        experts=kv[A + "expert_count"], expert_ff=kv[A + "expert_feed_forward_length"],
        top_k=kv[A + "expert_used_count"], ctx_train=kv[A + "context_length"],
        rope_base=kv.get(A + "rope.freq_base", 10000.0), rms_eps=kv[A + "attention.layer_norm_rms_epsilon"])


def load_gguf(path):
    g = GGUF(path)
    cfg = cfg_from_gguf(g)
    model = MoE(cfg)
    t = model.tensors()
    if set(t) != set(g.tensors):
        raise SystemExit("tensor set differs: missing %s, extra %s" % (sorted(set(t) - set(g.tensors)), sorted(set(g.tensors) - set(t))))
    with torch.no_grad():
        for n, p in t.items():
            a = g.tensors[n]
            if tuple(a.shape) != tuple(p.shape):
                raise SystemExit("%s: shape %s, want %s" % (n, a.shape, tuple(p.shape)))
            p.copy_(torch.from_numpy(a.astype(np.float32)))
    kv = g.kv
    tok = Tokenizer(kv["tokenizer.ggml.tokens"][1], kv["tokenizer.ggml.merges"][1], kv["tokenizer.ggml.eos_token_id"])
    return model, tok, g


def write_model_files(model, tok, merges, gguf_path, name, dtype):
    ftype = {"f32": GGML_F32, "f16": GGML_F16, "q8_0": LLAMA_FTYPE_MOSTLY_Q8_0}[dtype]
    kvs = gguf_kvs(model.cfg, tok, merges, name, ftype)
    tens = []
    for n, p in model.tensors().items():
        a = p.detach().numpy().astype(np.float32)
        # norms stay F32 (as llama.cpp's converters keep 1-D tensors); so do
        # the routers under Q8_0 (llama-quantize keeps ffn_gate_inp F32 too:
        # a rounded router changes which experts run)
        if a.ndim == 1 or dtype == "f32" or (dtype == "q8_0" and n.endswith("ffn_gate_inp.weight")):
            tens.append((n, a))
        elif dtype == "f16":
            tens.append((n, a.astype(np.float16)))
        else:
            tens.append((n, Q8_0(a)))
    gguf_write(gguf_path, kvs, tens)


def to_f32(src, dst):
    g = GGUF(src)
    kvs = [(k, t, (GGML_F32 if k == "general.file_type" else v)) for k, t, v in g.kv_list()]
    # Q8_0 and F16 values are exact in F32: the widened model computes the same function
    tens = [(n, g.tensors[n].astype(np.float32)) for n in g.order]
    gguf_write(dst, kvs, tens)


# ---------------------------------------------------------------- safetensors (HF names)

def write_safetensors(model, outdir):
    c = model.cfg
    t = {"model.embed_tokens.weight": model.tok_embd, "model.norm.weight": model.output_norm,
         "lm_head.weight": model.output}
    for i, b in enumerate(model.blk):
        p = "model.layers.%d." % i
        t[p + "input_layernorm.weight"] = b.attn_norm
        t[p + "self_attn.q_proj.weight"] = b.attn_q
        t[p + "self_attn.k_proj.weight"] = b.attn_k
        t[p + "self_attn.v_proj.weight"] = b.attn_v
        t[p + "self_attn.o_proj.weight"] = b.attn_output
        t[p + "self_attn.q_norm.weight"] = b.attn_q_norm
        t[p + "self_attn.k_norm.weight"] = b.attn_k_norm
        t[p + "post_attention_layernorm.weight"] = b.ffn_norm
        t[p + "mlp.gate.weight"] = b.ffn_gate_inp
        for e in range(c["experts"]):
            q = p + "mlp.experts.%d." % e
            t[q + "gate_proj.weight"] = b.ffn_gate_exps[e]
            t[q + "up_proj.weight"] = b.ffn_up_exps[e]
            t[q + "down_proj.weight"] = b.ffn_down_exps[e]
    hdr, off, blobs = {}, 0, []
    for n in sorted(t):
        a = t[n].detach().numpy().astype("<f4")
        hdr[n] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        blobs.append(a.tobytes())
    hdr["__metadata__"] = {"format": "pt"}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    with open(os.path.join(outdir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    conf = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": c["vocab"], "hidden_size": c["hidden"], "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
        "intermediate_size": c["expert_ff"] * c["top_k"], "moe_intermediate_size": c["expert_ff"],
        "num_experts": c["experts"], "num_experts_per_tok": c["top_k"], "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": c["ctx_train"],
        "rms_norm_eps": float("%g" % c["rms_eps"]), "rope_theta": float("%g" % c["rope_base"]), "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
        "bos_token_id": c["vocab"] - 1, "eos_token_id": c["vocab"] - 1,
    }
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def perplexity(model, ids, ctx, stats=None, batch=16):
    """run-interfaces.md: chunks of ctx tokens, each from an empty cache, last partial
    chunk dropped, positions 1..ctx-1 predicted; exp(mean NLL), accumulated in float64."""
    n_chunks = len(ids) // ctx
    nll, count = 0.0, 0
    data = torch.tensor(ids[:n_chunks * ctx], dtype=torch.long).view(n_chunks, ctx)
    for s in range(0, n_chunks, batch):
        x = data[s:s + batch]
        logits, _ = model(x, stats)
        lp = logits[:, :-1].double().log_softmax(-1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        count += x.shape[0] * (ctx - 1)
    # N in "ppl: X over N tokens" counts the predicted positions, C * (ctx - 1), as moe-run does
    return math.exp(nll / count), count, n_chunks


@torch.no_grad()
def routing_stats(model, ids, ctx):
    stats = []
    perplexity(model, ids, ctx, stats)
    L, E = model.cfg["layers"], model.cfg["experts"]
    out = []
    for l in range(L):
        cnt = sum(s[0] for s in stats[l::L]).double()
        probs = torch.cat([s[1] for s in stats[l::L]]).double()
        share = cnt / cnt.sum()
        load_ent = -(share[share > 0] * share[share > 0].log()).sum().item()
        tok_ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
        topk_mass = probs.topk(model.cfg["top_k"], dim=-1)[0].sum(-1).mean().item()
        out.append(dict(layer=l,
                        load_entropy_nats=round(load_ent, 4),
                        load_entropy_max=round(math.log(E), 4),
                        load_share_min=round(share.min().item(), 4),
                        load_share_max=round(share.max().item(), 4),
                        router_entropy_per_token_nats=round(tok_ent, 4),
                        router_topk_prob_mass=round(topk_mass, 4)))
    # how well one layer's top-1 expert predicts the next layer's (what a
    # prefetcher can exploit): H(top1[l+1] | top1[l]) against H(top1[l+1])
    top1 = [torch.cat([s[2][:, 0] for s in stats[l::L]]).numpy() for l in range(L)]

    def ent(c):
        p = c[c > 0] / c.sum()
        return float(-(p * np.log(p)).sum())
    for l in range(L - 1):
        joint = np.zeros((E, E))
        np.add.at(joint, (top1[l], top1[l + 1]), 1)
        h_next = ent(joint.sum(0))
        h_cond = sum(joint[i].sum() / joint.sum() * ent(joint[i]) for i in range(E) if joint[i].sum() > 0)
        out[l + 1]["top1_entropy_nats"] = round(h_next, 4)
        out[l + 1]["top1_entropy_given_prev_layer_top1_nats"] = round(h_cond, 4)
    return out


# ---------------------------------------------------------------- train

def cmd_train(a):
    torch.set_num_threads(a.threads)
    # bit-identical reruns: no scatter-add whose order depends on the threads
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)
    t0 = time.time()
    os.makedirs(a.models, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    manifest_path = os.path.join(a.models, a.name + ".corpus.tsv")
    if os.path.exists(manifest_path) and not a.new_manifest:
        manifest = [tuple(l.rstrip("\n").split("\t")) for l in open(manifest_path) if not l.startswith("#")]
    else:
        manifest = build_manifest()
        with open(manifest_path, "w") as f:
            f.write("# path\tsha256 of the text used (UTF-8, cut at %d bytes)\tsplit\n" % FILE_CAP)
            for p, h, s in manifest:
                f.write("%s\t%s\t%s\n" % (p, h, s))
    train_txt, held_txt = load_corpus(manifest)
    log("corpus: %d train files (%d bytes), %d held-out files (%d bytes)" % (
        len(train_txt), sum(len(t.encode()) for t in train_txt), len(held_txt), sum(len(t.encode()) for t in held_txt)))
    heldout = "\n".join(held_txt)
    with open(os.path.join(a.models, a.name + ".heldout.txt"), "w") as f:
        f.write(heldout)

    cfg = dict(CONFIG)
    if a.layers:
        cfg["layers"] = a.layers
    tb = time.time()
    pairs = learn_bpe(train_txt, cfg["vocab"] - 257)
    tok, merges = Tokenizer.from_merges(pairs)
    assert len(tok.tokens) == cfg["vocab"]
    ids = []
    for t in train_txt:
        ids.extend(tok.encode(t))
        ids.append(tok.eot)
    held_ids = tok.encode(heldout)
    log("bpe: %d merges in %.0fs; %d train tokens, %d held-out tokens (%.2f bytes/token)" % (
        len(merges), time.time() - tb, len(ids), len(held_ids), len(heldout.encode()) / len(held_ids)))

    gen = torch.Generator().manual_seed(a.seed)
    model = MoE(cfg)
    model.init_weights(gen)
    npar = n_params(model)
    log("model: %d parameters" % npar)
    data = torch.tensor(ids, dtype=torch.long)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    T, B = cfg["ctx_train"], a.batch
    # Warmup, a constant rate, then a linear decay to 10% (warmup-stable-decay).
    # The decay starts at --decay-at, or at 80% of --steps, or when 80% of
    # --minutes has passed (then it gets a quarter of the steps run so far): the
    # schedule adapts to a shared, loaded machine, and the JSON records the two
    # numbers (--steps, --decay-at) that replay it exactly.
    warm = 50
    total = a.steps
    decay_at = a.decay_at if a.decay_at else int(a.steps * 0.8)
    ttrain = time.time()
    hist = []
    step = 0
    while step < total:
        el = time.time() - ttrain
        if a.minutes and not a.decay_at and step < decay_at and el > 0.8 * a.minutes * 60:
            decay_at = step
            total = min(total, step + max(20, step // 4))
            log("step %d: 80%% of --minutes %g passed, decay over %d steps" % (step, a.minutes, total - step))
        if a.minutes and el > 1.2 * a.minutes * 60:
            log("stopping at step %d: 120%% of --minutes %g passed" % (step, a.minutes))
            total = step
            break
        if step < warm:
            lr = a.lr * (step + 1) / warm
        elif step < decay_at:
            lr = a.lr
        else:
            lr = a.lr * (1.0 - 0.9 * (step - decay_at + 1) / max(1, total - decay_at))
        for gp in opt.param_groups:
            gp["lr"] = lr
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([data[s:s + T] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts.tolist()])
        logits, aux = model(x)
        ce = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), y.reshape(-1))
        loss = ce + a.aux * aux / cfg["layers"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == total - 1:
            el = time.time() - ttrain
            log("step %d/%d ce %.4f aux %.4f lr %.2e  %.1fs (%.0f tok/s)" % (
                step, total, ce.item(), aux.item() / cfg["layers"], lr, el, (step + 1) * B * T / max(el, 1e-9)))
            hist.append([step, round(ce.item(), 4), round(aux.item() / cfg["layers"], 4)])
        step += 1
    train_s = time.time() - ttrain

    gguf_path = os.path.join(a.models, a.name + ".gguf")
    # F32 when the file stays within the 16 MB the repository takes, else F16
    # (then to-f32 widens it exactly)
    dtype = a.dtype
    if dtype == "auto":
        dtype = "f32" if npar * 4 + 100000 <= 16000000 else "f16" if npar * 2 + 200000 <= 16000000 else "q8_0"
    f16 = dtype != "f32"      # stored narrower than F32: an exact F32 copy goes to --out
    write_model_files(model, tok, merges, gguf_path, a.name, dtype)
    f32_path = gguf_path
    if f16:
        f32_path = os.path.join(a.out, a.name + ".f32.gguf")
        to_f32(gguf_path, f32_path)
    # every later number comes from the weights as the GGUF holds them
    ref, tok2, _ = load_gguf(gguf_path)
    write_safetensors(ref, a.out)
    ppl, n_tok, n_chunks = perplexity(ref, tok2.encode(heldout), 128)
    log("held-out ppl: %.4f over %d tokens (%d chunks of 128)" % (ppl, n_tok, n_chunks))
    routing = routing_stats(ref, tok2.encode(heldout), 128)
    facts = dict(
        name=a.name, architecture="qwen3moe", gguf=os.path.basename(gguf_path), gguf_dtype={"f32": "F32", "f16": "F16 (norms F32)", "q8_0": "Q8_0 (norms and routers F32)"}[dtype],
        gguf_bytes=os.path.getsize(gguf_path), gguf_sha256=hashlib.sha256(open(gguf_path, "rb").read()).hexdigest(),
        f32_gguf_sha256=hashlib.sha256(open(f32_path, "rb").read()).hexdigest(),
        config=cfg, parameters=npar,
        parameters_active_per_token=npar - cfg["layers"] * (cfg["experts"] - cfg["top_k"]) * 3 * cfg["hidden"] * cfg["expert_ff"],
        tokenizer=dict(model="gpt2", pre="qwen2", vocab=cfg["vocab"], merges=len(merges), eot_id=tok.eot),
        corpus=dict(manifest=os.path.basename(manifest_path), train_files=len(train_txt), heldout_files=len(held_txt),
                    train_bytes=sum(len(t.encode()) for t in train_txt), heldout_bytes=len(heldout.encode())),
        train_tokens=len(ids), heldout_tokens=len(held_ids),
        training=dict(steps=total, decay_at=decay_at, replay="--steps %d --decay-at %d" % (total, decay_at),
                      batch=B, seq=T, tokens_seen=total * B * T, minutes=a.minutes, lr=a.lr, aux_coef=a.aux,
                      seed=a.seed, threads=a.threads, train_seconds=round(train_s, 1),
                      total_seconds=round(time.time() - t0, 1), torch=torch.__version__, loss_history=hist),
        heldout_ppl=dict(value=round(ppl, 6), ctx=128, predicted_tokens=n_tok, chunks=n_chunks,
                         line="ppl: %.4f over %d tokens (%d chunks of 128)" % (ppl, n_tok, n_chunks),
                         definition="doc run-interfaces: chunks of 128 from an empty cache, no BOS, positions 1..127 predicted"),
        routing=routing,
    )
    with open(os.path.join(a.models, a.name + ".json"), "w") as f:
        json.dump(facts, f, indent=1)
        f.write("\n")
    log("wrote %s (%d bytes), %s, %s" % (gguf_path, os.path.getsize(gguf_path), f32_path, a.out + "/model.safetensors"))


# ---------------------------------------------------------------- other commands

def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def cmd_eval(a):
    torch.set_num_threads(a.threads)
    model, tok, _ = load_gguf(a.gguf)
    model.kv_f16 = a.kv_f16
    ppl, n, c = perplexity(model, tok.encode(read_text(a.text)), a.ctx)
    print("ppl: %.4f over %d tokens (%d chunks of %d)" % (ppl, n, c, a.ctx))


def cmd_tokenize(a):
    g = GGUF(a.gguf)
    kv = g.kv
    tok = Tokenizer(kv["tokenizer.ggml.tokens"][1], kv["tokenizer.ggml.merges"][1], kv["tokenizer.ggml.eos_token_id"])
    text = read_text(a.file) if a.file else a.text
    print(",".join(str(i) for i in tok.encode(text)))


def parse_ids(s):
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def cmd_logits(a):
    torch.set_num_threads(a.threads)
    model, tok, _ = load_gguf(a.gguf)
    model.kv_f16 = a.kv_f16
    ids = parse_ids(a.tokens) if a.tokens else tok.encode(a.prompt)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    arr = logits[0].numpy().astype("<f4")
    with open(a.out, "wb") as f:
        f.write(b"MOELGT01" + struct.pack("<II", arr.shape[0], arr.shape[1]) + arr.tobytes())
    print("logits: %d tokens x %d vocab -> %s; argmax %s" % (arr.shape[0], arr.shape[1], a.out,
                                                             ",".join(str(int(i)) for i in arr.argmax(-1))))


def read_logits(path):
    with open(path, "rb") as f:
        b = f.read()
    if b[:8] != b"MOELGT01":
        raise SystemExit("%s: not a MOELGT01 logits file" % path)
    n, v = struct.unpack_from("<II", b, 8)
    return np.frombuffer(b, dtype="<f4", count=n * v, offset=16).reshape(n, v)


def cmd_compare(a):
    x, y = read_logits(a.a), read_logits(a.b)
    if x.shape != y.shape:
        raise SystemExit("shapes differ: %s vs %s" % (x.shape, y.shape))
    d = np.abs(x.astype(np.float64) - y)
    same = (x.argmax(-1) == y.argmax(-1)).mean()
    print("compare: %d x %d, max abs diff %.3g (row %d), max |logit| %.3g, argmax agree %.1f%%" % (
        x.shape[0], x.shape[1], d.max(), d.max(-1).argmax(), np.abs(x).max(), 100 * same))
    if a.tol and d.max() > a.tol:
        sys.exit(1)


def cmd_greedy(a):
    torch.set_num_threads(a.threads)
    model, tok, _ = load_gguf(a.gguf)
    model.kv_f16 = a.kv_f16
    ids = parse_ids(a.tokens) if a.tokens else tok.encode(a.prompt)
    out = []
    with torch.no_grad():
        for _ in range(a.n):
            logits, _ = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
    print(",".join(map(str, out)))
    print(repr(tok.decode(out)))


def cmd_safetensors(a):
    model, _, _ = load_gguf(a.gguf)
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(model, a.out)
    print("wrote %s/model.safetensors and config.json" % a.out)


def cmd_to_f32(a):
    to_f32(a.src, a.dst)
    print("wrote %s" % a.dst)


def cmd_routing(a):
    torch.set_num_threads(a.threads)
    model, tok, _ = load_gguf(a.gguf)
    for r in routing_stats(model, tok.encode(read_text(a.text)), a.ctx):
        print(json.dumps(r))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--to-f32", nargs=2, metavar=("IN", "OUT"), help="widen an F16 or Q8_0 GGUF to F32 (exactly) and exit")
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("train")
    t.add_argument("--name", default="debian-moe-12m")
    t.add_argument("--models", default="models")
    t.add_argument("--out", default="build/trained-moe")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--aux", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=20261207)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--layers", type=int, default=0, help="override (smoke runs)")
    t.add_argument("--dtype", choices=("auto", "f32", "f16", "q8_0"), default="auto")
    t.add_argument("--decay-at", type=int, default=0, help="step where the learning rate starts to decay")
    t.add_argument("--minutes", type=float, default=0, help="wall-clock budget: decay from 80%% of it")
    t.add_argument("--new-manifest", action="store_true", help="rebuild the corpus manifest from this machine")
    e = sub.add_parser("eval")
    e.add_argument("--gguf", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--ctx", type=int, default=128)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--kv-f16", action="store_true", help="round K and V to F16 as llama.cpp's default cache does")
    k = sub.add_parser("tokenize")
    k.add_argument("--gguf", required=True)
    k.add_argument("--file")
    k.add_argument("text", nargs="?", default="")
    lg = sub.add_parser("logits")
    lg.add_argument("--gguf", required=True)
    lg.add_argument("--tokens")
    lg.add_argument("--prompt")
    lg.add_argument("--out", required=True)
    lg.add_argument("--threads", type=int, default=2)
    lg.add_argument("--kv-f16", action="store_true", help="round K and V to F16 as llama.cpp's default cache does")
    gr = sub.add_parser("greedy")
    gr.add_argument("--gguf", required=True)
    gr.add_argument("--tokens")
    gr.add_argument("--prompt")
    gr.add_argument("-n", type=int, default=64)
    gr.add_argument("--threads", type=int, default=2)
    gr.add_argument("--kv-f16", action="store_true", help="round K and V to F16 as llama.cpp's default cache does")
    cp = sub.add_parser("compare", help="max abs difference of two MOELGT01 logits files")
    cp.add_argument("a")
    cp.add_argument("b")
    cp.add_argument("--tol", type=float, default=0, help="exit 1 above this")
    st = sub.add_parser("safetensors", help="the GGUF's weights as safetensors (HF names) + config.json")
    st.add_argument("--gguf", required=True)
    st.add_argument("--out", required=True)
    f = sub.add_parser("to-f32")
    f.add_argument("src")
    f.add_argument("dst")
    r = sub.add_parser("routing")
    r.add_argument("--gguf", required=True)
    r.add_argument("--text", required=True)
    r.add_argument("--ctx", type=int, default=128)
    r.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.to_f32:
        to_f32(*a.to_f32)
        print("wrote %s" % a.to_f32[1])
        return
    cmds = dict(train=cmd_train, eval=cmd_eval, tokenize=cmd_tokenize, logits=cmd_logits,
                greedy=cmd_greedy, routing=cmd_routing, compare=cmd_compare,
                safetensors=cmd_safetensors)
    cmds["to-f32"] = cmd_to_f32
    if a.cmd not in cmds:
        ap.print_help()
        sys.exit(2)
    cmds[a.cmd](a)


if __name__ == "__main__":
    main()
