#!/usr/bin/python3
"""logits-compare.py - compares two logits files (run-interfaces.md format:
"MOELGT01", u32 n_tokens, u32 n_vocab, then n_tokens x n_vocab f32 rows).

Usage: logits-compare.py OURS REFERENCE [--tol X] [--median-tol X] [--quiet]

The error of a row is max |ours - ref| over the vocabulary divided by that
row's scale, max |ref| (logits are only defined up to what softmax sees, so an
error means something relative to the spread of the row). Prints the worst
row's error, the median over rows, and how many rows pick a different argmax.
Exit 0 when the worst error is <= tol and the median over rows <= median-tol
(default: tol; a systematic mistake shows in every row, a rare rounding flip
in a few), 1 when it is larger (or the argmax
differs on a row whose top two reference logits are further apart than the
tolerance allows), 2 on unreadable input.
"""
import argparse
import sys

import numpy as np


def load(path):
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) != 16 or head[:8] != b"MOELGT01":
            raise ValueError(f"{path}: not a logits file")
        n, v = np.frombuffer(head[8:], dtype="<u4")
        rows = np.frombuffer(f.read(), dtype="<f4")
    if rows.size != int(n) * int(v):
        raise ValueError(f"{path}: {rows.size} floats, header says {n} x {v}")
    return rows.reshape(int(n), int(v)).astype(np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("ref")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--median-tol", type=float, default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    try:
        x, r = load(a.ours), load(a.ref)
    except (OSError, ValueError) as e:
        print(f"logits-compare: {e}", file=sys.stderr)
        return 2
    if x.shape != r.shape:
        print(f"logits-compare: shapes differ: {x.shape} vs {r.shape}", file=sys.stderr)
        return 1
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(r)):
        print("logits-compare: non-finite logits", file=sys.stderr)
        return 1
    scale = np.maximum(np.abs(r).max(axis=1), 1e-30)
    err = np.abs(x - r).max(axis=1) / scale
    worst = int(err.argmax())
    am_x, am_r = x.argmax(axis=1), r.argmax(axis=1)
    top2 = np.sort(r, axis=1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0]) / scale
    # an argmax flip only counts where the reference's top two are further
    # apart than twice the tolerance (closer ones may swap within it)
    flips = int(np.sum((am_x != am_r) & (gap > 2 * a.tol)))
    med_tol = a.tol if a.median_tol is None else a.median_tol
    med = float(np.median(err))
    ok = err.max() <= a.tol and med <= med_tol and flips == 0
    if not a.quiet or not ok:
        print(f"logits-compare: {x.shape[0]} rows x {x.shape[1]}: max rel err {err.max():.3e} (row {worst}), "
              f"median {med:.3e}, argmax differs on {int(np.sum(am_x != am_r))} rows ({flips} beyond tol); "
              f"tol {a.tol:.1e} (median {med_tol:.1e}): {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
