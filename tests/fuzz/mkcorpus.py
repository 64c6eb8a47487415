#!/usr/bin/python3
"""mkcorpus.py - writes the seed corpora of fuzz_ring and fuzz_ctl
(tests/fuzz/corpus/{ring,ctl}/), and of fuzz_pack when given packs:

    tests/fuzz/mkcorpus.py [PACK...]

Each seed is one well-formed use of one entry or message (the fuzzer starts
from the shapes the decoders accept); the layouts are include/moetier/proto.h's.
The committed pack seeds were made from moe-gen models of 2 layers
(`moe-gen model --family qwen2_moe --preset tiny --layers 2 --experts 2
--hidden 16 --width 8 --vocab 8 --heads 1 --kv-heads 1 --head-dim 16
--format gguf`, then `moe-pack convert`, with and without --experts-only;
deepseek_v2 with 4 experts from safetensors)."""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

OP_NOP, OP_ACQUIRE, OP_RELEASE, OP_PREFETCH, OP_ROUTE, OP_COMPUTE = 1, 2, 3, 4, 5, 6
F_NOWAIT, F_WANT_GPU = 1, 2
MAGIC = 0x544F454D
HELLO, SUBMIT, STATS, CONFIG_GET, CONFIG_SET, PIN, UNPIN, EVICT, CLIENTS = 1, 4, 16, 17, 18, 19, 20, 21, 22
GPU_EXPORT, ADVISE, LATENT_BASIS = 24, 25, 26


def sqe(op, flags=0, layer=0, ids=(), tag=7, lease=0, off=0, dlen=0, tier=0, key=0, pos=0):
    ids = list(ids) + [0] * (32 - len(ids))
    return struct.pack('<BBHIQQIIIIII32H', op, flags, 0, layer, tag, lease, off, dlen, tier, key, pos, 0, *ids)


def entry(op, flags=0, layer=0, ids=(), **kw):
    b = bytearray(sqe(op, flags, layer, ids, **kw))
    struct.pack_into('<H', b, 2, len(ids))
    return bytes(b)


def ring_input(scratch, entries):
    return struct.pack('<H', len(scratch)) + scratch + b''.join(entries)


def f32(*v):
    return struct.pack('<%df' % len(v), *v)


def ring_seeds():
    lease1 = (1 << 32) | 1
    logits = f32(0.5, -1.0, 2.0, 0.1, 3.0, -0.2, 0.0, 1.5)
    comp = struct.pack('<IIII', 1, 2, 0, 0) + struct.pack('<2I', 1, 3) + f32(0.6, 0.4) + f32(*[0.01 * i for i in range(64)]) \
        + f32(*[0.0] * 64)
    yield 'acquire', ring_input(b'', [entry(OP_ACQUIRE, F_NOWAIT, 0, [0, 1]), entry(OP_ACQUIRE, 0, 1, [2, 3, 4])])
    yield 'acquire-release', ring_input(b'', [entry(OP_ACQUIRE, 0, 0, [5]), entry(OP_RELEASE, lease=lease1)])
    yield 'acquire-gpu', ring_input(b'', [entry(OP_ACQUIRE, F_WANT_GPU, 1, [6, 7])])
    yield 'route', ring_input(logits, [entry(OP_ROUTE, 0, 1, off=0, dlen=32)])
    yield 'route-nowait-off', ring_input(b'\0' * 64 + logits, [entry(OP_ROUTE, F_NOWAIT, 0, off=64, dlen=32)])
    yield 'compute', ring_input(comp, [entry(OP_ACQUIRE, 0, 0, [1, 3]), entry(OP_COMPUTE, 0, 0, off=0, dlen=len(comp))])
    yield 'prefetch', ring_input(b'', [entry(OP_PREFETCH, 0, 1, list(range(8)), tier=1)])
    yield 'nop-token', ring_input(b'', [entry(OP_NOP, key=1234, pos=3), entry(OP_ACQUIRE, 0, 0, [2], key=1234, pos=3)])
    yield 'bad', ring_input(b'', [entry(OP_ACQUIRE, 0, 0, []), entry(OP_ACQUIRE, 0, 9, [1]), entry(OP_ACQUIRE, 0xff, 0, [1]),
                                 entry(99), entry(OP_RELEASE, lease=0xffffffff00000005)])


