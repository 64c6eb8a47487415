"""moetier - a pure-Python binding of libmoetier (ctypes, no build step).

    import moetier
    with moetier.connect(socket="/run/moetier/moetierd.sock") as c:
        info = c.model_info()
        lease = c.acquire(layer=0, ids=[3, 5])          # slots, -1 = miss
        w = c.expert_array(lease.tiers[0], lease.slots[0])  # numpy, read-only
        lease.release()

Host-tier experts come out as numpy arrays (read-only views of the daemon's
arena, mapped once at attach) or as DLPack capsules (`expert_dlpack`, or pass
the object returned by `expert_tensor` to numpy.from_dlpack /
torch.utils.dlpack.from_dlpack). The arena mapping is PROT_READ: a consumer
that writes through a DLPack view crashes. A Python object holding a view
keeps the client alive; release the lease before the view is dropped only if
you no longer read it (the daemon may reuse the slot after release).

The library is found through $MOETIER_LIB, then the loader's search path
(libmoetier.so.0).
"""
import ctypes
import ctypes.util
import os

try:
    import numpy as _np
except ImportError:  # numpy is optional: lists are returned instead
    _np = None

MAX_BATCH = 32
TIER_GPU, TIER_HOST, TIER_NVME = 0, 1, 2
F_NOWAIT, F_WANT_GPU = 1, 2
# cache-aware ROUTE (proto.h enum moet_route_rule / _weights / _tiers)
ROUTE_EXACT, ROUTE_MARGIN, ROUTE_LOW_WEIGHT, ROUTE_SIMILARITY = 0, 1, 2, 3
ROUTE_RULES = {"exact": ROUTE_EXACT, "margin": ROUTE_MARGIN, "low-weight": ROUTE_LOW_WEIGHT,
               "similarity": ROUTE_SIMILARITY}
ROUTE_WEIGHTS = {None: 0, "family": 1, "renorm": 2, "inherit": 3}
ROUTE_TIER_GPU, ROUTE_TIER_HOST = 1, 2
STATS_TEXT, STATS_JSON, STATS_PROMETHEUS = 0, 1, 2
E_UNAVAILABLE, E_VERSION, E_DISCONNECTED, E_REFUSED, E_CAPS = -10001, -10002, -10003, -10004, -10005
CAP_RING, CAP_HOST_ARENA, CAP_GPU_EMU, CAP_GPU_VMM, CAP_ROUTE, CAP_COMPUTE, CAP_ADMIN = (1 << i for i in range(7))


class _ConnectOpts(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("socket_path", ctypes.c_char_p), ("model", ctypes.c_char_p),
                ("client_name", ctypes.c_char_p), ("caps_wanted", ctypes.c_uint32),
                ("control_only", ctypes.c_uint32), ("spin_us", ctypes.c_int)]


class _ModelInfo(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("name", ctypes.c_char * 64),
                ("family", ctypes.c_uint32), ("dtype", ctypes.c_uint32), ("hidden", ctypes.c_uint32),
                ("expert_width", ctypes.c_uint32), ("n_experts", ctypes.c_uint32), ("top_k", ctypes.c_uint32),
                ("n_moe_layers", ctypes.c_uint32), ("first_moe_layer", ctypes.c_uint32),
                ("moe_layer_step", ctypes.c_uint32), ("expert_bytes", ctypes.c_uint64),
                ("slot_bytes", ctypes.c_uint64 * 2), ("n_slots", ctypes.c_uint32 * 2),
                ("caps", ctypes.c_uint32), ("client_id", ctypes.c_uint32), ("protocol", ctypes.c_uint32)]


class _RouteArgs(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("rule", ctypes.c_uint), ("keep_top", ctypes.c_uint),
                ("margin", ctypes.c_float), ("max_share", ctypes.c_float), ("min_similarity", ctypes.c_float),
                ("weights", ctypes.c_uint), ("tiers", ctypes.c_uint),
                ("subst_mask", ctypes.c_uint32), ("open_mask", ctypes.c_uint32), ("n_resident", ctypes.c_uint32),
                ("exact", ctypes.c_uint32 * MAX_BATCH), ("exact_weights", ctypes.c_float * MAX_BATCH)]


