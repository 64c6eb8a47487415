"""Cache-aware ROUTE through the Python binding (moetier.Client.route) against
a real daemon serving a tiny qwen2_moe model (16 experts, top-4, softmax
probabilities not renormalised). Run by tests/test_python_route.sh:
    test_python_route.py SOCKET
Exits non-zero on the first wrong answer."""
import errno
import math
import sys
import time

import moetier

sock = sys.argv[1]
fails = 0


def check(cond, what):
    global fails
    if not cond:
        print("FAIL:", what)
        fails += 1


def settle(c, layer, want):
    """Makes exactly `want` host-resident in `layer` (evict the others, load these)."""
    n = c.info["n_experts"]
    for e in range(n):
        if e in want:
            continue
        for _ in range(100):
            try:
                c.evict(layer, e)
                break
            except moetier.MoetierError as ex:
                if ex.code == -errno.ENOENT:
                    break
                if ex.code != -errno.EBUSY:
                    raise
                time.sleep(0.01)
    if want:
        c.acquire(layer, sorted(want)).release()
    for _ in range(100):
        if {e for e, r in enumerate(c.resident(layer)) if r} == set(want):
            return
        time.sleep(0.01)
    raise SystemExit("residency of layer %d did not settle" % layer)


def softmax(lg):
    m = max(lg)
    z = sum(math.exp(v - m) for v in lg)
    return [math.exp(v - m) / z for v in lg]


with moetier.Client(socket=sock, name="py-route") as c:
    info = c.model_info()
    check(info["protocol"] >= 2, "protocol %d" % info["protocol"])
    check(info["n_experts"] == 16 and info["top_k"] == 4, "model %r" % info)
    lg = [-3.0] * 16
    lg[:7] = [4, 3, 2, 1.5, 1.4, 1.0, 0.5]
    p = softmax(lg)

    # plain ROUTE: exact, no cache fields
    with c.route(0, lg) as r:
        check(r.ids == [0, 1, 2, 3], "exact ids %r" % r.ids)
        check(all(abs(w - p[i]) < 1e-6 for i, w in enumerate(r.weights)), "exact weights %r" % r.weights)
        check(not hasattr(r, "substituted"), "plain route has no substitution fields")

    # expert 4 resident, 3 not: slot 3 takes 4 within margin 0.2; top-2 kept
    settle(c, 0, {0, 4})
    with c.route(0, lg, keep=2, margin=0.2) as r:
        check(r.ids == [0, 1, 2, 4], "margin ids %r" % r.ids)
        check(r.substituted == [False, False, False, True], "substituted %r" % r.substituted)
        check(r.subst_mask == 0x8 and r.open_mask == 0xC, "masks %#x %#x" % (r.subst_mask, r.open_mask))
        check(r.exact == [0, 1, 2, 3], "exact %r" % r.exact)
        check(abs(r.weights[3] - p[4]) < 1e-6, "family weight of the substitute %r" % r.weights)
        check(r.n_resident == 2, "n_resident %d" % r.n_resident)

    # the router's top-J are never replaced, whatever the margin
    settle(c, 1, {4, 5, 6})
    with c.route(1, lg, keep=2, margin=float("inf")) as r:
        check(r.ids[:2] == [0, 1], "top-J replaced: %r" % r.ids)
        check(r.ids[2:] == [4, 5], "best resident after J: %r" % r.ids)

    # low-weight rule, inherited weights: only slot 3 (share 0.05) qualifies
    settle(c, 2, {4, 5})
    with c.route(2, lg, keep=1, rule="low-weight", max_share=0.06, weights="inherit") as r:
        check(r.ids == [0, 1, 2, 4], "low-weight ids %r" % r.ids)
        check(all(abs(r.weights[i] - p[i]) < 1e-6 for i in range(4)), "inherited weights %r" % r.weights)

    # malformed requests: a clear error each
    for kw, code, words in [(dict(keep=5, margin=0.5), -errno.EINVAL, "keep-top J=5"),
                            (dict(keep=2, margin=-1.0), -errno.EINVAL, "margin -1 must be >= 0"),
                            (dict(keep=2, rule="similarity"), -errno.EOPNOTSUPP, "similarity")]:
        try:
            c.route(0, lg, **kw).release()
            check(False, "%r was accepted" % kw)
        except moetier.MoetierError as ex:
            check(ex.code == code and words in str(ex), "%r: %d %s" % (kw, ex.code, ex))
    bad = list(lg)
    bad[9] = float("nan")
    try:
        c.route(0, bad, keep=2, margin=0.5).release()
        check(False, "NaN logits accepted")
    except moetier.MoetierError as ex:
        check(ex.code == -errno.EINVAL and "logit 9 is NaN" in str(ex), "NaN: %s" % ex)
    try:
        c.route(0, lg, keep=2, rule="nope")
        check(False, "unknown rule accepted")
    except ValueError:
        pass

print("python route: %s" % ("ok" if not fails else "%d failures" % fails))
sys.exit(1 if fails else 0)
