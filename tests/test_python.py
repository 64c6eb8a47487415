"""Checks of client/python/moetier.py against a running moetierd (started
by tests/test_python.sh). argv: socket, pack file. Exit 77 (skipped) when
numpy is absent: the array and DLPack checks need it, and a run without
them is not a pass."""
import hashlib
import struct
import sys

import moetier

try:
    import numpy as np
except ImportError:
    np = None

sock, pack = sys.argv[1], sys.argv[2]


def pack_extent(layer, expert):
    """Payload of (layer, expert) read straight from the pack (independent
    of the daemon): header fields per core/pack.h."""
    with open(pack, "rb") as f:
        hdr = f.read(4096)
        # struct pack_header_disk: magic[8] version header_size header_crc flags
        # (24), model (316 bytes), n_parts, reserved0 (-> 348), parts[8] of 32 B
        # aligned to 8 (352 .. 608), then extent_payload, extent_bytes,
        # index_offset, index_count. Checked below: e_len == extent_payload.
        off = 608
        payload, _, index_off, _ = struct.unpack_from("<QQQQ", hdr, off)
        n_experts = struct.unpack_from("<I", hdr, 24 + 64 + 16)[0]
        f.seek(index_off + (layer * n_experts + expert) * 32)
        e_off, e_len = struct.unpack("<QQ", f.read(16))
        assert e_len == payload
        f.seek(e_off)
        return f.read(e_len)


try:
    moetier.connect(socket="/nonexistent/x.sock")
    raise SystemExit("connect to nothing did not raise")
except moetier.Unavailable:
    pass

with moetier.connect(socket=sock, name="pytest") as c:
    info = c.model_info()
    assert info["n_experts"] == 16 and info["n_moe_layers"] == 3, info
    with c.acquire(1, [2, 7]) as lease:
        assert lease.slots[0] >= 0 and lease.slots[1] >= 0, lease.slots
        want = pack_extent(1, 2)
        got = c.expert_bytes(lease.tiers[0], lease.slots[0])
        assert got == want, "bytes differ from the pack"
        if np is not None:
            a = c.expert_array(lease.tiers[0], lease.slots[0])
            assert not a.flags.writeable
            assert a.tobytes() == want
            d = np.from_dlpack(c.expert_tensor(lease.tiers[1], lease.slots[1]))
            assert d.dtype == np.uint8 and d.shape == (info["expert_bytes"],)
            assert hashlib.sha256(d.tobytes()).digest() == hashlib.sha256(pack_extent(1, 7)).digest()
            m = c.resident(1)
            assert m.dtype == bool and m[2] and m[7], m
            cnt = c.expert_counters()
            assert cnt["hits"].shape == (3, 16)
            assert cnt["hits"][1, 2] + cnt["misses"][1, 2] >= 1
            # The DLPack view is the slot itself, not a copy.
            v = np.from_dlpack(c.expert_tensor(lease.tiers[0], lease.slots[0]))
            assert v.tobytes() == want
        cap = c.expert_dlpack(lease.tiers[0], lease.slots[0])
        assert type(cap).__name__ == "PyCapsule"
        del cap
    logits = [0.0] * 16
    logits[11], logits[4] = 3.0, 2.0
    r = c.route(0, logits)
    assert r.ids[:2] == [11, 4], r.ids
    assert r.weights[0] > r.weights[1] > 0
    r.release()
    try:
        c.release(r.lease or 0x100000007)
        raise SystemExit("stale release did not raise")
    except moetier.MoetierError as e:
        assert e.code < 0
    # COMPUTE: experts 2 and 7 of layer 1 are resident (acquired above).
    n = info["hidden"]
    y = c.compute(1, [[2, 7]], [[0.5, 0.5]], [[0.01 * i for i in range(n)]])
    assert len(y) == 1 and len(y[0]) == n
    y2 = c.compute(1, [[7, 2]], [[1.0, 0.0]], [[0.01 * i for i in range(n)]])
    y3 = c.compute(1, [[7]], [[1.0]], [[0.01 * i for i in range(n)]])
    assert list(y2[0]) == list(y3[0]), "weight 0 must not change the result"
    assert "server_clients_accepted" in c.stats()
    assert "ring-spin-us" in c.config_get("ring-spin-us")
if np is None:
    print("python binding: the checks without numpy passed; numpy is absent, so the array and DLPack checks did not run: skipped")
    sys.exit(77)
print("python binding: ok (with numpy %s: arrays and DLPack checked)" % np.__version__)