def _load():
    names = [os.environ.get("MOETIER_LIB"), "libmoetier.so.0", ctypes.util.find_library("moetier")]
    err = None
    for n in names:
        if not n:
            continue
        try:
            return ctypes.CDLL(n)
        except OSError as e:
            err = e
    raise OSError("libmoetier not found (set MOETIER_LIB): %s" % err)


_lib = _load()
_P = ctypes.c_void_p
_u32p = ctypes.POINTER(ctypes.c_uint32)
_i32p = ctypes.POINTER(ctypes.c_int32)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_u64p = ctypes.POINTER(ctypes.c_uint64)
for name, res, args in [
    ("moet_connect", ctypes.c_int, [ctypes.POINTER(_ConnectOpts), ctypes.POINTER(_P)]),
    ("moet_close", None, [_P]),
    ("moet_model_info", ctypes.c_int, [_P, ctypes.POINTER(_ModelInfo)]),
    ("moet_acquire", ctypes.c_int, [_P, ctypes.c_uint32, _u32p, ctypes.c_uint, ctypes.c_uint, _i32p, _u8p, _u64p]),
    ("moet_release", ctypes.c_int, [_P, ctypes.c_uint64]),
    ("moet_route", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.POINTER(ctypes.c_float), ctypes.c_uint, ctypes.c_uint,
                                  _u32p, ctypes.POINTER(ctypes.c_float), _i32p, _u8p, _u64p]),
    ("moet_route_opts", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.POINTER(ctypes.c_float), ctypes.c_uint,
                                       ctypes.c_uint, ctypes.POINTER(_RouteArgs), _u32p,
                                       ctypes.POINTER(ctypes.c_float), _i32p, _u8p, _u64p]),
    ("moet_compute", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _u32p,
                                    ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float),
                                    ctypes.POINTER(ctypes.c_float)]),
    ("moet_prefetch", ctypes.c_int, [_P, ctypes.c_uint32, _u32p, ctypes.c_uint, ctypes.c_uint]),
    ("moet_slot_ptr", ctypes.c_void_p, [_P, ctypes.c_uint, ctypes.c_int32]),
    ("moet_resident", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint, _u8p, ctypes.c_uint]),
    ("moet_wait_ready", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_int]),
    ("moet_expert_counters", ctypes.c_int, [_P, _u64p, _u64p, _u64p, _u64p]),
    ("moet_stats", ctypes.c_int, [_P, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]),
    ("moet_clients", ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_void_p)]),
    ("moet_config_get", ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]),
    ("moet_config_set", ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    ("moet_pin", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint]),
    ("moet_unpin", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint]),
    ("moet_evict", ctypes.c_int, [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint]),
    ("moet_strerror", ctypes.c_char_p, [ctypes.c_int]),
    ("moet_last_error", ctypes.c_char_p, [_P]),
]:
    f = getattr(_lib, name)
    f.restype = res
    f.argtypes = args
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


class MoetierError(OSError):
    """A libmoetier failure; .code is the negative return code."""

    def __init__(self, code, detail=""):
        msg = _lib.moet_strerror(code).decode()
        super().__init__(-code, msg + (": " + detail if detail else ""))
        self.code = code


class Unavailable(MoetierError):
    """No daemon is running: the caller should use its own weights."""


def _check(rc, ctx=None):
    if rc < 0:
        detail = (_lib.moet_last_error(ctx) or b"").decode(errors="replace")
        raise (Unavailable if rc == E_UNAVAILABLE else MoetierError)(rc, detail)
    return rc


# ---- DLPack (v0.x ABI), built with ctypes -----------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
# The destructor gets the dying capsule as a raw pointer: wrapping it in a
# py_object would touch the reference count of an object being freed.
_CAPSULE_DTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_pyapi = ctypes.pythonapi
_pyapi.PyCapsule_New.restype = ctypes.py_object
_pyapi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_pyapi.PyCapsule_IsValid.restype = ctypes.c_int
_pyapi.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_pyapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_pyapi.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_live = {}  # address of a DLManagedTensor -> what it keeps alive


@_DELETER
def _dl_deleter(mt):
    _live.pop(ctypes.addressof(mt.contents), None)


