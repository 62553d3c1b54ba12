"""Fixed cost of the sparse kernels on BERT-base shapes (M = 128 rows, 2 threads).

    python benchmarks/sparse_fixed_cost.py [--calls 200] [--format csr 1x4] [--shapes 768x3088]

Per shape and format, the median time of ``--calls`` calls at density 0
(no nonzeros: the time is the fixed cost - input transpose, output stores,
epilogue, parallel regions) and at density 0.1, with no epilogue and with
the epilogue BERT uses for that shape (QKV: bias; attention output and FF2:
bias + residual; FF1: bias + GELU).  ``FF pair`` is FF1 (768 -> 3072, bias,
GELU) followed by FF2 (3072 -> 768, bias, residual) as two calls, and
``FF chained`` the same pair with FF1 writing its result straight into the
transposed workspace FF2 reads (``xnext`` / ``xready`` of
:func:`sparseinfer.kernels.csr.chain_kernel`).
Times in microseconds, median / 10th percentile.  Before each shape the script
waits (``--max-wait`` s) for other processes to go quiet; absolute times still
drift by tens of percent here, so compare variants in the same run.
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

from sparseinfer.kernels import bsr as B  # noqa: E402
from sparseinfer.kernels import csr as C  # noqa: E402

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
    """(kernel, packing function, workspace) for one format."""
    if block is None:
        return C.csr_kernel(M), C.pack_csr, C.make_workspace(M, K)
    return B.bsr_kernel(block, M), lambda W: B.pack_bsr(W, block), B.make_workspace(M, K, N, block)


def median_us(fn, calls):
    """Median and 10th percentile (us) of ``calls`` calls."""
    fn()
    fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(ts)), 1e6 * float(np.percentile(ts, 10))


def one_shape(M, K, N, block, calls, rng):
    kernel, pack, (xt, ot) = operands(M, K, N, block)
    X = rng.standard_normal((M, K), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    use_b, use_r, act = BERT_EPILOGUE.get((K, N), (True, True, C.ACT_NONE))
    bias = rng.standard_normal(N, dtype=np.float32) if use_b else None
    res = rng.standard_normal((M, N), dtype=np.float32) if use_r else None
    row = []
    for dens in (0.0, 0.1):
        indptr, indices, data = pack(weight(rng, K, N, block, dens))
        row.append(median_us(lambda: kernel(X, indptr, indices, data, None, None, out, C.ACT_NONE, xt, ot), calls))
        row.append(median_us(lambda: kernel(X, indptr, indices, data, bias, res, out, act, xt, ot), calls))
    return row


def ff_pair(M, block, calls, rng):
    """FF1 + FF2 as two plain calls, and chained through FF2's transposed workspace."""
    K, H = 768, 3072
    r, c = block or (1, 1)
    lanes = B.chunk_rows(c)
    kernel = C.chain_kernel(r, c, C.lanes_for(M, lanes))
    _, pack, ws1 = operands(M, K, H, block)
    _, _, ws2 = operands(M, H, K, block)
    xnext = C.chain_workspace(M, H, lanes)
    X = rng.standard_normal((M, K), dtype=np.float32)
    x_rows, no_out = np.empty((M, 0), np.float32), np.empty((0, H), np.float32)
    mid = np.empty((M, H), np.float32)
    out = np.empty((M, K), np.float32)
    b1 = rng.standard_normal(H, dtype=np.float32)
    b2 = rng.standard_normal(K, dtype=np.float32)
    res = rng.standard_normal((M, K), dtype=np.float32)
    rows = {"FF pair": [], "FF chained": []}
    for dens in (0.0, 0.1):
        W1, W2 = pack(weight(rng, K, H, block, dens)), pack(weight(rng, H, K, block, dens))

        def pair():
            kernel(X, *W1, b1, None, mid, C.ACT_GELU, *ws1, C.NO_NEXT, False, C.NO_ORDER)
            kernel(mid, *W2, b2, res, out, C.ACT_NONE, *ws2, C.NO_NEXT, False, C.NO_ORDER)

        def chained():
            kernel(X, *W1, b1, None, no_out, C.ACT_GELU, *ws1, xnext, False)
            kernel(x_rows, *W2, b2, res, out, C.ACT_NONE, xnext, ws2[1], C.NO_NEXT, True, C.NO_ORDER)

        rows["FF pair"].append(median_us(pair, calls))
        rows["FF chained"].append(median_us(chained, calls))
    return rows


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
    print(f"{'format':>6s} {'K x N':>11s} | {'d=0':>13s} {'d=0 ep':>13s} | {'d=.1':>13s} {'d=.1 ep':>13s}")
    for fmt in a.format:
        block = None if fmt == "csr" else tuple(int(v) for v in fmt.split("x"))
        for K, N in shapes:
            wait_for_quiet(a.max_wait)
            r = one_shape(a.m, K, N, block, a.calls, rng)
            print(f"{fmt:>6s} {f'{K}x{N}':>11s} | {cell(r[0])} {cell(r[1])} | {cell(r[2])} {cell(r[3])}", flush=True)
        wait_for_quiet(a.max_wait)
        for name, r in ff_pair(a.m, block, a.calls, rng).items():
            print(f"{fmt:>6s} {name:>11s} | {'':13s} {cell(r[0])} | {'':13s} {cell(r[1])}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