def rec(mode, body):
    return struct.pack('<BH', mode, len(body)) + body


def msg(mtype, arg=0, payload=b''):
    return rec(1, struct.pack('<HI', mtype, arg) + payload)


def hello(flags=0, name=b'fuzz', model=b''):
    return msg(HELLO, 0, struct.pack('<IIII', 1, 1, 0, flags) + name.ljust(32, b'\0') + model.ljust(64, b'\0'))


def ctl_seeds():
    data, ctl = hello(), hello(1)
    yield 'hello', data
    yield 'hello-control', ctl
    yield 'hello-model', hello(0, model=b'tiers-test')
    yield 'hello-badversion', msg(HELLO, 0, struct.pack('<IIII', 5, 9, 0, 0) + b'\0' * 96)
    yield 'stats', ctl + msg(STATS, 0) + msg(STATS, 1) + msg(STATS, 2) + msg(STATS, 0x102)
    yield 'config', ctl + msg(CONFIG_GET, 0, b'') + msg(CONFIG_GET, 0, b'wait-timeout-ms\0') + \
        msg(CONFIG_SET, 0, b'client-share=40\0') + msg(CONFIG_SET, 0, b'log-level=warn\0') + msg(CONFIG_SET, 0, b'pack=x\0')
    ea = struct.pack('<IIII', 1, 2, 1, 0)
    yield 'pin', ctl + msg(PIN, 0, ea) + msg(UNPIN, 0, ea) + msg(EVICT, 0, ea) + msg(PIN, 0, struct.pack('<IIII', 0, 3, 0, 0))
    yield 'clients', data + msg(CLIENTS)
    yield 'gpu-export', data + msg(GPU_EXPORT, 0) + msg(GPU_EXPORT, 5)
    yield 'advise', data + msg(ADVISE, 0, struct.pack('<IIII', 0, 4, 2, 0) + struct.pack('<32I', 1, 2, *([0] * 30)))
    yield 'latent-basis', data + msg(LATENT_BASIS, 0, struct.pack('<IIII', 0, 0, 0, 0)) + \
        msg(LATENT_BASIS, 0, struct.pack('<IIII', 7, 0, 0, 0)) + msg(LATENT_BASIS, 0, struct.pack('<II', 0, 0))
    yield 'submit', data + msg(SUBMIT, 0, entry(OP_ACQUIRE, 0, 0, [1, 2])) + msg(SUBMIT, 0, entry(OP_RELEASE, lease=(1 << 32) | 1))
    yield 'unknown', data + msg(99) + msg(HELLO, 0, b'')
    yield 'before-hello', msg(STATS, 0)
    hdr = struct.pack('<IHHIiII', MAGIC ^ 1, 1, HELLO, 1, 0, 0, 0)
    yield 'raw-badmagic', rec(0, hdr) + rec(2, hdr)
    yield 'raw-short', rec(0, b'MOET')
    yield 'raw-badlen', rec(0, struct.pack('<IHHIiII', MAGIC, 1, HELLO, 1, 0, 0, 500) + b'\0' * 112)


def write(sub, name, data):
    d = os.path.join(HERE, 'corpus', sub)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def main():
    for name, data in ring_seeds():
        write('ring', name, data)
    for name, data in ctl_seeds():
        write('ctl', name, data)
    for p in sys.argv[1:]:
        img = open(p, 'rb').read()
        base = os.path.splitext(os.path.basename(p))[0]
        write('pack', base + '-fixcrc', b'\x03' + img)
        write('pack', base + '-raw', b'\x00' + img)


if __name__ == '__main__':
    main()