@_CAPSULE_DTOR
def _capsule_dtor(cap):
    # Not consumed (still named "dltensor"): the producer frees it.
    if _pyapi.PyCapsule_IsValid(cap, b"dltensor"):
        _live.pop(_pyapi.PyCapsule_GetPointer(cap, b"dltensor"), None)


def _dlpack_capsule(ptr, nbytes, owner):
    shape = (ctypes.c_int64 * 1)(nbytes)
    mt = _DLManagedTensor()
    mt.dl_tensor.data = ptr
    mt.dl_tensor.device = _DLDevice(1, 0)  # kDLCPU
    mt.dl_tensor.ndim = 1
    mt.dl_tensor.dtype = _DLDataType(1, 8, 1)  # kDLUInt, 8 bits
    mt.dl_tensor.shape = shape
    mt.dl_tensor.strides = None
    mt.dl_tensor.byte_offset = 0
    mt.deleter = _dl_deleter
    _live[ctypes.addressof(mt)] = (mt, shape, owner)
    return _pyapi.PyCapsule_New(ctypes.addressof(mt), b"dltensor", ctypes.cast(_capsule_dtor, ctypes.c_void_p))


class ExpertTensor:
    """An expert's payload bytes as a DLPack producer (CPU, uint8[n])."""

    def __init__(self, client, ptr, nbytes):
        self._client, self._ptr, self._n = client, ptr, nbytes

    def __dlpack__(self, stream=None, **kw):
        return _dlpack_capsule(self._ptr, self._n, self._client)

    def __dlpack_device__(self):
        return (1, 0)


class Lease:
    """The result of acquire/route: slots (-1 = miss), tiers, and the lease."""

    def __init__(self, client, ids, slots, tiers, lease, weights=None):
        self.client, self.ids, self.slots, self.tiers, self.lease, self.weights = client, ids, slots, tiers, lease, weights

    @property
    def hits(self):
        return sum(1 for s in self.slots if s >= 0)

    def release(self):
        if self.lease:
            self.client.release(self.lease)
            self.lease = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.release()


