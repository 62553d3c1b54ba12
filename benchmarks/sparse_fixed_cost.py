"""Fixed cost of the sparse kernels on BERT-base shapes (M = 128 rows, 2 threads), called as the
engine calls them.

    python benchmarks/sparse_fixed_cost.py [--calls 200] [--format csr 1x4] [--shapes 768x3088]

Each call uses what a plan's sparse Dense step uses (:mod:`sparseinfer.runtime.sparse_lowering`):
the row chunk of ``chunk_lanes`` (64 rows per chunk at M = 128 and 2 threads, one per thread),
the pack of ``engine_pack`` (K panels of 64 KiB of the chunk's ``xt``, traversal order, int16
row indices) and the workspaces of ``workspace_shapes``.  Per shape and format, the median time
of ``--calls`` calls at density 0 (no nonzeros: the time is the fixed cost - input transpose,
output stores, epilogue, parallel regions, and the sweep of every column through every K panel)
and at density 0.1, with no epilogue and with the epilogue BERT uses for that shape (QKV: bias;
attention output and FF2: bias + residual; FF1: bias + GELU).  Then, at density 0.1 with the
epilogue, the same call with ``X.T`` already in the workspace (``xready``, as a chained
consumer), with the result left transposed for a next kernel (``xnext``, as a chained producer:
no residual, no row-major store) and with both: what the input transpose and the output store
cost inside a call.  ``FF pair`` is FF1 (768 -> 3072, bias, GELU) followed by FF2 (3072 -> 768,
bias, residual) as two calls, and ``FF chained`` the same pair with FF1 writing its result
straight into the transposed workspace FF2 reads (the plan's chain).
Times in microseconds, median / 10th percentile, the variants of a shape interleaved in rounds.
Before each shape the script waits (``--max-wait`` s) for other processes to go quiet; absolute
times still drift by tens of percent here, so compare variants in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from sparse_breakeven import wait_for_quiet  # noqa: E402

from sparseinfer.kernels import csr as C  # noqa: E402
from sparseinfer.kernels.sparse_formats import aligned_empty  # noqa: E402
from sparseinfer.runtime.sparse_lowering import chunk_lanes, engine_pack  # noqa: E402

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
# BERT's epilogue per shape: (bias, residual, activation)
BERT_EPILOGUE = {(768, 2304): (True, False, C.ACT_NONE), (768, 768): (True, True, C.ACT_NONE), (768, 3072): (True, False, C.ACT_GELU)}


def weight(rng, K, N, block, dens):
    W = rng.standard_normal((K, N), dtype=np.float32) * np.float32(0.05)
    if block is None:
        return W * (rng.random((K, N)) < dens)
    r, c = block
    keep = rng.random((-(-K // r), -(-N // c))) < dens
    return W * np.kron(keep, np.ones((r, c), bool))[:K, :N]


def operands(M, K, N, block):
    """(kernel, packing function, workspaces ``(xt, ot)``, chain workspace for the result) as a
    plan's sparse Dense step on ``M`` rows has them."""
    r, c = block or (1, 1)
    lanes = chunk_lanes(c, M)
    kernel = C.chain_kernel(r, c, C.lanes_for(M, lanes))
    xt_shape, ot_shape = C.workspace_shapes(M, max(r, -(-K // r) * r), lanes)
    ws = (aligned_empty(xt_shape), aligned_empty(ot_shape))
    return kernel, lambda W: engine_pack(W, block, M, lanes, ot_shape[0]), ws, C.chain_workspace(M, N, lanes)


def median_us(fns, calls, rounds=10):
    """Median and 10th percentile (us) of ``calls`` calls of each of ``fns``, interleaved: in each
    of ``rounds`` rounds every function runs ``calls / rounds`` times, the order rotating, so that
    a burst of load from another process or a drifting clock reaches all of them alike."""
    for fn in fns:
        fn()
        fn()
    ts = [[] for _ in fns]
    per = max(1, calls // rounds)
    for r in range(rounds):
        for i in [(r + j) % len(fns) for j in range(len(fns))]:
            for _ in range(per):
                t0 = time.perf_counter()
                fns[i]()
                ts[i].append(time.perf_counter() - t0)
    return [(1e6 * float(np.median(t)), 1e6 * float(np.percentile(t, 10))) for t in ts]


def one_shape(M, K, N, block, calls, rng):
    """Times at d = 0 and 0.1 without and with the epilogue, then at d = 0.1 with the epilogue:
    X.T given, result transposed, both."""
    kernel, pack, (xt, ot), xnext = operands(M, K, N, block)
    X = rng.standard_normal((M, K), dtype=np.float32)
    x_rows, no_out = np.empty((M, 0), np.float32), np.empty((0, N), np.float32)
    out = np.empty((M, N), np.float32)
    use_b, use_r, act = BERT_EPILOGUE.get((K, N), (True, True, C.ACT_NONE))
    bias = rng.standard_normal(N, dtype=np.float32) if use_b else None
    res = rng.standard_normal((M, N), dtype=np.float32) if use_r else None
    fns = []
    for dens in (0.0, 0.1):
        w = pack(weight(rng, K, N, block, dens))

        def call(b=None, r=None, a=C.ACT_NONE, ready=False, nxt=C.NO_NEXT, w=w):
            # with xready the kernel reads X.T from xt, where every call without it leaves the same X.T
            kernel(x_rows if ready else X, *w[:3], b, r, no_out if nxt is xnext else out, a, xt, ot, nxt, ready, w[3])

        fns += [call, lambda call=call: call(bias, res, act)]
    # the loop's last call: d = 0.1
    fns += [lambda: call(bias, res, act, ready=True), lambda: call(bias, None, act, nxt=xnext)]
    fns.append(lambda: call(bias, None, act, ready=True, nxt=xnext))
    return median_us(fns, calls)


def ff_pair(M, block, calls, rng):
    """FF1 + FF2 as two plain calls, and chained through FF2's transposed workspace."""
    K, H = 768, 3072
    kernel, pack1, ws1, xnext = operands(M, K, H, block)
    _, pack2, ws2, _ = operands(M, H, K, block)
    X = rng.standard_normal((M, K), dtype=np.float32)
    x_rows, no_out = np.empty((M, 0), np.float32), np.empty((0, H), np.float32)
    mid = np.empty((M, H), np.float32)
    out = np.empty((M, K), np.float32)
    b1 = rng.standard_normal(H, dtype=np.float32)
    b2 = rng.standard_normal(K, dtype=np.float32)
    res = rng.standard_normal((M, K), dtype=np.float32)
    fns = []
    for dens in (0.0, 0.1):
        W1, W2 = pack1(weight(rng, K, H, block, dens)), pack2(weight(rng, H, K, block, dens))

        def pair(W1=W1, W2=W2):
            kernel(X, *W1[:3], b1, None, mid, C.ACT_GELU, *ws1, C.NO_NEXT, False, W1[3])
            kernel(mid, *W2[:3], b2, res, out, C.ACT_NONE, *ws2, C.NO_NEXT, False, W2[3])

        def chained(W1=W1, W2=W2):
            kernel(X, *W1[:3], b1, None, no_out, C.ACT_GELU, *ws1, xnext, False, W1[3])
            kernel(x_rows, *W2[:3], b2, res, out, C.ACT_NONE, xnext, ws2[1], C.NO_NEXT, True, W2[3])

        fns += [pair, chained]
    t = median_us(fns, calls)
    return {"FF pair": [t[0], t[2]], "FF chained": [t[1], t[3]]}


def cell(t):
    return f"{t[0]:6.1f}/{t[1]:6.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--format", nargs="+", default=["csr"], help="csr and/or RxC blocks")
    ap.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for a quiet machine before each shape")
    ap.add_argument("--shapes", nargs="*", default=[], help="extra KxN shapes")
    a = ap.parse_args(argv)
    shapes = SHAPES + [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    rng = np.random.default_rng(0)
    print(f"M={a.m}, {THREADS} threads, median of {a.calls} calls (us); load average {os.getloadavg()}")
    print("median / 10th percentile; ep: with the BERT epilogue")
    print("at d=.1 with the epilogue: X.T given (xready), result left transposed (xnext), both")
    head = f"{'format':>6s} {'K x N':>11s} | {'d=0':>13s} {'d=0 ep':>13s} | {'d=.1':>13s} {'d=.1 ep':>13s}"
    print(head + f" | {'X.T given':>13s} {'transposed':>13s} {'both':>13s}")
    for fmt in a.format:
        block = None if fmt == "csr" else tuple(int(v) for v in fmt.split("x"))
        for K, N in shapes:
            wait_for_quiet(a.max_wait)
            r = one_shape(a.m, K, N, block, a.calls, rng)
            print(
                f"{fmt:>6s} {f'{K}x{N}':>11s} | {cell(r[0])} {cell(r[1])} | {cell(r[2])} {cell(r[3])} | {cell(r[4])} {cell(r[5])} {cell(r[6])}",
                flush=True,
            )
        wait_for_quiet(a.max_wait)
        for name, r in ff_pair(a.m, block, a.calls, rng).items():
            print(f"{fmt:>6s} {name:>11s} | {'':13s} {cell(r[0])} | {'':13s} {cell(r[1])}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