class Client:
    def __init__(self, socket=None, model=None, name="python", caps=0, control_only=False, spin_us=-1):
        self._ctx = None
        opts = _ConnectOpts(ctypes.sizeof(_ConnectOpts), socket.encode() if socket else None,
                            model.encode() if model else None, name.encode(), caps, 1 if control_only else 0, spin_us)
        ctx = _P()
        _check(_lib.moet_connect(ctypes.byref(opts), ctypes.byref(ctx)))
        self._ctx = ctx
        mi = _ModelInfo()
        mi.size = ctypes.sizeof(mi)
        _check(_lib.moet_model_info(ctx, ctypes.byref(mi)), ctx)
        self.info = {f: getattr(mi, f) for f, _ in _ModelInfo._fields_ if f not in ("size", "slot_bytes", "n_slots")}
        self.info["name"] = mi.name.decode()
        self.info["slot_bytes"] = list(mi.slot_bytes)
        self.info["n_slots"] = list(mi.n_slots)

    def model_info(self):
        return dict(self.info)

    def close(self):
        if self._ctx:
            _lib.moet_close(self._ctx)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def __del__(self):
        # Views (numpy arrays, DLPack capsules) hold a reference to the
        # client, so the mapping outlives every view.
        self.close()

    def acquire(self, layer, ids, nowait=False, want_gpu=False):
        ids = [int(i) for i in ids]
        n = len(ids)
        if not 0 < n <= MAX_BATCH:
            raise ValueError("1..%d experts per acquire" % MAX_BATCH)
        a_ids = (ctypes.c_uint32 * n)(*ids)
        slots = (ctypes.c_int32 * n)()
        tiers = (ctypes.c_uint8 * n)()
        lease = ctypes.c_uint64()
        flags = (F_NOWAIT if nowait else 0) | (F_WANT_GPU if want_gpu else 0)
        _check(_lib.moet_acquire(self._ctx, layer, a_ids, n, flags, slots, tiers, ctypes.byref(lease)), self._ctx)
        return Lease(self, ids, list(slots), list(tiers), lease.value)

    def release(self, lease):
        return _check(_lib.moet_release(self._ctx, int(lease)), self._ctx)

    def route(self, layer, logits, nowait=False, keep=None, margin=None, rule=None, max_share=0.0,
              min_similarity=0.0, weights=None, tiers=0):
        """Routing by the daemon (the model's rule), then an acquire of the experts.
        Cache-aware when keep (J) or rule is given (doc/routing.md): the slots after the
        router's top-J whose expert is not resident may take a resident one; rule is
        "margin" (default; margin defaults to +inf), "low-weight" (max_share, 0 = 0.25),
        "similarity" or "exact"; weights None (the rule's), "family", "renorm", "inherit";
        tiers 0 (GPU or host), ROUTE_TIER_GPU, ROUTE_TIER_HOST. The Lease then also has
        .substituted (per slot), .subst_mask, .open_mask, .exact, .exact_weights,
        .n_resident. A malformed request raises MoetierError (-EINVAL) saying why."""
        vals = [float(x) for x in logits]
        arr = (ctypes.c_float * len(vals))(*vals)
        ex = (ctypes.c_uint32 * MAX_BATCH)()
        w = (ctypes.c_float * MAX_BATCH)()
        slots = (ctypes.c_int32 * MAX_BATCH)()
        tr = (ctypes.c_uint8 * MAX_BATCH)()
        lease = ctypes.c_uint64()
        flags = F_NOWAIT if nowait else 0
        if keep is None and rule is None:
            k = _check(_lib.moet_route(self._ctx, layer, arr, len(vals), flags, ex, w, slots, tr,
                                       ctypes.byref(lease)), self._ctx)
            return Lease(self, list(ex[:k]), list(slots[:k]), list(tr[:k]), lease.value, list(w[:k]))
        rule = "margin" if rule is None else rule
        if rule not in ROUTE_RULES or weights not in ROUTE_WEIGHTS:
            raise ValueError("rule must be one of %s, weights one of %s" % (sorted(ROUTE_RULES),
                                                                            [k for k in ROUTE_WEIGHTS if k]))
        a = _RouteArgs()
        a.size = ctypes.sizeof(a)
        a.rule = ROUTE_RULES[rule]
        a.keep_top = self.info["top_k"] if keep is None else int(keep)
        a.margin = float("inf") if margin is None else float(margin)
        a.max_share = float(max_share)
        a.min_similarity = float(min_similarity)
        a.weights = ROUTE_WEIGHTS[weights]
        a.tiers = int(tiers)
        k = _check(_lib.moet_route_opts(self._ctx, layer, arr, len(vals), flags, ctypes.byref(a), ex, w, slots, tr,
                                        ctypes.byref(lease)), self._ctx)
        r = Lease(self, list(ex[:k]), list(slots[:k]), list(tr[:k]), lease.value, list(w[:k]))
        r.subst_mask, r.open_mask, r.n_resident = a.subst_mask, a.open_mask, a.n_resident
        r.substituted = [bool(a.subst_mask >> i & 1) for i in range(k)]
        r.exact = list(a.exact[:k])
        r.exact_weights = list(a.exact_weights[:k])
        return r

    def compute(self, layer, experts, weights, x):
        """Expert FFNs on the daemon's host tier. experts, weights: [tokens][k];
        x: [tokens][hidden] floats. Returns y like x (numpy when available).
        Raises MoetierError with code -EAGAIN (11) when an expert is not resident yet."""
        T, k, n = len(experts), len(experts[0]), self.info["hidden"]
        flat_e = [int(e) for row in experts for e in row]
        flat_w = [float(v) for row in weights for v in row]
        flat_x = [float(v) for row in x for v in row]
        if len(flat_e) != T * k or len(flat_w) != T * k or len(flat_x) != T * n:
            raise ValueError("experts/weights must be [tokens][k], x [tokens][hidden]")
        y = (ctypes.c_float * (T * n))()
        _check(_lib.moet_compute(self._ctx, layer, T, k, (ctypes.c_uint32 * (T * k))(*flat_e),
                                 (ctypes.c_float * (T * k))(*flat_w), (ctypes.c_float * (T * n))(*flat_x), y), self._ctx)
        if _np is not None:
            return _np.array(y, dtype=_np.float32).reshape(T, n)
        return [list(y[t * n:(t + 1) * n]) for t in range(T)]

    def prefetch(self, layer, ids, tier=TIER_HOST):
        ids = [int(i) for i in ids][:MAX_BATCH]
        return _check(_lib.moet_prefetch(self._ctx, layer, (ctypes.c_uint32 * len(ids))(*ids), len(ids), tier), self._ctx)

    def _ptr(self, tier, slot):
        p = _lib.moet_slot_ptr(self._ctx, tier, slot)
        if not p:
            raise ValueError("tier %d slot %d is not mapped" % (tier, slot))
        return p

    def expert_bytes(self, tier, slot):
        """A copy of the expert's payload as bytes."""
        return ctypes.string_at(self._ptr(tier, slot), self.info["expert_bytes"])

    def expert_array(self, tier, slot):
        """A read-only numpy uint8 view of the payload (no copy)."""
        if _np is None:
            raise RuntimeError("numpy is not installed")
        n = self.info["expert_bytes"]
        buf = (ctypes.c_uint8 * n).from_address(self._ptr(tier, slot))
        buf._owner = self  # the array's base keeps the client (the mapping) alive
        a = _np.frombuffer(buf, dtype=_np.uint8)
        a.flags.writeable = False
        return a

    def expert_tensor(self, tier, slot):
        """A DLPack producer for the payload (numpy.from_dlpack, torch)."""
        return ExpertTensor(self, self._ptr(tier, slot), self.info["expert_bytes"])

    def expert_dlpack(self, tier, slot):
        """A raw "dltensor" PyCapsule for the payload."""
        return _dlpack_capsule(self._ptr(tier, slot), self.info["expert_bytes"], self)

    def resident(self, layer, tier=TIER_HOST):
        n = self.info["n_experts"]
        m = (ctypes.c_uint8 * n)()
        _check(_lib.moet_resident(self._ctx, layer, tier, m, n), self._ctx)
        return _np.array(m, dtype=bool) if _np is not None else [bool(x) for x in m]

    def wait_ready(self, layer, timeout_ms=1000):
        return _check(_lib.moet_wait_ready(self._ctx, layer, timeout_ms), self._ctx) == 1

    def expert_counters(self):
        """Per-(layer, expert) hits, misses, loads, bytes, shaped [layers][experts] (EPLB)."""
        L, E = self.info["n_moe_layers"], self.info["n_experts"]
        arrs = [(ctypes.c_uint64 * (L * E))() for _ in range(4)]
        _check(_lib.moet_expert_counters(self._ctx, *arrs), self._ctx)
        out = {}
        for k, a in zip(("hits", "misses", "loads", "bytes"), arrs):
            out[k] = _np.array(a, dtype=_np.uint64).reshape(L, E) if _np is not None else \
                [list(a[l * E:(l + 1) * E]) for l in range(L)]
        return out

    def _text(self, fn, *args):
        p = ctypes.c_void_p()
        _check(fn(self._ctx, *args, ctypes.byref(p)), self._ctx)
        try:
            return ctypes.string_at(p).decode()
        finally:
            _libc.free(p)

    def stats(self, fmt=STATS_TEXT):
        return self._text(_lib.moet_stats, fmt)

    def clients(self):
        return self._text(_lib.moet_clients)

    def config_get(self, name=None):
        return self._text(_lib.moet_config_get, name.encode() if name else None)

    def config_set(self, name, value):
        return _check(_lib.moet_config_set(self._ctx, name.encode(), str(value).encode()), self._ctx)

    def pin(self, layer, expert, tier=TIER_HOST):
        return _check(_lib.moet_pin(self._ctx, layer, expert, tier), self._ctx)

    def unpin(self, layer, expert, tier=TIER_HOST):
        return _check(_lib.moet_unpin(self._ctx, layer, expert, tier), self._ctx)

    def evict(self, layer, expert, tier=TIER_HOST):
        return _check(_lib.moet_evict(self._ctx, layer, expert, tier), self._ctx)


def connect(socket=None, model=None, name="python", **kw):
    """Attach to moetierd; raises Unavailable when no daemon runs."""
    return Client(socket=socket, model=model, name=name, **kw)
